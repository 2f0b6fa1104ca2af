"""Health metrics: the GNS two-batch estimator vs the direct unbiased formulas, its EMA on synthetic
gradients, weight-change fractions against bf16 half-ULP arithmetic, state round trip, shard awareness."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from self_revision_training.shared.health import (
    GradientNoiseScale,
    compute_ema,
    compute_gns_estimates,
    compute_grad_sq_norm,
    compute_noise_scale,
    compute_unit_mean_sq_norm,
    compute_weight_change,
    snapshot_params,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------------------------------------------
# (a) exact identity on per-sample gradients


def test_two_batch_estimator_equals_direct_unbiased_formulas():
    model = _mlp()
    n = 8
    x, y = torch.randn(n, 5, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    per_sample, sq_norms = [], []
    for i in range(n):
        model.zero_grad()
        ((model(x[i : i + 1]) - y[i : i + 1]) ** 2).sum().backward()
        per_sample.append(_flat_grad(model).clone())
        sq_norms.append(compute_grad_sq_norm(model.parameters(), dtype=torch.float64))
    g = torch.stack(per_sample)  # [n, P]
    g_bar = g.mean(0)
    trace_direct = n / (n - 1) * float((g - g_bar).pow(2).sum(1).mean())
    grad_sq_direct = float(g_bar.pow(2).sum()) - trace_direct / n

    # The big batch the way a trainer sees it: the summed loss times a token-style scale 1/T.
    scale = 1.0 / 37.0
    model.zero_grad()
    (((model(x) - y) ** 2).sum() * scale).backward()
    big = compute_unit_mean_sq_norm(compute_grad_sq_norm(model.parameters(), dtype=torch.float64), n, scale)
    assert big == pytest.approx(float(g_bar.pow(2).sum()), rel=1e-12)
    assert sq_norms == pytest.approx(g.pow(2).sum(1).tolist(), rel=1e-12)

    small = sum(sq_norms) / n  # B_small = 1, averaged over the n choices of the single unit
    grad_sq, trace = compute_gns_estimates(small, big, 1, n)
    assert trace == pytest.approx(trace_direct, rel=1e-6)
    assert grad_sq == pytest.approx(grad_sq_direct, rel=1e-6)
    # Default float32 norms agree closely too (fp32 reduction of fp64 grads).
    assert compute_grad_sq_norm(model.parameters()) == pytest.approx(
        compute_grad_sq_norm(model.parameters(), dtype=torch.float64), rel=1e-6
    )


def test_estimates_validate_batches_and_noise_scale_edges():
    with pytest.raises(ValueError):
        compute_gns_estimates(1.0, 0.5, 4, 4)
    with pytest.raises(ValueError):
        compute_gns_estimates(1.0, 0.5, 0, 4)
    with pytest.raises(ValueError):
        compute_unit_mean_sq_norm(1.0, 0)
    assert compute_noise_scale(3.0, 1.5) == 2.0
    assert compute_noise_scale(3.0, -1.0) == math.inf
    assert math.isnan(compute_noise_scale(-1.0, 0.0))
    assert compute_ema(0.0, 2.0, 0.9, 1) == pytest.approx((0.2, 2.0))
    with pytest.raises(ValueError):
        GradientNoiseScale(beta=1.0)


# ---------------------------------------------------------------------------------------------------
# (b) statistical recovery of sum(sigma^2) / |mu|^2


def test_ema_recovers_noise_scale_of_gaussian_gradients():
    gen = torch.Generator().manual_seed(1)
    d, b_small, b_big = 64, 4, 64
    mu = 0.5 * torch.randn(d, generator=gen, dtype=torch.float64)
    sigma = 0.5 + 2 * torch.rand(d, generator=gen, dtype=torch.float64)
    true = float(sigma.pow(2).sum() / mu.pow(2).sum())
    gns = GradientNoiseScale(beta=0.99)
    for _ in range(2000):
        samples = mu + sigma * torch.randn(b_big, d, generator=gen, dtype=torch.float64)  # [B_big, d]
        small = float(samples[:b_small].mean(0).pow(2).sum())
        big = float(samples.mean(0).pow(2).sum())
        metrics = gns.update(small, big, b_small, b_big)
    assert metrics["gns_b_simple"] == gns.noise_scale
    assert gns.noise_scale == pytest.approx(true, rel=0.10)
    assert gns.trace == pytest.approx(float(sigma.pow(2).sum()), rel=0.10)
    assert gns.grad_sq == pytest.approx(float(mu.pow(2).sum()), rel=0.10)


def test_non_finite_step_is_reported_but_not_folded_in():
    gns = GradientNoiseScale()
    gns.update(2.0, 1.0, 1, 4)
    before = gns.state_dict()
    metrics = gns.update(math.inf, 1.0, 1, 4)
    assert not math.isfinite(metrics["gns_trace_step"])
    assert gns.state_dict() == before
    assert math.isnan(GradientNoiseScale().noise_scale)


# ---------------------------------------------------------------------------------------------------
# (c) weight change after one Adam step at lr 5e-6

LR = 5e-6
# bf16 keeps 8 significant bits: for |w| in [2^e, 2^(e+1)) the half-ULP is 2^(e-8). The first Adam step
# moves each entry with a non-zero gradient by ~lr. Magnitudes are away from binade edges:
#   1.5e-4 (half-ULP 2^-21 = 4.8e-7) and 1.2e-3 (2^-18 = 3.8e-6): below lr -> changes;
#   3.0e-3 (2^-17 = 7.6e-6) and 0.1 (2^-12 = 2.4e-4): above lr -> stays.
MAGNITUDES = (1.5e-4, 1.2e-3, 3.0e-3, 0.1)
PER_GROUP, ZERO_GRAD_PER_GROUP = 16, 4  # 4 entries of each group get a zero gradient (never move)
EXPECTED_BF16_FRAC = 2 * (PER_GROUP - ZERO_GRAD_PER_GROUP) / (len(MAGNITUDES) * PER_GROUP)  # 24/64
EXPECTED_FP32_FRAC = (PER_GROUP - ZERO_GRAD_PER_GROUP) / PER_GROUP  # 48/64: every non-zero gradient


def _weights_and_grads() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    n = len(MAGNITUDES) * PER_GROUP
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    w = (torch.tensor(MAGNITUDES).repeat_interleave(PER_GROUP) * signs).to(torch.bfloat16)
    g = (0.01 + torch.rand(n, generator=gen)) * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    g.view(len(MAGNITUDES), PER_GROUP)[:, :ZERO_GRAD_PER_GROUP] = 0.0
    return w.float(), g  # w holds bf16-representable values


def _expected_bf16_changed(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    half_ulp = torch.exp2(torch.floor(torch.log2(w.abs())) - 8)
    return (g != 0) & (LR > half_ulp)


def _adam_step(param: nn.Parameter, grad: torch.Tensor) -> None:
    param.grad = grad.to(param.dtype)
    torch.optim.Adam([param], lr=LR).step()


def test_frac_changed_bf16_matches_half_ulp_rule():
    w, g = _weights_and_grads()
    assert int(_expected_bf16_changed(w, g).sum()) == 24  # the rule and the hand count agree
    param = nn.Parameter(w.to(torch.bfloat16))
    before = snapshot_params([param])
    assert before[0].dtype == torch.bfloat16 and before[0].data_ptr() != param.data_ptr()
    _adam_step(param, g)
    stats = compute_weight_change([param], before)
    assert stats.frac_changed == EXPECTED_BF16_FRAC == 0.375
    assert (stats.num_changed, stats.numel) == (24, 64)
    changed = param.detach() != before[0]
    assert torch.equal(changed, _expected_bf16_changed(w, g))
    diff = param.detach().float() - before[0].float()
    assert stats.update_ratio == pytest.approx(float(diff.norm() / before[0].float().norm()), rel=1e-6)
    assert stats.as_metrics() == {
        "frac_weights_changed": stats.frac_changed,
        "update_to_weight_ratio": stats.update_ratio,
    }


def test_frac_changed_fp32_master_and_its_bf16_view():
    w, g = _weights_and_grads()
    param = nn.Parameter(w.clone())  # fp32 master weights
    before_fp32 = snapshot_params([param])
    before_bf16 = snapshot_params([param], torch.bfloat16)  # the cheap forward-dtype snapshot
    _adam_step(param, g)
    master = compute_weight_change([param], before_fp32)
    assert master.frac_changed == EXPECTED_FP32_FRAC == 0.75
    assert torch.equal(param.detach() != before_fp32[0], g != 0)
    ratio = float((param.detach() - w).norm() / w.norm())
    assert master.update_ratio == pytest.approx(ratio, rel=1e-6)
    # The bf16 view of the master weights moves by the same half-ULP rule (values start bf16-exact).
    view = compute_weight_change([param], before_fp32, compare_dtype=torch.bfloat16)
    assert view.frac_changed == EXPECTED_BF16_FRAC
    assert compute_weight_change([param], before_bf16).frac_changed == EXPECTED_BF16_FRAC


def test_weight_change_validates_snapshot():
    param = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError):
        compute_weight_change([param], [])
    with pytest.raises(ValueError):
        compute_weight_change([param], [torch.ones(4)])


# ---------------------------------------------------------------------------------------------------
# (d) resume


def test_state_dict_round_trip_continues_ema_exactly():
    gen = torch.Generator().manual_seed(4)
    pairs = [
        (1.0 + float(torch.rand((), generator=gen)), float(torch.rand((), generator=gen))) for _ in range(20)
    ]
    straight = GradientNoiseScale(beta=0.95)
    for small, big in pairs:
        straight.update(small, big, 2, 16)
    first = GradientNoiseScale(beta=0.95)
    for small, big in pairs[:10]:
        first.update(small, big, 2, 16)
    resumed = GradientNoiseScale(beta=0.95)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as in trainer_state.json
    for small, big in pairs[10:]:
        metrics = resumed.update(small, big, 2, 16)
    assert resumed.state_dict() == straight.state_dict()
    assert metrics["gns_b_simple"] == straight.noise_scale
    with pytest.raises(ValueError):
        GradientNoiseScale(beta=0.9).load_state_dict(first.state_dict())


# ---------------------------------------------------------------------------------------------------
# (e) shard awareness (anything with to_local(), as FSDP2 DTensors) and the import boundary


class FakeShard:
    """Stands in for a DTensor: `to_local()` gives this rank's shard."""

    def __init__(self, local: torch.Tensor) -> None:
        self._local = local

    def to_local(self) -> torch.Tensor:
        return self._local


