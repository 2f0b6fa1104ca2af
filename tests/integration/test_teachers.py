"""Phase-2 teachers: live (the learner's current weights score), frozen LoRA (the base weights with the
adapter disabled, no second copy), EMA (resumable float32 shadow); LoRA training end to end with merged
weights for the rollout engine and final/. Real Learner (FSDP2, gloo), Teacher and loop; tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny  # noqa: I001 - tests/fixtures is on sys.path (conftest)
import torch

from self_distillation.config import SelfDistillationConfig
from self_distillation.learner import Learner
from self_distillation.losses import Divergence
from self_distillation.rollout_data import LearnerSample
from self_distillation.teacher import Teacher
from self_revision_training.shared.config import ModelConfig, PromptConfig, load_config
from self_revision_training.shared.prompts import save_prompt_spec

REPO = Path(__file__).resolve().parents[2]
TINY_CFG = str(REPO / "configs" / "tiny" / "distill.yaml")
LOCAL = ["ray.enabled=false", "ray.num_learners=1", "backend.name=hf"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("teachers")
    tiny.build_tiny_model(out / "student", tiny_tokenizer, seed=0, tie_word_embeddings=True)
    save_prompt_spec(out / "student", tiny_tokenizer, PromptConfig())
    data = out / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(8))
    )
    return {"student": out / "student", "data": data}


def _cfg(models, *extra: str) -> SelfDistillationConfig:
    args = [f"student.path={models['student']}", f"teacher.path={models['student']}", f"train_data.path={models['data']}",
            "output_dir=unused", "optim.lr=1e-2", "optim.warmup_steps=0", "ray.num_learners=1", "loss.top_k=8", *extra]  # fmt: skip
    return load_config(SelfDistillationConfig, TINY_CFG, args)


def _samples(n: int = 3, seed: int = 0) -> list[LearnerSample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(5, 1000, (4,), generator=g).tolist()
        y = torch.randint(5, 1000, (5,), generator=g).tolist()
        teacher_ids = prompt + [7, 8, 9] + y  # any context: the learner scores it
        out.append(
            LearnerSample(prompt + y, [0] * 4 + [1] * 5, True, None, None, teacher_ids, [0] * 7 + [1] * 5)
        )
    return out


def _learner(cfg) -> Learner:
    learner = Learner(cfg, 0, 1)
    learner.setup(*learner.address())
    return learner


def _plain_scores(state: dict, model_dir, samples, div) -> list[dict]:
    """A Teacher whose weights are `state` (a full learner state dict) scores the teacher sequences."""
    teacher = Teacher(ModelConfig(path=str(model_dir), dtype="float32"), div, device="cpu")
    teacher.model.load_state_dict({k.removeprefix("causal_lm."): v for k, v in state.items()}, strict=False)
    teacher.model.tie_weights()
    return teacher.score([(s.teacher_ids, s.teacher_mask) for s in samples])


@pytest.mark.slow
def test_live_teacher_scores_with_the_learners_current_weights(models):
    cfg = _cfg(models, "teacher_mode=live")
    assert cfg.teacher_source == "learner"
    learner = _learner(cfg)
    try:
        learner.train_step([[_samples(seed=1)]])  # the weights move
        probe = _samples(seed=2)
        live = learner.score_teacher(probe)
        state = learner.get_state()["model"]
    finally:
        learner.close()
    reference = _plain_scores(state, models["student"], probe, Divergence.from_config(cfg.loss))
    for a, b in zip(live, reference, strict=True):
        torch.testing.assert_close(a["logprobs"], b["logprobs"], rtol=1e-5, atol=1e-5)
        assert torch.equal(a["ids"], b["ids"])


@pytest.mark.slow
def test_frozen_lora_teacher_is_the_base_model_without_a_copy(models):
    cfg = _cfg(models, "lora.enabled=true", "lora.rank=4", "lora.alpha=8")
    assert cfg.teacher_source == "learner"
    base = Teacher(cfg.teacher, Divergence.from_config(cfg.loss), device="cpu")
    probe = _samples(seed=3)
    expected = base.score([(s.teacher_ids, s.teacher_mask) for s in probe])
    learner = _learner(cfg)
    try:
        before = {k: v.clone() for k, v in learner.get_state()["model"].items()}
        for seed in (4, 5):
            out = learner.train_step([[_samples(seed=seed)]])
            assert out["grad_norm"] > 0
        after = learner.get_state()["model"]
        scored = learner.score_teacher(probe)
    finally:
        learner.close()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(".lora_" in k for k in changed)  # only the adapters trained
    for a, b in zip(scored, expected, strict=True):  # adapter disabled = the frozen base teacher
        torch.testing.assert_close(a["logprobs"], b["logprobs"], rtol=1e-5, atol=1e-5)


def _run(models, out: Path, *extra: str) -> list[dict]:
    from self_distillation.train import main

    main(["--config", TINY_CFG, f"student.path={models['student']}", f"teacher.path={models['student']}",
          f"train_data.path={models['data']}", f"output_dir={out}", *LOCAL, *extra])  # fmt: skip
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_end_to_end_exports_merged_weights(models, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = _run(
        models,
        tmp_path,
        "lora.enabled=true",
        "lora.rank=4",
        "lora.alpha=8",
        "optim.lr=1e-2",
        "max_num_steps=2",
    )
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 2 and train[1]["train/rollout_minus_learner_logprob_abs_max"] < 1e-4  # merged sync
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # a plain model: no adapter keys
    base = AutoModelForCausalLM.from_pretrained(models["student"])
    assert not any("lora" in k for k in final.state_dict())
    diff = [k for k, v in final.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert diff and all(
        any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        for k in diff
    )


@pytest.mark.slow
def test_ema_teacher_checkpoints_and_resumes_exactly(models, tmp_path):
    extra = ["teacher_mode=ema", "teacher_ema_decay=0.5", "max_num_steps=3", "keep_last=5"]
    full = _run(models, tmp_path / "full", *extra)
    _run(models, tmp_path / "split", *extra[:-2], "max_num_steps=2", "keep_last=5")
    resumed = _run(models, tmp_path / "split", *extra)
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in full]
    teacher = tmp_path / "full" / "checkpoints" / "step_000003" / "teacher"
    assert (teacher / "model.safetensors").is_file() and (teacher / "ema_shadow.fp32").is_file()
