"""The unlabeled half of a semi-supervised trainer: which cases, and the loader of their two views.

``UnlabeledData`` builds ``self.dataloader_unlabeled`` beside nnU-Net's labeled loaders, from nnU-Net's own training
pipeline split by kind (the spatial part shared by the views, the photometric part per view), with the data-loading
workers split between the labeled and the unlabeled loader. It reads the base's ``unlabeled_batch_size``,
``unlabeled_views`` and ``strong_view_always_changed``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from os.path import join

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_semi.data.loaders import (
    ImageOnlyDataset,
    PerturbedUntilChanged,
    TwoViewUnlabeledLoader,
    split_spatial_and_photometric,
)
from nnunet_semi.data.unlabeled import unlabeled_case_folders


class UnlabeledData(nnUNetTrainer):
    """The unlabeled case pool and its two-view loader (``self.dataloader_unlabeled``, ``self.unlabeled_pool``)."""

    def unlabeled_case_folders(self) -> dict[str, str]:
        """Case id -> preprocessed folder of every unlabeled case of this fold (``data.unlabeled``'s answer)."""
        # nnunetv2.paths reads nnUNet_raw once at import; the environment now is what nnU-Net's commands see
        raw_dataset = join(os.environ.get("nnUNet_raw", ""), self.plans_manager.dataset_name)
        try:
            return unlabeled_case_folders(
                self.preprocessed_dataset_folder, join(self.preprocessed_dataset_folder_base, "splits_final.json"),
                self.fold, raw_dataset, self.plans_manager.plans, self.configuration_name, self.dataset_json)
        except RuntimeError as error:
            raise RuntimeError(f"{type(self).__name__}: {error}") from None

    def build_weak_transforms(self) -> ComposeTransforms:
        """Photometric pipeline of the teacher's view. Default: none (the crop after the shared spatial transform)."""
        return ComposeTransforms([])

    def build_strong_transforms(self, nnunet_photometric: ComposeTransforms) -> ComposeTransforms:
        """Photometric pipeline of the student's view. Default: nnU-Net's own intensity augmentations."""
        return nnunet_photometric

    def split_unlabeled_pipeline(self, nnunet_pipeline: ComposeTransforms):
        """(spatial part shared by the views, photometric part, mask-for-norm step or None) of nnU-Net's training
        pipeline (``loaders.split_spatial_and_photometric``, which refuses a transform it does not know)."""
        return split_spatial_and_photometric(nnunet_pipeline)

    def get_dataloaders(self):
        total_workers = get_allowed_n_proc_DA()
        # split the worker budget between labeled and unlabeled loading instead of doubling the processes; nnU-Net
        # 2.8's get_dataloaders reads its worker count only from get_allowed_n_proc_DA() (nnUNet_n_proc_DA), so the
        # variable is set for that one call rather than copying the method
        labeled_workers = (total_workers + 1) // 2 if total_workers > 1 else total_workers
        with _environment_variable("nnUNet_n_proc_DA", str(labeled_workers)):
            dataloader_train, dataloader_val = super().get_dataloaders()
        self.dataloader_unlabeled = self._build_unlabeled_dataloader(max(0, total_workers - labeled_workers))
        return dataloader_train, dataloader_val

    def _build_unlabeled_dataloader(self, num_workers: int):
        self.unlabeled_pool = ImageOnlyDataset(self.unlabeled_case_folders())
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        nnunet_pipeline = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        spatial, photometric, mask_for_norm = self.split_unlabeled_pipeline(nnunet_pipeline)
        strong = self.build_strong_transforms(photometric)
        if self.strong_view_always_changed:
            strong = PerturbedUntilChanged(strong)
        loader = TwoViewUnlabeledLoader(
            self.unlabeled_pool, self.unlabeled_batch_size or self.batch_size, initial_patch_size,
            self.configuration_manager.patch_size, self.label_manager, spatial, self.build_weak_transforms(),
            strong, mask_for_norm, self.unlabeled_views)
        self.print_to_log_file(
            f"Unlabeled cases: {len(self.unlabeled_pool)}, unlabeled batch size: {loader.batch_size}, "
            f"unsupervised weight: {self.unsup_weight} ({self.describe_ramp(self.unsup_rampup_iterations)}), "
            f"teacher momentum: {self.teacher_momentum}")
        if num_workers == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(loader, None, num_workers, max(2, num_workers), seeds=None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()


@contextmanager
def _environment_variable(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
