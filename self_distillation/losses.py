"""Token-level distillation losses for SD-Zero Phase 2 (paper Sec. 3.2, the KL between the student
pi_theta(. | x, y_<t) and the frozen SRT teacher pi_SRT(. | x, y, P_r, y_<t) on every token of y).

All options of the divergence travel as one frozen `Divergence` (built once from the config's `loss`
section by `Divergence.from_config`). Three paths with identical semantics:
- `distillation_loss(student_logits, teacher_logits, mask, div)`: from aligned [B, T, V] logits (the dense
  reference the tests check against a brute force).
- `compute_sparse_token_divergence(student_logits, teacher_logprobs, teacher_ids, div)`: against the
  teacher's top-k (or full) log-probs shipped by a separate teacher process (the learner's path).
- `lean_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, div)`: from
  final hidden states already selected at the target positions ([N, H]) and both lm_head weights; logits
  exist one chunk at a time and each chunk's gradient is computed right away
  (`target_logits.lean_chunked_loss`), so no [N, V] float32 tensor exists and nothing is recomputed.

Per token t, with p_S = softmax(z_S / T), p_T = softmax(z_T / T) over the full vocabulary (top_k=None)
or over the teacher's top-k ids with both renormalised on that support (top_k=k, the reference's
default with k=64):
    forward  = sum p_T (log p_T - log p_S)                 KL(teacher || student)
    reverse  = sum p_S (log p_S - log p_T)                 KL(student || teacher), the paper's objective
    mixed    = w * forward + (1 - w) * reverse              w = mixed_kl_weight (reference: 0.5)
    jsd      = b * KL(p_T || M) + (1 - b) * KL(p_S || M),   M = b * p_T + (1 - b) * p_S, b = jsd_beta
Clipping (both off by default; the reference clips nothing):
    clip_per_entry: each vocabulary entry's term is clamped to <= c before summing over the vocabulary
                    (OPSD's "pointwise" jsd_token_clip); applies to forward/reverse/mixed.
    clip_per_token: each token's divergence is clamped to <= c (verl's loss_max_clamp); a clipped token
                    passes no gradient.
Reduction: loss = sum_t mask_t * kl_t / num_tokens, where num_tokens defaults to sum(mask) and should be
the number of valid tokens in the whole optimizer step (all micro-batches, all data-parallel ranks) so
the loss does not depend on how the step is split. An all-zero mask gives 0, not NaN.
Gradients reach only the student: teacher inputs are detached; log_softmax runs in float32 (or in
float64 when the inputs are float64, which the brute-force tests use).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from self_revision_training.shared.target_logits import lean_chunked_loss

KLType = Literal["forward", "reverse", "mixed", "jsd"]
KL_TYPES = ("forward", "reverse", "mixed", "jsd")


@dataclass(frozen=True)
class Divergence:
    """The token-level divergence and its options (see the module docstring)."""

    kl_type: KLType = "reverse"  # the paper's objective; the released code ran mixed
    mixed_kl_weight: float = 0.5  # weight of the forward term in "mixed"
    jsd_beta: float = 0.5  # jsd mixture weight b in (0, 1)
    top_k: int | None = None  # None = full vocabulary; k = the teacher's top-k support, renormalised
    clip_per_entry: float | None = None  # clamp each vocabulary entry's term to <= c (OPSD)
    clip_per_token: float | None = None  # clamp each token's divergence to <= c (verl)
    temperature: float = 1.0  # applied to BOTH student and teacher logits

    def __post_init__(self) -> None:
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"kl_type must be one of {KL_TYPES}, got {self.kl_type!r}")
        if not 0.0 <= self.mixed_kl_weight <= 1.0:
            raise ValueError(f"mixed_kl_weight must be in [0, 1], got {self.mixed_kl_weight}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be None (full vocabulary) or >= 1, got {self.top_k}")
        for name in ("clip_per_entry", "clip_per_token"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be None or > 0, got {value}")
        if self.clip_per_entry is not None and self.kl_type == "jsd":
            raise ValueError("clip_per_entry applies to forward/reverse/mixed; use clip_per_token with jsd")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @classmethod
    def from_config(cls, loss: Any) -> Divergence:
        """From a `LossConfig` (self_distillation.config), built once per run."""
        fields = ("kl_type", "mixed_kl_weight", "jsd_beta", "top_k", "clip_per_entry", "clip_per_token")
        return cls(**{name: getattr(loss, name) for name in fields}, temperature=loss.temperature)


def count_divergence_terms(div: Divergence) -> int:
    """How many vocabulary sums the divergence has (forward and/or reverse; 2 for jsd)."""
    if div.kl_type == "jsd":
        return 2
    weight = {"forward": 1.0, "reverse": 0.0, "mixed": div.mixed_kl_weight}[div.kl_type]
    return int(weight > 0) + int(weight < 1)


@dataclass(frozen=True)
class TokenDivergence:
    values: torch.Tensor  # [...] divergence per token (float32, or float64 for float64 inputs)
    clipped_entries: torch.Tensor  # [...] vocabulary entries clamped by clip_per_entry (0 when off)
    clipped_token: torch.Tensor  # [...] 1 where clip_per_token clamped the token (0 when off)
    entries_per_token: int  # vocabulary terms per token that clip_per_entry acts on (support x terms)


def _divergence_from_logp(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, div: Divergence
) -> TokenDivergence:
    if div.kl_type == "jsd":
        log_b, log_1mb = torch.log(torch.tensor(div.jsd_beta)), torch.log(torch.tensor(1.0 - div.jsd_beta))
        mix_logp = torch.logsumexp(torch.stack([teacher_logp + log_b, student_logp + log_1mb]), dim=0)
        kl_t_m = (teacher_logp.exp() * (teacher_logp - mix_logp)).sum(-1)
        kl_s_m = (student_logp.exp() * (student_logp - mix_logp)).sum(-1)
        divergence = div.jsd_beta * kl_t_m + (1.0 - div.jsd_beta) * kl_s_m
        clipped_entries = torch.zeros_like(divergence)
    else:
        forward_terms = teacher_logp.exp() * (teacher_logp - student_logp)  # [..., V or k]
        reverse_terms = student_logp.exp() * (student_logp - teacher_logp)
        weight = {"forward": 1.0, "reverse": 0.0, "mixed": div.mixed_kl_weight}[div.kl_type]
        clipped_entries = torch.zeros(forward_terms.shape[:-1], dtype=forward_terms.dtype)
        if div.clip_per_entry is not None:
            with torch.no_grad():
                used = [t for t, w in ((forward_terms, weight), (reverse_terms, 1.0 - weight)) if w > 0]
                clipped_entries = sum((t > div.clip_per_entry).sum(-1).to(t.dtype) for t in used)
            forward_terms = forward_terms.clamp(max=div.clip_per_entry)
            reverse_terms = reverse_terms.clamp(max=div.clip_per_entry)
        divergence = 0.0
        if weight > 0:
            divergence = divergence + weight * forward_terms.sum(-1)
        if weight < 1:
            divergence = divergence + (1.0 - weight) * reverse_terms.sum(-1)
    clipped_token = torch.zeros_like(divergence)
    if div.clip_per_token is not None:
        clipped_token = (divergence.detach() > div.clip_per_token).to(divergence.dtype)
        divergence = divergence.clamp(max=div.clip_per_token)
    entries = count_divergence_terms(div) * student_logp.shape[-1]
    return TokenDivergence(divergence, clipped_entries.to(divergence.device), clipped_token, entries)


def compute_token_divergence_stats(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, div: Divergence = Divergence()
) -> TokenDivergence:
    """Per-token divergence between student and teacher next-token distributions, with clip counts.

    Args:
        student_logits: [..., V] any float dtype; gradients flow into it.
        teacher_logits: [..., V] (detached here).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # at least fp32 (bf16 logits -> fp32)
    student = student_logits.to(dtype)  # [..., V]
    teacher = teacher_logits.detach().to(dtype)  # [..., V]
    if div.temperature != 1.0:  # skip two [..., V] copies in the common case
        student, teacher = student / div.temperature, teacher / div.temperature
    if div.top_k is not None and div.top_k < teacher.shape[-1]:
        support = teacher.topk(div.top_k, dim=-1).indices  # [..., k]
        teacher = teacher.gather(-1, support)
        student = student.gather(-1, support)
    return _divergence_from_logp(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), div)


