"""The Phase-1 collector end to end: well-formed records from the real vLLM and HF backends, and
resume after SIGKILL (every problem exactly once, committed batches kept byte for byte, verified set
and summary consistent with the attempts file); one writer per shard (a second collection exits naming
the first), killing the driver kills the collector, over-long prompts are skipped and counted, a failed
start blocks nothing, and a resume refuses changed sampling or grading settings."""

from __future__ import annotations

import json
import os
import re
import shutil
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
    "y_init_ids",
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
    "y_init_ids",
    "y_init_correct",
    "y_init_extracted",
    "p_r",
    "y_revised",
    "y_revised_ids",
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
    # sampling and grading decide which tuples exist: a resume refuses them, with the key and both values
    for key, value, shown in [
        ("sampling.temperature", 0.7, "sampling.temperature: 1.0 -> 0.7"),
        ("sampling.top_p", 1.0, "sampling.top_p: 0.9 -> 1.0"),
        (
            "grading.extraction",
            "boxed_or_last_number",
            "grading.extraction: 'boxed' -> 'boxed_or_last_number'",
        ),
        ("grading.timeout_s", 1.0, "grading.timeout_s"),
        ("revision_max_tokens", 8, "revision_max_tokens: None -> 8"),
    ]:
        with pytest.raises(collect.ConfigError, match=re.escape(shown)):
            collect.main(
                args_for(
                    tiny_model_dir,
                    addition_data,
                    out,
                    **{"backend.name": "hf", "dataset.end_index": 2, key: value},
                )
            )
    # resources and the range may change: an allowed change runs (here: nothing left to do)
    collect.main(
        args_for(
            tiny_model_dir,
            addition_data,
            out,
            **{"backend.name": "hf", "dataset.end_index": 2, "grading.num_workers": 1, "batch_size": 5},
        )
    )


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


# ---------------------------------------------------------------- a user's mistakes never wedge a run


def test_long_prompts_are_skipped_and_counted_and_check_only_reports_them(tiny_model_dir, tmp_path, capsys):
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    rows[2] = {"problem": "word " * 300, "answer": "3"}  # longer than the 96-token context
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = args_for(
        tiny_model_dir,
        data,
        out,
        **{"backend.name": "hf", "backend.max_model_len": 96, "sampling.max_tokens": 8},
    )
    collect.main([*args, "check_only=true"])
    report = capsys.readouterr().out
    assert "1 prompts too long for max_model_len=96 (skipped and counted)" in report
    assert not (out / "shard-0-of-1" / "attempts.jsonl").exists()  # check_only writes nothing
    stats = collect.main(args)  # before: ValueError, and every rerun failed at the same batch
    assert stats["problems_skipped"] == {"prompt_too_long": 1} and stats["problems_done"] == 5
    shard = out / "shard-0-of-1"
    markers = [m for m, _ in iter_committed_batches(shard / "attempts.jsonl")]
    assert [i for m in markers for i in m["prompt_too_long"]] == [2]
    covered = sorted(i for m in markers for i in m["indices"])
    assert covered == [0, 1, 2, 3, 4]
    inits = {
        r["original_index"] for _, recs in iter_committed_batches(shard / "attempts.jsonl") for r in recs
    }
    assert inits == {0, 1, 3, 4}
    assert json.loads((shard / "summary.json").read_text())["problems_skipped"] == {"prompt_too_long": 1}
    before = (shard / "attempts.jsonl").read_bytes()
    collect.main(args)  # the rerun does not retry the skipped problem
    assert (shard / "attempts.jsonl").read_bytes() == before


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_rerun(
    tiny_model_dir, addition_data, tmp_path
):
    out = tmp_path / "run"
    shard = out / "shard-0-of-1"
    typo = str(tiny_model_dir) + "-typo"
    with pytest.raises(SystemExit, match=r"model.path='.*-typo' cannot be loaded"):
        collect.main(args_for(typo, addition_data, out, **{"backend.name": "hf", "check_only": "true"}))
    with pytest.raises(OSError):
        collect.main(args_for(typo, addition_data, out, **{"backend.name": "hf", "dataset.end_index": 2}))
    assert not (shard / "config.yaml").exists() and not (shard / "sdzero_prompt.json").exists()
    # before: "collected with other settings (model: ...-typo -> ...)" although nothing was collected
    collect.main(
        args_for(tiny_model_dir, addition_data, out, **{"backend.name": "hf", "dataset.end_index": 2})
    )
    check_collection(shard, {0, 1}, 2, 2)
    # a tokenizer without a chat template is named by check_only, before any engine starts
    no_template = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, no_template)
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(SystemExit, match="has no chat template"):
        collect.main(args_for(no_template, addition_data, tmp_path / "r2", check_only="true"))


