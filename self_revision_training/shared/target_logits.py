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


def plan_packed_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Sequence indices per packed row: longest first, each into the first row it fits (first-fit
    decreasing), a row holding at most `budget` tokens (a longer sequence gets a row of its own).

    Args:
        lengths: tokens of each sequence.
        budget: tokens per row (>= 1).
    Returns:
        rows of indices; every index appears once, rows in order of their first (longest) sequence.
    """
    if budget < 1:
        raise ValueError(f"a packed row needs a budget >= 1 token, got {budget}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def packed_position_ids(lengths: Sequence[int]) -> torch.Tensor:
    """[1, sum(lengths)] int64: 0..n-1 for each sequence of a packed row, in order.

    With `attention_mask=None`, transformers (>= 4.53; here 5.x) reads a position that does not follow
    its left neighbour as the start of a new sequence and builds a block-diagonal causal mask (sdpa,
    eager, flex) or uses the varlen kernel (flash_attention_2), so no token attends across a boundary;
    `check_packed_attention` verifies that for a given model.
    """
    return torch.cat([torch.arange(n) for n in lengths])[None] if lengths else torch.zeros(1, 0).long()


PACKED_SDPA = "sdpa_packed"  # the attention implementation `use_packed_attention` registers with transformers


def _sequence_starts(
    position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
) -> list[int] | None:
    """[0, start of each later sequence, T] of a packed row (batch 1, no cache), else None (one sequence,
    a padded batch, decoding). A position that does not follow its left neighbour starts a sequence (the
    rule transformers' `find_packed_sequence_indices` uses for the block-diagonal mask)."""
    if position_ids is None or query.shape[0] != 1 or position_ids.shape[-1] != query.shape[2]:
        return None
    if key.shape[2] != query.shape[2]:
        return None
    pos = position_ids.reshape(-1)
    starts = ((pos[1:] - pos[:-1]) != 1).nonzero().flatten().add(1).tolist()
    return [0, *starts, pos.numel()] if starts else None


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,  # [1, Hq, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except on a packed row: causal sdpa per sequence (the varlen path).

    A block-diagonal mask over a packed row of R tokens makes sdpa compute all R^2 scores and, with an
    explicit mask, leaves the fused causal kernels (measured on CPU: slower than padding); one causal call
    per sequence computes only each sequence's own triangle. Every other call (padded batches, a single
    sequence, sliding-window layers, decoding) is `sdpa_attention_forward` unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = _sequence_starts(kwargs.get("position_ids"), query, key)
    if starts is None or kwargs.get("sliding_window") or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    parts = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None  # [1, T, Hq, D]


def use_packed_attention(causal_lm: nn.Module) -> str:
    """Switch a model on transformers' sdpa to `packed_sdpa_attention` (registered here under PACKED_SDPA,
    with sdpa's mask function); other implementations keep theirs (flash_attention_2 is varlen already,
    eager/flex apply the block-diagonal mask). Returns the implementation in use."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    implementation = causal_lm.config._attn_implementation
    if implementation not in ("sdpa", PACKED_SDPA):
        return implementation
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    causal_lm.set_attn_implementation(PACKED_SDPA)
    return PACKED_SDPA


@torch.no_grad()
def check_packed_attention(causal_lm: nn.Module, lengths: Sequence[int] = (7, 9), seed: int = 0) -> None:
    """Raise unless packing is exact for this model: a packed sequence's hidden states must not depend on
    the sequence packed before it, and must equal those of the sequence run alone.

    Run once on the plain (unsharded) model before packing is used: a model whose attention ignores the
    packed position ids (custom remote code, an attention implementation without packed support) would
    otherwise mix sequences silently.
    """
    decoder = causal_lm.model
    vocab = causal_lm.config.vocab_size
    param = next(causal_lm.parameters())
    gen = torch.Generator().manual_seed(seed)
    first, second, first_alt = (torch.randint(0, vocab, (n,), generator=gen) for n in (*lengths, lengths[0]))
    positions = packed_position_ids(lengths).to(param.device)

    def hidden(ids: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        out = decoder(input_ids=ids[None].to(param.device), position_ids=pos, use_cache=False)
        return out.last_hidden_state[0].float()

    was_training = causal_lm.training
    causal_lm.eval()  # no dropout: the three forwards must differ only by what is packed
    try:
        alone = hidden(second, torch.arange(lengths[1], device=param.device)[None])
        packed = hidden(torch.cat([first, second]), positions)[lengths[0] :]
        packed_alt = hidden(torch.cat([first_alt, second]), positions)[lengths[0] :]
    finally:
        causal_lm.train(was_training)
    scale = float(alone.abs().max()) + 1e-6
    tolerance = 1e-3 if param.dtype in (torch.float32, torch.float64) else 3e-2  # bf16: rounding only
    errors = (float((packed - alone).abs().max()) / scale, float((packed_alt - packed).abs().max()) / scale)
    if max(errors) > tolerance:
        attn = getattr(causal_lm.config, "_attn_implementation", None)
        raise ValueError(
            f"{type(causal_lm).__name__} (attention {attn!r}) does not keep packed sequences apart "
            f"(relative hidden-state error {max(errors):.2g} > {tolerance:g}): set packing off for this model"
        )


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
