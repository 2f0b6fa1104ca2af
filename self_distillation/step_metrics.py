"""Per-step metrics of Phase 2: rollout statistics (driver) and the learner's summed statistics (all ranks).

Pure Python/torch. The learner adds each sample's per-token values to a `DistillationStats` (named sums,
no index arithmetic), the sums are all-reduced over ranks as one tensor (`to_tensor` / `from_tensor`,
with the maxima reduced separately), and `metrics()` turns them into token means:

    train/kl, train/kl_r1, train/kl_r0           divergence per target token, overall and by reward r
    train/teacher_minus_student_logprob          mean gap of the sampled token's log-prob (raw distributions)
    train/rollout_minus_learner_logprob_abs_*    |engine - learner| log-prob of the sampled token (sync check)
    train/clipped_entry_fraction / _token_fraction  what loss.clip_per_entry / clip_per_token clamped
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from self_distillation.rollout_data import RolloutItem


class _Reduced:
    """Named statistics all-reduced over ranks as tensors, one per reduction (field metadata "reduce")."""

    def _names(self, reduce: str) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.metadata.get("reduce", "sum") == reduce]  # type: ignore[arg-type]

    def to_tensor(self, reduce: str = "sum") -> torch.Tensor:
        """The fields all-reduced with `reduce` ("sum", "max" or "min") as one float64 tensor."""
        return torch.tensor([getattr(self, n) for n in self._names(reduce)], dtype=torch.float64)

    def set_from_tensor(self, values: torch.Tensor, reduce: str = "sum") -> None:
        for name, value in zip(self._names(reduce), values.tolist(), strict=True):
            setattr(self, name, float(value))


@dataclass
class DistillationStats(_Reduced):
    """Sums over this rank's samples (then over all ranks) of one learner step."""

    kl_sum: float = 0.0
    num_tokens: float = 0.0
    kl_sum_r1: float = 0.0
    num_tokens_r1: float = 0.0
    kl_sum_r0: float = 0.0
    num_tokens_r0: float = 0.0
    logprob_gap_sum: float = 0.0  # teacher - student log-prob of the sampled token
    rollout_logprob_abs_diff_sum: float = 0.0
    rollout_tokens: float = 0.0
    clipped_entries: float = 0.0
    clip_entries_total: float = 0.0  # tokens x vocabulary terms the entry clip acts on
    clipped_tokens: float = 0.0
    rollout_logprob_abs_diff_max: float = field(default=0.0, metadata={"reduce": "max"})

    def add_sample(
        self,
        reward: bool,
        divergence: torch.Tensor,  # [n] this sample's per-token divergence
        student_logprobs: torch.Tensor,  # [n] raw log-prob of each sampled token under the learner
        teacher_logprobs: torch.Tensor,  # [n] the same under the teacher
        rollout_logprobs: list[float] | None,  # [n] the same under the rollout engine
        clipped_entries: torch.Tensor,  # [n]
        clipped_token: torch.Tensor,  # [n]
        entries_per_token: int,
    ) -> None:
        n = divergence.numel()
        div, lp = divergence.double(), student_logprobs.double()
        self.kl_sum += float(div.sum())
        self.num_tokens += n
        if reward:
            self.kl_sum_r1 += float(div.sum())
            self.num_tokens_r1 += n
        else:
            self.kl_sum_r0 += float(div.sum())
            self.num_tokens_r0 += n
        self.logprob_gap_sum += float((teacher_logprobs.double() - lp).sum())
        if rollout_logprobs is not None and len(rollout_logprobs) == n:
            diff = (torch.tensor(rollout_logprobs, dtype=torch.float64) - lp).abs()
            self.rollout_logprob_abs_diff_sum += float(diff.sum())
            self.rollout_tokens += n
            self.rollout_logprob_abs_diff_max = max(
                self.rollout_logprob_abs_diff_max, float(diff.max()) if n else 0.0
            )
        self.clipped_entries += float(clipped_entries.sum())
        self.clip_entries_total += n * entries_per_token
        self.clipped_tokens += float(clipped_token.sum())

    def metrics(self) -> dict[str, float]:
        """Token means; NaN where nothing was counted (e.g. no r=1 sample this step)."""

        def ratio(a: float, b: float) -> float:
            return a / b if b else math.nan

        return {
            "train/kl_r1": ratio(self.kl_sum_r1, self.num_tokens_r1),
            "train/kl_r0": ratio(self.kl_sum_r0, self.num_tokens_r0),
            "train/kl": self.kl_sum / max(self.num_tokens, 1.0),
            "train/teacher_minus_student_logprob": self.logprob_gap_sum / max(self.num_tokens, 1.0),
            "train/rollout_minus_learner_logprob_abs_mean": ratio(
                self.rollout_logprob_abs_diff_sum, self.rollout_tokens
            ),
            "train/rollout_minus_learner_logprob_abs_max": (
                self.rollout_logprob_abs_diff_max if self.rollout_tokens else math.nan
            ),
            "train/clipped_entry_fraction": ratio(self.clipped_entries, self.clip_entries_total),
            "train/clipped_token_fraction": ratio(self.clipped_tokens, self.num_tokens),
        }