def test_two_collections_into_one_directory_the_second_exits_naming_the_first(
    tiny_model_dir, addition_data, tmp_path
):
    out = tmp_path / "run"
    shard = out / "shard-0-of-1"
    args = args_for(tiny_model_dir, addition_data, out, **{"backend.name": "hf", "sampling.max_tokens": 64})
    cmd = [sys.executable, str(FIXTURES / "collect_runner.py"), "0.5", *args]
    first = subprocess.Popen(
        cmd, env=subprocess_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        lock = shard / ".sdzero.lock"
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text()):  # the first collection holds the shard
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        t0 = time.time()
        second = subprocess.run(
            cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert first.poll() is None, "the first collection ended before the second started"
        assert second.returncode != 0 and time.time() - t0 < 60
        assert f"in use by another run: pid {first.pid}" in second.stderr, second.stderr[-2000:]
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        first.stderr.close()
    check_collection(shard, set(range(40)), 2, 2)  # every problem once: nothing duplicated


def test_killing_the_driver_script_kills_the_collector(tiny_model_dir, addition_data, tmp_path):
    """kill -9 of run_srt_data.sh (not of python): no orphan keeps writing into the output directory."""
    from self_revision_training.shared.run_lock import RunLockError, check_run_lock

    out = tmp_path / "out"
    env = {
        **subprocess_env(),
        "OUTPUT_DIR": str(out),
        "MODEL_PATH": str(tiny_model_dir),
        "DATASET": str(addition_data),
        "NUM_GPUS": "0",
        "BACKEND": "hf",
        "MAX_TOKENS": "32",
        "MAX_MODEL_LEN": "512",
        "BATCH_SIZE": "2",
        "NUM_RESPONSES": "2",
        "NUM_REVISIONS": "2",
        "TARGET_REVISION_SAMPLES": "0",
        "TRUNCATED_INIT": "keep",
        "PYTHON": sys.executable,
        "EXTRA_ARGS": "progress=false model.dtype=float32 grading.num_workers=1",
    }
    shard = out / "collect" / "shard-0-of-1"
    attempts = shard / "attempts.jsonl"
    driver = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "run_srt_data.sh")], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None:
        # a batch is committed and its summary written (the summary follows the commit marker)
        if (
            attempts.exists()
            and b'"batch_done"' in attempts.read_bytes()
            and (shard / "summary.json").exists()
        ):
            break
        time.sleep(0.01)
    assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
    os.kill(driver.pid, signal.SIGKILL)  # the script, which no trap can see
    driver.wait()
    driver.stderr.close()
    deadline = time.time() + 60
    while True:  # the collector held the shard's lock; it is free once the collector is gone
        try:
            check_run_lock(shard)
            break
        except RunLockError:
            assert time.time() < deadline, "the collector outlived its driver"
            time.sleep(0.1)
    size = attempts.stat().st_size
    time.sleep(3)
    assert attempts.stat().st_size == size, "something still writes into the output directory"
    summary = json.loads((shard / "summary.json").read_text())
    assert summary["status"] == "running" and summary["problems_done"] < 40


def test_driver_defaults_revise_correct_and_decimal_integer_knobs(tmp_path):
    from self_revision_training.shared.config import load_config

    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" "--" >> "$ARGS_FILE"\n')
    fake.chmod(0o755)
    env = {
        **os.environ,
        "OUTPUT_DIR": str(tmp_path / "out"),
        "MODEL_PATH": "m",
        "DATASET": "d.jsonl",
        "NUM_GPUS": "0",
        "START_INDEX": "010",  # YAML 1.1 and bash arithmetic would read 8
        "BATCH_SIZE": "08",  # bash arithmetic: "value too great for base"
        "PYTHON": str(fake),
        "ARGS_FILE": str(tmp_path / "args.txt"),
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "run_srt_data.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    calls = [
        c.strip("\n").split("\n") for c in (tmp_path / "args.txt").read_text().split("--\n") if c.strip()
    ]
    collect_args = calls[1][2:]
    assert calls[1][:2] == ["-m", "self_revision_training.collect"]
    for expected in ("revise_correct=true", "dataset.start_index=10", "batch_size=8"):
        assert expected in collect_args
    cfg = load_config(
        collect.CollectConfig,
        ROOT / "configs" / "phase1_collect.yaml",
        [a for a in collect_args if not a.startswith("output_dir")] + ["output_dir=o"],
    )
    assert cfg.revise_correct is True and cfg.dataset.start_index == 10
    assert collect.CollectConfig(output_dir="o", model=cfg.model, dataset=cfg.dataset).revise_correct is True
