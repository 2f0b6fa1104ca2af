"""The plain-SFT data stage (`sample_data`): rejection sampling (RFT) keeps exactly the verified, distinct
responses; SSD's filter runs over the whole run once every shard is done; the sample budget is exact and
survives a resume; a resume refuses changed sampling; a real engine's samples train with one-stage SFT."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from self_revision_training import sample_data
from self_revision_training.shared.budget import collect_run_budget
from self_revision_training.shared.config import ConfigError
from self_revision_training.shared.storage import iter_committed_batches
from self_revision_training.ssd_filter import filter_ssd_samples

REPO = Path(__file__).resolve().parents[2]
QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


@pytest.fixture(scope="module")
def addition_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "add.jsonl"
    rows = [{"problem": f"What is {i} + {2 * i + 1}?", "answer": str(3 * i + 1)} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def scripted(tiny_model_dir, monkeypatch):
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    from scripted_backend import ScriptedBackend
    from transformers import AutoTokenizer

    import self_revision_training.shared.generation as generation

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(generation, "create_backend", lambda model, cfg: ScriptedBackend(tok))
    return tok


def args(model, data, out, **overrides) -> list[str]:
    base = {
        "model.path": model,
        "dataset.path": data,
        "output_dir": out,
        "sampling.max_tokens": 64,
        "num_samples": 4,
        "batch_size": 5,
        "grading.num_workers": 1,
        "progress": False,
        **overrides,
    }
    return [f"{k}={v}" for k, v in base.items()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_samples(out: Path) -> list[dict]:
    return [
        r
        for shard in sorted(out.glob("shard-*"))
        for _, batch in iter_committed_batches(shard / "samples.jsonl")
        for r in batch
    ]


def test_rejection_keeps_the_verified_distinct_responses_once_every_shard_is_done(
    tiny_model_dir, addition_data, scripted, tmp_path
):
    out = tmp_path / "rft"
    first = sample_data.main(args(tiny_model_dir, addition_data, out, num_shards=2, shard_index=0))
    assert first is None and not (out / "sft.jsonl").exists()  # shard 1 has not run yet
    summary = sample_data.main(args(tiny_model_dir, addition_data, out, num_shards=2, shard_index=1))
    records = all_samples(out)
    assert len(records) == 24 * 4
    kept = read_jsonl(out / "sft.jsonl")
    expected = {}
    for r in sorted(records, key=lambda r: (r["original_index"], r["response_idx"])):
        a, b = map(int, QUESTION.search(r["x"]).groups())
        if f"\\boxed{{{a + b}}}" in r["text"] and r["text"] not in expected.setdefault(
            r["original_index"], []
        ):
            expected[r["original_index"]].append(r["text"])  # correct, first of its text
    assert [(k["original_index"], k["completion"]) for k in kept] == [
        (i, t) for i, texts in sorted(expected.items()) for t in texts
    ]
    assert all(k["completion_ids"] is not None and k["source"] == "rejection" for k in kept)
    report = summary["filter"]
    assert report["kept"] == len(kept) and report["duplicate"] > 0 and report["wrong"] > 0
    assert report["wrong"] + report["duplicate"] + report["over_cap"] + report["no_reward"] + len(kept) == 96
    total = collect_run_budget(out)  # the two shards' budget.json
    assert total["samples_generated"] == 96 and total["num_problems"] == 24
    assert total["tokens_generated"] == sum(r["num_tokens"] for r in records)


def test_ssd_filters_over_the_whole_run_and_the_verifier_only_reports(
    tiny_model_dir, addition_data, scripted, tmp_path
):
    out = tmp_path / "ssd"
    summary = sample_data.main(
        args(tiny_model_dir, addition_data, out, strategy="ssd", num_samples=1, ssd_shortest_percent=25)
    )
    records = sorted(all_samples(out), key=lambda r: r["original_index"])
    assert {r["reason"] for r in records} == {"correct", "wrong"}  # graded, for the report only
    assert summary["accuracy"] == sum(r["correct"] for r in records) / len(records)
    kept_idx, report = filter_ssd_samples(
        [r["text"] for r in records], [r["finish_reason"] for r in records], shortest_percent=25
    )
    assert report["shortest"] > 0  # the cutoff drops something here
    kept = read_jsonl(out / "sft.jsonl")
    assert [k["completion"] for k in kept] == [records[i]["text"].strip() for i in kept_idx]
    assert summary["filter"] == report | {"problems_with_data": len(kept_idx)}
    assert any(not records[i]["correct"] for i in kept_idx)  # SSD keeps wrong answers too


def test_ssd_raw_prompt_ablation_samples_from_the_bare_problem_text(
    tiny_model_dir, addition_data, scripted, monkeypatch, tmp_path
):
    """prompt_format=raw (ml-ssd): the engine sees the problem text without the chat template; the SFT
    data is the same prompt/completion layout (SFT applies the template)."""
    import self_revision_training.shared.generation as generation

    seen = []
    make = generation.create_backend

    def recording(model, cfg):
        backend = make(model, cfg)
        generate = backend.generate
        backend.generate = lambda prompts, *a, **k: seen.extend(prompts) or generate(prompts, *a, **k)
        return backend

    monkeypatch.setattr(generation, "create_backend", recording)
    out = tmp_path / "raw"
    sample_data.main(args(tiny_model_dir, addition_data, out, strategy="ssd", num_samples=1, prompt_format="raw",
                          reward="none", ssd_shortest_percent=0))  # fmt: skip
    first = json.loads((addition_data).read_text().splitlines()[0])["problem"]
    assert scripted.decode(seen[0], skip_special_tokens=True) == first
    assert scripted.decode(seen[0], skip_special_tokens=False) == scripted.decode(
        scripted(first, add_special_tokens=True)["input_ids"], skip_special_tokens=False
    )
    assert read_jsonl(out / "sft.jsonl")[0]["prompt"] == first


def test_the_sample_budget_is_exact_and_a_resume_keeps_it_and_refuses_changed_sampling(
    tiny_model_dir, addition_data, scripted, tmp_path
):
    out = tmp_path / "budget"
    sample_data.main(args(tiny_model_dir, addition_data, out, max_samples=22))  # 5 problems x 4 fit
    shard = out / "shard-0-of-1"
    assert json.loads((shard / "summary.json").read_text())["status"] == "budget"
    assert json.loads((shard / "budget.json").read_text())["samples_generated"] == 20
    committed = (shard / "samples.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"sampling\.temperature"):
        sample_data.main(
            args(tiny_model_dir, addition_data, out, max_samples=40, **{"sampling.temperature": 0.5})
        )
    sample_data.main(args(tiny_model_dir, addition_data, out, max_samples=40))  # the cap may grow
    assert (shard / "samples.jsonl").read_bytes().startswith(committed)
    budget = json.loads((shard / "budget.json").read_text())
    assert budget["samples_generated"] == 40 and budget["num_problems"] == 10
    assert sorted(r["original_index"] for r in all_samples(out))[::4] == list(range(10))


@pytest.mark.vllm
@pytest.mark.slow
def test_engine_samples_train_with_one_stage_sft(tiny_model_dir, addition_data, tmp_path):
    """vLLM samples of the tiny model -> SSD data -> `sft` with data.layout=prompt_completion."""
    data = tmp_path / "data"
    sample_data.main(
        [
            "--config",
            str(REPO / "configs" / "tiny" / "sample.yaml"),
            *args(
                tiny_model_dir, addition_data, data, strategy="ssd", num_samples=2, **{"dataset.end_index": 8}
            ),
        ]
    )
    kept = read_jsonl(data / "sft.jsonl")
    assert kept and all(k["prompt"].startswith("What is") for k in kept)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "self_revision_training.sft",
            "--config",
            "configs/tiny/sft.yaml",
            f"model.path={tiny_model_dir}",
            f"data.train_file={data / 'sft.jsonl'}",
            "data.layout=prompt_completion",
            f"output_dir={tmp_path / 'sft'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with_ids = sum(k["completion_ids"] is not None for k in kept)  # stripped responses have none
    line = next(line for line in proc.stdout.splitlines() if "examples kept" in line)
    # a random model samples special tokens that vLLM's text skips: those ids are re-encoded, and counted
    used, reencoded = map(
        int, re.search(r"sampled ids (\d+), re-encoded \(ids did not match the text\) (\d+)", line).groups()
    )
    assert used >= 1 and used + reencoded == with_ids
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file()
    budget = collect_run_budget(tmp_path)  # sampling shard + SFT stage
    assert budget["samples_generated"] == 16 and budget["tokens_trained"] > 0


@pytest.mark.vllm
@pytest.mark.slow
def test_scripts_run_ssd_data_then_one_stage_sft(tiny_model_dir, addition_data, tmp_path):
    """run_srt_data.sh STRATEGY=ssd -> sft.sh STAGES=one, on CPU: the knobs reach the stage's config."""
    import os

    env = {
        **os.environ,
        "OUTPUT_DIR": str(tmp_path / "ssd"),
        "STRATEGY": "ssd",
        "MODEL_PATH": str(tiny_model_dir),
        "DATASET": str(addition_data),
        "END_INDEX": "6",
        "NUM_GPUS": "0",
        "MAX_TOKENS": "16",
        "MAX_MODEL_LEN": "256",
        "KV_CACHE_GB": "0.25",
        "SSD_SHORTEST_PERCENT": "20",
        "EXTRA_ARGS": "model.dtype=float32 grading.num_workers=1 progress=false",
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        ["bash", "scripts/run_srt_data.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    saved = (tmp_path / "ssd" / "samples" / "shard-0-of-1" / "config.yaml").read_text()
    for line in ("temperature: 1.5", "top_k: 20", "top_p: 0.8", "ssd_shortest_percent: 20", "strategy: ssd"):
        assert line in saved
    sft_env = {
        **os.environ,
        "STAGES": "one",
        "BASE_MODEL": str(tiny_model_dir),
        "TRAIN_FILE": str(tmp_path / "ssd" / "samples" / "sft.jsonl"),
        "CKPT_ROOT": str(tmp_path / "ssd"),
        "CONFIG_STAGE1": "configs/tiny/sft.yaml",
        "EPOCHS_STAGE1": "1",
        "LR_STAGE1": "1e-3",
        "MAX_LENGTH": "256",
        "NPROC_PER_NODE": "1",
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        ["bash", "scripts/sft.sh"], cwd=REPO, env=sft_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "ssd" / "sft" / "final" / "model.safetensors").is_file()
    assert "layout: prompt_completion" in (tmp_path / "ssd" / "sft" / "config.yaml").read_text()
    budget = collect_run_budget(tmp_path / "ssd")
    assert budget["samples_generated"] == 6 and set(budget["stages"]) == {"samples/shard-0-of-1", "sft"}
