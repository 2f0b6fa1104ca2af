"""Logits at target positions only: hidden states -> the lm_head in chunks (SFT, the learner, the teacher).

A sequence of T tokens has T-1 next-token predictions, but only the positions that predict a trained
token (the completion in SFT, the response y in Phase 2) need logits. `select_target_rows` takes the
final hidden states of exactly those positions ([N, H], row-major: sequence by sequence, left to right;
position t predicts token t+1), and `map_chunks` runs a function of the [C, V] logits `chunk_size` rows
at a time, each chunk recomputed in backward (activation checkpointing) when gradients are needed, so
at most one chunk of [C, V] float32 logits is alive and no [B, T, V] tensor ever exists.

`lean_chunked_loss` is the memory-lean alternative for a scalar loss of the [N, V] logits: each chunk's
gradient is computed during forward with local autograd and accumulated into buffers the size of the
inputs, so nothing is recomputed in backward and no [N, V] tensor exists.

`TargetLogitsLM` wraps a Hugging Face causal LM (Llama/Qwen layout: `.model` decoder, `.lm_head`) so that
one forward does both, inside the module: FSDP2 uses it as the root, so the lm_head (a root parameter)
stays gathered for the whole chunked loss. Models that transform logits after the lm_head (Gemma's final
soft-capping, logit scaling) are refused, since this path would silently skip the transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# config attributes of models whose logits are not lm_head(hidden): this path would skip the transform
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def check_plain_lm_head(causal_lm: nn.Module) -> None:
    """Raise unless logits = lm_head(last hidden state) for this model (Llama/Qwen layout)."""
    for name in ("model", "lm_head"):
        if not hasattr(causal_lm, name):
            raise ValueError(f"{type(causal_lm).__name__} has no '.{name}'; expected a Llama/Qwen-style LM")
    config = getattr(causal_lm, "config", None)
    for attr in LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0, False):
            raise ValueError(
                f"{type(causal_lm).__name__} transforms its logits ({attr}={value}); the target-position "
                "loss computes lm_head(hidden) directly and would skip that, so this model is not supported"
            )


def upcast_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (log-softmax of bf16 logits loses the tail; float64 stays float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def select_target_rows(
    hidden: torch.Tensor, next_tokens: torch.Tensor, next_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of the positions that predict a target, and the targets.

    Args:
        hidden: [B, T, H] final hidden states (after the final norm).
        next_tokens: [B, T-1] the token each position predicts (input_ids[:, 1:] or SFT labels[:, 1:]).
        next_mask: [B, T-1] bool, True where position t's prediction (of token t+1) is a target.
    Returns:
        (rows [N, H], targets [N]) in row-major order.
    """
    return hidden[:, :-1][next_mask], next_tokens[next_mask]


def map_chunks(
    fn: Callable[..., Any],
    rows: torch.Tensor,
    lm_head: nn.Module,
    per_row: Sequence[torch.Tensor | None] = (),
    extra: Sequence[Any] = (),
    chunk_size: int | None = None,
) -> list[Any]:
    """[fn(rows[c], lm_head, *(x[c] for x in per_row), *extra) for each chunk c of `chunk_size` rows].

    `fn` computes the lm_head logits of its rows itself, so with gradients enabled each chunk is
    checkpointed (recomputed in backward) and only one chunk's logits are alive at a time. `per_row`
    tensors are sliced like `rows` (None stays None); chunk_size None = one chunk.
    """
    size = rows.shape[0] if chunk_size is None else chunk_size
    outputs = []
    for start in range(0, rows.shape[0], max(1, size)):
        part = slice(start, start + size)
        args = (rows[part], lm_head, *(None if x is None else x[part] for x in per_row), *extra)
        if torch.is_grad_enabled() and rows.requires_grad:
            outputs.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            outputs.append(fn(*args))
    return outputs


class TargetLogitsLM(nn.Module):
    """A causal LM whose forward applies `chunk_fn` to the logits of the target positions only."""

    def __init__(self, causal_lm: nn.Module, chunk_size: int = 1024):
        super().__init__()
        check_plain_lm_head(causal_lm)
        self.causal_lm = causal_lm
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None,  # [B, T] {0,1}; None = no padding
        position_ids: torch.Tensor | None,  # [B, T]
        next_mask: torch.Tensor,  # [B, T-1] bool: position t predicts a target token t+1
        chunk_fn: Callable[..., Any],
        per_row: Sequence[torch.Tensor | None] = (),
        extra: Sequence[Any] = (),
        next_tokens: torch.Tensor | None = None,  # [B, T-1]; None = input_ids[:, 1:]
    ) -> tuple[list[Any], torch.Tensor | None]:
        """-> ([chunk_fn(rows_c, lm_head, targets_c, *per_row_c, *extra) per chunk], anchor).

        `anchor` is a zero scalar connected to the whole graph when there is no target at all (a dummy
        micro-batch: every rank must still run backward through the same modules), else None.
        """
        out = self.causal_lm.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = out.last_hidden_state  # [B, T, H]
        tokens = input_ids[:, 1:] if next_tokens is None else next_tokens
        rows, targets = select_target_rows(hidden, tokens, next_mask)
        chunks = map_chunks(
            chunk_fn, rows, self.causal_lm.lm_head, (targets, *per_row), extra, self.chunk_size
        )
        return chunks, (hidden.sum() * 0.0 if rows.shape[0] == 0 else None)


class _LeanChunkedLoss(torch.autograd.Function):
    """Chunked loss over lm_head projections; gradients are computed per chunk during forward.

    Per chunk, autograd gives d(loss)/d(logits) [C, V]; the hidden-state and lm_head gradients follow by
    two matmuls, accumulated in place into buffers the size of the inputs. Backward only scales them, so
    no chunk is recomputed. (Backward may run once per forward.)
    """

    @staticmethod
    def forward(ctx, hidden, weight, chunk_loss, chunk_size):
        needs_grad = hidden.requires_grad or weight.requires_grad
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight) if needs_grad else None
        detached_weight = weight.detach()
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            part = hidden[rows].detach()  # [C, H]
            with torch.enable_grad():
                logits = (part @ detached_weight.T).requires_grad_(needs_grad)  # [C, V]
                chunk_total = chunk_loss(logits, rows)
                if needs_grad:
                    (grad_logits,) = torch.autograd.grad(chunk_total, logits)  # [C, V]
                    grad_logits = grad_logits.to(detached_weight.dtype)
                    grad_hidden[rows] = grad_logits @ detached_weight
                    grad_weight.addmm_(grad_logits.T, part)
            total += chunk_total.detach()
            del logits, chunk_total
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.to(grad_hidden.dtype)
        return grad_hidden.mul_(scale), grad_weight.mul_(scale), None, None


def lean_chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    chunk_loss: Callable[[torch.Tensor, slice], torch.Tensor],
    chunk_size: int = 512,
) -> torch.Tensor:
    """sum over chunks of chunk_loss(hidden[rows] @ weight.T, rows), with gradients for hidden and weight.

    Args:
        hidden: [N, H] rows at the target positions.
        weight: [V, H] the lm_head weight.
        chunk_loss: ([C, V] logits with grad, the rows' slice) -> scalar; gradients flow only into the logits.
        chunk_size: rows per chunk; peak memory ~ a few [chunk_size, V] float32 tensors.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _LeanChunkedLoss.apply(hidden, weight, chunk_loss, chunk_size)
