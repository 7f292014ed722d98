"""nnUNetv2_semi_preprocess: unlabeled images preprocessed with the dataset's plans, and every bad input refused."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import DATASET_ID, plan_and_preprocess
from nnunet_semi.cli import preprocess_entry
from nnunet_semi.data.unlabeled import preprocess_unlabeled
from nnunet_semi.errors import SemiInputError
from nnunet_semi.tools.synthetic import make_synthetic_dataset

CONFIG = "3d_fullres"
OUT_NAME = "nnUNetPlans_3d_fullres_unlabeled"


def _unlabeled_dir(env):
    return env.raw_dataset / "imagesUnlabeled"


def _write_image(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))


def _folder_state(folder):
    """File name -> (size, mtime) of everything under folder; {} if it does not exist."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_preprocessed_unlabeled_cases_match_nnunet_preprocessing_and_load(planned_dataset):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    # a labeled image copied in as unlabeled must come out exactly as nnU-Net preprocessed it
    shutil.copy(planned_dataset.raw_dataset / "imagesTr" / "case_000_0000.nii.gz",
                _unlabeled_dir(planned_dataset) / "copy_000_0000.nii.gz")
    outputs = preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    out = planned_dataset.preprocessed_dataset / OUT_NAME
    assert outputs == {CONFIG: str(out)}

    unlabeled = nnUNetDatasetBlosc2(str(out))
    assert sorted(unlabeled.identifiers) == ["copy_000", "unl_000", "unl_001", "unl_002"]
    labeled = nnUNetDatasetBlosc2(str(planned_dataset.preprocessed_dataset / "nnUNetPlans_3d_fullres"))
    data_u, seg_u, _, props_u = unlabeled.load_case("copy_000")
    data_l, seg_l, _, props_l = labeled.load_case("case_000")
    np.testing.assert_array_equal(np.asarray(data_u), np.asarray(data_l))
    assert props_u["class_locations"] == {}
    assert props_u["bbox_used_for_cropping"] == props_l["bbox_used_for_cropping"]
    # the "seg" of an unlabeled case is the nonzero mask only: no label values
    assert set(np.unique(np.asarray(seg_u))) <= {-1, 0}
    assert 1 in np.unique(np.asarray(seg_l))


def test_nnunet_loader_samples_unlabeled_cases(planned_dataset):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    plans = PlansManager(str(planned_dataset.preprocessed_dataset / "nnUNetPlans.json"))
    dataset_json = json.loads((planned_dataset.preprocessed_dataset / "dataset.json").read_text())
    patch = (16, 16, 16)
    loader = nnUNetDataLoader(nnUNetDatasetBlosc2(str(planned_dataset.preprocessed_dataset / OUT_NAME)), 2, patch,
                              patch, plans.get_label_manager(dataset_json), oversample_foreground_percent=0.0)
    batch = next(loader)
    assert batch["data"].shape == (2, 1, *patch)
    assert all(k.startswith("unl_") for k in batch["keys"])


def test_second_run_skips_done_cases_and_changed_plans_redo_them(planned_dataset, capsys):
    preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    out = planned_dataset.preprocessed_dataset / OUT_NAME
    before = _folder_state(out)
    preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    assert _folder_state(out) == before
    assert "3 already preprocessed, 0 to do" in capsys.readouterr().out

    # a new case is added alone; a removed one disappears from the output
    shutil.copy(_unlabeled_dir(planned_dataset) / "unl_000_0000.nii.gz",
                _unlabeled_dir(planned_dataset) / "unl_new_0000.nii.gz")
    os.remove(_unlabeled_dir(planned_dataset) / "unl_002_0000.nii.gz")
    preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    after = _folder_state(out)
    assert "unl_new.pkl" in after and "unl_002.pkl" not in after
    assert after["unl_001.b2nd"] == before["unl_001.b2nd"]

    # the network and batch size do not change preprocessed arrays: nothing is redone
    plans_file = planned_dataset.preprocessed_dataset / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"][CONFIG]["batch_size"] = 7
    plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]["features_per_stage"][0] = 3
    plans_file.write_text(json.dumps(plans))
    capsys.readouterr()
    preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    assert "0 to do" in capsys.readouterr().out

    # changing the plans' normalization invalidates every cached case
    plans_file = planned_dataset.preprocessed_dataset / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["foreground_intensity_properties_per_channel"]["0"]["mean"] += 1.0
    plans_file.write_text(json.dumps(plans))
    capsys.readouterr()
    preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    assert "plans changed" in capsys.readouterr().out
    assert _folder_state(out)["unl_001.b2nd"] != before["unl_001.b2nd"]


