"""Completion-only cross-entropy for SFT, computed from hidden states in chunks (memory-lean).

Used by `self_revision_training.sft`. The loss of a step is

    sum over trained tokens of -log p(token) / (trained tokens in the whole global batch)

(all micro-batches, all ranks; reference §7.15: token-mean over the global batch, as TRL's
`completion_only_loss` with `num_items_in_batch`). The function here returns the local *sum*; the
trainer divides by the all-reduced count, so the step's loss does not depend on how it is split.

Full [B, T, V] float32 logits are never materialised: only positions whose next token is trained go
through the lm_head, `chunk_size` rows at a time, and each chunk is recomputed in backward
(activation checkpointing) so at most one chunk of logits is alive at once. log-softmax runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from self_revision_training.sft_data import IGNORE_INDEX
from self_revision_training.shared.target_logits import (
    TargetLogitsLM,
    map_chunks,
    select_target_rows,
    upcast_logits,
)


def _chunk_ce_sum(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    logits = upcast_logits(lm_head(hidden))  # [n, V], upcast: log-softmax in float32
    return F.cross_entropy(logits, targets, reduction="sum")


def _total(like: torch.Tensor, chunks: list[torch.Tensor], anchor: torch.Tensor | None) -> torch.Tensor:
    total = like.new_zeros((), dtype=torch.float32)
    for chunk in chunks:
        total = total + chunk
    if anchor is not None:
        total = total + anchor  # no trained token: keep the graph connected (every rank must run backward)
    return total


def compute_completion_ce_sum(
    hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over trained positions.

    Args:
        hidden: [B, T, H] final hidden states (after the final norm).
        lm_head: maps [n, H] -> [n, V] logits.
        labels: [B, T] int64, the input ids where trained and IGNORE_INDEX elsewhere; position t's
            hidden state predicts labels[t + 1] (the usual one-token shift).
        chunk_size: rows of logits computed at once.
    Returns:
        (loss_sum, num_tokens): float32 scalar with grad, int64 scalar.
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
    rows, targets = select_target_rows(hidden, labels[:, 1:], mask)  # [N, H], [N]
    chunks = map_chunks(_chunk_ce_sum, rows, lm_head, (targets,), (), chunk_size)
    return _total(hidden, chunks, hidden.sum() * 0.0 if rows.shape[0] == 0 else None), mask.sum()


class CompletionLossModel(TargetLogitsLM):
    """A Hugging Face causal LM whose forward returns the completion loss sum (FSDP2 root; see
    `target_logits.TargetLogitsLM`)."""

    def __init__(self, causal_lm: nn.Module, chunk_size: int = 4096):
        super().__init__(causal_lm, chunk_size)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,  # [B, T]
        labels: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, T] {0,1}; None = no padding
        position_ids: torch.Tensor | None = None,  # [B, T]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
        chunks, anchor = super().forward(
            input_ids, attention_mask, position_ids, mask, _chunk_ce_sum, next_tokens=labels[:, 1:]
        )
        return _total(labels, chunks, anchor), mask.sum()
