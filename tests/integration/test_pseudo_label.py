"""Majority-vote pseudo-labels end to end with a scripted backend (no model): the labelling stage on
problems whose gold answers are hidden (and on rows with none), its resume and re-thresholding, then Phase 1
collection and the Phase 2 teacher context driven by the vote. Every P_r follows the pseudo-reward, never
the hidden gold answer; skipped problems are absent and counted."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from self_distillation.rollout_data import build_rollout_items
from self_distillation.teacher_context import SelfRevisionContext
from self_revision_training import collect, pseudo_label, training_mix
from self_revision_training.shared.config import DatasetConfig, GradingConfig, PromptConfig, SamplingConfig
from self_revision_training.shared.generation import Sample
from self_revision_training.shared.problems import load_problems
from self_revision_training.shared.prompts import (
    build_generation_prompt,
    build_phrase_ids,
    build_teacher_prompt,
    select_phrase,
)
from self_revision_training.shared.rewards import build_reward_source
from self_revision_training.shared.rewards.majority_vote import VOTE_SKIPS
from self_revision_training.shared.storage import iter_committed_batches, read_jsonl

# problem id -> (hidden gold or None = unlabelled row, the k=4 scripted answers (None = no boxed answer))
SCRIPT = {
    0: ("5", ["5", "5", "5", "7"]),  # label 5, right
    1: ("5", ["4", "4", "5", None]),  # label 4 (ratio 0.5), wrong: 2 false positives, 1 false negative
    2: ("1", ["1", "2", "1", "2"]),  # tie: skipped
    3: ("3", [None, None, None, None]),  # nothing parsed: skipped
    4: ("0.5", ["\\frac{1}{2}", "0.5", "1/2", "3"]),  # one answer in three forms: label \frac{1}{2}
    5: ("2", ["1", "2", "3", "4"]),  # ratio 0.25 < tau: skipped (below tau is checked before a tie)
    6: (None, ["9", "9", "9", "8"]),  # unlabelled row: labelled 9, no audit
    7: (None, ["6", "6", "2", None]),  # unlabelled row: labelled 6 (ratio 0.5)
}
REVISED = "5"  # every revision answers 5: verified exactly where the pseudo-label is 5
QUESTION = re.compile(r"Problem (\d+):")


class VoteBackend:
    """Answers problem i's sample k with SCRIPT[i][1][k]; revision prompts (which end in a P_r) get REVISED."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.max_model_len = 1024
        self.policy_version = 0
        self.eos_token_ids = frozenset({tokenizer.eos_token_id})
        self.prompt_cfg = PromptConfig()

    def _sample(self, answer: str | None) -> Sample:
        body = "I am not sure." if answer is None else f"So the answer is \\boxed{{{answer}}}."
        ids = self.tokenizer(body, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return Sample(body, ids, "stop")

    def generate(self, prompts, sampling, *, max_tokens=None, return_logprobs=False):
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            index = int(QUESTION.search(text).group(1))
            phrases = (self.prompt_cfg.correct_phrase, self.prompt_cfg.incorrect_phrase)
            if any(text.rstrip().endswith(p) for p in phrases):
                out.append([self._sample(REVISED) for _ in range(sampling.n)])
            else:
                out.append([self._sample(SCRIPT[index][1][k % 4]) for k in range(sampling.n)])
        return out

    def update_weights(self, weights_dir) -> None:
        self.policy_version += 1

    def close(self) -> None:
        pass


@pytest.fixture()
def backend_factory(monkeypatch, tiny_tokenizer):
    import self_revision_training.shared.generation as generation

    created = []

    def create(model, cfg):
        created.append(VoteBackend(tiny_tokenizer))
        return created[-1]

    monkeypatch.setattr(generation, "create_backend", create)
    return created


def write_inputs(path: Path) -> Path:
    rows = []
    for i, (gold, _) in SCRIPT.items():
        row = {"problem": f"Problem {i}: what is the value?"}
        if gold is not None:
            row["answer"] = gold
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def label_args(model_dir, data, out, **overrides) -> list[str]:
    base = {
        "model.path": model_dir,
        "dataset.path": data,
        "output_dir": out,
        "num_votes": 4,
        "vote.threshold": 0.5,
        "batch_size": 3,
        "grading.num_workers": 1,
        "sampling.max_tokens": 64,
        "progress": False,
    }
    base.update(overrides)
    return [f"{k}={v}" for k, v in base.items()]


def contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_labelling_stage_votes_with_gold_hidden_and_resumes(tiny_tokenizer_dir, tmp_path, backend_factory):
    data = write_inputs(tmp_path / "unlabelled.jsonl")
    out = tmp_path / "labels"
    stats = pseudo_label.main(label_args(tiny_tokenizer_dir, data, out))
    labels = {r["original_index"]: r for r in read_jsonl(out / "labels.jsonl")}
    assert sorted(labels) == [0, 1, 4, 6, 7]  # 2 (tie), 3 (no answer), 5 (below tau) are absent
    assert {i: r["answer"] for i, r in labels.items()} == {0: "5", 1: "4", 4: "\\frac{1}{2}", 6: "9", 7: "6"}
    assert labels[1] == {
        "problem": "Problem 1: what is the value?",
        "answer": "4",  # the vote, not the hidden gold 5
        "label_source": "vote",
        "vote_ratio": 0.5,
        "num_votes": 2,
        "num_samples": 4,
        "original_index": 1,
        "gold_answer": "5",
    }
    assert "gold_answer" not in labels[6] and labels[4]["vote_ratio"] == 0.75
    audit = stats["audit"]
    assert (audit["num_groups"], audit["num_kept"], audit["coverage"]) == (8, 5, 5 / 8)
    assert [audit[f"skipped/{r}"] for r in VOTE_SKIPS] == [1, 1, 1]  # no answer, below tau, tie
    assert audit["num_audited"] == 3 and audit["label_accuracy"] == pytest.approx(2 / 3)
    # scored: problems 0, 1, 4 (12 responses): FP = problem 1's two 4s; FN = problem 1's 5
    assert (audit["false_positives"], audit["false_negatives"], audit["num_scored"]) == (2, 1, 12)
    assert audit["reward_accuracy"] == pytest.approx(9 / 12)
    assert stats["audit_by_threshold"]["0.75"]["num_kept"] == 3  # 0, 4, 6 (the 0.5s drop)
    assert stats["status"] == "done" and stats["audit_rows"] == 6 and stats["problems"] == 8
    batches = list(iter_committed_batches(out / "votes.jsonl"))
    assert [len(m["indices"]) for m, _ in batches] == [3, 3, 2] and len(backend_factory) == 1

    # a rerun samples nothing; a new tau rewrites the labels from the stored votes
    again = pseudo_label.main(label_args(tiny_tokenizer_dir, data, out, **{"vote.threshold": 0.75}))
    assert len(backend_factory) == 1
    assert sorted(r["original_index"] for r in read_jsonl(out / "labels.jsonl")) == [0, 4, 6]
    assert again["audit"] == stats["audit_by_threshold"]["0.75"]
    with pytest.raises(Exception, match="other settings"):
        pseudo_label.main(label_args(tiny_tokenizer_dir, data, out, num_votes=8))


def test_phase1_and_phase2_follow_the_pseudo_reward(
    tiny_tokenizer_dir, tiny_tokenizer, tmp_path, backend_factory
):
    data = write_inputs(tmp_path / "unlabelled.jsonl")
    pseudo_label.main(label_args(tiny_tokenizer_dir, data, tmp_path / "labels"))
    labels_path = tmp_path / "labels" / "labels.jsonl"
    problems, _ = load_problems(DatasetConfig(path=str(labels_path)))
    assert [p.extras["label_source"] for p in problems] == ["vote"] * 5

    # Phase 1: the collector grades y_init and revisions with the offline vote (labels.jsonl)
    out = tmp_path / "collect"
    collect.main(
        [f"model.path={tiny_tokenizer_dir}", f"dataset.path={labels_path}", f"output_dir={out}",
         "reward=majority_vote", "num_responses=4", "num_revisions=1", "revise_correct=true",
         "target_revision_samples=0", "grading.num_workers=1", "sampling.max_tokens=64", "progress=false"]
    )  # fmt: skip
    records = [
        r for _, batch in iter_committed_batches(out / "shard-0-of-1" / "attempts.jsonl") for r in batch
    ]
    label = {p.extras["original_index"]: p.answer for p in problems}
    value = {"\\frac{1}{2}": 0.5, "0.5": 0.5, "1/2": 0.5}
    same = lambda a, b: a is not None and value.get(a, a) == value.get(b, b)  # noqa: E731
    inits = [r for r in records if r["type"] == "init"]
    revisions = [r for r in records if r["type"] == "revision"]
    assert len(inits) == 20 and len(revisions) == 20
    for r in inits:
        i = problems[r["original_index"]].extras["original_index"]
        assert r["y_init_correct"] == same(r["y_init_extracted"], label[i]), r
    by_problem = {}
    for r in revisions:
        i = problems[r["original_index"]].extras["original_index"]
        by_problem.setdefault(i, []).append(r)
        assert r["p_r"] == select_phrase(same(r["y_init_extracted"], label[i]), PromptConfig())
        assert r["verified"] == (label[i] == REVISED)  # verified against the label, not the gold
    # problem 1 (label 4, gold 5): the two 4s get "rephrase" although wrong, the 5 gets "wrong" although right
    assert [r["p_r"] == PromptConfig().correct_phrase for r in by_problem[1]] == [True, True, False, False]

    # Phase 2: the teacher sequence carries the phrase of the pseudo-reward
    prompt_cfg = PromptConfig()
    phrases = build_phrase_ids(tiny_tokenizer, prompt_cfg)
    context = SelfRevisionContext(
        lambda p: build_teacher_prompt(tiny_tokenizer, p.problem, prompt_cfg, p.solution).ids,
        phrases,
        eos_token_ids=frozenset({tiny_tokenizer.eos_token_id}),
    )
    backend = VoteBackend(tiny_tokenizer)
    prompts = [build_generation_prompt(tiny_tokenizer, p.problem, prompt_cfg).ids for p in problems]
    rows = backend.generate(prompts, SamplingConfig(n=4))
    samples = [[(s.token_ids, s.text, s.finish_reason, None) for s in row] for row in rows]
    with build_reward_source("majority_vote", "math", GradingConfig(num_workers=1)) as reward:
        verdicts = reward.score(problems, [[s.text for s in row] for row in rows])
    items, skipped = build_rollout_items(context, problems, prompts, samples, verdicts)
    assert len(items) == 20 and sum(skipped.values()) == 0
    for item, verdict in zip(items, [v for row in verdicts for v in row], strict=True):
        gold_correct = verdict.gold_correct
        assert contains(item.teacher_ids, phrases[verdict.correct])
        assert not contains(item.teacher_ids, phrases[not verdict.correct])
        assert item.reward == verdict.correct
        if gold_correct is not None and gold_correct != verdict.correct:  # the vote misleads here
            assert not contains(item.teacher_ids, phrases[gold_correct])
    assert (
        sum(v.gold_correct is not None and v.gold_correct != v.correct for row in verdicts for v in row) == 3
    )


def online_batch(tiny_tokenizer, tmp_path):
    """The online source (rows without label_source): the group's own vote; gold hidden, audit only."""
    path = write_inputs(tmp_path / "u.jsonl")  # rows 6 and 7 have no answer at all
    problems, _ = load_problems(DatasetConfig(path=str(path), answers="optional"))
    assert [p.answer for p in problems[6:]] == ["", ""]
    prompt_cfg = PromptConfig()
    prompts = [build_generation_prompt(tiny_tokenizer, p.problem, prompt_cfg).ids for p in problems]
    out = VoteBackend(tiny_tokenizer).generate(prompts, SamplingConfig(n=4))
    with build_reward_source("majority_vote", "math", GradingConfig(num_workers=1)) as reward:
        verdicts = reward.score(problems, [[s.text for s in row] for row in out])
    samples = [[(s.token_ids, s.text, s.finish_reason, None) for s in row] for row in out]
    context = SelfRevisionContext(
        lambda p: build_teacher_prompt(tiny_tokenizer, p.problem, prompt_cfg, p.solution).ids,
        build_phrase_ids(tiny_tokenizer, prompt_cfg),
        eos_token_ids=frozenset({tiny_tokenizer.eos_token_id}),
    )
    return problems, prompts, samples, verdicts, context


def test_online_vote_marks_skipped_groups(tiny_tokenizer, tmp_path):
    problems, _, _, verdicts, _ = online_batch(tiny_tokenizer, tmp_path)
    skips = [row[0].skip for row in verdicts]
    assert skips == [None, None, "vote_tie", "vote_no_answer", None, "vote_below_threshold", None, None]
    assert all(not v.correct and v.reason == "vote_skipped" for row in verdicts if row[0].skip for v in row)
    assert [v.correct for v in verdicts[1]] == [True, True, False, False]  # vs the vote 4, not gold 5
    assert [v.gold_correct for v in verdicts[1]] == [False, False, True, False]


def test_phase2_drops_and_counts_skipped_vote_samples(tiny_tokenizer, tmp_path):
    problems, prompts, samples, verdicts, context = online_batch(tiny_tokenizer, tmp_path)
    items, skipped = build_rollout_items(context, problems, prompts, samples, verdicts)
    assert len(items) == 5 * 4  # problems 0, 1, 4, 6, 7
    assert {k: skipped.get(k, 0) for k in VOTE_SKIPS} == {r: 4 for r in VOTE_SKIPS}


# ---------------------------------------------------------------- Noisy-Student mixing and the drivers

ROOT = Path(__file__).resolve().parents[2]


def test_build_training_mix_samples_and_shuffles(tmp_path):
    labels = tmp_path / "labels.jsonl"
    rows = [
        {"problem": f"p{i}", "answer": str(i), "label_source": "vote", "vote_ratio": 1.0} for i in range(6)
    ]
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    gold = tmp_path / "gold.jsonl"
    gold.write_text(
        "".join(json.dumps({"question": f"g{i}", "answer": f"#### {i}"}) + "\n" for i in range(4))
    )
    out = tmp_path / "mix.jsonl"
    counts = training_mix.main(
        [
            "--labels",
            str(labels),
            "--out",
            str(out),
            "--labelled",
            str(gold),
            "--num-pseudo",
            "3",
            "--seed",
            "1",
        ]
    )
    assert counts == {"pseudo": 3, "labelled": 4}
    mixed = read_jsonl(out)
    assert sorted(r["label_source"] for r in mixed) == ["gold"] * 4 + ["vote"] * 3
    assert {r["answer"] for r in mixed if r["label_source"] == "gold"} == {"0", "1", "2", "3"}
    problems, _ = load_problems(DatasetConfig(path=str(out)))  # a dataset Phase 1 and Phase 2 read as is
    assert len(problems) == 7
    assert training_mix.build_training_mix(labels, out, None, None, None, 0) == {"pseudo": 6, "labelled": 0}


def run_script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", f"scripts/{name}"], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_noisy_student_dry_run_chains_label_train_relabel(tmp_path):
    env = {"DRY_RUN": "1", "OUTPUT_DIR": str(tmp_path / "ns"), "UNLABELLED": "u.jsonl", "BASE_MODEL": "base",
           "ITERATIONS": "2", "STUDENT_INIT": "previous", "AUDIT": "audit.jsonl", "NUM_PSEUDO": "10"}  # fmt: skip
    result = run_script("noisy_student.sh", env)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 2 * 6  # label, audit, mix, run_srt_data, sft, distill per iteration
    it1, it2 = commands[:6], commands[6:]
    assert "MODEL_PATH=base " in it1[0] and "pseudo_label.sh" in it1[0] and "DATASET=u.jsonl" in it1[0]
    assert "DATASET=audit.jsonl" in it1[1] and "--num-pseudo 10" in it1[2]
    labeller = f"{tmp_path}/ns/iter-1/model"
    assert f"MODEL_PATH={labeller} " in it2[0]  # relabelled by the previous iteration's frozen final/
    assert (
        f"MODEL_PATH={labeller} " in it2[3] and f"BASE_MODEL={labeller} " in it2[4]
    )  # STUDENT_INIT=previous
    assert "distill.sh" in it2[5] and "reward=ground_truth" in it2[5]
    assert not (tmp_path / "ns").exists()


@pytest.mark.parametrize(
    ("script", "env", "message"),
    [
        ("pseudo_label.sh", {"THRESHOLD": "high"}, "THRESHOLD"),
        ("pseudo_label.sh", {"TIE": "coin"}, "TIE"),
        ("noisy_student.sh", {"ITERATIONS": "0"}, "ITERATIONS"),
        ("noisy_student.sh", {"TRAIN_REWARD": "none"}, "TRAIN_REWARD"),
    ],
)
def test_drivers_reject_bad_knobs_before_loading_anything(tmp_path, script, env, message):
    base = {
        "MODEL_PATH": "m",
        "DATASET": "d.jsonl",
        "OUTPUT_DIR": str(tmp_path / "o"),
        "UNLABELLED": "u.jsonl",
    }
    result = run_script(script, {**base, **env})
    assert result.returncode == 2 and message in result.stderr


def test_online_vote_collection_skips_voteless_groups_and_grades_revisions_against_the_label(
    tiny_tokenizer_dir, tmp_path, backend_factory
):
    """Phase 1 with reward=majority_vote on rows without labels (dataset.answers=optional): each y_init
    group votes; a skipped group (tie, below tau, no answer) is not revised (skip_reason = the vote's skip);
    the revisions of a kept group are graded against that group's label, never by a vote of their own."""
    data = write_inputs(tmp_path / "unlabelled.jsonl")
    out = tmp_path / "collect"
    collect.main(
        [f"model.path={tiny_tokenizer_dir}", f"dataset.path={data}", f"output_dir={out}",
         "dataset.answers=optional", "reward=majority_vote", "vote.threshold=0.5", "num_responses=4",
         "num_revisions=2", "target_revision_samples=0", "grading.num_workers=1", "sampling.max_tokens=64",
         "progress=false"]
    )  # fmt: skip
    records = [r for _, b in iter_committed_batches(out / "shard-0-of-1" / "attempts.jsonl") for r in b]
    inits = {(r["original_index"], r["response_idx"]): r for r in records if r["type"] == "init"}
    expected_skip = {2: "vote_tie", 3: "vote_no_answer", 5: "vote_below_threshold"}
    labels = {0: "5", 1: "4", 4: "\\frac{1}{2}", 6: "9", 7: "6"}
    for (i, _k), r in inits.items():
        if i in expected_skip:
            assert r["skip_reason"] == expected_skip[i] and not r["revised"]
        else:
            assert r["skip_reason"] is None and r["revised"]
    revisions = [r for r in records if r["type"] == "revision"]
    assert {r["original_index"] for r in revisions} == set(labels)
    for r in revisions:  # every revision answers 5: verified exactly where the group's label is 5
        assert r["verified"] == (labels[r["original_index"]] == REVISED), r
        init = inits[(r["original_index"], r["response_idx"])]
        assert r["p_r"] == select_phrase(init["y_init_correct"], PromptConfig())
    summary = json.loads((out / "shard-0-of-1" / "summary.json").read_text())
    assert summary["problems_done"] == 8
    assert summary["init"]["not_revised"] == {"vote_tie": 4, "vote_no_answer": 4, "vote_below_threshold": 4}