def test_the_pool_is_exactly_the_folder(planned_dataset, capsys):
    """A removed image leaves the pool on the next run even when nothing is to preprocess; a trainer started on a
    preprocessed pool that disagrees with imagesUnlabeled says so."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_semi.data.unlabeled import unlabeled_case_folders

    preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    out = planned_dataset.preprocessed_dataset / OUT_NAME
    plans = json.loads((planned_dataset.preprocessed_dataset / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((planned_dataset.preprocessed_dataset / "dataset.json").read_text())
    labeled = str(planned_dataset.preprocessed_dataset / PlansManager(plans).get_configuration(CONFIG).data_identifier)

    def pool():
        return set(unlabeled_case_folders(labeled, str(planned_dataset.preprocessed_dataset / "splits_final.json"),
                                          0, str(planned_dataset.raw_dataset), plans, CONFIG, dataset_json))

    assert pool() == {"unl_000", "unl_001", "unl_002"}
    os.remove(_unlabeled_dir(planned_dataset) / "unl_002_0000.nii.gz")
    with pytest.raises(RuntimeError, match=r"1 no longer in imagesUnlabeled \(unl_002\).*nnUNetv2_semi_preprocess"):
        pool()
    capsys.readouterr()
    preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    assert "0 to do, 1 removed from imagesUnlabeled" in capsys.readouterr().out
    assert not any(p.name.startswith("unl_002") for p in out.iterdir())
    assert pool() == {"unl_000", "unl_001"}
    shutil.copy(_unlabeled_dir(planned_dataset) / "unl_000_0000.nii.gz",
                _unlabeled_dir(planned_dataset) / "unl_new_0000.nii.gz")
    with pytest.raises(RuntimeError, match=r"1 case\(s\) not preprocessed \(unl_new\)"):
        pool()


def test_worker_processes_give_the_same_result(planned_dataset):
    preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=2)
    out = planned_dataset.preprocessed_dataset / OUT_NAME
    assert sorted(p.name for p in out.glob("*.pkl")) == ["unl_000.pkl", "unl_001.pkl", "unl_002.pkl"]
    assert not (out / ".incomplete").exists()


def test_planning_ignores_unlabeled_images(nnunet_env):
    """The plans with imagesUnlabeled present are identical to the plans without it."""
    make_synthetic_dataset(str(nnunet_env.raw), DATASET_ID, num_labeled=5, num_unlabeled=4, num_test=0,
                           shape=(20, 20, 20), seed=3)
    plan_and_preprocess(DATASET_ID, configurations=())
    plans_file = nnunet_env.preprocessed_dataset / "nnUNetPlans.json"
    with_unlabeled = plans_file.read_text()
    fingerprint = (nnunet_env.preprocessed_dataset / "dataset_fingerprint.json").read_text()
    shutil.rmtree(nnunet_env.preprocessed_dataset)
    shutil.rmtree(nnunet_env.raw_dataset / "imagesUnlabeled")
    plan_and_preprocess(DATASET_ID, configurations=())
    assert plans_file.read_text() == with_unlabeled
    assert (nnunet_env.preprocessed_dataset / "dataset_fingerprint.json").read_text() == fingerprint


# --- bad input: one clear error naming the file or value, and nothing written -------------------------------------

def _corrupt(path):
    path.write_bytes(b"this is not a nifti file" * 10)


BAD_INPUTS = {
    "missing folder": (lambda d: shutil.rmtree(d), "does not exist"),
    "empty folder": (lambda d: [os.remove(p) for p in d.iterdir()], "contains no CASE_XXXX"),
    "wrong suffix": (lambda d: (d / "unl_000_0000.nii.gz").rename(d / "unl_000.nii.gz"), "unl_000.nii.gz"),
    "three-digit channel": (lambda d: (d / "unl_000_0000.nii.gz").rename(d / "unl_000_000.nii.gz"),
                            "unl_000_000.nii.gz"),
    "missing channel file": (lambda d: (d / "unl_001_0000.nii.gz").rename(d / "unl_001_0001.nii.gz"),
                             "unl_001_0000.nii.gz"),
    "corrupt image": (lambda d: _corrupt(d / "unl_002_0000.nii.gz"), "unl_002_0000.nii.gz"),
    "2D image in a 3D dataset": (lambda d: _write_image(d / "flat_0000.nii.gz", np.ones((24, 24), np.float32)),
                                 "flat_0000.nii.gz: the image is 2D"),
    "two channels in one file": (
        lambda d: sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.ones((8, 8, 8), np.float32))] * 2),
                                  str(d / "multi_0000.nii.gz")), "2 channel(s) read"),
    # a 2-value vector image: the real count, not its first axis read as channels
    "vector image": (lambda d: sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 8, 8, 2), np.float32),
                                                                      isVector=True), str(d / "vector_0000.nii.gz")),
                     "vector_0000.nii.gz: 2 values per voxel (a vector image)"),
    # cut short (gzip's end-of-stream marker missing): SimpleITK would read it as a mostly-zero image
    "truncated image": (lambda d: (d / "unl_001_0000.nii.gz").write_bytes(
        (d / "unl_001_0000.nii.gz").read_bytes()[:3000]), "unl_001_0000.nii.gz: the file is truncated or corrupt"),
    "id of a labeled case": (lambda d: shutil.copy(d / "unl_000_0000.nii.gz", d / "case_003_0000.nii.gz"),
                             "case_003"),
    "id escaping its folder": (lambda d: shutil.copy(d / "unl_000_0000.nii.gz", d / ".._0000.nii.gz"), "'..'"),
    "id with a space": (lambda d: shutil.copy(d / "unl_000_0000.nii.gz", d / "a b_0000.nii.gz"), "'a b'"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_unlabeled_input_is_refused_without_writing(planned_dataset, name):
    make_bad, expected_text = BAD_INPUTS[name]
    make_bad(_unlabeled_dir(planned_dataset))
    out = planned_dataset.preprocessed_dataset / OUT_NAME
    with pytest.raises(SemiInputError) as info:
        preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    assert expected_text in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_refused(planned_dataset, bad_value):
    # SimpleITK's NIfTI reader turns NaN/inf into 0 before nnU-Net sees them; nibabel passes them through, so the
    # check runs on what the dataset's reader returns. Switch this dataset's plans to nibabel to exercise it.
    plans_file = planned_dataset.preprocessed_dataset / "nnUNetPlans.json"
    plans_file.write_text(json.dumps(json.loads(plans_file.read_text()) | {"image_reader_writer": "NibabelIO"}))
    image = np.ones((24, 24, 24), np.float32)
    image[3, 4, 5] = bad_value
    _write_image(_unlabeled_dir(planned_dataset) / "nonfinite_0000.nii.gz", image)
    with pytest.raises(SemiInputError, match=r"nonfinite_0000.nii.gz: 1 voxel\(s\) are NaN or infinite"):
        preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    assert not (planned_dataset.preprocessed_dataset / OUT_NAME).exists()


def test_failure_keeps_earlier_output_untouched(planned_dataset):
    preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    out = planned_dataset.preprocessed_dataset / OUT_NAME
    before = _folder_state(out)
    shutil.copy(_unlabeled_dir(planned_dataset) / "unl_000_0000.nii.gz",
                _unlabeled_dir(planned_dataset) / "good_0000.nii.gz")
    _corrupt(_unlabeled_dir(planned_dataset) / "zbad_0000.nii.gz")
    with pytest.raises(SemiInputError, match="zbad_0000.nii.gz"):
        preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)
    assert _folder_state(out) == before


def test_before_planning_and_unknown_configuration(planned_dataset):
    with pytest.raises(SemiInputError, match=r"3d_lowres.*Available: .*3d_fullres"):
        preprocess_unlabeled(DATASET_ID, ["3d_lowres_missing"], num_processes=1)
    os.remove(planned_dataset.preprocessed_dataset / "nnUNetPlans.json")
    with pytest.raises(SemiInputError, match=r"nnUNetPlans.json not found. Run nnUNetv2_plan_and_preprocess -d 990"):
        preprocess_unlabeled(DATASET_ID, [CONFIG], num_processes=1)


def test_command_line_reports_one_error_line_and_exit_code(planned_dataset, capsys):
    with pytest.raises(SystemExit) as info:
        preprocess_entry(["-d", str(DATASET_ID), "-c", "2d_nope", "-np", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nnUNetv2_semi_preprocess: error: configuration '2d_nope'")


def test_command_line_preprocesses(planned_dataset):
    preprocess_entry(["-d", str(DATASET_ID), "-c", CONFIG, "-np", "1"])
    assert (planned_dataset.preprocessed_dataset / OUT_NAME / "unl_000.pkl").is_file()


def test_2d_dataset(nnunet_env):
    """2D datasets: the 2d configuration's preprocessing, and a 3D image among 2D ones is refused."""
    make_synthetic_dataset(str(nnunet_env.raw), DATASET_ID, num_labeled=5, num_unlabeled=2, num_test=0,
                           shape=(40, 40), seed=4)
    plan_and_preprocess(DATASET_ID, configurations=("2d",))
    out = preprocess_unlabeled(DATASET_ID, ["2d"], num_processes=1)["2d"]
    assert sorted(p for p in os.listdir(out) if p.endswith(".pkl")) == ["unl_000.pkl", "unl_001.pkl"]
    _write_image(_unlabeled_dir(nnunet_env) / "vol_0000.nii.gz", np.ones((4, 40, 40), np.float32))
    with pytest.raises(SemiInputError, match="vol_0000.nii.gz: the image is 3D"):
        preprocess_unlabeled(DATASET_ID, ["2d"], num_processes=1)