class FakeParam(FakeShard):
    def __init__(self, local: torch.Tensor, grad: torch.Tensor) -> None:
        super().__init__(local)
        self.grad = FakeShard(grad)


def _run_two_ranks(fn):
    """Simulated 2-rank sum: a local-only pass records each rank's buffer; then each rank adds the other's."""
    local: dict[int, torch.Tensor] = {}
    for rank in (0, 1):
        fn(rank, lambda t, r=rank: local.__setitem__(r, t.clone()))
    return [fn(rank, lambda t, r=rank: t.add_(local[1 - r])) for rank in (0, 1)]


def test_sharded_norms_and_counts_sum_to_the_global_ones():
    torch.manual_seed(5)
    full_w = [torch.randn(6, 3), torch.randn(5)]
    full_g = [torch.randn(6, 3), torch.randn(5)]
    plain = [nn.Parameter(w.clone()) for w in full_w]
    for p, g in zip(plain, full_g, strict=True):
        p.grad = g.clone()
    expected_sq = compute_grad_sq_norm(plain, dtype=torch.float64)
    assert expected_sq == pytest.approx(sum(float(g.double().pow(2).sum()) for g in full_g), rel=1e-12)

    # Uneven Shard(0) split over two ranks, as FSDP2 does for 5 rows.
    def shards(rank: int) -> list[FakeParam]:
        return [
            FakeParam(w.chunk(2)[rank].clone(), g.chunk(2)[rank].clone())
            for w, g in zip(full_w, full_g, strict=True)
        ]

    def grad_norm(rank: int, all_reduce) -> float:
        return compute_grad_sq_norm(shards(rank), all_reduce, dtype=torch.float64)

    out0, out1 = _run_two_ranks(grad_norm)
    assert out0 == pytest.approx(expected_sq, rel=1e-12) and out1 == pytest.approx(expected_sq, rel=1e-12)

    # Weight change: move half the entries of the full tensors, compare global stats.
    after_w = [w.clone() for w in full_w]
    after_w[0][::2] += 1.0
    full_stats = compute_weight_change([nn.Parameter(w) for w in after_w], [w.clone() for w in full_w])

    def weight_change(rank: int, all_reduce):
        before = snapshot_params([FakeShard(w.chunk(2)[rank].clone()) for w in full_w])
        now = [FakeShard(w.chunk(2)[rank].clone()) for w in after_w]
        return compute_weight_change(now, before, all_reduce)

    stats0, stats1 = _run_two_ranks(weight_change)
    assert stats0.numel == stats1.numel == full_stats.numel == 23
    assert stats0.num_changed == full_stats.num_changed == 9
    assert stats0.frac_changed == full_stats.frac_changed
    assert stats0.update_ratio == pytest.approx(full_stats.update_ratio, rel=1e-6)  # fp32 norms
    assert stats1.update_ratio == pytest.approx(full_stats.update_ratio, rel=1e-6)


def test_params_without_grad_count_as_zero():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    a.grad = torch.full((2,), 3.0)
    assert compute_grad_sq_norm([a, b], dtype=torch.float64) == pytest.approx(18.0, rel=1e-14)
    assert compute_grad_sq_norm([a, b]) == pytest.approx(18.0, rel=1e-6)  # fp32 norm, squared
    assert compute_grad_sq_norm([]) == 0.0


def test_health_imports_without_torch_distributed():
    """`import torch` itself loads torch.distributed, so check the module's own imports (AST) and that
    it imports with vllm/ray blocked."""
    import ast
    from pathlib import Path

    import self_revision_training.shared.health as health

    tree = ast.parse(Path(health.__file__).read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [
        f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
    ]
    assert not [name for name in names if "distributed" in name], names
    probe = (
        "import sys, torch\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('vllm', 'ray', 'self_distillation'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import self_revision_training.shared.health\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
