"""The majority vote with scripted answers: clusters of equivalent forms, unparsed answers (counted, never
candidates), ties / below tau / no answer skipped; the `majority_vote` reward source online and offline;
hand-computed audit metrics; maj@k clustering equivalent answers (the old string vote fails it)."""

from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

from self_distillation.evaluation import maj_at_k, majority_vote_correct, summarize
from self_revision_training.shared.answers import (
    cluster_answer_groups,
    compute_vote,
    string_equivalence,
    vote_groups,
)
from self_revision_training.shared.config import GradingConfig
from self_revision_training.shared.problems import Problem
from self_revision_training.shared.rewards import REWARD_NAMES, Verdict, build_reward_source
from self_revision_training.shared.rewards.majority_vote import (
    VOTE_SKIPS,
    MajorityVoteReward,
    VoteConfig,
    compute_vote_audit,
    pin_vote_label,
)

FRAC = re.compile(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}")


def _value(text: str) -> Fraction | str:
    text = "".join(text.split())
    match = FRAC.fullmatch(text)
    if match:
        return Fraction(int(match.group(1)), int(match.group(2)))
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return text


class ScriptedEquivalence:
    """Numeric equivalence of decimals, a/b and \\frac{a}{b}; records each batched call."""

    def __init__(self):
        self.calls: list[list[tuple[str, str]]] = []

    def __call__(self, pairs):
        self.calls.append(list(pairs))
        return [_value(a) == _value(b) for a, b in pairs]


def boxed(answer: str | None) -> str:
    return "I have no idea." if answer is None else f"so the answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------- the vote (shared/answers.py)


def test_equivalent_forms_land_in_one_cluster_and_the_label_is_the_first_seen():
    eq = ScriptedEquivalence()
    ids = cluster_answer_groups([["0.5", "\\frac{1}{2}", "7", "1/2", "7 "]], eq)[0]
    assert ids == [0, 0, 1, 0, 1]
    vote = compute_vote(ids, ["0.5", "\\frac{1}{2}", "7", "1/2", "7 "], threshold=0.5)
    assert (vote.label, vote.num_votes, vote.vote_ratio, vote.skip) == ("0.5", 3, 0.6, None)


def test_comparisons_are_batched_per_round_and_exact_repeats_need_no_call():
    eq = ScriptedEquivalence()
    groups = [["1", "1", "2", "0.5"], ["3", "3", "3"], ["\\frac{1}{2}", "0.5", "9"]]
    ids = cluster_answer_groups(groups, eq)
    assert ids == [[0, 0, 1, 2], [0, 0, 0], [0, 0, 1]]
    # round 1: each group's second distinct answer vs its one representative; round 2: the third vs two
    assert eq.calls == [
        [("1", "2"), ("\\frac{1}{2}", "0.5")],
        [("1", "0.5"), ("2", "0.5"), ("\\frac{1}{2}", "9")],
    ]


def test_clusters_of_a_prefix_are_the_prefix_of_the_clusters():
    rng = random.Random(0)
    pool = ["0.5", "1/2", "\\frac{1}{2}", "2", "4/2", "3", None, "x"]
    for _ in range(200):
        group = [rng.choice(pool) for _ in range(rng.randint(1, 8))]
        full = cluster_answer_groups([group], ScriptedEquivalence())[0]
        for k in range(1, len(group) + 1):
            assert cluster_answer_groups([group[:k]], ScriptedEquivalence())[0] == full[:k]


def test_unparsed_answers_are_not_candidates_but_count_in_the_ratio():
    answers = [None, None, None, "3"]
    ids = cluster_answer_groups([answers], ScriptedEquivalence())[0]
    assert ids == [None, None, None, 0]
    low = compute_vote(ids, answers, threshold=0.5)
    assert (low.label, low.vote_ratio, low.num_parsed, low.skip) == ("3", 0.25, 1, "vote_below_threshold")
    assert compute_vote(ids, answers, threshold=0.25).kept


