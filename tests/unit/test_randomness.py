"""Every library function that draws takes a ``torch.Generator``: the same seed gives the same draw, another seed
another, and torch's global random state is left alone (the rule for batch-level stochastic operations)."""

from __future__ import annotations

import pytest
import torch

from nnunet_semi.components.feature_perturbation import channel_dropout, dropout_skips
from nnunet_semi.components.masks import entropy_percentile_mask
from nnunet_semi.components.mixing import clipped_gaussian_noise, cutmix_boxes, mixup_with_labeled_partners
from nnunet_semi.components.neural_process import ClassMemoryBank, NeuralProcessHead, sample_voxels_per_image
from nnunet_semi.components.prototypes import gather_voxels
from nnunet_semi.components.uncertainty import percentile

torch.manual_seed(0)
_X = torch.randn(4, 6, 5, 5, 5)
_PROBS = torch.softmax(torch.randn(2, 3, 6, 6, 6), 1)
_LABELS = torch.randint(0, 3, (2, 1, 6, 6, 6))
_HEAD = NeuralProcessHead(feature_dim=6, num_classes=3, latent_dim=8, hidden_dim=16)


def _banks():
    context, target = ClassMemoryBank(3, 8, length=16), ClassMemoryBank(3, 8, length=16)
    features = torch.randn(30, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(30) % 3
    context.push(features, labels)
    target.push(features + 1, labels)
    return context, target


def _memory_after_push(generator):
    bank = ClassMemoryBank(3, 6, length=8)
    bank.push(torch.randn(40, 6, generator=torch.Generator().manual_seed(9)), torch.arange(40) % 3, 5, generator)
    return bank.memory


def _np_decode(generator):
    context, target = _banks()
    with torch.no_grad():
        projected = _HEAD.project(torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(3)))
        summary = _HEAD.summarize(projected, context.centers(), context.available(), target.centers(),
                                  target.available())
        return _HEAD.decode(projected, summary, summary.q_target, 3, generator=generator)


def _np_dense(generator):
    context, target = _banks()
    return _HEAD.predict_dense(_X[:2], context, target, 2, summary_voxels=7, chunk_voxels=50, generator=generator)


DRAWS = {
    "channel_dropout": lambda g: channel_dropout(_X, 0.5, g),
    "dropout_skips": lambda g: dropout_skips([_X, _X[:, :3]], 0.5, g)[1],
    "clipped_gaussian_noise": lambda g: clipped_gaussian_noise(_X, 0.1, 0.2, g),
    "mixup_with_labeled_partners": lambda g: mixup_with_labeled_partners(_X[:3], _X[3:], 0.75, g)[0],
    "cutmix_boxes": lambda g: cutmix_boxes(16, (8, 8, 8), 0.5, 0.5, "cpu", g),
    "percentile": lambda g: percentile(_X, 20.0, max_samples=50, generator=g),
    "entropy_percentile_mask": lambda g: entropy_percentile_mask(_PROBS, _PROBS.flip(0), 20.0, 100, g),
    "gather_voxels": lambda g: gather_voxels(_PROBS, _LABELS, torch.ones_like(_LABELS, dtype=torch.bool), 5, g)[0],
    "sample_voxels_per_image": lambda g: sample_voxels_per_image(
        _PROBS, _LABELS, torch.ones_like(_LABELS, dtype=torch.bool), 9, True, g)[2],
    "ClassMemoryBank.push": _memory_after_push,
    "NeuralProcessHead.decode": _np_decode,
    "NeuralProcessHead.predict_dense": _np_dense,
}


@pytest.mark.parametrize("name", list(DRAWS))
def test_draws_follow_the_generator_and_leave_the_global_state_alone(name):
    draw = DRAWS[name]
    global_state = torch.get_rng_state()
    first, again = draw(torch.Generator().manual_seed(1)), draw(torch.Generator().manual_seed(1))
    other = draw(torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