def compute_token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, div: Divergence = Divergence()
) -> torch.Tensor:
    """[...] per-token divergence (float32, or float64 for float64 inputs); see the _stats variant."""
    return compute_token_divergence_stats(student_logits, teacher_logits, div).values


def masked_sum_and_count(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of values where mask == 1, number of such entries) in float32."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(), mask.sum()


def _reduce(
    total: torch.Tensor, count: torch.Tensor, num_tokens: float | torch.Tensor | None
) -> torch.Tensor:
    denominator = count if num_tokens is None else torch.as_tensor(num_tokens, dtype=total.dtype)
    return total / denominator.clamp(min=1.0)  # an all-masked batch gives 0, not NaN


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    div: Divergence = Divergence(),
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked token-level distillation loss from aligned logits.

    Args:
        student_logits: [B, T, V]; row [b, t] and teacher row [b, t] predict the same target token.
        teacher_logits: [B, T, V].
        mask: [B, T] in {0, 1}; 1 where the token is in the loss.
        num_tokens: the normaliser (valid tokens in the whole optimizer step); default sum(mask).
    Returns:
        (scalar loss, metrics: kl_sum over masked tokens, num_tokens in this call)
    """
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(student_logits.shape[:-1])}")
    divergence = compute_token_divergence(student_logits, teacher_logits, div)  # [B, T]
    total, count = masked_sum_and_count(divergence, mask)
    loss = _reduce(total, count, num_tokens)
    return loss, {"kl_sum": float(total.detach()), "num_tokens": float(count)}


def lean_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    div: Divergence = Divergence(),
    num_tokens: float | torch.Tensor | None = None,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`distillation_loss` from hidden states at the target positions, without [N, V] tensors.

    Args:
        student_hidden: [N, H] final hidden states at the N target positions (after the final norm).
        student_weight: [V, H] the student's lm_head weight.
        teacher_hidden: [N, H_T] the teacher's hidden states at the matching positions (detached here).
        teacher_weight: [V, H_T] the teacher's lm_head weight.
        mask: [N] in {0, 1}, default all ones.
        chunk_size: tokens per chunk; peak memory ~ a few [chunk_size, V] float32 tensors.
    Returns:
        (scalar loss, metrics) exactly as `distillation_loss`.
    """
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student has {student_hidden.shape[0]} target positions, teacher "
            f"{teacher_hidden.shape[0]}: the sequences are misaligned"
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"vocabulary sizes differ: student {student_weight.shape[0]}, teacher {teacher_weight.shape[0]}"
        )
    mask = torch.ones(student_hidden.shape[0], device=student_hidden.device) if mask is None else mask
    if mask.shape != student_hidden.shape[:1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match {student_hidden.shape[0]} positions")
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()

    def chunk_loss(student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher_hidden[rows] @ teacher_weight.T  # [C, V], only target positions
        divergence = compute_token_divergence(student_logits, teacher_logits, div)  # [C]
        return (divergence * mask[rows].to(divergence.dtype)).sum()

    total = lean_chunked_loss(student_hidden, student_weight, chunk_loss, chunk_size)
    count = mask.float().sum()
    loss = _reduce(total, count, num_tokens)
    return loss, {"kl_sum": float(total.detach()), "num_tokens": float(count)}


def compute_sparse_token_divergence(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor | None = None,
    div: Divergence = Divergence(),
) -> TokenDivergence:
    """Per-token divergence against teacher log-probs shipped by a separate teacher process.

    The teacher sends, per target token, either its full log-softmax (teacher_ids None) or its top-k
    ids and log-probs (log_softmax(z_T / T) gathered at its k largest entries). Both are renormalised on
    the support here, so the result equals `compute_token_divergence(student, teacher_full_logits, div)`
    (top_k = k, or None for the full case) without ever moving [N, V] teacher tensors.

    Args:
        student_logits: [N, V] (gradients flow); divided by `div.temperature` here.
        teacher_logprobs: [N, k] (or [N, V]) teacher log-probs already at `div.temperature`; detached here.
        teacher_ids: [N, k] int64 vocabulary ids of `teacher_logprobs`, or None for the full vocabulary.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = student_logits.to(dtype)
    if div.temperature != 1.0:
        student = student / div.temperature
    if teacher_ids is not None:
        if teacher_ids.shape != teacher_logprobs.shape:
            raise ValueError(
                f"teacher ids {tuple(teacher_ids.shape)} != log-probs {tuple(teacher_logprobs.shape)}"
            )
        student = student.gather(-1, teacher_ids.long())  # [N, k]
    if student.shape != teacher_logprobs.shape:
        raise ValueError(f"student {tuple(student.shape)} vs teacher {tuple(teacher_logprobs.shape)}")
    # the support and temperature are already applied: renormalise both on it
    on_support = replace(div, top_k=None, temperature=1.0)
    return compute_token_divergence_stats(student, teacher_logprobs.detach().to(dtype), on_support)
