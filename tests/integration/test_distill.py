"""Phase 2 end to end on tiny random models: Ray + vLLM + 2 learner ranks, weight sync, exact resume,
and a science check that distillation steps move the student towards the teacher.

Real Ray, vLLM (CPU), FSDP2 (gloo) and transformers; no mocks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tiny  # noqa: I001 - tests/fixtures is on sys.path (conftest)
import torch

from self_revision_training.shared.config import PromptConfig
from self_revision_training.shared.prompts import save_prompt_spec

REPO = Path(__file__).resolve().parents[2]
TINY_CFG = str(REPO / "configs" / "tiny" / "distill.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("distill")
    tiny.build_tiny_model(out / "student", tiny_tokenizer, seed=0, tie_word_embeddings=True)
    tiny.build_tiny_model(out / "teacher", tiny_tokenizer, seed=1, tie_word_embeddings=True)
    save_prompt_spec(out / "teacher", tiny_tokenizer, PromptConfig())
    data = out / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n"
            for i in range(12)
        )
    )
    return {"student": out / "student", "teacher": out / "teacher", "data": data}


def run(setup, out: Path, *extra: str) -> list[dict]:
    from self_distillation.train import main

    main(
        [
            "--config",
            TINY_CFG,
            f"student.path={setup['student']}",
            f"teacher.path={setup['teacher']}",
            f"train_data.path={setup['data']}",
            f"output_dir={out}",
            *extra,
        ]
    )
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_ray_vllm_two_learners_end_to_end_and_weight_sync(setup, tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        rows = run(setup, tmp_path, "max_num_steps=3", f"val_data.path={setup['data']}", "val_max_samples=4")
    finally:
        ray.shutdown()
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and rows[0]["step"] == 0 and "val/accuracy" in rows[0]
    assert all(math.isfinite(r["train/loss"]) and r["train/num_target_tokens"] > 0 for r in train)
    for r in train[1:]:  # sampled after a sync: the engine's log-probs equal the learner's (tied model)
        assert r["policy_version"] >= 1
        assert r["train/rollout_minus_learner_logprob_abs_max"] < 1e-4
    assert train[0]["train/loss"] > train[-1]["train/loss"] * 0.5
    assert (tmp_path / "checkpoints" / "step_000003" / "driver_state.json").is_file()
    assert (tmp_path / "final" / "sdzero_prompt.json").is_file()
    assert (tmp_path / "final" / "config.json").is_file()


def load_learner_state(ckpt: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt / "learner" / "model_optim", out)
    return torch.load(out, weights_only=False)


def assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_resume_continues_exactly_like_the_uninterrupted_run(setup, tmp_path):
    local = ["ray.enabled=false", "ray.num_learners=1", "backend.name=hf", "keep_last=5"]
    full = run(setup, tmp_path / "full", "max_num_steps=3", *local)
    run(setup, tmp_path / "split", "max_num_steps=2", *local)  # stops after step 2 (as if killed)
    resumed = run(setup, tmp_path / "split", "max_num_steps=3", *local)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in full]
    for step in (2, 3):
        a = tmp_path / "full" / "checkpoints" / f"step_00000{step}"
        b = tmp_path / "split" / "checkpoints" / f"step_00000{step}"
        assert_same(load_learner_state(a), load_learner_state(b), f"step {step}")
        assert json.loads((a / "driver_state.json").read_text()) == json.loads(
            (b / "driver_state.json").read_text()
        )
        assert (a / "learner" / "scheduler.json").read_text() == (
            b / "learner" / "scheduler.json"
        ).read_text()


def test_sigkill_mid_run_resumes_from_the_last_checkpoint(setup, tmp_path):
    """Kill -9 after the step-2 checkpoint (the process is somewhere in step 3+), rerun: the metrics and the
    final checkpoint equal an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    local = ["ray.enabled=false", "ray.num_learners=1", "backend.name=hf", "keep_last=10", "max_num_steps=6"]
    full = run(setup, tmp_path / "full", *local)
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "self_distillation.train",
        "--config",
        TINY_CFG,
        f"student.path={setup['student']}",
        f"teacher.path={setup['teacher']}",
        f"train_data.path={setup['data']}",
        f"output_dir={out}",
        *local,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while (
        proc.poll() is None and time.time() < deadline and not (out / "checkpoints" / "step_000002").exists()
    ):
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run(setup, out, *local)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in full]
    final = "checkpoints/step_000006"
    assert_same(load_learner_state(tmp_path / "full" / final), load_learner_state(out / final), "step 6")


@pytest.mark.slow
def test_distillation_steps_reduce_held_out_kl_to_the_teacher(setup, tiny_tokenizer):
    """Science check: the real Teacher and Learner and the real loss; KL on held-out sequences drops."""
    from self_distillation.config import SelfDistillationConfig
    from self_distillation.learner import Learner
    from self_distillation.losses import Divergence
    from self_distillation.rollout_data import LearnerSample, build_rollout_items
    from self_distillation.teacher import Teacher
    from self_distillation.teacher_context import SelfRevisionContext
    from self_revision_training.shared.config import load_config
    from self_revision_training.shared.problems import Problem
    from self_revision_training.shared.prompts import build_generation_prompt, build_phrase_ids
    from self_revision_training.shared.rewards import Verdict

    cfg = load_config(
        SelfDistillationConfig,
        TINY_CFG,
        [
            f"student.path={setup['student']}",
            f"teacher.path={setup['teacher']}",
            f"train_data.path={setup['data']}",
            "output_dir=unused",
            "optim.lr=3e-3",
            "optim.warmup_steps=0",
            "loss.kl_type=reverse",
            "ray.num_learners=1",
        ],
    )
    prompt_cfg = PromptConfig()
    phrases = build_phrase_ids(tiny_tokenizer, prompt_cfg)
    g = torch.Generator().manual_seed(0)

    def batch(n: int, offset: int) -> list[LearnerSample]:
        problems = [Problem(i, f"What is {i} + 2?", str(i + 2)) for i in range(offset, offset + n)]
        prompts = [build_generation_prompt(tiny_tokenizer, p.problem, prompt_cfg).ids for p in problems]
        by_index = {p.index: ids for p, ids in zip(problems, prompts, strict=True)}
        context = SelfRevisionContext(lambda p: by_index[p.index], phrases, eos_token_ids=frozenset())
        samples = [
            [(torch.randint(5, 1000, (12,), generator=g).tolist(), "", "length", None)] for _ in prompts
        ]
        verdicts = [[Verdict(i % 2 == 0, None, "")] for i in range(n)]
        items, _ = build_rollout_items(context, problems, prompts, samples, verdicts)
        scores = teacher.score([(i.teacher_ids, i.teacher_mask) for i in items])
        return [
            LearnerSample(i.student_ids, i.student_mask, i.reward, None, s)
            for i, s in zip(items, scores, strict=True)
        ]

    teacher = Teacher(cfg.teacher, Divergence.from_config(cfg.loss))
    learner = Learner(cfg, 0, 1)
    addr, port = learner.address()
    learner.setup(addr, port)
    try:
        held_out = batch(6, 100)
        before = learner.evaluate(held_out)["kl_mean"]
        for _ in range(6):
            learner.train_step([[batch(4, 0)]])
        after = learner.evaluate(held_out)["kl_mean"]
    finally:
        learner.close()
    assert after < 0.8 * before, (before, after)
