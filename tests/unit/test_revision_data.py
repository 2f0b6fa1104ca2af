"""prepare_data on hand-made records: cleaning, de-duplication, the Stage-2 quota, formats, errors;
and the collection log's commit/recovery rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from self_revision_training import prepare_data
from self_revision_training.revision_data import (
    CollectionStats,
    build_init_record,
    build_revision_record,
    load_verified,
)
from self_revision_training.shared.config import DEFAULT_CORRECT_PHRASE as P1
from self_revision_training.shared.config import DEFAULT_INCORRECT_PHRASE as P0
from self_revision_training.shared.storage import DataFileError, iter_committed_batches, recover_batch_log
from self_revision_training.stage_split import (
    build_stage_records,
    format_stage1,
    format_stage2,
    strip_sycophantic_opening,
    trim_repeating_tail,
)


def rec(
    i: int,
    init_correct: bool,
    *,
    x: str | None = None,
    y_init: str | None = None,
    y_rev: str | None = None,
    verified: bool = True,
    resp: int = 0,
    rev: int = 0,
) -> dict:
    return {
        "type": "revision",
        "x": x if x is not None else f"problem {i}",
        "y_init": y_init if y_init is not None else f"first try {i}",
        "p_r": P1 if init_correct else P0,
        "y_revised": y_rev if y_rev is not None else f"revised {i}",
        "ground_truth": str(i),
        "y_init_correct": init_correct,
        "y_revised_correct": verified,
        "verified": verified,
        "original_index": i,
        "response_idx": resp,
        "revision_idx": rev,
        "y_revised_finish_reason": "stop",
        "y_revised_num_tokens": 5,
        "y_revised_reason": "correct" if verified else "wrong",
    }


# ---------------------------------------------------------------- cleaning


def test_trim_repeating_tail_keeps_one_copy():
    loop = "so the answer is 4. "
    text = "Let us compute 2+2. " + loop * 6
    # ". " also ends the text before the loop, so the kept copy starts two characters early
    assert trim_repeating_tail(text) == "Let us compute 2+2. so the answer is 4"


def test_trim_repeating_tail_handles_a_cut_off_last_copy():
    loop = "I think it is 7, "
    text = "Start. " + loop * 5 + loop[:6]
    assert trim_repeating_tail(text) == ("Start. " + loop).rstrip()


def test_trim_repeating_tail_leaves_normal_text_and_short_repeats():
    normal = "First we add 3 and 4 to get 7. Then we multiply by 2 to get 14. The answer is \\boxed{14}."
    assert trim_repeating_tail(normal) == normal
    twice = "Intro. " + "abcdefghijkl" * 2  # two periods are not degenerate (>= 3 needed)
    assert trim_repeating_tail(twice) == twice
    assert trim_repeating_tail("") == ""
    assert trim_repeating_tail("aaaaaaaa") == "aaaaaaaa"  # periods shorter than 10 characters are ignored


@pytest.mark.parametrize(
    "text, expected",
    [
        ("You're absolutely right to question that. the sum is 5.", "The sum is 5."),
        ("You are right, the sum is 5.", "The sum is 5."),
        ("Yes, you're right — the sum is 5.", "The sum is 5."),
        ("Indeed, You are absolutely right: let me redo it.", "Let me redo it."),
        ("Thank you for pointing that out! Great question. the sum is 5.", "The sum is 5."),
        ("Good catch. Nice point! recomputing: 5.", "Recomputing: 5."),
        ("  Great question! 5", "5"),
    ],
)
def test_strip_sycophantic_openings(text, expected):
    assert strip_sycophantic_opening(text) == expected


@pytest.mark.parametrize(
    "text",
    ["Let me correct it. 2 + 3 = 5.", "The right answer is 5.", "Thanks to symmetry, x = 1.", "you are here"],
)
def test_strip_sycophantic_leaves_other_openings(text):
    assert strip_sycophantic_opening(text) == text


# ---------------------------------------------------------------- split and formats


def test_formats_match_reference_layouts():
    r = rec(1, False, x="What is 2+3?", y_init="It is 6.", y_rev="It is 5.")
    s1, s2 = format_stage1(r), format_stage2(r)
    assert s1["prompt"] == "What is 2+3?"
    assert s1["completion"] == "It is 6.\n\n" + P0 + "\n\nIt is 5."
    assert s2["prompt"] == "What is 2+3?\n\nIt is 6.\n\n" + P0
    assert s2["completion"] == "It is 5."
    for s in (s1, s2):  # the structured fields travel along for per-segment tokenisation in the SFT
        assert (s["x"], s["y_init"], s["p_r"], s["y_revised"], s["y_init_correct"]) == (
            "What is 2+3?",
            "It is 6.",
            P0,
            "It is 5.",
            False,
        )


def test_stage2_quota_takes_correct_init_first_and_stage1_the_remaining_incorrect():
    records = [rec(i, init_correct=i < 3) for i in range(10)]  # 3 correct-init, 7 incorrect-init
    split = build_stage_records(records, stage2_size=5, seed=0)
    assert len(split.stage2) == 5 and len(split.stage1) == 5
    assert sum(r["y_init_correct"] for r in split.stage2) == 3
    assert not any(r["y_init_correct"] for r in split.stage1)
    ids2 = {r["original_index"] for r in split.stage2}
    ids1 = {r["original_index"] for r in split.stage1}
    assert ids1.isdisjoint(ids2) and ids1 | ids2 == set(range(10))


def test_correct_init_beyond_the_quota_is_unused():
    records = [rec(i, init_correct=i < 6) for i in range(9)]
    split = build_stage_records(records, stage2_size=4, seed=0)
    assert len(split.stage2) == 4 and all(r["y_init_correct"] for r in split.stage2)
    assert len(split.stage1) == 3 and split.stats["unused_correct_init"] == 2


def test_split_is_seeded():
    records = [rec(i, init_correct=i % 3 == 0) for i in range(30)]
    a = build_stage_records(records, stage2_size=8, seed=1)
    b = build_stage_records(records, stage2_size=8, seed=1)
    c = build_stage_records(records, stage2_size=8, seed=2)
    assert a.stage1 == b.stage1 and a.stage2 == b.stage2
    assert [r["original_index"] for r in a.stage1] != [r["original_index"] for r in c.stage1]


def test_exact_duplicates_and_empty_revisions_are_removed():
    records = [rec(0, False), rec(0, False, rev=1), rec(1, False, y_rev="   "), rec(2, False), rec(3, False)]
    split = build_stage_records(records, stage2_size=1, seed=0)
    assert split.stats["duplicates_or_empty_removed"] == 2
    assert len(split.stage1) + len(split.stage2) == 3


def test_cleaning_runs_before_dedup_and_can_be_disabled():
    loop = "and so on and on. "
    a = rec(0, False, y_rev="You're right, it is 5. " + loop * 5)
    b = rec(0, False, y_rev="It is 5. and so on and on", rev=1)
    c = rec(1, False)
    cleaned = build_stage_records([a, b, c], stage2_size=1, seed=0)
    assert cleaned.stats["duplicates_or_empty_removed"] == 1  # a cleans to exactly b
    raw = build_stage_records([a, b, c], stage2_size=1, seed=0, clean=False)
    assert raw.stats["duplicates_or_empty_removed"] == 0
    texts = {r["y_revised"] for r in raw.stage1 + raw.stage2}
    assert a["y_revised"] in texts


def test_empty_stages_are_errors():
    with pytest.raises(ValueError, match="Stage 2 would be empty"):
        build_stage_records([], stage2_size=5, seed=0)
    with pytest.raises(ValueError, match="Stage 1 would be empty"):
        build_stage_records([rec(i, False) for i in range(3)], stage2_size=5, seed=0)
    with pytest.raises(ValueError, match="Stage 1 would be empty"):  # only correct-init tuples
        build_stage_records([rec(i, True) for i in range(3)], stage2_size=1, seed=0)


# ---------------------------------------------------------------- the collection log


def write_log(path: Path, batches: list[list[dict]], tail: str = "") -> None:
    lines = []
    for b, records in enumerate(batches):
        lines += [json.dumps(r) for r in records]
        lines.append(
            json.dumps(
                {
                    "type": "batch_done",
                    "batch": b,
                    "indices": sorted({r["original_index"] for r in records}),
                    "seconds": 1.0,
                    "generated_tokens": 10,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n" + tail, encoding="utf-8")


def test_recover_batch_log_drops_only_the_uncommitted_batch(tmp_path):
    path = tmp_path / "attempts.jsonl"
    write_log(path, [[rec(0, False)], [rec(1, False), rec(2, True)]])
    committed = path.read_bytes()
    with open(
        path, "a", encoding="utf-8"
    ) as f:  # a batch cut by a kill: complete lines, no marker, torn tail
        f.write(json.dumps(rec(3, False)) + "\n" + json.dumps(rec(4, False))[:17])
    assert recover_batch_log(path) == 2
    assert path.read_bytes() == committed
    assert recover_batch_log(path) == 0
    batches = list(iter_committed_batches(path))
    assert [m["indices"] for m, _ in batches] == [[0], [1, 2]]


def test_load_verified_reads_committed_batches_only_and_rejects_overlapping_shards(tmp_path):
    a, b = tmp_path / "shard-0-of-2", tmp_path / "shard-1-of-2"
    a.mkdir()
    b.mkdir()
    write_log(
        a / "attempts.jsonl",
        [[rec(0, False), rec(2, False, verified=False)]],
        tail=json.dumps(rec(4, False)) + "\n",
    )  # uncommitted: ignored
    write_log(b / "attempts.jsonl", [[rec(1, True)]])
    records, files = load_verified(tmp_path)
    assert sorted(r["original_index"] for r in records) == [0, 1] and len(files) == 2
    write_log(b / "attempts.jsonl", [[rec(1, True), rec(0, False)]])
    with pytest.raises(DataFileError, match="overlapping shards"):
        load_verified(tmp_path)


def test_load_verified_accepts_the_reference_formats(tmp_path):
    ref = [
        {k: v for k, v in rec(i, False, verified=i != 1).items() if k not in ("type", "verified")}
        for i in range(3)
    ]
    (tmp_path / "d_revision.json").write_text(json.dumps(ref), encoding="utf-8")
    records, _ = load_verified(tmp_path / "d_revision.json")
    assert [r["original_index"] for r in records] == [0, 2]  # filtered on y_revised_correct
    (tmp_path / "x_all_responses.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in ref), encoding="utf-8"
    )
    assert len(load_verified(tmp_path / "x_all_responses.jsonl")[0]) == 2


def test_load_verified_errors_name_the_file_and_line(tmp_path):
    bad = rec(0, False)
    del bad["y_init"]
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec(1, False)) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"r\.jsonl:2: revision record lacks \['y_init'\]"):
        load_verified(path)
    with pytest.raises(DataFileError, match="no attempts.jsonl"):
        load_verified(tmp_path)
    with pytest.raises(DataFileError, match="no such file"):
        load_verified(tmp_path / "missing.jsonl")


def test_collection_stats_count_per_r():
    init = {
        "type": "init",
        "y_init_correct": False,
        "y_init_finish_reason": "length",
        "y_init_num_tokens": 8,
        "y_init_reason": "no_answer",
        "revised": False,
        "skip_reason": "truncated",
    }
    stats = CollectionStats()
    stats.add_batch(
        {"indices": [0, 1], "seconds": 2.0, "generated_tokens": 100},
        [init, rec(0, False), rec(0, False, verified=False, rev=1), rec(1, True)],
    )
    d = stats.to_dict()
    assert d["problems_done"] == 2 and d["verified_tuples"] == 2
    assert d["revision"]["by_r"]["r0"] | {} == d["revision"]["by_r"]["r0"]
    assert d["revision"]["by_r"]["r0"]["revisions"] == 2 and d["revision"]["by_r"]["r0"]["yield"] == 0.5
    assert d["revision"]["by_r"]["r1"]["verified"] == 1
    assert d["init"]["truncation_rate"] == 1.0 and d["init"]["not_revised"] == {"truncated": 1}
    assert d["throughput"]["tokens_per_s"] == 50.0


# ---------------------------------------------------------------- the prepare_data entry point


def test_prepare_data_cli_writes_both_stages_and_stats(tmp_path, capsys):
    coll = tmp_path / "collect" / "shard-0-of-1"
    coll.mkdir(parents=True)
    write_log(coll / "attempts.jsonl", [[rec(i, init_correct=i < 2) for i in range(6)]])
    out = tmp_path / "data"
    stats = prepare_data.main(
        [f"input={tmp_path / 'collect'}", f"output_dir={out}", "stage2_size=3", "prefix=p"]
    )
    assert stats["stage1"] == 3 and stats["stage2"] == 3
    lines1 = (out / "p_stage1.jsonl").read_text().splitlines()
    assert len(lines1) == 3 and all({"prompt", "completion"} <= json.loads(x).keys() for x in lines1)
    assert json.loads((out / "p_stats.json").read_text())["stage2_correct_init"] == 2
    assert "prepare_data:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="Stage 1 would be empty"):
        prepare_data.main(
            [f"input={tmp_path / 'collect'}", f"output_dir={out}", "stage2_size=50", "--no-clean"]
        )


def test_prepare_data_rejects_a_phrase_outside_the_prompt_spec(tmp_path):
    bad = rec(0, False)
    bad["p_r"] = "Wrong. I need to redo all."
    path = tmp_path / "r.jsonl"
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in [bad, rec(1, False), rec(2, False)]), encoding="utf-8"
    )
    with pytest.raises(SystemExit, match="neither phrase"):
        prepare_data.main([f"input={path}", f"output_dir={tmp_path / 'o'}", "stage2_size=1"])


def test_the_same_tuple_twice_in_one_shard_says_so(tmp_path):
    shard = tmp_path / "shard-0-of-1"
    shard.mkdir()
    write_log(shard / "attempts.jsonl", [[rec(0, False), rec(1, False)], [rec(0, False)]])  # two writers
    with pytest.raises(DataFileError, match=r"duplicate tuples within one shard: tuple \(0, 0, 0\)"):
        load_verified(tmp_path)
    with pytest.raises(SystemExit, match="duplicate tuples within one shard"):
        prepare_data.main([f"input={tmp_path}", f"output_dir={tmp_path / 'o'}", "stage2_size=1"])


def test_records_store_the_sampled_ids_without_end_of_turn():
    from types import SimpleNamespace

    problem = SimpleNamespace(index=3, problem="1+1?", answer="2")
    verdict = SimpleNamespace(correct=False, extracted="3", reason="wrong")
    eos = frozenset({99})
    init = build_init_record(
        problem, 0, SimpleNamespace(text="x", token_ids=[5, 6, 99], finish_reason="stop"), verdict, 0, 0, eos
    )
    assert init["y_init_ids"] == [5, 6]
    cut = build_init_record(
        problem, 1, SimpleNamespace(text="x", token_ids=[5, 6], finish_reason="length"), verdict, 0, 0, eos
    )
    assert cut["y_init_ids"] == [5, 6]
    revision = build_revision_record(
        init, P0, 0, SimpleNamespace(text="y", token_ids=[7, 99], finish_reason="stop"), verdict, eos
    )
    assert revision["y_init_ids"] == [5, 6] and revision["y_revised_ids"] == [7]


def test_prepare_data_carries_sampled_ids_and_drops_them_when_cleaning_changes_a_text(tmp_path):
    loop = "again and again. " * 5
    records = [rec(i, init_correct=i < 2) | {"y_init_ids": [i, 1], "y_revised_ids": [i, 2]} for i in range(6)]
    records[5] |= {"y_init": "first try 5 " + loop, "y_revised": "You're right, revised 5"}  # both cleaned
    records[4].pop("y_init_ids")  # e.g. written before ids were stored
    coll = tmp_path / "collect" / "shard-0-of-1"
    coll.mkdir(parents=True)
    write_log(coll / "attempts.jsonl", [records])
    out = tmp_path / "data"
    stats = prepare_data.main([f"input={tmp_path / 'collect'}", f"output_dir={out}", "stage2_size=3"])
    assert stats["token_ids"] == {"kept": 9, "reencoded_after_cleaning": 2, "missing": 1}
    rows = [
        json.loads(line)
        for f in ("srt_stage1.jsonl", "srt_stage2.jsonl")
        for line in (out / f).read_text().splitlines()
    ]
    by_index = {r["original_index"]: r for r in rows}
    assert by_index[0]["y_init_ids"] == [0, 1] and by_index[0]["y_revised_ids"] == [0, 2]
    assert by_index[5]["y_init_ids"] is None and by_index[5]["y_revised_ids"] is None
    assert by_index[5]["y_revised"] == "Revised 5" and by_index[4]["y_init_ids"] is None


def test_collection_stats_count_prompts_too_long():
    stats = CollectionStats()
    stats.add_batch({"indices": [0, 1, 2], "prompt_too_long": [1]}, [])
    stats.add_batch({"indices": [3]}, [])  # markers written before the field existed
    assert stats.to_dict()["problems_skipped"] == {"prompt_too_long": 1}
    assert stats.to_dict()["problems_done"] == 4
