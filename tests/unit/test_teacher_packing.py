"""The packed teacher forward: same top-k ids and log-probs (and full-vocabulary hidden states) as the padded
micro-batches on sequences of mixed lengths, in input order; the row plan; the packed-attention check."""

from __future__ import annotations

import random

import pytest
import torch

from self_distillation.losses import Divergence
from self_distillation.teacher import Teacher
from self_revision_training.shared.config import ModelConfig
from self_revision_training.shared.target_logits import (
    check_packed_attention,
    packed_position_ids,
    plan_packed_rows,
)


def _sequences(vocab: int, lengths: list[int], seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(ids, target mask) pairs: a prefix of a third of the tokens, then targets (SD-Zero's second copy)."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        prefix = max(1, n // 3)
        out.append(([rng.randrange(5, vocab) for _ in range(n)], [0] * prefix + [1] * (n - prefix)))
    return out


LENGTHS = [37, 5, 61, 12, 2, 48, 23, 61, 9, 30, 17]  # mixed, one with a single target, two equal


@pytest.mark.parametrize("top_k", [8, None], ids=["top_k", "full_vocabulary"])
def test_packed_and_padded_scoring_agree(tiny_model_dir, top_k):
    model = ModelConfig(path=str(tiny_model_dir), dtype="float32")
    div = Divergence("reverse", top_k=top_k)
    padded = Teacher(model, div, device="cpu")
    packed = Teacher(model, div, device="cpu", pack_tokens=64)  # several rows; the 61-token ones alone
    seqs = _sequences(padded.model.config.vocab_size, LENGTHS)
    want, got = padded.score(seqs), packed.score(seqs)
    assert len(got) == len(seqs)
    for (_, mask), a, b in zip(seqs, want, got, strict=True):
        n = sum(mask)
        assert b["target_logprobs"].shape == (n,)
        torch.testing.assert_close(b["target_logprobs"], a["target_logprobs"], atol=1e-5, rtol=0)
        if top_k is None:
            assert b["ids"] is None and b["hidden"].shape == a["hidden"].shape == (n, 64)
            torch.testing.assert_close(b["hidden"], a["hidden"], atol=1e-5, rtol=0)
        else:
            assert torch.equal(b["ids"], a["ids"]) and b["ids"].shape == (n, top_k)
            torch.testing.assert_close(b["logprobs"], a["logprobs"], atol=1e-5, rtol=0)


def test_one_row_per_sequence_and_one_row_for_all_agree(tiny_model_dir):
    model = ModelConfig(path=str(tiny_model_dir), dtype="float32")
    seqs = _sequences(1024, LENGTHS, seed=1)
    div = Divergence("mixed", top_k=4)
    alone = Teacher(model, div, device="cpu", pack_tokens=1).score(seqs)  # budget 1: every sequence alone
    together = Teacher(model, div, device="cpu", pack_tokens=10_000).score(seqs)  # one row
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a["ids"], b["ids"])
        torch.testing.assert_close(b["logprobs"], a["logprobs"], atol=1e-5, rtol=0)


def test_plan_packed_rows_fills_rows_longest_first():
    lengths = [5, 9, 3, 12, 7, 1, 4]
    rows = plan_packed_rows(lengths, 12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert rows == [[3], [1, 2], [4, 0], [6, 5]]  # first-fit decreasing
    assert plan_packed_rows([20, 3], 8) == [[0], [1]]  # too long for the budget: a row of its own
    assert plan_packed_rows([], 8) == []
    with pytest.raises(ValueError, match="budget"):
        plan_packed_rows([1], 0)
    assert packed_position_ids([3, 1, 2]).tolist() == [[0, 1, 2, 0, 0, 1]]


def test_the_check_refuses_attention_that_mixes_packed_sequences(tiny_model_dir):
    """An attention function that ignores the packed position ids (plain causal over the whole row) mixes the
    sequences; the check run at construction refuses it, and passes the real sdpa / eager paths."""
    import torch.nn.functional as F
    from transformers import AttentionInterface, AutoModelForCausalLM

    def whole_row_causal(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("test_whole_row_causal", whole_row_causal)
    for implementation in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation)
        check_packed_attention(model)
    model.config._attn_implementation = "test_whole_row_causal"
    with pytest.raises(ValueError, match="does not keep packed sequences apart"):
        check_packed_attention(model)
