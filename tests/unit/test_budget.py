"""budget.json: a stage's counters, their sum over a method's stages (problems united per dataset, wall time
kept per stage), and the state round trip a resumed run relies on."""

from __future__ import annotations

import json

import pytest

from self_revision_training.shared.budget import Budget, collect_run_budget, main, sum_budgets


def test_sum_of_stages(tmp_path):
    collect = Budget(
        "collect", samples_generated=192, tokens_generated=20_000, problems={"train.jsonl": [0, 1, 2]}
    )
    collect.add_time("collection", 60.0)
    sft = Budget("sft", tokens_trained=5_000, optimizer_steps=4)
    sft.add_time("training", 30.0)
    distill = Budget("distill", samples_generated=32, tokens_generated=3_000, tokens_trained=2_500, teacher_tokens_scored=2_500,
                     optimizer_steps=4, validation_samples=16)  # fmt: skip
    distill.add_problems("train.jsonl", [2, 3])
    distill.add_time("rollout", 10.0)
    distill.add_time("rollout", 5.5)
    total = sum_budgets([("srt_data", collect), ("srt/stage1", sft), ("distill", distill)])
    assert total["samples_generated"] == 224 and total["tokens_generated"] == 23_000
    assert (
        total["tokens_trained"] == 7_500
        and total["optimizer_steps"] == 8
        and total["validation_samples"] == 16
    )
    assert total["problems"] == {"train.jsonl": [0, 1, 2, 3]} and total["num_problems"] == 4  # the union
    assert total["wall_seconds"] == {
        "srt_data/collection": 60.0,
        "srt/stage1/training": 30.0,
        "distill/rollout": 15.5,
    }
    assert total["wall_seconds_total"] == 105.5
    for name, stage in (("srt_data", collect), ("srt/stage1", sft), ("distill", distill)):
        stage.save(tmp_path / name)
    assert collect_run_budget(tmp_path) == total
    written = main([str(tmp_path)])
    assert json.loads((tmp_path / "budget.json").read_text()) == written == total
    assert collect_run_budget(tmp_path) == total  # the run's own total is not counted again


def test_state_round_trip_and_missing_stages(tmp_path):
    budget = Budget("distill", samples_generated=8)
    budget.add_problems("d", [3, 1])
    assert Budget.from_dict(json.loads(json.dumps(budget.state_dict()))) == budget
    assert Budget.from_dict(budget.to_dict()) == budget  # budget.json reads back too
    with pytest.raises(FileNotFoundError, match="no budget.json"):
        collect_run_budget(tmp_path)


def test_a_method_built_on_another_methods_stages_counts_them(tmp_path):
    """SD-Zero's Phase 2 in sd-zero/ on the SRT run in srt/: sd-zero/budget.json = both."""
    Budget("collect", samples_generated=100).save(tmp_path / "srt" / "srt_data" / "collect" / "shard-0-of-1")
    Budget("sft", tokens_trained=7).save(tmp_path / "srt" / "srt" / "stage1")
    Budget("distill", samples_generated=32).save(tmp_path / "sd-zero" / "distill")
    main([str(tmp_path / "srt")])  # the SRT method's own total is not a stage of sd-zero
    total = main([str(tmp_path / "sd-zero"), str(tmp_path / "srt"), str(tmp_path / "sd-zero")])
    assert total["samples_generated"] == 132 and total["tokens_trained"] == 7
    assert set(total["stages"]) == {str(tmp_path / "srt" / "srt_data" / "collect" / "shard-0-of-1"),
                                    str(tmp_path / "srt" / "srt" / "stage1"), "distill"}  # fmt: skip