@dataclass
class PolicyStats(_Reduced):
    """GRPO's learner statistics: ratio, clipping, entropy, KL to the reference, engine-vs-learner gap."""

    tokens: float = 0.0
    ratio_sum: float = 0.0
    clipped: float = 0.0
    entropy_sum: float = 0.0
    kl_sum: float = 0.0
    rollout_logprob_abs_diff_sum: float = 0.0
    ratio_max: float = field(default=-math.inf, metadata={"reduce": "max"})
    ratio_min: float = field(default=math.inf, metadata={"reduce": "min"})

    def add_sample(self, values: dict[str, torch.Tensor], rollout_logprobs: list[float] | None) -> None:
        n = values["ratio"].numel()
        if not n:
            return
        ratio = values["ratio"].double()
        self.tokens += n
        self.ratio_sum += float(ratio.sum())
        self.ratio_max = max(self.ratio_max, float(ratio.max()))
        self.ratio_min = min(self.ratio_min, float(ratio.min()))
        self.clipped += float(values["clipped"].sum())
        self.entropy_sum += float(values["entropy"].double().sum())
        self.kl_sum += float(values["kl"].double().sum())
        if rollout_logprobs is not None:
            diff = torch.tensor(rollout_logprobs, dtype=torch.float64) - values["logprobs"].double()
            self.rollout_logprob_abs_diff_sum += float(diff.abs().sum())

    def metrics(self) -> dict[str, float]:
        n = self.tokens or math.nan
        return {
            "train/ratio_mean": self.ratio_sum / n,
            "train/ratio_max": self.ratio_max if self.tokens else math.nan,
            "train/ratio_min": self.ratio_min if self.tokens else math.nan,
            "train/clip_fraction": self.clipped / n,
            "train/entropy": self.entropy_sum / n,
            "train/kl_to_reference": self.kl_sum / n,
            "train/rollout_minus_learner_logprob_abs_mean": self.rollout_logprob_abs_diff_sum / n,
        }


@dataclass
class StepStats:
    """Per-step rollout statistics (the learner's loss/KL metrics are merged in by the driver)."""

    rewards: list[bool] = field(default_factory=list)
    response_lengths: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    grade_reasons: list[str] = field(default_factory=list)  # the reward source's verdict reasons


def compute_rollout_metrics(
    stats: StepStats, items: list[RolloutItem], skipped: dict[str, int]
) -> dict[str, float]:
    """Training reward, r=1 fraction, response lengths, truncation and skip counts of one step."""
    n = max(1, len(stats.rewards))
    lengths = stats.response_lengths or [0]
    return {
        "train/reward": sum(stats.rewards) / n,  # accuracy of the sampled responses
        "train/fraction_r1": sum(i.reward for i in items) / max(1, len(items)),  # among distilled items
        "train/response_length_mean": sum(lengths) / len(lengths),
        "train/response_length_max": float(max(lengths)),
        "train/truncation_rate": sum(r == "length" for r in stats.finish_reasons) / n,
        "train/teacher_budget_truncation_rate": sum(i.budget_truncated for i in items) / max(1, len(items)),
        "train/num_samples": float(len(stats.rewards)),
        "train/num_items": float(len(items)),
        **{f"train/skipped_{k}": float(v) for k, v in skipped.items()},
        **{f"train/grade_reason/{k}": v / n for k, v in sorted(Counter(stats.grade_reasons).items())},
        **_context_metrics(items, n),
    }


def _context_metrics(items: list[RolloutItem], num_samples: int) -> dict[str, float]:
    """Teacher-context facts: the share of samples with a usable privileged context (a reference solution,
    a successful sibling) and, among those, the share whose privileged text was cut to fit the budget."""
    privileged = sum(i.context_info.get("privileged", 0.0) for i in items)
    if not privileged:
        return {}
    truncated = sum(i.context_info.get("privileged_truncated", 0.0) for i in items)
    return {
        "train/privileged_context_fraction": privileged / num_samples,
        "train/privileged_truncation_rate": truncated / privileged,
    }
