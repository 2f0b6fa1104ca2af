"""Token-level distillation losses for SD-Zero Phase 2 (paper Sec. 3.2, the KL between the student
pi_theta(. | x, y_<t) and the frozen SRT teacher pi_SRT(. | x, y, P_r, y_<t) on every token of y).

Two paths with identical semantics:
- `distillation_loss(student_logits, teacher_logits, mask, ...)`: from aligned [B, T, V] logits.
- `lean_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, ...)`: from
  final hidden states already selected at the target positions ([N, H]) and the lm_head weights. Logits
  exist one chunk of tokens at a time; each chunk's gradient is computed right away (local autograd) and
  kept at the size of the inputs, so no [N, V] float32 tensor ever exists and nothing is recomputed.

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

from typing import Literal

import torch
import torch.nn.functional as F

KLType = Literal["forward", "reverse", "mixed", "jsd"]
KL_TYPES = ("forward", "reverse", "mixed", "jsd")


def _check_options(
    kl_type: str,
    mixed_kl_weight: float,
    jsd_beta: float,
    top_k: int | None,
    clip_per_entry: float | None,
    clip_per_token: float | None,
    temperature: float,
) -> None:
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")
    if not 0.0 <= mixed_kl_weight <= 1.0:
        raise ValueError(f"mixed_kl_weight must be in [0, 1], got {mixed_kl_weight}")
    if not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None (full vocabulary) or >= 1, got {top_k}")
    for name, value in (("clip_per_entry", clip_per_entry), ("clip_per_token", clip_per_token)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be None or > 0, got {value}")
    if clip_per_entry is not None and kl_type == "jsd":
        raise ValueError("clip_per_entry applies to forward/reverse/mixed; use clip_per_token with jsd")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def compute_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kl_type: KLType = "reverse",
    mixed_kl_weight: float = 0.5,
    jsd_beta: float = 0.5,
    top_k: int | None = None,
    clip_per_entry: float | None = None,
    clip_per_token: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence between student and teacher next-token distributions.

    Args:
        student_logits: [..., V] any float dtype; gradients flow into it.
        teacher_logits: [..., V] (detached here).
    Returns:
        [...] divergence per token in float32 (float64 for float64 inputs).
    """
    _check_options(kl_type, mixed_kl_weight, jsd_beta, top_k, clip_per_entry, clip_per_token, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # at least fp32 (bf16 logits -> fp32)
    student = student_logits.to(dtype)  # [..., V]
    teacher = teacher_logits.detach().to(dtype)  # [..., V]
    if temperature != 1.0:  # skip two [..., V] copies in the common case
        student, teacher = student / temperature, teacher / temperature
    if top_k is not None and top_k < teacher.shape[-1]:
        support = teacher.topk(top_k, dim=-1).indices  # [..., k]
        teacher = teacher.gather(-1, support)
        student = student.gather(-1, support)
    student_logp = F.log_softmax(student, dim=-1)
    teacher_logp = F.log_softmax(teacher, dim=-1)
    if kl_type == "jsd":
        log_b, log_1mb = torch.log(torch.tensor(jsd_beta)), torch.log(torch.tensor(1.0 - jsd_beta))
        mix_logp = torch.logsumexp(torch.stack([teacher_logp + log_b, student_logp + log_1mb]), dim=0)
        kl_t_m = (teacher_logp.exp() * (teacher_logp - mix_logp)).sum(-1)
        kl_s_m = (student_logp.exp() * (student_logp - mix_logp)).sum(-1)
        divergence = jsd_beta * kl_t_m + (1.0 - jsd_beta) * kl_s_m
    else:
        forward_terms = teacher_logp.exp() * (teacher_logp - student_logp)  # [..., V or k]
        reverse_terms = student_logp.exp() * (student_logp - teacher_logp)
        if clip_per_entry is not None:
            forward_terms = forward_terms.clamp(max=clip_per_entry)
            reverse_terms = reverse_terms.clamp(max=clip_per_entry)
        weight = {"forward": 1.0, "reverse": 0.0, "mixed": mixed_kl_weight}[kl_type]
        divergence = 0.0
        if weight > 0:
            divergence = divergence + weight * forward_terms.sum(-1)
        if weight < 1:
            divergence = divergence + (1.0 - weight) * reverse_terms.sum(-1)
    if clip_per_token is not None:
        divergence = divergence.clamp(max=clip_per_token)
    return divergence


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
    *,
    kl_type: KLType = "reverse",
    mixed_kl_weight: float = 0.5,
    jsd_beta: float = 0.5,
    top_k: int | None = None,
    clip_per_entry: float | None = None,
    clip_per_token: float | None = None,
    temperature: float = 1.0,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked token-level distillation loss from aligned logits.

    Args:
        student_logits: [B, T, V]; row [b, t] and teacher row [b, t] predict the same target token.
        teacher_logits: [B, T, V].
        mask: [B, T] in {0, 1}; 1 where the token is in the loss.
        num_tokens: the normaliser (valid tokens in the whole optimizer step); default sum(mask).
    Returns:
        (scalar loss, metrics: kl_mean over masked tokens, num_tokens in this call)
    """
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(student_logits.shape[:-1])}")
    divergence = compute_token_divergence(  # [B, T]
        student_logits,
        teacher_logits,
        kl_type=kl_type,
        mixed_kl_weight=mixed_kl_weight,
        jsd_beta=jsd_beta,
        top_k=top_k,
        clip_per_entry=clip_per_entry,
        clip_per_token=clip_per_token,
        temperature=temperature,
    )
    total, count = masked_sum_and_count(divergence, mask)
    loss = _reduce(total, count, num_tokens)
    metrics = {"kl_sum": float(total.detach()), "num_tokens": float(count)}
    return loss, metrics


class _LeanDistillation(torch.autograd.Function):
    """Chunked loss over lm_head projections; gradients are computed per chunk during forward.

    Per chunk, autograd gives d(loss)/d(student logits) [C, V]; the hidden-state and lm_head gradients
    follow by two matmuls, accumulated in place into buffers the size of the inputs. Backward only
    scales them, so no chunk is recomputed. (Backward may run once per forward.)
    """

    @staticmethod
    def forward(
        ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, mask, options, chunk_size
    ):
        needs_grad = student_hidden.requires_grad or student_weight.requires_grad
        dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=student_hidden.device)
        grad_hidden = torch.zeros_like(student_hidden) if needs_grad else None
        grad_weight = torch.zeros_like(student_weight) if needs_grad else None
        weight = student_weight.detach()
        for start in range(0, student_hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hidden = student_hidden[rows].detach()  # [C, H]
            with torch.no_grad():
                teacher_logits = teacher_hidden[rows] @ teacher_weight.T  # [C, V], only target positions
            with torch.enable_grad():
                student_logits = (hidden @ weight.T).requires_grad_(needs_grad)  # [C, V]
                divergence = compute_token_divergence(student_logits, teacher_logits, **options)  # [C]
                chunk_total = (divergence * mask[rows].to(divergence.dtype)).sum()
                if needs_grad:
                    (grad_logits,) = torch.autograd.grad(chunk_total, student_logits)  # [C, V]
                    grad_logits = grad_logits.to(weight.dtype)
                    grad_hidden[rows] = grad_logits @ weight
                    grad_weight.addmm_(grad_logits.T, hidden)
            total += chunk_total.detach()
            del teacher_logits, student_logits, divergence, chunk_total
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.to(grad_hidden.dtype)
        return grad_hidden.mul_(scale), grad_weight.mul_(scale), None, None, None, None, None


def lean_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kl_type: KLType = "reverse",
    mixed_kl_weight: float = 0.5,
    jsd_beta: float = 0.5,
    top_k: int | None = None,
    clip_per_entry: float | None = None,
    clip_per_token: float | None = None,
    temperature: float = 1.0,
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
    _check_options(kl_type, mixed_kl_weight, jsd_beta, top_k, clip_per_entry, clip_per_token, temperature)
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student has {student_hidden.shape[0]} target positions, teacher "
            f"{teacher_hidden.shape[0]}: the sequences are misaligned"
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"vocabulary sizes differ: student {student_weight.shape[0]}, teacher {teacher_weight.shape[0]}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = torch.ones(student_hidden.shape[0], device=student_hidden.device) if mask is None else mask
    if mask.shape != student_hidden.shape[:1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match {student_hidden.shape[0]} positions")
    options = {
        "kl_type": kl_type,
        "mixed_kl_weight": mixed_kl_weight,
        "jsd_beta": jsd_beta,
        "top_k": top_k,
        "clip_per_entry": clip_per_entry,
        "clip_per_token": clip_per_token,
        "temperature": temperature,
    }
    total = _LeanDistillation.apply(
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        mask,
        options,
        chunk_size,
    )
    count = mask.float().sum()
    loss = _reduce(total, count, num_tokens)
    return loss, {"kl_sum": float(total.detach()), "num_tokens": float(count)}


def global_token_count(masks: list[torch.Tensor], all_reduce=None) -> torch.Tensor:
    """Valid tokens in a whole optimizer step: summed over micro-batch masks, then over ranks.

    Args:
        masks: this rank's micro-batch masks ({0, 1}, any shape).
        all_reduce: optional in-place sum across data-parallel ranks (e.g. torch.distributed.all_reduce);
            kept as a callable so this module never imports torch.distributed.
    Returns:
        float32 scalar. Pass it as `num_tokens` to every micro-batch's loss. When the data-parallel
        wrapper averages gradients over W ranks (FSDP, DDP), pass `count / W` so the step's gradient
        equals that of one process holding the whole batch.
    """
    count = torch.stack([m.float().sum() for m in masks]).sum() if masks else torch.zeros(())
    if all_reduce is not None:
        all_reduce(count)
    return count


def compute_sparse_token_divergence(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor | None = None,
    *,
    kl_type: KLType = "reverse",
    mixed_kl_weight: float = 0.5,
    jsd_beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence against teacher log-probs shipped by a separate teacher process.

    The teacher sends, per target token, either its full log-softmax (teacher_ids None) or its top-k
    ids and log-probs (log_softmax(z_T / T) gathered at its k largest entries). Both are renormalised on
    the support here, so the result equals `compute_token_divergence(student, teacher_full_logits,
    top_k=k)` (and top_k=None for the full case) without ever moving [N, V] teacher tensors.

    Args:
        student_logits: [N, V] (gradients flow); divided by `temperature` here.
        teacher_logprobs: [N, k] (or [N, V]) teacher log-probs already at `temperature`; detached here.
        teacher_ids: [N, k] int64 vocabulary ids of `teacher_logprobs`, or None for the full vocabulary.
    Returns:
        [N] divergence per token (float32, or float64 for float64 inputs).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = student_logits.to(dtype)
    if temperature != 1.0:
        student = student / temperature
    if teacher_ids is not None:
        if teacher_ids.shape != teacher_logprobs.shape:
            raise ValueError(
                f"teacher ids {tuple(teacher_ids.shape)} != log-probs {tuple(teacher_logprobs.shape)}"
            )
        student = student.gather(-1, teacher_ids.long())  # [N, k]
    if student.shape != teacher_logprobs.shape:
        raise ValueError(f"student {tuple(student.shape)} vs teacher {tuple(teacher_logprobs.shape)}")
    return compute_token_divergence(  # log_softmax renormalises both on the support; T already applied
        student,
        teacher_logprobs.detach().to(dtype),
        kl_type=kl_type,
        mixed_kl_weight=mixed_kl_weight,
        jsd_beta=jsd_beta,
    )


def _chunk_sparse_terms(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    targets: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    options: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = lm_head(hidden).float()  # [C, V]
    divergence = compute_sparse_token_divergence(logits, teacher_logprobs, teacher_ids, **options)  # [C]
    student_target_logprobs = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # [C], raw
    return divergence, student_target_logprobs


class StudentDistillationModel(torch.nn.Module):
    """Wraps a Hugging Face causal LM so that one forward returns per-target-token divergences.

    Only positions that predict a target token go through the lm_head, `chunk_size` rows at a time, each
    chunk recomputed in backward (activation checkpointing), so no [B, T, V] tensor exists. FSDP2 uses
    this module as the root, so the lm_head is gathered for the whole loss.
    """

    def __init__(self, causal_lm: torch.nn.Module, options: dict, chunk_size: int = 1024):
        super().__init__()
        for name in ("model", "lm_head"):
            if not hasattr(causal_lm, name):
                raise ValueError(
                    f"{type(causal_lm).__name__} has no '.{name}'; expected a Llama/Qwen-style LM"
                )
        self.causal_lm = causal_lm
        self.options = dict(options)
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, T] {0,1}
        position_ids: torch.Tensor,  # [B, T]
        target_mask: torch.Tensor,  # [B, T] {0,1}: 1 on target tokens
        teacher_logprobs: torch.Tensor,  # [N, k] (or [N, V]), N = target_mask.sum(), row-major order
        teacher_ids: torch.Tensor | None = None,  # [N, k]; None = full vocabulary
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (divergence [N], student log-prob of each target token [N], raw distribution, detached)."""
        from torch.utils.checkpoint import checkpoint

        out = self.causal_lm.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = out.last_hidden_state  # [B, T, H]
        predicts = target_mask[:, 1:].bool()  # [B, T-1]: position t predicts token t + 1
        selected = hidden[:, :-1][predicts]  # [N, H]
        targets = input_ids[:, 1:][predicts]  # [N]
        if selected.shape[0] != teacher_logprobs.shape[0]:
            raise ValueError(
                f"{selected.shape[0]} student targets but {teacher_logprobs.shape[0]} teacher rows"
            )
        divergences, logprobs = [], []
        for start in range(0, selected.shape[0], self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            args = (
                selected[rows],
                self.causal_lm.lm_head,
                targets[rows],
                teacher_logprobs[rows],
                None if teacher_ids is None else teacher_ids[rows],
                self.options,
            )
            if torch.is_grad_enabled() and selected.requires_grad:
                div, lp = checkpoint(_chunk_sparse_terms, *args, use_reentrant=False)
            else:
                div, lp = _chunk_sparse_terms(*args)
            divergences.append(div)
            logprobs.append(lp.detach())
        if not divergences:  # keep the graph connected: every rank must run backward
            return (hidden.sum() * 0.0)[None][:0], hidden.new_zeros(0)
        return torch.cat(divergences), torch.cat(logprobs)
