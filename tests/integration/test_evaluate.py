"""The evaluation entry point end to end: GSM8K-, MATH-500- and AIME-style local files through the HF
and vLLM backends on the tiny model, summary.json consistent with samples.jsonl, the model's prompt spec,
skipped over-long prompts, and scripts/eval.sh refusing bad knobs before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from self_distillation import evaluate
from self_distillation.evaluation import summarize
from self_revision_training.shared.config import ConfigError, PromptConfig
from self_revision_training.shared.prompts import save_prompt_spec
from self_revision_training.shared.storage import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"

SAMPLE_KEYS = {
    "problem_index",
    "sample_index",
    "ground_truth",
    "response",
    "num_tokens",
    "finish_reason",
    "extracted",
    "correct",
    "reason",
}

# Hand-made rows in the field layouts of the public benchmarks (4 problems each).
LAYOUTS = {
    # openai/gsm8k: question + worked answer ending in "#### <number>"
    "gsm8k": (
        [
            {"question": f"Tom has {i} apples and buys {i + 2} more. How many?", "answer": f"{i}+{i + 2}=x\n#### {2 * i + 2}"}
            for i in range(4)
        ],
        ["2", "4", "6", "8"],
    ),
    # HuggingFaceH4/MATH-500: problem + worked solution (boxed) + short answer + metadata
    "math500": (
        [
            {
                "problem": f"Compute $\\frac{{{i}}}{{2}} + {i}$.",
                "solution": f"We get $\\boxed{{\\frac{{{3 * i}}}{{2}}}}$.",
                "answer": f"\\frac{{{3 * i}}}{{2}}",
                "subject": "Algebra",
                "level": 1,
                "unique_id": f"test/algebra/{i}.json",
            }
            for i in range(1, 5)
        ],
        [f"\\frac{{{3 * i}}}{{2}}" for i in range(1, 5)],
    ),
    # AIME-style (e.g. AIME 2024/2025 mirrors): problem + integer answer + worked solution + metadata
    "aime": (
        [
            {"id": f"2024-I-{i}", "problem": f"Find the remainder when {7 * i} is divided by 5.",
             "solution": f"It is \\boxed{{{7 * i % 5}}}.", "answer": 7 * i % 5, "year": 2024}
            for i in range(1, 5)
        ],
        [str(7 * i % 5) for i in range(1, 5)],
    ),
}  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def args_for(model_dir, data, out, **overrides) -> list[str]:
    base = {
        "model.path": model_dir,
        "model.dtype": "float32",
        "dataset.path": data,
        "output_dir": out,
        "backend.name": "hf",
        "backend.max_model_len": 512,
        "sampling.max_tokens": 8,
        "sampling.n": 2,
        "ks": "[1,2,4]",
        "batch_size": 3,
        "grading.num_workers": 1,
        "progress": False,
    }
    base.update(overrides)
    return [f"{k}={v}" for k, v in base.items()]


def check_outputs(out: Path, num_problems: int, n: int) -> tuple[dict, list[dict]]:
    """Files exist, one record per (problem, sample), and the summary recomputes from samples.jsonl."""
    summary = json.loads((out / "summary.json").read_text())
    samples = read_jsonl(out / "samples.jsonl")
    assert (out / "config.yaml").is_file() and (out / "sdzero_prompt.json").is_file()
    assert len(samples) == num_problems * n
    assert all(set(r) == SAMPLE_KEYS for r in samples)
    assert sorted({(r["problem_index"], r["sample_index"]) for r in samples}) == [
        (p, k) for p in sorted({r["problem_index"] for r in samples}) for k in range(n)
    ]
    recomputed = summarize(samples, summary["config"]["ks"])
    assert {k: summary[k] for k in recomputed} == recomputed
    assert summary["num_samples"] == len(samples) and summary["num_problems"] == num_problems
    assert summary["mean_response_tokens"] == sum(r["num_tokens"] for r in samples) / len(samples)
    assert sum(summary["grade_reasons"].values()) == len(samples)
    assert summary["decoding"]["n"] == n and summary["config"]["sampling"]["n"] == n
    assert summary["git_sha"] is None or len(summary["git_sha"]) >= 40
    return summary, samples


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_evaluate_hf_backend_on_each_dataset_layout(tiny_model_dir, tmp_path, layout):
    rows, answers = LAYOUTS[layout]
    data = write_jsonl(tmp_path / f"{layout}.jsonl", rows)
    out = tmp_path / "eval"
    returned = evaluate.main(args_for(tiny_model_dir, data, out, label=layout))
    summary, samples = check_outputs(out, 4, 2)
    assert returned == summary
    assert summary["label"] == layout and summary["prompt_source"] == "config"
    assert summary["ks_omitted"] == [4] and set(summary["pass@k"]) == set(summary["maj@k"]) == {"1", "2"}
    assert [r["ground_truth"] for r in samples if r["sample_index"] == 0] == answers
    assert (
        summary["decoding"] | {"max_model_len": 512, "temperature": 1.0, "top_p": 1.0} == summary["decoding"]
    )


def test_evaluate_counts_correct_answers_and_reuses_a_finished_run(tiny_model_dir, tmp_path, monkeypatch):
    # The scripted backend answers "What is A + B?" right about half the time: nonzero accuracy to check.
    sys.path.insert(0, str(FIXTURES))
    from scripted_backend import ScriptedBackend
    from transformers import AutoTokenizer

    import self_revision_training.shared.generation as generation

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(generation, "create_backend", lambda model, cfg: ScriptedBackend(tok))
    rows = [{"question": f"What is {i} + {i + 3}?", "answer": f"#### {2 * i + 3}"} for i in range(6)]
    data = write_jsonl(tmp_path / "add.jsonl", rows)
    out = tmp_path / "eval"
    args = args_for(tiny_model_dir, data, out, **{"sampling.n": 4, "sampling.max_tokens": 64, "ks": "[1,4]"})
    evaluate.main(args)
    summary, samples = check_outputs(out, 6, 4)
    right = sum(r["correct"] for r in samples)
    assert 0 < right < len(samples) and summary["avg@k"]["mean"] == right / len(samples)
    assert summary["pass@k"]["1"] == pytest.approx(summary["avg@k"]["mean"])
    assert summary["avg@k"]["ci_low"] < summary["avg@k"]["mean"] < summary["avg@k"]["ci_high"]
    assert set(summary["grade_reasons"]) <= {"correct", "wrong"}
    # reuse=true with the same config returns the stored summary without generating
    monkeypatch.setattr(generation, "create_backend", lambda model, cfg: pytest.fail("generated again"))
    assert evaluate.main([*args, "reuse=true"]) == summary


def test_evaluate_skips_prompts_without_room_and_limits_problems(tiny_model_dir, tmp_path):
    rows = [{"problem": "What is 1 + 1?", "answer": "2"}] * 2 + [{"problem": "word " * 300, "answer": "3"}]
    rows += [{"problem": "What is 2 + 2?", "answer": "4"}] * 3
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "eval"
    overrides = {"backend.max_model_len": 96, "max_problems": 4, "sampling.n": 1, "ks": "[1]"}
    evaluate.main(args_for(tiny_model_dir, data, out, **overrides))
    summary, samples = check_outputs(out, 3, 1)
    assert summary["skipped_prompts"] == 1 and summary["skipped_problem_indices"] == [2]
    assert summary["dataset"]["problems_evaluated"] == 4 and summary["dataset"]["problems_loaded"] == 6
    assert all(r["num_tokens"] <= 8 for r in samples)


def test_evaluate_uses_the_model_dirs_prompt_spec(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    spec_prompt = PromptConfig(system_prompt="You solve math problems.", instruction_position="before")
    save_prompt_spec(model, tiny_tokenizer, spec_prompt)
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "What is 1 + 1?", "answer": "2"}])
    out = tmp_path / "eval"
    evaluate.main(args_for(model, data, out, **{"sampling.n": 1, "ks": "[1]"}))
    summary, _ = check_outputs(out, 1, 1)
    assert summary["prompt_source"] == str(model / "sdzero_prompt.json")
    assert summary["prompt"]["system_prompt"] == "You solve math problems."
    assert summary["avg@k"]["ci_low"] is None  # one problem: no interval
    # a conflicting prompt.* in the config is an error unless prompt_source=config
    with pytest.raises(ConfigError, match="prompt_source=config"):
        evaluate.main(args_for(model, data, tmp_path / "e2", **{"prompt.instruction_position": "none"}))
    evaluate.main(
        args_for(model, data, tmp_path / "e3", prompt_source="config", **{"sampling.n": 1, "ks": "[1]"})
    )
    assert json.loads((tmp_path / "e3" / "summary.json").read_text())["prompt"]["system_prompt"] is None


@pytest.mark.vllm
def test_evaluate_vllm_backend(tiny_model_dir, tmp_path):
    rows, _ = LAYOUTS["math500"]
    data = write_jsonl(tmp_path / "math.jsonl", rows)
    out = tmp_path / "eval"
    evaluate.main(
        args_for(
            tiny_model_dir,
            data,
            out,
            **{"backend.name": "vllm", "backend.kv_cache_gb": 0.25, "sampling.n": 3},
        )
    )
    summary, samples = check_outputs(out, 4, 3)
    assert summary["decoding"]["backend"] == "vllm" and summary["ks_omitted"] == [4]
    assert all(1 <= r["num_tokens"] <= 8 for r in samples)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"N": "abc"}, "knob N=abc must be an integer >= 1"),
        ({"KS": "1,x"}, "knob KS=1,x must be comma-separated integers >= 1"),
        ({"KS": "0,4"}, "knob KS=0,4 must be comma-separated integers >= 1"),
        ({"TEMPERATURE": "hot"}, "knob TEMPERATURE=hot must be a non-negative number"),
        ({"BACKEND": "tgi"}, "knob BACKEND=tgi must be one of: vllm hf"),
        ({"MAX_PROBLEMS": "0"}, "knob MAX_PROBLEMS=0 must be an integer >= 1"),
        ({"MODEL_PATH": ""}, "MODEL_PATH"),
    ],
)
def test_eval_script_rejects_bad_knobs_before_loading_a_model(tmp_path, env, message):
    full = {
        **os.environ,
        "MODEL_PATH": str(tmp_path / "no-model"),
        "DATASET": str(tmp_path / "d.jsonl"),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "NUM_GPUS": "0",
        "PYTHON": "false",  # never reached: the knob check must fail first
        **env,
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "eval.sh")], env=full, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_eval_script_passes_knobs_as_overrides(tmp_path):
    # A fake interpreter records the command line: knobs become the documented overrides.
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    fake.chmod(0o755)
    full = {
        **os.environ,
        "MODEL_PATH": "m",
        "DATASET": "d.jsonl",
        "OUTPUT_DIR": str(tmp_path / "out"),
        "NUM_GPUS": "0",
        "N": "8",
        "KS": "1,4,8",
        "MAX_PROBLEMS": "5",
        "LABEL": "base",
        "EXTRA_ARGS": "grading.num_workers=3",
        "PYTHON": str(fake),
        "ARGS_FILE": str(tmp_path / "args.txt"),
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "eval.sh")], env=full, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args[:4] == ["-m", "self_distillation.evaluate", "--config", "configs/eval.yaml"]
    for expected in ("sampling.n=8", "ks=[1,4,8]", "max_problems=5", "label=base", "grading.num_workers=3"):
        assert expected in args
    # and the YAML plus those overrides form a valid config
    from self_revision_training.shared.config import load_config

    cfg = load_config(evaluate.EvalConfig, ROOT / "configs" / "eval.yaml", args[4:])
    assert cfg.ks == [1, 4, 8] and cfg.sampling.n == 8 and cfg.dataset.split == "test"


def test_the_default_generation_budget_is_at_least_the_training_budget(tmp_path):
    """Evaluating with fewer new tokens than Phase 2 trained with cuts a model below its own length."""
    import dataclasses

    from self_distillation.config import SelfDistillationConfig
    from self_revision_training.shared.config import load_config

    distill_default = next(f for f in dataclasses.fields(SelfDistillationConfig) if f.name == "sampling")
    train_budget = distill_default.default_factory().max_tokens
    assert evaluate.EvalConfig.__dataclass_fields__["sampling"].default_factory().max_tokens >= train_budget
    yaml_cfg = load_config(
        evaluate.EvalConfig,
        ROOT / "configs" / "eval.yaml",
        ["model.path=m", "dataset.path=d", "output_dir=o"],
    )
    distill_yaml = load_config(
        SelfDistillationConfig, ROOT / "configs" / "phase2_distill.yaml",
        ["student.path=s", "teacher.path=t", "train_data.path=d", "output_dir=o"],
    )  # fmt: skip
    assert yaml_cfg.sampling.max_tokens >= max(train_budget, distill_yaml.sampling.max_tokens)
    # and the driver's default (MAX_TOKENS unset) passes that budget; a leading zero stays decimal
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    fake.chmod(0o755)
    base = {
        **os.environ,
        "MODEL_PATH": "m",
        "DATASET": "d.jsonl",
        "OUTPUT_DIR": str(tmp_path / "out"),
        "NUM_GPUS": "0",
        "PYTHON": str(fake),
        "ARGS_FILE": str(tmp_path / "args.txt"),
    }
    base.pop("MAX_TOKENS", None)
    for extra, expected in (
        ({}, f"sampling.max_tokens={yaml_cfg.sampling.max_tokens}"),
        ({"MAX_TOKENS": "0512", "N": "08"}, "sampling.max_tokens=512"),
    ):
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "eval.sh")],
            env={**base, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        args = (tmp_path / "args.txt").read_text().splitlines()
        assert expected in args
    assert "sampling.n=8" in args


def test_a_second_evaluation_into_one_output_dir_exits_naming_the_first(tiny_model_dir, tmp_path):
    holder_code = (
        "import sys, time\n"
        "from self_revision_training.shared.run_lock import acquire_run_lock\n"
        "lock = acquire_run_lock(sys.argv[1], 'evaluation')\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "What is 1 + 1?", "answer": "2"}])
    out = tmp_path / "eval"
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=f"in use by another run: pid {holder.pid}"):
            evaluate.main(args_for(tiny_model_dir, data, out))
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "samples.jsonl").exists() and not (out / "config.yaml").exists()


def test_eval_script_temperature_sweep_runs_once_per_temperature_then_the_table(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$ARGS_FILE"\necho ---- >> "$ARGS_FILE"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "MODEL_PATH": "m",
        "DATASET": "d.jsonl",
        "OUTPUT_DIR": str(out),
        "NUM_GPUS": "0",
        "TEMPERATURES": "0,0.6 1.0",
        "PYTHON": str(fake),
        "ARGS_FILE": str(tmp_path / "args.txt"),
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "eval.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    calls = [c.strip().splitlines() for c in (tmp_path / "args.txt").read_text().split("----") if c.strip()]
    assert len(calls) == 4
    for call, t in zip(calls[:3], ("0", "0.6", "1.0"), strict=True):
        assert call[:2] == ["-m", "self_distillation.evaluate"]
        assert f"sampling.temperature={t}" in call and f"output_dir={out}/T{t}" in call
        assert sum(a.startswith("sampling.temperature=") for a in call) == 1
    assert calls[3] == ["-m", "self_distillation.report", f"{out}/T0", f"{out}/T0.6", f"{out}/T1.0"]
    bad = subprocess.run(
        ["bash", str(ROOT / "scripts" / "eval.sh")],
        env={**env, "TEMPERATURES": "0 hot"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "TEMPERATURES" in bad.stderr
