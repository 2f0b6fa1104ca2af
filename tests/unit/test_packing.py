"""Sequence packing in the learner and SFT: a packed micro-batch (one row, no padding, position ids restarting
per sequence) gives the same loss and gradients as the padded one, with mixed lengths, in float64 — for SFT's
completion loss, the Phase-2 distillation objective (top-k and full vocabulary) and GRPO; the per-sequence
attention path equals transformers' block-diagonal mask; an SFT step through FSDP2 agrees too."""

from __future__ import annotations

import random

import pytest
import torch

from self_distillation.losses import Divergence
from self_distillation.objectives import build_objective, student_batch
from self_distillation.rollout_data import LearnerSample, collate_sequences
from self_revision_training.sft import collate
from self_revision_training.sft_data import IGNORE_INDEX, SFTExample
from self_revision_training.sft_loss import CompletionLossModel
from self_revision_training.shared.target_logits import TargetLogitsLM, use_packed_attention

LENGTHS = [23, 7, 41, 12, 3, 30]  # mixed; one sequence with a single target
TOL = dict(atol=1e-6, rtol=1e-6)


def _model(tiny_model_dir, implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float64, attn_implementation=implementation
    )
    model.config.use_cache = False
    return model


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], **TOL, msg=key)


def _sft_examples(vocab: int) -> list[SFTExample]:
    rng = random.Random(0)
    out = []
    for n in LENGTHS:
        ids = [rng.randrange(5, vocab) for _ in range(n)]
        prompt = max(1, n // 2)
        out.append(SFTExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], f"example {n}"))
    return out


