"""Health metrics under real 2-rank FSDP2 (gloo, CPU): shard sums equal the unsharded model's values."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from self_revision_training.shared.health import compute_grad_sq_norm, compute_weight_change, snapshot_params

WORLD = 2
N = 6  # sequences ("units") in the step, split evenly over the ranks


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 5, generator=gen)
    x[:, 0] = 0.0  # first input column never active -> those weights get a zero gradient and stay
    return x, torch.randn(N, 3, generator=gen)


def _worker(rank: int, init_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))  # 7 and 3 rows: uneven shards
        reference = copy.deepcopy(model)
        x, y = _data()

        # Unsharded reference on the whole step: mean over the N units.
        (((reference(x) - y) ** 2).sum() / N).backward()
        ref_sq = compute_grad_sq_norm(reference.parameters(), dtype=torch.float64)
        ref_before = snapshot_params(reference.parameters())
        torch.optim.Adam(reference.parameters(), lr=1e-3).step()
        ref_change = compute_weight_change(reference.parameters(), ref_before)

        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        assert all(hasattr(p, "to_local") for p in params)  # FSDP2 parameters are DTensors
        half = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        # Each rank sums its units x WORLD / N; FSDP2 averages over ranks -> the mean over all N units.
        (((model(x[half]) - y[half]) ** 2).sum() * (WORLD / N)).backward()
        assert all(hasattr(p.grad, "to_local") for p in params)  # DTensor shards
        local_numel = sum(p.to_local().numel() for p in params)
        assert local_numel < sum(p.numel() for p in reference.parameters())

        def all_reduce(t: torch.Tensor) -> None:
            dist.all_reduce(t)  # sum

        sq = compute_grad_sq_norm(params, all_reduce, dtype=torch.float64)
        assert sq == pytest.approx(ref_sq, rel=1e-5), (sq, ref_sq)

        before = snapshot_params(params)
        torch.optim.Adam(params, lr=1e-3).step()
        change = compute_weight_change(params, before, all_reduce)
        assert change.numel == ref_change.numel == 5 * 7 + 7 + 7 * 3 + 3
        assert change.num_changed == ref_change.num_changed == change.numel - 7, (change, ref_change)
        assert change.update_ratio == pytest.approx(ref_change.update_ratio, rel=1e-5)
    finally:
        dist.barrier()  # both ranks done before either tears gloo down ("terminate called" otherwise)
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_metrics_equal_unsharded(tmp_path: Path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "pg_init"),), nprocs=WORLD, join=True)
