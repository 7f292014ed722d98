"""Every trainer on nnU-Net's default GPU path, reproduced on CPU: the network compiled by nnU-Net's own initialize
(torch.compile, inductor) and the step under autocast (bfloat16 here, float16 on CUDA). Three training steps and a
validation step each, with finite losses and changed weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo import OptimizedModule

import nnunet_semi.methods as training
from helpers import make_trainer, tiny_schedule

# every method of the package (variants change class attributes only): a new method is tested without an edit here
METHODS = sorted(n.removeprefix("nnUNetTrainer") for n in training.__all__ if "_" not in n)


def _three_steps_and_a_validation(trainer, context):
    weights = {k: v.clone() for k, v in trainer.unwrapped_network().state_dict().items()
               if v.dtype.is_floating_point}
    with context():
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(3)]
    for out in outputs:
        losses = {k: float(v) for k, v in out.items() if k == "loss" or k.startswith("loss_")}
        assert set(losses) == {"loss"} | {f"loss_{t}" for t in trainer.loss_terms}
        assert all(np.isfinite(v) for v in losses.values()), losses
    after = trainer.unwrapped_network().state_dict()
    assert any(not torch.equal(after[k], v) for k, v in weights.items())
    trainer.on_validation_epoch_start()
    with context(), torch.no_grad():
        result = trainer.validation_step(next(trainer.dataloader_val))
    assert np.isfinite(result["loss"]) and all(np.all(np.isfinite(result[k])) for k in result if k.endswith("_tp"))


@pytest.mark.parametrize("method", METHODS)
def test_training_and_validation_steps_under_autocast(semi_dataset, method):
    trainer = make_trainer(semi_dataset, tiny_schedule(getattr(training, f"nnUNetTrainer{method}")))
    _three_steps_and_a_validation(trainer, lambda: torch.autocast("cpu", dtype=torch.bfloat16))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_training_and_validation_steps_with_the_network_compiled(semi_dataset, method):
    # nnU-Net compiles in its own initialize() on CUDA only; here the same call on CPU, in the same place
    cls = tiny_schedule(getattr(training, f"nnUNetTrainer{method}"), _do_i_compile=lambda self: True)
    trainer = make_trainer(semi_dataset, cls)
    assert isinstance(trainer.network, OptimizedModule)
    _three_steps_and_a_validation(trainer, torch.enable_grad)
