"""Training-health metrics: gradient noise scale and the fraction of weights changed per step.

Pure torch (no torch.distributed import): a cross-rank sum comes in as a callable `all_reduce(tensor)`
that sums in place (e.g. `self_revision_training.shared.distributed.all_reduce`; None = one process).
FSDP2 parameters and gradients are DTensors sharded over ranks; every function works on the local
shard (`.to_local()` when a tensor has it), so squared norms and counts of the shards, summed over
ranks, are the global ones. This assumes the tensors are *sharded* (FSDP2 `Shard(0)`) over the group
that `all_reduce` sums over; a replicated placement would be counted once per replica.

1. Gradient noise scale, McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
   App. A.1 (the two-batch estimator; reference: related_methods.md 4(d2), EleutherAI/gpt-neox
   megatron/gradient_noise_scale). With |g_s|^2, |g_b|^2 the squared norms of gradients that are
   means over B_s < B_b i.i.d. units at the same parameters,
       |G|^2  ~= (B_b |g_b|^2 - B_s |g_s|^2) / (B_b - B_s)
       tr S   ~= (|g_s|^2 - |g_b|^2) / (1/B_s - 1/B_b)
   each EMA-smoothed (beta 0.99, bias correction 1/(1 - beta^t)), and B_simple = EMA(tr S) / EMA(|G|^2),
   in units. Per step in a trainer (small = the first micro-batch of every rank, big = the whole step):

       health = GradientNoiseScale()                    # persist health.state_dict() with the trainer
       for k, batch in enumerate(micro_batches):
           backward(loss_sum(batch))                    # .grad = scale * sum of per-unit gradients
           if k == 0:
               small = compute_grad_sq_norm(params, all_reduce)
       big = compute_grad_sq_norm(params, all_reduce)   # before clipping
       metrics |= health.update(
           compute_unit_mean_sq_norm(small, n_first, scale), compute_unit_mean_sq_norm(big, n_all, scale),
           n_first, n_all)

   Units are sequences: with the loss normalised by the step's trained tokens T (`scale = 1/T`, the
   same for every micro-batch; in `sft.train_step` each rank multiplies by world/T and FSDP2 averages
   over ranks, so the effective scale is 1/T), `.grad / scale` is the sum of per-sequence gradients
   (each the gradient of that sequence's summed CE), so `compute_unit_mean_sq_norm` divides by
   (scale * n)^2, and B_simple comes out in sequences (compare it with the step's global batch).
   n_first / n_all count real sequences over all ranks (not zero-weight dummies). The big norm is
   free: `clip_grad_norm_` returns the pre-clip global norm, so big = norm ** 2 (take the snapshot
   before clipping otherwise). Requirements: grad_accum >= 2 (else B_s = B_b); FSDP2 gradient sync on
   every micro-batch (its default; without it `.grad` is empty after the first backward); and
   micro-batches that are random subsets of the step (length-grouped batching hands the longest
   sequences to the first micro-batch, which biases the estimate).

2. Weight change per step (related_methods.md 4(d2)): frac_changed = (1/N) sum_i [w_i' != w_i] compared
   in the forward dtype (bf16: Adam's ~lr step is lost below half an ULP, |w| 2^-9), and the update
   ratio ||w' - w|| / ||w|| in fp32 math:

       before = snapshot_params(params, torch.bfloat16)  # before optimizer.step()
       optimizer.step()
       metrics |= compute_weight_change(params, before, all_reduce).as_metrics()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

AllReduce = Callable[[torch.Tensor], Any]  # sums its argument over ranks, in place


def _local(tensor: Any) -> torch.Tensor:
    """The local shard of a DTensor (anything with `to_local()`), else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _reduce(values: list[torch.Tensor], all_reduce: AllReduce | None) -> list[float]:
    """Sum a few float64 scalars over ranks in ONE collective (every rank must call it)."""
    buf = torch.stack(values)  # [k] float64
    if all_reduce is not None:
        all_reduce(buf)
    return buf.tolist()


def _device(tensors: Sequence[Any]) -> torch.device:
    return _local(tensors[0]).device if tensors else torch.device("cpu")