def test_a_tie_a_ratio_below_tau_and_an_all_unparsed_group_are_skipped():
    votes = vote_groups(
        [["1", "2", "1", "2"], ["1", "2", "3", "1", "4"], [None, None, None], ["5", "5", "6", "7"]],
        ScriptedEquivalence(),
        threshold=0.5,
    )
    assert [v.skip for v in votes] == ["vote_tie", "vote_below_threshold", "vote_no_answer", None]
    assert vote_groups([["1", "2", "3", "4"]], ScriptedEquivalence())[0].skip == "vote_below_threshold"
    assert votes[2].label is None and votes[2].vote_ratio == 0.0 and votes[2].num_samples == 3
    assert votes[3].label == "5" and votes[3].vote_ratio == 0.5  # ratio == tau is kept
    first = vote_groups([["1", "2", "1", "2"]], ScriptedEquivalence(), tie="first_seen")[0]
    assert first.kept and first.label == "1"
    assert vote_groups([["1", "2", "3", "1"]], ScriptedEquivalence(), threshold=0.75)[0].skip == (
        "vote_below_threshold"
    )


def test_empty_input_and_bad_arguments():
    assert cluster_answer_groups([], ScriptedEquivalence()) == []
    assert compute_vote([], [], 0.5).skip == "vote_no_answer"
    with pytest.raises(ValueError, match="threshold"):
        compute_vote([0], ["1"], threshold=1.5)
    with pytest.raises(ValueError, match="tie"):
        compute_vote([0], ["1"], tie="random")
    with pytest.raises(ValueError, match="results"):
        cluster_answer_groups([["1", "2"]], lambda pairs: [])


# ---------------------------------------------------------------- the reward source + audit


def problem(i: int, gold: str = "", **extras) -> Problem:
    return Problem(index=i, problem=f"What is problem {i}?", answer=gold, extras=extras)


def test_hand_computed_audit_for_4_4_5_none_with_gold_5():
    with MajorityVoteReward(GradingConfig(), VoteConfig(threshold=0.5), ScriptedEquivalence()) as reward:
        verdicts = reward.score([problem(0, "5")], [[boxed("4"), boxed("4"), boxed("5"), boxed(None)]])
    group = verdicts[0]
    assert [v.correct for v in group] == [True, True, False, False]
    assert [v.gold_correct for v in group] == [False, False, True, False]
    assert {v.label for v in group} == {"4"} and {v.vote_ratio for v in group} == {0.5}
    assert [v.reason for v in group] == ["correct", "correct", "wrong", "no_answer"]
    assert all(v.skip is None and v.label_correct is False for v in group)
    audit = compute_vote_audit(verdicts)
    assert audit["coverage"] == 1.0 and audit["num_kept"] == 1
    assert audit["label_accuracy"] == 0.0
    assert audit["reward_accuracy"] == 0.25
    assert (audit["false_positives"], audit["false_negatives"]) == (2, 1)
    assert audit["false_positive_rate"] == 0.5 and audit["false_negative_rate"] == 0.25
    assert audit["gold_accuracy"] == 0.25 and audit["mean_vote_ratio"] == 0.5
    assert audit["ratio_0.50_0.75/num_groups"] == 1 and audit["ratio_0.50_0.75/label_accuracy"] == 0.0


