"""The Phase-1 collector end to end: well-formed records from the real vLLM and HF backends, and
resume after SIGKILL (every problem exactly once, committed batches kept byte for byte, verified set
and summary consistent with the attempts file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from self_revision_training import collect
from self_revision_training.revision_data import CollectionStats
from self_revision_training.shared.storage import iter_committed_batches

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"

INIT_KEYS = {
    "type",
    "original_index",
    "response_idx",
    "x",
    "ground_truth",
    "y_init",
    "y_init_correct",
    "y_init_extracted",
    "y_init_reason",
    "y_init_num_tokens",
    "y_init_finish_reason",
    "revised",
    "skip_reason",
    "batch",
    "policy_version",
}
REVISION_KEYS = {
    "type",
    "original_index",
    "response_idx",
    "revision_idx",
    "x",
    "ground_truth",
    "y_init",
    "y_init_correct",
    "y_init_extracted",
    "p_r",
    "y_revised",
    "y_revised_correct",
    "y_revised_extracted",
    "y_revised_reason",
    "y_revised_num_tokens",
    "y_revised_finish_reason",
    "verified",
    "batch",
    "policy_version",
}


@pytest.fixture(scope="module")
def addition_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "add.jsonl"
    rows = [{"problem": f"What is {i} + {2 * i + 1}?", "answer": str(3 * i + 1)} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def args_for(model_dir, data, out, **overrides) -> list[str]:
    base = {
        "model.path": model_dir,
        "model.dtype": "float32",
        "dataset.path": data,
        "output_dir": out,
        "backend.max_model_len": 512,
        "backend.kv_cache_gb": 0.25,
        "sampling.max_tokens": 16,
        "num_responses": 2,
        "num_revisions": 2,
        "batch_size": 3,
        "target_revision_samples": 0,
        "truncated_init": "keep",
        "progress": False,
    }
    base.update(overrides)
    return [f"{k}={v}" for k, v in base.items()]


def check_collection(shard: Path, expected: set[int], num_responses: int, num_revisions: int) -> dict:
    """Exactly-once coverage and internal consistency of one shard directory."""
    attempts = shard / "attempts.jsonl"
    covered: list[int] = []
    inits, revisions = {}, {}
    stats = CollectionStats()
    for marker, records in iter_committed_batches(attempts):
        covered += marker["indices"]
        stats.add_batch(marker, records)
        for r in records:
            if r["type"] == "init":
                assert set(r) == INIT_KEYS
                key = (r["original_index"], r["response_idx"])
                assert key not in inits, f"duplicate init record {key}"
                inits[key] = r
            else:
                assert set(r) == REVISION_KEYS
                key = (r["original_index"], r["response_idx"], r["revision_idx"])
                assert key not in revisions, f"duplicate revision record {key}"
                revisions[key] = r
                assert r["verified"] == (r["y_revised_correct"] and r["y_revised_finish_reason"] == "stop")
    assert sorted(covered) == sorted(expected) and len(covered) == len(set(covered))
    assert {k[0] for k in inits} == expected
    for (i, k), r in inits.items():
        assert 0 <= k < num_responses
        n_rev = sum(1 for key in revisions if key[:2] == (i, k))
        assert n_rev == (num_revisions if r["revised"] else 0)
        assert r["revised"] == (r["skip_reason"] is None)
    verified_file = [json.loads(line) for line in (shard / "verified.jsonl").read_text().splitlines()]
    assert verified_file == [r for r in revisions.values() if r["verified"]]
    summary = json.loads((shard / "summary.json").read_text())
    expect = stats.to_dict()
    for key in ("problems_done", "verified_tuples", "init", "revision", "batches"):
        assert summary[key] == expect[key], key
    assert summary["status"] in ("range_done", "target_reached")
    return summary


def test_collect_hf_backend_writes_well_formed_records(tiny_model_dir, addition_data, tmp_path):
    out = tmp_path / "run"
    collect.main(
        args_for(tiny_model_dir, addition_data, out, **{"backend.name": "hf", "dataset.end_index": 7})
    )
    shard = out / "shard-0-of-1"
    summary = check_collection(shard, set(range(7)), 2, 2)
    assert summary["init"]["samples"] == 14 and summary["revision"]["samples"] == 28
    assert (shard / "config.yaml").exists() and (shard / "sdzero_prompt.json").exists()
    # rerunning a finished range is a no-op that keeps every byte
    before = (shard / "attempts.jsonl").read_bytes()
    collect.main(
        args_for(tiny_model_dir, addition_data, out, **{"backend.name": "hf", "dataset.end_index": 7})
    )
    assert (shard / "attempts.jsonl").read_bytes() == before


def test_collect_refuses_changed_settings_or_shard_counts(tiny_model_dir, addition_data, tmp_path):
    out = tmp_path / "run"
    collect.main(
        args_for(tiny_model_dir, addition_data, out, **{"backend.name": "hf", "dataset.end_index": 2})
    )
    with pytest.raises(collect.ConfigError, match="num_revisions"):
        collect.main(
            args_for(tiny_model_dir, addition_data, out, **{"backend.name": "hf", "num_revisions": 3})
        )
    with pytest.raises(collect.ConfigError, match="1 shards"):
        collect.main(args_for(tiny_model_dir, addition_data, out, **{"backend.name": "hf", "num_shards": 2}))


@pytest.mark.vllm
def test_collect_vllm_backend_writes_well_formed_records(tiny_model_dir, addition_data, tmp_path):
    out = tmp_path / "run"
    collect.main(
        args_for(tiny_model_dir, addition_data, out, **{"backend.name": "vllm", "dataset.end_index": 7})
    )
    summary = check_collection(out / "shard-0-of-1", set(range(7)), 2, 2)
    assert summary["init"]["samples"] == 14 and summary["revision"]["samples"] == 28


def run_killed_then_resumed(cmd: list[str], shard: Path, env: dict) -> bytes:
    """Start `cmd`, SIGKILL it right after its first committed batch, return the bytes committed by then."""
    attempts = shard / "attempts.jsonl"
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if attempts.exists() and b'"batch_done"' in attempts.read_bytes():
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"collector ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    data = attempts.read_bytes()
    committed = data[: data.rindex(b'"batch_done"')]
    committed = data[: data.index(b"\n", len(committed)) + 1]
    assert committed.count(b'"batch_done"') < 40 // 3, "the whole range finished before the kill"
    resumed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return committed


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_sigkill_then_rerun_processes_each_problem_once_hf(tiny_model_dir, addition_data, tmp_path):
    out = tmp_path / "run"
    args = args_for(tiny_model_dir, addition_data, out, **{"backend.name": "hf", "sampling.max_tokens": 24})
    shard = out / "shard-0-of-1"
    committed = run_killed_then_resumed(
        [sys.executable, "-m", "self_revision_training.collect", *args], shard, subprocess_env()
    )
    assert (shard / "attempts.jsonl").read_bytes().startswith(committed)
    check_collection(shard, set(range(40)), 2, 2)


def test_sigkill_then_rerun_keeps_the_verified_set_consistent(tiny_model_dir, addition_data, tmp_path):
    # The scripted backend answers right half the time, so there are verified tuples of both kinds
    # (r=0 and, with revise_correct, r=1) to keep consistent across the kill.
    out = tmp_path / "run"
    args = args_for(
        tiny_model_dir,
        addition_data,
        out,
        revise_correct="true",
        **{"backend.name": "hf", "sampling.max_tokens": 64},
    )
    shard = out / "shard-0-of-1"
    cmd = [sys.executable, str(FIXTURES / "collect_runner.py"), "0.05", *args]
    committed = run_killed_then_resumed(cmd, shard, subprocess_env())
    assert (shard / "attempts.jsonl").read_bytes().startswith(committed)
    summary = check_collection(shard, set(range(40)), 2, 2)
    assert (
        summary["revision"]["by_r"]["r0"]["verified"] > 0
        and summary["revision"]["by_r"]["r1"]["verified"] > 0
    )


def test_target_stops_collection_and_shards_are_disjoint(tiny_model_dir, addition_data, tmp_path):
    out = tmp_path / "run"
    sys.path.insert(0, str(FIXTURES))
    from scripted_backend import ScriptedBackend
    from transformers import AutoTokenizer

    import self_revision_training.shared.generation as generation

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    original = generation.create_backend
    generation.create_backend = lambda model, cfg: ScriptedBackend(tok)
    try:
        for k in range(2):
            collect.main(
                args_for(
                    tiny_model_dir,
                    addition_data,
                    out,
                    num_shards=2,
                    shard_index=k,
                    target_revision_samples=10,
                    batch_size=2,
                    **{"sampling.max_tokens": 64},
                )
            )
    finally:
        generation.create_backend = original
    done = []
    for k in range(2):
        summary = json.loads((out / f"shard-{k}-of-2" / "summary.json").read_text())
        assert summary["status"] == "target_reached" and summary["target"] == 5
        assert 5 <= summary["verified_tuples"] < 5 + 2 * 2 * 2  # stops after the batch that reached it
        for marker, _ in iter_committed_batches(out / f"shard-{k}-of-2" / "attempts.jsonl"):
            assert all(i % 2 == k for i in marker["indices"])
            done += marker["indices"]
    assert len(done) == len(set(done)) < 40


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MAX_TOKENS": "abc"}, "knob MAX_TOKENS=abc must be an integer >= 1"),
        ({"TOP_P": "-1"}, "knob TOP_P=-1 must be a non-negative number"),
        ({"MODE": "physics"}, "knob MODE=physics must be one of: math code"),
        ({"NUM_GPUS": "3", "TP_SIZE": "2"}, "knob NUM_GPUS=3 must be a multiple of TP_SIZE=2"),
        ({"TOP_P": "1.5"}, "sampling.top_p must be in (0, 1]"),
        ({"DATASET": "/nonexistent/problems.jsonl"}, "/nonexistent/problems.jsonl"),
    ],
)
def test_driver_rejects_bad_knobs_before_loading_a_model(tmp_path, env, message):
    full = {
        **os.environ,
        "OUTPUT_DIR": str(tmp_path / "out"),
        "MODEL_PATH": str(tmp_path / "no-model"),
        "DATASET": str(tmp_path / "d.jsonl"),
        "NUM_GPUS": "0",
        **env,
    }
    (tmp_path / "d.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n')
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "run_srt_data.sh")],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "out" / "collect" / "shard-0-of-1" / "attempts.jsonl").exists()