def test_sft_packed_batch_gives_the_same_loss_and_gradients(tiny_model_dir):
    causal_lm = _model(tiny_model_dir)
    model = CompletionLossModel(causal_lm, chunk_size=16)
    examples = _sft_examples(causal_lm.config.vocab_size)
    padded = collate(examples, 0, torch.device("cpu"))
    loss, count = model(**padded)
    loss.backward()
    want = _grads(model)
    use_packed_attention(causal_lm)
    packed = collate(examples, 0, torch.device("cpu"), packing=True)
    assert packed["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in packed
    assert int((packed["position_ids"] == 0).sum()) == len(examples)
    packed_loss, packed_count = model(**packed)
    packed_loss.backward()
    assert int(packed_count) == int(count) == sum(e.num_trained for e in examples)
    torch.testing.assert_close(packed_loss, loss, **TOL)
    _assert_same(want, _grads(model))


def _learner_samples(vocab: int, top_k: int | None, teacher_hidden: int = 64) -> list[LearnerSample]:
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    samples = []
    for n in LENGTHS:
        prompt = max(1, n // 3)
        ids = [rng.randrange(5, vocab) for _ in range(n)]
        targets = n - prompt
        if top_k is None:
            teacher = {"hidden": torch.randn(targets, teacher_hidden, generator=gen, dtype=torch.float64)}
        else:
            logits = torch.randn(targets, vocab, generator=gen, dtype=torch.float64)
            logprobs, top = logits.log_softmax(-1).topk(top_k, -1)
            teacher = {"ids": top.int(), "logprobs": logprobs}
        teacher["target_logprobs"] = torch.zeros(targets, dtype=torch.float64)
        rollout = [-rng.random() for _ in range(targets)]
        samples.append(LearnerSample(ids, [0] * prompt + [1] * targets, n % 2 == 0, rollout, teacher))
    return samples


@pytest.mark.parametrize("top_k", [8, None], ids=["top_k", "full_vocabulary"])
def test_distillation_packed_batch_gives_the_same_loss_and_gradients(tiny_model_dir, top_k):
    causal_lm = _model(tiny_model_dir)
    model = TargetLogitsLM(causal_lm, chunk_size=16)
    vocab = causal_lm.config.vocab_size
    samples = _learner_samples(vocab, top_k)
    head = torch.randn(vocab, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = {}
    for packing in (False, True):
        if packing:
            use_packed_attention(causal_lm)
        objective = build_objective("distillation", Divergence("mixed", top_k=top_k), vocab, packing=packing)
        if top_k is None:
            objective.set_teacher_lm_head(head)  # the teacher's lm_head, for its full-vocabulary logits
        loss, values = objective.micro_batch_loss(model, samples, 0, torch.device("cpu"))
        loss.backward()
        results[packing] = (loss.detach(), values, _grads(model))
    (loss, values, grads), (p_loss, p_values, p_grads) = results[False], results[True]
    torch.testing.assert_close(p_loss, loss, **TOL)
    for key in values:  # per-token statistics in the same order (sequence by sequence)
        torch.testing.assert_close(p_values[key], values[key], **TOL)
    _assert_same(grads, p_grads)


def test_grpo_packed_batch_gives_the_same_loss_and_gradients(tiny_model_dir):
    from self_distillation.config import GRPOConfig

    causal_lm = _model(tiny_model_dir)
    model = TargetLogitsLM(causal_lm, chunk_size=16)
    samples = _learner_samples(causal_lm.config.vocab_size, 4)
    for i, s in enumerate(samples):
        s.advantage = (-1.0) ** i * 0.5
    results = []
    for packing in (False, True):
        if packing:
            use_packed_attention(causal_lm)
        objective = build_objective("grpo", Divergence(), 0, GRPOConfig(), packing=packing)
        loss, _ = objective.micro_batch_loss(model, samples, 0, torch.device("cpu"))
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    _assert_same(results[0][1], results[1][1])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_per_sequence_attention_equals_the_block_diagonal_mask(tiny_model_dir, implementation):
    """transformers' own packed path (block-diagonal mask from the position ids) and the per-sequence sdpa
    calls give the same hidden states on one packed row."""
    reference = _model(tiny_model_dir, implementation)
    varlen = _model(tiny_model_dir)
    use_packed_attention(varlen)
    seqs = [([random.Random(n).randrange(5, 1000) for _ in range(n)], [0] * n) for n in LENGTHS]
    batch = collate_sequences(seqs, 0, packed=True)
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    with torch.no_grad():
        want = reference.model(**kwargs).last_hidden_state
        got = varlen.model(**kwargs).last_hidden_state
    torch.testing.assert_close(got, want, **TOL)


def test_student_batch_packs_in_sample_order_and_keeps_the_dummy():
    samples = [LearnerSample([1, 2, 3], [0, 1, 1], True, None), LearnerSample([4, 5], [0, 1], False, None)]
    batch = student_batch(samples, 0, torch.device("cpu"), packing=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]] and "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["target_mask"].tolist() == [[0, 1, 1, 0, 1]]
    dummy = student_batch([], 0, torch.device("cpu"), packing=True)
    assert dummy["target_mask"].sum() == 0 and dummy["input_ids"].shape == (1, 2)
    with pytest.raises(ValueError, match="position 0"):  # a target there would cross a packed boundary
        collate_sequences([([1, 2], [0, 1]), ([3, 4], [1, 1])], 0, packed=True)


def test_sft_step_through_fsdp_is_the_same_packed(tiny_model_dir):
    """The SFT entry's `train_step` (FSDP2, 1 rank, global-token mean, clip, AdamW): padded and packed
    micro-batches of mixed lengths give the same loss, grad norm and updated weights."""
    from self_revision_training.sft import SFTConfig, SFTDataConfig, build_optimizer, train_step
    from self_revision_training.shared import distributed as dist_utils
    from self_revision_training.shared.config import ModelConfig

    device = dist_utils.init()
    try:
        cfg = SFTConfig(output_dir="unused", model=ModelConfig(path="x"), data=SFTDataConfig(train_file="x"))
        out = {}
        for packing in (False, True):
            causal_lm = _model(tiny_model_dir)
            if packing:
                use_packed_attention(causal_lm)
            model = CompletionLossModel(causal_lm, 16)
            dist_utils.wrap_fsdp(model, device)
            optimizer = build_optimizer(model, cfg)
            examples = _sft_examples(causal_lm.config.vocab_size)
            micro = [(collate(examples[i : i + 3], 0, device, packing), 1.0) for i in (0, 3)]
            stats = train_step(model, optimizer, micro, cfg.max_grad_norm)
            out[packing] = (stats, {k: v.full_tensor() for k, v in model.state_dict().items()})
        (a, wa), (b, wb) = out[False], out[True]
        assert a["num_completion_tokens"] == b["num_completion_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-9
        )
        _assert_same(wa, wb)
    finally:
        dist_utils.cleanup()


def test_sft_fused_adamw_gives_the_same_update(tiny_model_dir):
    """SFT `adam_fused` (torch's fused AdamW on FSDP2's sharded parameters): the optimizer is the fused one
    and the updated weights equal the for-each AdamW's up to float32 rounding."""
    import dataclasses

    from self_revision_training.sft import SFTConfig, SFTDataConfig, build_optimizer, train_step
    from self_revision_training.shared import distributed as dist_utils
    from self_revision_training.shared.config import ModelConfig

    device = dist_utils.init()
    try:
        base = SFTConfig(output_dir="unused", model=ModelConfig(path="x"), data=SFTDataConfig(train_file="x"))
        weights, start = {}, None
        for fused in (False, True):
            cfg = dataclasses.replace(base, adam_fused=fused)
            causal_lm = _model(tiny_model_dir)
            model = CompletionLossModel(causal_lm, 16)
            dist_utils.wrap_fsdp(model, device)
            start = start or {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
            optimizer = build_optimizer(model, cfg)
            assert bool(optimizer.defaults["fused"]) is fused
            examples = _sft_examples(causal_lm.config.vocab_size)
            for _ in range(2):
                train_step(model, optimizer, [(collate(examples[:3], 0, device), 1.0)], cfg.max_grad_norm)
            weights[fused] = {k: v.full_tensor() for k, v in model.state_dict().items()}
        for key, value in weights[False].items():
            assert torch.allclose(weights[True][key], value, rtol=1e-5, atol=1e-7), key
        assert any(not torch.equal(v, start[k]) for k, v in weights[False].items())  # the steps moved it
    finally:
        dist_utils.cleanup()
