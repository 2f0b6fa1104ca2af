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
    # a validation split is disjoint from both and leaves train and test exactly as they were
    write_task("basic_arithmetic", tmp_path / "c", train=20, test=10, seed=3, val=8, **kwargs)
    for split in ("train", "test"):
        assert (tmp_path / "c" / f"{split}.jsonl").read_bytes() == (
            tmp_path / "a" / f"{split}.jsonl"
        ).read_bytes()
    val = {json.loads(x)["problem"] for x in (tmp_path / "c" / "val.jsonl").read_text().splitlines()}
    assert len(val) == 8 and not val & {r["problem"] for r in rows["train"] + rows["test"]}
    assert not (tmp_path / "a" / "val.jsonl").exists()


def test_every_embedded_model_pins_its_payload():
    for name, spec in MODELS.items():
        assert spec.sha256 and len(spec.sha256) == 64, name
        assert len(spec.wheels) == len(spec.members), name


def test_worked_solutions_of_the_arithmetic_task_are_right():
    from fractions import Fraction

    from self_revision_training.embedded import worked_solution
    from self_revision_training.shared.answers import extract_boxed

    assert (
        worked_solution("-( 20 + 67 + -59 )", "-28")
        == "20 + 67 = 87\n87 + (-59) = 28\n-(28) = -28\nSo the answer is \\boxed{-28}."
    )
    assert worked_solution("3 - 5", "-2").endswith("3 - 5 = -2\nSo the answer is \\boxed{-2}.")
    reasoning_gym = pytest.importorskip("reasoning_gym")
    data = reasoning_gym.create_dataset(
        "basic_arithmetic", size=300, seed=1, min_terms=2, max_terms=4, min_digits=1, max_digits=2
    )
    for entry in data:  # every step follows from the previous ones and the boxed answer is the task's
        solution = worked_solution(entry["metadata"]["expression"], entry["answer"])
        assert Fraction(extract_boxed(solution)) == Fraction(entry["answer"])
    with pytest.raises(ValueError, match="answer"):
        worked_solution("2 + 2", "5")
