"""components.neural_process: class memory banks, the NP head, voxel sampling."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_semi.components.neural_process import (
    ClassMemoryBank,
    Gaussian,
    NeuralProcessHead,
    gaussian_kl,
    sample_voxels_per_image,
)


def _banks(head, classes=3):
    context, target = ClassMemoryBank(classes, 8, 64), ClassMemoryBank(classes, 8, 64)
    features = torch.randn(60, 4)
    labels = torch.arange(60) % classes
    with torch.no_grad():
        context.push(head.project(features), labels)
        target.push(head.project(features + 1.5), labels)  # a shifted "pseudo-labeled" distribution
    return context, target


def test_memory_bank_is_a_per_class_fifo_with_centers_and_state():
    bank = ClassMemoryBank(num_classes=3, feature_dim=2, length=3)
    bank.push(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 0, 1]))
    assert bank.available().tolist() == [True, True, False]
    torch.testing.assert_close(bank.centers()[:2], torch.tensor([[2.0, 0.0], [0.0, 5.0]]))
    # two more for class 0 overflow the length 3: the oldest (1, 0) goes
    bank.push(torch.tensor([[5.0, 0.0], [7.0, 0.0], [9.0, 9.0]]), torch.tensor([0, 0, 7]))  # 7: not a class
    torch.testing.assert_close(bank.centers()[0], torch.tensor([5.0, 0.0]))
    assert bank.size.tolist() == [3, 1, 0]
    bank.push(torch.randn(10, 2), torch.zeros(10, dtype=torch.long), max_per_class=2)
    assert bank.pointer[0].item() == (4 + 2) % 3  # 4 pushed before, then 2 of the 10
    copy = ClassMemoryBank(3, 2, 3)
    copy.load_state_dict(bank.state_dict())
    torch.testing.assert_close(copy.centers(), bank.centers())


def test_gaussian_kl_is_zero_for_equal_distributions_and_matches_the_closed_form():
    p = Gaussian(torch.zeros(1, 2), torch.ones(1, 2))
    assert gaussian_kl(p, p).item() == pytest.approx(0.0)
    q = Gaussian(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 1.0]]))
    expected = (math.log(2) + (1 + 1) / 8 - 0.5) + 0.0
    assert gaussian_kl(p, q).item() == pytest.approx(expected)


def test_np_head_shapes_gradient_and_dense_prediction_in_2d_and_3d():
    torch.manual_seed(0)
    head = NeuralProcessHead(feature_dim=4, num_classes=3, latent_dim=8, hidden_dim=16)
    context, target = _banks(head)
    voxels = torch.randn(2, 10, 4)
    projected = head.project(voxels)
    summary = head.summarize(projected, context.centers(), context.available(), target.centers(), target.available())
    logits = head.decode(projected, summary, summary.q_target, num_samples=3)
    assert logits.shape == (3, 2, 10, 3)
    assert (summary.q_target.std >= 0.1).all()
    (logits.square().mean() + gaussian_kl(summary.q_target, summary.q_context)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    for spatial in [(5, 6), (3, 4, 5)]:
        probs = head.predict_dense(torch.randn(2, 4, *spatial), context, target, num_samples=2, summary_voxels=7,
                                   chunk_voxels=4)
        assert probs.shape == (2, 3, *spatial)
        torch.testing.assert_close(probs.sum(1), torch.ones(2, *spatial))


def test_kl_term_moves_the_target_distribution_toward_the_context_distribution():
    torch.manual_seed(0)
    head = NeuralProcessHead(feature_dim=4, num_classes=3, latent_dim=8, hidden_dim=16)
    context, target = _banks(head)
    voxels = torch.randn(2, 32, 4)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)

    def distributions():
        projected = head.project(voxels)
        return head.summarize(projected, context.centers(), context.available(), target.centers(),
                              target.available())

    before = distributions()
    kl_before = gaussian_kl(before.q_target, before.q_context).item()
    gap_before = (before.q_target.mean - before.q_context.mean).norm().item()
    for _ in range(30):
        summary = distributions()
        optimizer.zero_grad()
        gaussian_kl(summary.q_target, summary.q_context).backward()
        optimizer.step()
    after = distributions()
    assert kl_before > 0
    assert gaussian_kl(after.q_target, after.q_context).item() < 0.5 * kl_before
    assert (after.q_target.mean - after.q_context.mean).norm().item() < gap_before


def test_empty_bank_is_reported():
    head = NeuralProcessHead(4, 2, 8, 16)
    empty = ClassMemoryBank(2, 8)
    with pytest.raises(ValueError, match="memory bank is empty"):
        head.summarize(torch.randn(1, 3, 8), empty.centers(), empty.available(), empty.centers(), empty.available())


def test_sample_voxels_per_image_draws_valid_voxels_with_gradient():
    features = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.arange(32).view(2, 1, 4, 4)
    valid = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    valid[0, 0, 0, :2] = True  # image 0: two valid voxels (drawn with replacement)
    valid[1] = True
    sampled, sampled_labels, index = sample_voxels_per_image(features, labels, valid, voxels_per_image=5)
    assert sampled.shape == (2, 5, 3) and set(sampled_labels[0].tolist()) <= {0, 1}
    torch.testing.assert_close(sampled[1, 0], features[1, :, index[1, 0] // 4, index[1, 0] % 4])
    sampled.sum().backward()
    assert features.grad[0, :, 1:].abs().sum() == 0 and features.grad[1].abs().sum() > 0


def test_class_balanced_voxel_sampling_gives_a_small_structure_its_share():
    torch.manual_seed(0)
    labels = torch.zeros(2, 1, 20, 20, dtype=torch.long)
    labels[:, 0, :2, :10] = 1  # 20 of 400 voxels
    valid = torch.ones_like(labels, dtype=torch.bool)
    features = torch.randn(2, 3, 20, 20)
    _, uniform, _ = sample_voxels_per_image(features, labels, valid, 20)
    _, balanced, _ = sample_voxels_per_image(features, labels, valid, 20, class_balanced=True)
    assert uniform.float().mean() < 0.2
    assert 0.35 < balanced.float().mean() < 0.65  # about half of the draws are the small class


def test_dense_prediction_chunks_over_batch_and_space_and_does_not_depend_on_the_chunk_size():
    torch.manual_seed(0)
    head = NeuralProcessHead(feature_dim=4, num_classes=3, latent_dim=8, hidden_dim=16)
    context, target = _banks(head)
    features = torch.randn(6, 4, 5, 6, 7)
    decoded = []
    handle = head.decoder.register_forward_hook(lambda module, inputs, output: decoded.append(inputs[0].shape))
    torch.manual_seed(1)
    small = head.predict_dense(features, context, target, num_samples=2, summary_voxels=50, chunk_voxels=64)
    handle.remove()
    torch.manual_seed(1)
    large = head.predict_dense(features, context, target, num_samples=2, summary_voxels=50, chunk_voxels=10_000)
    # at most 64 voxels (batch x space) per decoder call, whatever the batch of 6
    assert max(shape[1] * shape[2] for shape in decoded) <= 64
    torch.testing.assert_close(small, large)