def test_skipped_groups_carry_no_reward_and_are_counted_not_scored():
    groups = [
        [boxed("1"), boxed("2")],  # tie at ratio 0.5
        [boxed(None), boxed(None)],  # no answer
        [boxed("3"), boxed("4"), boxed("5"), boxed("6")],  # ratio 0.25 < tau (a 4-way tie, below tau first)
        [boxed("6"), boxed("6"), boxed("6"), boxed("7")],  # kept, label right
        ["", boxed("8"), boxed("8"), boxed("8")],  # kept, label wrong; an empty response
    ]
    golds = ["1", "1", "3", "6", "9"]
    with MajorityVoteReward(GradingConfig(), VoteConfig(threshold=0.5), ScriptedEquivalence()) as reward:
        verdicts = reward.score([problem(i, g) for i, g in enumerate(golds)], groups)
    for group, skip in zip(verdicts[:3], ["vote_tie", "vote_no_answer", "vote_below_threshold"], strict=True):
        assert all(
            v.skip == skip and not v.correct and v.reason == "vote_skipped" and v.label is None for v in group
        )
    assert verdicts[0][0].gold_correct is True  # gold grades are kept for the audit even when skipped
    assert [v.correct for v in verdicts[4]] == [False, True, True, True]
    assert verdicts[4][0].reason == "empty_response"
    audit = compute_vote_audit(verdicts, prefix="vote/")
    assert audit["vote/num_groups"] == 5 and audit["vote/num_kept"] == 2 and audit["vote/coverage"] == 0.4
    assert [audit[f"vote/skipped/{r}"] for r in VOTE_SKIPS] == [1, 1, 1]
    assert audit["vote/label_accuracy"] == 0.5 and audit["vote/num_scored"] == 8
    assert (audit["vote/false_positives"], audit["vote/false_negatives"]) == (3, 0)
    assert audit["vote/reward_accuracy"] == 5 / 8
    # buckets hold every group with a candidate label, skipped ones included (no_answer has none)
    assert (
        audit["vote/ratio_0.00_0.25/num_groups"] == 0 and audit["vote/ratio_0.00_0.25/label_accuracy"] is None
    )
    assert (
        audit["vote/ratio_0.25_0.50/num_groups"] == 1 and audit["vote/ratio_0.25_0.50/label_accuracy"] == 1.0
    )
    assert (
        audit["vote/ratio_0.50_0.75/num_groups"] == 1 and audit["vote/ratio_0.50_0.75/label_accuracy"] == 1.0
    )
    assert (
        audit["vote/ratio_0.75_1.00/num_groups"] == 2 and audit["vote/ratio_0.75_1.00/label_accuracy"] == 0.5
    )


def test_train_samples_keeps_every_vote_and_marks_the_rest_untrained():
    vote = VoteConfig(threshold=0.5, train_samples=2)
    with MajorityVoteReward(GradingConfig(), vote, ScriptedEquivalence()) as reward:
        group = reward.score([problem(0)], [[boxed("1"), boxed("2"), boxed("1"), boxed("1")]])[0]
    assert [v.correct for v in group] == [True, False, True, True] and group[0].vote_ratio == 0.75
    assert [v.skip for v in group] == [None, None, "vote_not_trained", "vote_not_trained"]
    assert all(v.gold_correct is None and v.label_correct is None for v in group)  # no gold: no audit
    audit = compute_vote_audit([group])
    assert audit["num_kept"] == 1 and audit["num_scored"] == 0 and audit["reward_accuracy"] is None


def test_offline_rows_compare_with_their_pseudo_label_and_audit_against_gold_answer():
    rows = [
        problem(0, "\\frac{1}{2}", label_source="vote", vote_ratio=0.75, gold_answer="0.5"),
        problem(1, "4", label_source="vote", vote_ratio=0.5),  # no gold: no audit
        problem(2, "3", label_source="gold"),  # gold mixed in
    ]
    groups = [[boxed("0.5"), boxed("2")], [boxed("4"), boxed(None)], [boxed("3"), boxed("1")]]
    with MajorityVoteReward(GradingConfig(), VoteConfig(threshold=0.9), ScriptedEquivalence()) as reward:
        verdicts = reward.score(rows, groups)
    assert [[v.correct for v in g] for g in verdicts] == [[True, False], [True, False], [True, False]]
    assert all(v.skip is None for g in verdicts for v in g)  # a fixed label is never skipped
    assert [v.label for v in verdicts[0]] == ["\\frac{1}{2}"] * 2 and verdicts[0][0].vote_ratio == 0.75
    assert [v.gold_correct for v in verdicts[0]] == [True, False] and verdicts[0][0].label_correct is True
    assert verdicts[1][0].gold_correct is None and verdicts[1][0].label_correct is None
    assert verdicts[2][0].gold_correct is True and verdicts[2][0].vote_ratio is None


def test_pin_vote_label_fixes_the_groups_label_for_later_responses():
    row = problem(3, "6")
    with MajorityVoteReward(GradingConfig(), VoteConfig(), ScriptedEquivalence()) as reward:
        verdict = reward.score([row], [[boxed("5"), boxed("5"), boxed("6")]])[0][0]
        pinned = pin_vote_label(row, verdict)
        assert (pinned.answer, pinned.extras["gold_answer"], pinned.extras["label_source"]) == (
            "5",
            "6",
            "vote",
        )
        revisions = reward.score([pinned], [[boxed("5"), boxed("6")]])[0]  # compared with 5, not voted
    assert [v.correct for v in revisions] == [True, False] and [v.gold_correct for v in revisions] == [
        False,
        True,
    ]
    assert pin_vote_label(row, Verdict(True, "6", "correct", "6")) is row  # a ground-truth verdict


