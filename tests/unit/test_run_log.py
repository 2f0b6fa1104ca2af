"""metrics.jsonl is strict JSON: a NaN or infinite metric (no samples this step) is written as null."""

from __future__ import annotations

import json
import math

from self_revision_training.shared.run_log import MetricsLogger


def strict_loads(line: str):
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_nan_and_inf_are_written_as_null_and_resume_drops_later_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(path, 0)
    logger.log({"step": 1, "loss": 0.5, "kl_r1": math.nan, "ratio": math.inf, "neg": -math.inf})
    logger.log({"step": 2, "loss": 0.25, "kl_r1": 0.1})
    rows = [strict_loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"step": 1, "loss": 0.5, "kl_r1": None, "ratio": None, "neg": None}
    assert rows[1]["kl_r1"] == 0.1
    MetricsLogger(path, 1)  # resumed from step 1: the rows after it are dropped
    assert [strict_loads(line)["step"] for line in path.read_text().splitlines()] == [1]
