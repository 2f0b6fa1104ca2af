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
from torch.utils.checkpoint import checkpoint

from self_revision_training.sft_data import IGNORE_INDEX


def _chunk_ce_sum(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # [n, V], upcast: log-softmax in float32
    return F.cross_entropy(logits, targets, reduction="sum")


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
    targets = labels[:, 1:]  # [B, T-1]
    mask = targets != IGNORE_INDEX  # [B, T-1]
    selected = hidden[:, :-1][mask]  # [N, H]: only positions that predict a trained token
    selected_targets = targets[mask]  # [N]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk_size):
        h = selected[start : start + chunk_size]
        t = selected_targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_ce_sum, h, lm_head, t, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, lm_head, t)
    if selected.shape[0] == 0:
        total = total + hidden.sum() * 0.0  # keep the graph connected (every rank must run backward)
    return total, mask.sum()


class CompletionLossModel(nn.Module):
    """Wraps a Hugging Face causal LM so that one forward returns the completion loss sum.

    FSDP2 is applied with this module as the root, so the lm_head and embeddings (root parameters) are
    gathered for the whole forward, including the chunked loss. `causal_lm.model` must be the decoder
    (returns `last_hidden_state`) and `causal_lm.lm_head` the output projection (Llama/Qwen layout).
    """

    def __init__(self, causal_lm: nn.Module, chunk_size: int = 4096):
        super().__init__()
        for name in ("model", "lm_head"):
            if not hasattr(causal_lm, name):
                raise ValueError(
                    f"{type(causal_lm).__name__} has no '.{name}'; expected a Llama/Qwen-style LM"
                )
        self.causal_lm = causal_lm
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        labels: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, T] {0,1}; None = no padding
        position_ids: torch.Tensor | None = None,  # [B, T]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.causal_lm.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return compute_completion_ce_sum(
            out.last_hidden_state, self.causal_lm.lm_head, labels, self.chunk_size
        )
