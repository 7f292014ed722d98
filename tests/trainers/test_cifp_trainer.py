"""nnUNetTrainerCIFP on the tiny planned dataset: the refinement module beside the stock network, gradient of each
stream, fusion statistics, variants and checkpoint state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import has_grad, make_trainer, next_batches, random_streams_rewinder, tiny_schedule
from nnunet_semi.methods import (
    nnUNetTrainerCIFP,
    nnUNetTrainerCIFP_channelAttention,
    nnUNetTrainerCIFP_prototypeKeys,
)


def test_refinement_module_lives_beside_the_stock_network_and_is_saved(semi_dataset, tmp_path):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerCIFP))
    refine = trainer.auxiliary["cross_image"]
    assert type(trainer.network).__name__ == "PlainConvUNet"
    assert not any(n.startswith("cross_image") for n, _ in trainer.network.named_parameters())
    assert any(p is refine.gamma for g in trainer.optimizer.param_groups for p in g["params"])
    trainer.train_step(next(trainer.dataloader_train))
    trainer.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert checkpoint["network_weights"].keys() == trainer.unwrapped_network().state_dict().keys()
    torch.testing.assert_close(checkpoint["semi_state"]["auxiliary"]["cross_image.gamma"], refine.gamma.detach())
    fresh = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerCIFP))
    fresh.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    for k, v in refine.state_dict().items():
        torch.testing.assert_close(fresh.auxiliary["cross_image"].state_dict()[k], v)


@pytest.mark.parametrize("stream", ["strong", "feature", "cross_image"])
def test_each_stream_trains_the_student_and_only_cross_image_trains_the_refinement(stream, semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerCIFP))
    trainer.optimizer.zero_grad(set_to_none=True)
    terms = trainer.compute_losses(*next_batches(trainer))
    assert set(terms) == set(trainer.loss_terms) and all(torch.isfinite(v) for v in terms.values())
    terms[stream].backward()
    network = trainer.unwrapped_network()
    assert has_grad(network, "encoder.") and has_grad(network, f"decoder.seg_layers.{1}.")
    assert not has_grad(network, "decoder.seg_layers.0.")  # full resolution only
    assert has_grad(trainer.auxiliary["cross_image"]) == (stream == "cross_image")
    assert all(p.grad is None for p in trainer.teacher.parameters())


def test_fusion_statistics_are_consistent_and_logged(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerCIFP))
    out = trainer.train_step(next(trainer.dataloader_train))
    used = sum(out[f"stat_fusion_weight_{s}"] for s in trainer.fusion_sources)
    assert used == pytest.approx(1.0, abs=1e-5) and out["stat_fusion_weight_strong"] == 0.0
    assert out["stat_refined_fraction"] == pytest.approx(trainer.refine_fraction, abs=0.05)
    assert 0.0 <= out["stat_pseudo_label_weight"] <= 1.0
    trainer.on_train_epoch_end([out])
    for key in ("semi_loss_cross_image", "semi_fusion_weight_cross_image", "semi_refined_fraction"):
        assert np.isfinite(trainer.logger.get_value(key, step=-1)), key


@pytest.mark.parametrize("variant", [nnUNetTrainerCIFP_channelAttention, nnUNetTrainerCIFP_prototypeKeys],
                         ids=lambda c: c.__name__)
def test_attention_and_key_variants_train_their_refinement(variant, semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(variant))
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.compute_losses(*next_batches(trainer))["cross_image"].backward()
    refine = trainer.auxiliary["cross_image"]
    assert (refine.attention, refine.keys) == (variant.refinement_attention, variant.refinement_keys)
    assert has_grad(refine, "gamma") and has_grad(trainer.unwrapped_network(), "encoder.")


def test_unknown_fusion_source_is_refused(semi_dataset):
    with pytest.raises(ValueError, match="fusion_sources must be a non-empty subset"):
        make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerCIFP, fusion_sources=("weak", "teacher2")))


def test_each_input_is_encoded_once_and_perturbed_decodes_compute_only_the_full_resolution_head(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerCIFP))
    network = trainer.unwrapped_network()
    encoded, deep_heads = [], []
    hooks = [network.encoder.register_forward_hook(lambda m, inputs, out: encoded.append(inputs[0].shape[0])),
             network.decoder.seg_layers[0].register_forward_hook(lambda *args: deep_heads.append(1))]
    labeled, unlabeled = next_batches(trainer)
    trainer.compute_losses(labeled, unlabeled)
    for hook in hooks:
        hook.remove()
    num_labeled, num_unlabeled = labeled["data"].shape[0], unlabeled["data_weak"].shape[0]
    # labeled + strong in the main forward, the weak view once for both feature streams (the teacher is separate)
    assert sorted(encoded) == sorted([num_labeled + num_unlabeled, num_unlabeled])
    assert len(deep_heads) == 1  # deep supervision only in the main forward, for the supervised term


def test_stream_losses_are_logged_unweighted_and_weighted_in_the_total(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerCIFP, strong_weight=0.25))
    out = trainer.train_step(next(trainer.dataloader_train))
    expected = out["loss_sup"] + 0.25 * out["loss_strong"] + 0.5 * (out["loss_feature"] + out["loss_cross_image"])
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-5)
    # gamma and the relative size of the refinement are logged
    assert out["stat_cross_image_gamma"] == pytest.approx(trainer.refinement_gamma, rel=1e-2)
    assert out["stat_cross_image_update_ratio"] == pytest.approx(out["stat_cross_image_gamma"], rel=1e-2)
    assert 0 <= out["stat_cutmix_fraction"] <= 0.125  # boxes of half the side: 1/8 of a 3D patch at most


def test_switching_the_cross_image_refinement_off_changes_its_stream_loss(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerCIFP))
    labeled, unlabeled = next_batches(trainer)
    rewind = random_streams_rewinder(trainer)

    def cross_image_loss(gamma):
        with torch.no_grad():
            trainer.auxiliary["cross_image"].gamma.fill_(gamma)
            rewind()
            return trainer.compute_losses(labeled, unlabeled)["cross_image"].item()

    assert abs(cross_image_loss(1.0) - cross_image_loss(0.0)) > 1e-3


def test_the_strong_stream_learns_the_partners_pseudo_label_inside_its_cutmix_box(semi_dataset, monkeypatch):
    import nnunet_semi.methods.cifp as module

    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerCIFP, cutmix_probability=1.0))
    targets = []
    original = module.weighted_ce_dice_loss
    monkeypatch.setattr(module, "weighted_ce_dice_loss",
                        lambda logits, labels, weight, norm: targets.append((labels, weight)) or
                        original(logits, labels, weight, norm))
    boxes = []
    original_boxes = module.cutmix_boxes
    monkeypatch.setattr(module, "cutmix_boxes", lambda *a, **k: boxes.append(original_boxes(*a, **k)) or boxes[-1])
    trainer.compute_losses(*next_batches(trainer))
    (strong_labels, strong_weight), (fused_labels, fused_weight) = targets[0], targets[1]
    box = boxes[0]
    partners = torch.roll(torch.arange(box.shape[0]), 1)
    assert box.flatten(1).any(1).all()
    torch.testing.assert_close(strong_labels[box], fused_labels[partners][box])
    torch.testing.assert_close(strong_labels[~box], fused_labels[~box])
    torch.testing.assert_close(strong_weight[box], fused_weight[partners][box])


def test_fusing_the_strong_stream_with_cutmix_is_refused(semi_dataset):
    with pytest.raises(ValueError, match="set cutmix_probability = 0"):
        make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerCIFP, fusion_sources=("weak", "strong")))
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerCIFP, fusion_sources=("weak", "strong"),
                                                       cutmix_probability=0.0))
    assert np.isfinite(trainer.train_step(next(trainer.dataloader_train))["loss"])