def _sq_norm(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|tensor|^2 as a float64 scalar, reduced in `dtype` (or the tensor's own dtype if wider).

    vector_norm upcasts inside the reduction (no full-precision copy of a bf16 shard) and reduces
    accurately; squaring the fp32 norm costs ~1e-7 relative, which is immaterial for these metrics.
    """
    work = torch.promote_types(tensor.dtype, dtype)
    return torch.linalg.vector_norm(tensor, 2, dtype=work).double() ** 2


# ---------------------------------------------------------------------------------------------------
# 1. Gradient noise scale


def compute_grad_sq_norm(
    params: Iterable[Any], all_reduce: AllReduce | None = None, dtype: torch.dtype = torch.float32
) -> float:
    """Global squared L2 norm of the current `.grad` of `params` (None grads count as 0).

    Args:
        params: parameters (plain or FSDP2 DTensor); every rank passes its copy of the same list.
        all_reduce: in-place sum over ranks; None = single process.
        dtype: norm precision (float32 or float64); the per-tensor squares are summed in float64.
    Returns:
        sum over all parameters and ranks of |grad|^2, a Python float.
    """
    params = list(params)
    device = _device(params)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None:
            total += _sq_norm(_local(p.grad).detach(), dtype)
    return _reduce([total], all_reduce)[0]


def compute_unit_mean_sq_norm(grad_sq_norm: float, num_units: float, grad_scale: float = 1.0) -> float:
    """|mean per-unit gradient|^2 from the squared norm of `grad_scale * (sum of per-unit gradients)`.

    Args:
        grad_sq_norm: |.grad|^2 (e.g. from `compute_grad_sq_norm`).
        num_units: units (sequences) whose gradients were summed, over all ranks.
        grad_scale: the factor the summed loss was multiplied by before backward (1/T for a loss
            normalised by the step's T trained tokens; 1 if `grad_sq_norm` is already of the sum).
    Returns:
        grad_sq_norm / (grad_scale * num_units)^2.
    """
    if num_units <= 0 or grad_scale <= 0:
        raise ValueError(f"num_units and grad_scale must be > 0, got {num_units}, {grad_scale}")
    return grad_sq_norm / (grad_scale * num_units) ** 2


def compute_gns_estimates(
    small_sq_norm: float, big_sq_norm: float, small_batch: float, big_batch: float
) -> tuple[float, float]:
    """McCandlish et al. 2018 App. A.1 unbiased two-batch estimates.

    Args:
        small_sq_norm, big_sq_norm: |g|^2 of gradients that are means over small_batch / big_batch
            units, at the same parameters.
        small_batch, big_batch: the unit counts, 0 < small_batch < big_batch.
    Returns:
        (grad_sq, trace): estimates of |G|^2 (true-gradient squared norm; may be negative when noise
        dominates) and tr(Sigma) (per-unit gradient covariance trace).
    """
    if not 0 < small_batch < big_batch:
        raise ValueError(f"need 0 < small_batch < big_batch, got {small_batch}, {big_batch}")
    grad_sq = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (big_batch - small_batch)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / small_batch - 1.0 / big_batch)
    return grad_sq, trace


def compute_noise_scale(trace: float, grad_sq: float) -> float:
    """B_simple = tr(Sigma) / |G|^2; inf when |G|^2 <= 0 < tr(Sigma) (noise-dominated), nan if both <= 0."""
    if grad_sq > 0:
        return trace / grad_sq
    return math.inf if trace > 0 else math.nan


def compute_ema(avg: float, value: float, beta: float, step: int) -> tuple[float, float]:
    """One EMA update (gpt-neox convention): returns (new raw avg, bias-corrected avg / (1 - beta^step)).

    `step` is the 1-based count of values seen, including this one; `avg` starts at 0.
    """
    avg = beta * avg + (1.0 - beta) * value
    return avg, avg / (1.0 - beta**step)


class GradientNoiseScale:
    """EMA-smoothed two-batch gradient noise scale; `state_dict` lets a resumed run continue the EMA."""

    def __init__(self, beta: float = 0.99) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.step = 0  # finite estimates folded into the EMA
        self.ema_grad_sq = 0.0  # raw (not bias-corrected) EMA of |G|^2
        self.ema_trace = 0.0  # raw EMA of tr(Sigma)

    @property
    def grad_sq(self) -> float:
        """Bias-corrected EMA of |G|^2 (nan before the first update)."""
        return self.ema_grad_sq / (1.0 - self.beta**self.step) if self.step else math.nan

    @property
    def trace(self) -> float:
        """Bias-corrected EMA of tr(Sigma) (nan before the first update)."""
        return self.ema_trace / (1.0 - self.beta**self.step) if self.step else math.nan

    @property
    def noise_scale(self) -> float:
        """B_simple in units (sequences); the bias corrections cancel in the ratio."""
        return compute_noise_scale(self.trace, self.grad_sq) if self.step else math.nan

    def update(
        self, small_sq_norm: float, big_sq_norm: float, small_batch: float, big_batch: float
    ) -> dict[str, float]:
        """Fold one step's pair of gradient norms into the EMA; returns metrics to log.

        Non-finite estimates (an inf/nan gradient) are reported but not folded in, so one bad step
        does not poison the EMA. Returns gns_grad_sq / gns_trace / gns_b_simple (EMA, bias-corrected)
        and gns_grad_sq_step / gns_trace_step (this step's raw estimates).
        """
        grad_sq, trace = compute_gns_estimates(small_sq_norm, big_sq_norm, small_batch, big_batch)
        if math.isfinite(grad_sq) and math.isfinite(trace):
            self.step += 1
            self.ema_grad_sq, _ = compute_ema(self.ema_grad_sq, grad_sq, self.beta, self.step)
            self.ema_trace, _ = compute_ema(self.ema_trace, trace, self.beta, self.step)
        return {
            "gns_grad_sq": self.grad_sq,
            "gns_trace": self.trace,
            "gns_b_simple": self.noise_scale,
            "gns_grad_sq_step": grad_sq,
            "gns_trace_step": trace,
        }

    def state_dict(self) -> dict[str, float | int]:
        """JSON-serialisable state (floats round-trip exactly through json)."""
        return {
            "beta": self.beta,
            "step": self.step,
            "ema_grad_sq": self.ema_grad_sq,
            "ema_trace": self.ema_trace,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if float(state["beta"]) != self.beta:
            raise ValueError(f"checkpoint beta {state['beta']} != configured beta {self.beta}")
        self.step = int(state["step"])
        self.ema_grad_sq = float(state["ema_grad_sq"])
        self.ema_trace = float(state["ema_trace"])


# ---------------------------------------------------------------------------------------------------
# 2. Weight change per optimizer step


def snapshot_params(params: Iterable[Any], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Detached copies of the local parameter shards, cast to `dtype` (None = each param's own dtype).

    Memory: one copy of this rank's shards in `dtype`, numel/world_size x itemsize per rank (bf16:
    2 bytes per parameter, e.g. 1 GB per rank for a 4B model on 8 ranks). A bf16 snapshot gives
    frac_changed in bf16 exactly; the fp32 master-weight update ratio needs an fp32 snapshot.
    """
    out = []
    for p in params:
        local = _local(p).detach()
        out.append(local.to(dtype if dtype is not None else local.dtype, copy=True))
    return out


@dataclass(frozen=True)
class WeightChange:
    """Global weight-change statistics of one optimizer step."""

    frac_changed: float  # entries whose value in the compare dtype changed / all entries
    update_ratio: float  # ||w_after - w_before|| / ||w_before||, both in the snapshot dtype, fp32 math
    num_changed: int
    numel: int

    def as_metrics(self) -> dict[str, float]:
        return {"frac_weights_changed": self.frac_changed, "update_to_weight_ratio": self.update_ratio}


def compute_weight_change(
    params: Iterable[Any],
    before: Sequence[torch.Tensor],
    all_reduce: AllReduce | None = None,
    compare_dtype: torch.dtype | None = None,
) -> WeightChange:
    """Fraction of entries changed and update-to-weight norm ratio between `before` and `params` now.

    Args:
        params: the same parameters, in the same order, as given to `snapshot_params`.
        before: `snapshot_params(params, dtype)` taken before the optimizer step.
        all_reduce: in-place sum over ranks; None = single process.
        compare_dtype: dtype in which "changed" is decided (both sides are cast to it); None = the
            snapshot's dtype. With an fp32 snapshot, `compare_dtype=torch.bfloat16` gives the bf16
            view of fp32 master weights.
    Returns:
        WeightChange (global over ranks). The ratio compares the params cast to the snapshot dtype,
        i.e. the update as seen at the snapshot's precision. Transient memory: a few fp32/compare-dtype
        copies of one tensor's local shard at a time; one all_reduce of 4 float64 values.
    """
    params = list(params)
    if len(params) != len(before):
        raise ValueError(f"{len(params)} params but {len(before)} snapshot tensors")
    device = _device(params)
    changed = torch.zeros((), dtype=torch.float64, device=device)
    diff_sq = torch.zeros((), dtype=torch.float64, device=device)
    before_sq = torch.zeros((), dtype=torch.float64, device=device)
    numel = 0
    for p, old in zip(params, before, strict=True):
        new = _local(p).detach()
        if new.shape != old.shape:
            raise ValueError(f"shape {tuple(new.shape)} != snapshot shape {tuple(old.shape)}")
        cmp = compare_dtype if compare_dtype is not None else old.dtype
        changed += (new.to(cmp) != old.to(cmp)).sum().double()
        diff_sq += _sq_norm(new.to(old.dtype).float() - old.float(), torch.float32)
        before_sq += _sq_norm(old, torch.float32)
        numel += old.numel()
    count = torch.tensor(float(numel), dtype=torch.float64, device=device)  # exact below 2^53
    totals = _reduce([changed, diff_sq, before_sq, count], all_reduce)
    num_changed, total_diff_sq, total_before_sq, total_numel = totals
    return WeightChange(
        frac_changed=num_changed / total_numel if total_numel else math.nan,
        update_ratio=math.sqrt(total_diff_sq / total_before_sq) if total_before_sq > 0 else math.nan,
        num_changed=int(num_changed),
        numel=int(total_numel),
    )
