"""Gradient averaging of auxiliary heads over DDP ranks, run for real with two CPU processes (gloo backend)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_semi.trainer.ddp import average_gradients_over_ranks


def _worker(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        used, unused_on_rank_1 = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))
        used.grad = torch.full((2, 3), float(rank + 1))
        if rank == 0:
            unused_on_rank_1.grad = torch.full((4,), 4.0)
        average_gradients_over_ranks([used, unused_on_rank_1])
        results[rank] = (used.grad.clone(), unused_on_rank_1.grad.clone())
    finally:
        dist.destroy_process_group()


def test_auxiliary_gradients_are_averaged_and_missing_ones_count_as_zero(tmp_path):
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2, join=True)
    for rank in (0, 1):
        used, unused = results[rank]
        torch.testing.assert_close(used, torch.full((2, 3), 1.5))  # mean of 1 and 2
        torch.testing.assert_close(unused, torch.full((4,), 2.0))  # mean of 4 and a missing (zero) gradient
