"""The embedded task files: seeded, disjoint train / held-out splits."""

import json

import pytest

from self_revision_training.embedded import MODELS, write_task


def test_task_splits_are_disjoint_and_seeded(tmp_path):
    pytest.importorskip("reasoning_gym")
    kwargs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"]}
    write_task("basic_arithmetic", tmp_path / "a", train=20, test=10, seed=3, **kwargs)
    write_task("basic_arithmetic", tmp_path / "b", train=20, test=10, seed=3, **kwargs)
    rows = {
        s: [json.loads(x) for x in (tmp_path / "a" / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "test")
    }
    assert len(rows["train"]) == 20 and len(rows["test"]) == 10
    assert not {r["problem"] for r in rows["train"]} & {r["problem"] for r in rows["test"]}
    assert all(r["answer"].lstrip("-").isdigit() for r in rows["train"] + rows["test"])
    for split in ("train", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{split}.jsonl"
        ).read_bytes()


def test_every_embedded_model_pins_its_payload():
    for name, spec in MODELS.items():
        assert spec.sha256 and len(spec.sha256) == 64, name
        assert len(spec.wheels) == len(spec.members), name
