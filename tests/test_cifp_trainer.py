"""nnUNetTrainerCIFP on the tiny planned dataset: the refinement module beside the stock network, gradient of each
stream, fusion statistics, variants and checkpoint state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_semi.training import (
    nnUNetTrainerCIFP,
    nnUNetTrainerCIFP_channelAttention,
    nnUNetTrainerCIFP_prototypeKeys,
)

from conftest import has_grad, make_trainer, next_batches, tiny_schedule


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