def test_reward_source_registry_and_config_errors():
    assert "majority_vote" in REWARD_NAMES
    with MajorityVoteReward(GradingConfig(), VoteConfig(), ScriptedEquivalence()) as reward:
        with pytest.raises(ValueError, match=">= 2 responses"):
            reward.score([problem(0)], [[boxed("1")]])
        fixed = problem(1, "1", label_source="vote")
        assert reward.score([fixed], [[boxed("1")]])[0][0].correct  # a fixed label needs no vote
    with pytest.raises(ValueError, match="math"):
        build_reward_source("majority_vote", "code", GradingConfig())
    with pytest.raises(ValueError, match="threshold"):
        VoteConfig(threshold=-0.1)
    with pytest.raises(ValueError, match="train_samples"):
        VoteConfig(train_samples=0)
    with pytest.raises(ValueError, match="bucket_edges"):
        compute_vote_audit([], bucket_edges=(0.5, 0.9))
    assert compute_vote_audit([])["coverage"] is None


# ---------------------------------------------------------------- maj@k (issue 12, item 5)


def test_maj_at_k_clusters_equivalent_answers_before_voting():
    # 3 of 5 samples are right in three forms; the wrong "7" has the most identical strings
    answers = [["0.5", "\\frac{1}{2}", "1/2", "7", "7"]]
    correct = [[True, True, True, False, False]]
    eq = ScriptedEquivalence()
    assert maj_at_k(answers, correct, 5, equivalent=eq) == 1.0
    assert maj_at_k(answers, correct, 5) == 0.0  # text-only voting splits the right answer
    assert majority_vote_correct(answers[0], correct[0], equivalent=eq)
    records = [
        {"problem_index": 0, "sample_index": j, "correct": c, "extracted": a, "num_tokens": 3,
         "finish_reason": "stop", "reason": "correct" if c else "wrong"}
        for j, (a, c) in enumerate(zip(answers[0], correct[0], strict=True))
    ]  # fmt: skip
    assert summarize(records, [1, 5], equivalent=eq)["maj@k"] == {"1": 1.0, "5": 1.0}
    assert summarize(records, [1, 5])["maj@k"] == {"1": 1.0, "5": 0.0}
    assert string_equivalence([("1 / 2", "1/2"), ("1/2", "0.5")]) == [True, False]


def test_maj_at_k_with_math_verify_equivalence():
    from self_revision_training.shared.rewards.equivalence import AnswerEquivalence

    answers = [["0.5", "\\frac{1}{2}", "1/2", "7", "7"], ["1,000", "1000", "2", "2", "1000"]]
    correct = [[True, True, True, False, False], [True, True, False, False, True]]
    with AnswerEquivalence(GradingConfig(num_workers=1)) as equivalent:
        assert maj_at_k(answers, correct, 5, equivalent=equivalent) == 1.0
        assert cluster_answer_groups(answers, equivalent) == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]]
        assert equivalent([("2", "3"), ("x^2-1", "(x-1)(x+1)")]) == [False, True]
        assert equivalent.num_failed == 0


def test_phase2_validation_is_graded_against_gold_whatever_the_training_reward():
    """The reward worker votes on training groups but grades validation samples (one per problem is
    enough) against their gold answers."""
    from self_distillation.actors import RewardWorker

    problems = [Problem(0, "p", "5"), Problem(1, "q", "2")]
    worker = RewardWorker("majority_vote", "math", GradingConfig(num_workers=1))
    try:
        with pytest.raises(ValueError, match="needs >= 2 responses"):
            worker.score(problems, [["\\boxed{5}"], ["\\boxed{3}"]])
        verdicts = worker.score(problems, [["\\boxed{5}"], ["\\boxed{3}"]], "val")
        assert [[v.correct for v in row] for row in verdicts] == [[True], [False]]
        assert all(v.vote_ratio is None for row in verdicts for v in row)
    finally:
        worker.close()
