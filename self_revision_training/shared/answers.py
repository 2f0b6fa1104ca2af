"""Final-answer extraction from a response, shared by every reward source and by evaluation.

The answer is the content of the LAST `\\boxed{...}` / `\\fbox{...}` (brace matching, escaped braces, the
`\\boxed 5` form); with `extraction="boxed_or_last_number"` a response without one falls back to its last
number (explicit and non-default: the original Phase-1 grader always did this, which marks unboxed or
truncated answers correct). Ground truths are normalised the same way (GSM8K `... #### 1,234` -> `1234`).
Pure Python: no math-verify, no worker processes (`rewards.math_verify` compares the extracted answers).

The majority vote over one prompt's samples lives here too (`cluster_answer_groups`, `compute_vote`,
`vote_groups`): answers clustered by an equivalence the caller passes in, label = the largest cluster,
vote_ratio = its size / k with unparsed answers counted in k; ties, ratios below tau and groups without
any answer are skipped. Used by the `majority_vote` reward source, the labelling stage and maj@k.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,]|\.\d)")


def _match_braces(text: str, open_pos: int) -> int | None:
    """Index of the `}` closing the `{` at open_pos, skipping escaped braces; None if unbalanced."""
    depth = 0
    i = open_pos
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # `\{`, `\}` and `\\` never open or close a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _boxed_content_at(text: str, end_of_command: int) -> str | None:
    i = end_of_command
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] == "{":
        close = _match_braces(text, i)
        return None if close is None else text[i + 1 : close]
    if i == end_of_command:  # `\boxed5`: a single-character argument, as in TeX
        return text[i] if not text[i].isspace() and text[i] not in "$\\" else None
    match = re.match(r"[^\s$]+", text[i:])  # `\boxed 5`, `\boxed -3.5$`
    return match.group(0).rstrip(".,;") if match else None


def extract_boxed(text: str) -> str | None:
    """Content of the last well-formed `\\boxed`/`\\fbox` in `text`, or None (empty boxes count as none)."""
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        content = _boxed_content_at(text, match.end())
        if content is not None and content.strip():
            return content.strip()
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in `text` (thousands separators removed), or None."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer(response: str, extraction: str = "boxed") -> str | None:
    if extraction not in ("boxed", "boxed_or_last_number"):
        raise ValueError(f"unknown extraction mode {extraction!r}")
    answer = extract_boxed(response)
    if answer is None and extraction == "boxed_or_last_number":
        answer = extract_last_number(response)
    return answer


def normalize_ground_truth(ground_truth: str) -> str:
    """GSM8K `...#### 1,234` -> `1234`; other answers are stripped only."""
    text = ground_truth.strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    return strip_thousands(text)


def strip_thousands(text: str) -> str:
    """`1,234,567` -> `1234567` when the whole answer is one number (a tuple `1,234` of two ints is rare
    as a final answer, while GSM8K-style `1,234` is common)."""
    return text.replace(",", "") if _THOUSANDS.fullmatch(text.strip().lstrip("-$")) else text


# ----------------------------------------------------------------------------------------------
# majority vote over the extracted answers of one prompt's samples (TTRL; Noisy Student; GATES)
#
#   ids = cluster_answer_groups([["0.5", "\\frac{1}{2}", "3", None]], equivalent)   # -> [[0, 0, 1, None]]
#   vote = compute_vote(ids[0], ["0.5", "\\frac{1}{2}", "3", None], threshold=0.5)
#   # -> label "0.5", vote_ratio 0.5 (2 of 4: the unparsed sample counts), kept
#
# Clusters: answers are taken in order of first appearance; an answer joins the first cluster whose
# representative (its first-seen answer) it is equivalent to, else it opens a new cluster. Answers
# that are equal without whitespace share a cluster without a call. `equivalent` is passed in (the real
# one, `rewards.equivalence.AnswerEquivalence`, runs math-verify in killable worker processes), so this
# module stays pure; it is called once per round with every group's pending comparisons (a round per
# distinct answer of the largest group), never once per pair.

VOTE_SKIPS = ("vote_no_answer", "vote_below_threshold", "vote_tie")  # why a vote yields no label

Equivalence = Callable[[Sequence[tuple[str, str]]], list[bool]]
"""Batched answer equivalence: for each (reference, candidate) pair, whether candidate equals reference."""


def vote_key(answer: str | None) -> str | None:
    """The exact-match key of an answer: its text without any whitespace; None = no answer."""
    if answer is None:
        return None
    key = "".join(answer.split())
    return key or None


def string_equivalence(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """Equivalence by exact text without whitespace (no math): the default where no grader exists."""
    return [vote_key(a) == vote_key(b) for a, b in pairs]


def cluster_answer_groups(
    groups: Sequence[Sequence[str | None]], equivalent: Equivalence
) -> list[list[int | None]]:
    """Cluster each group's answers by equivalence, batching the comparisons of all groups.

    Args:
        groups: per prompt, the extracted answer of each sample (None = no answer).
        equivalent: batched (representative, candidate) -> bool.
    Returns:
        per group, per sample: its cluster id (0, 1, ... in order of first appearance), None if unparsed.
        A prefix of a group clusters exactly like the prefix of the result (maj@k relies on this).
    """
    keys = [[vote_key(a) for a in group] for group in groups]
    distinct: list[list[str]] = []  # per group: distinct keys, first appearance first
    texts: list[dict[str, str]] = []  # per group: key -> its first-seen answer text (what math-verify reads)
    for group, row in zip(groups, keys, strict=True):
        seen: dict[str, str] = {}
        for answer, key in zip(group, row, strict=True):
            if key is not None and key not in seen:
                seen[key] = answer.strip()  # type: ignore[union-attr]  # key is None iff answer is
        distinct.append(list(seen))
        texts.append(seen)
    reps: list[list[str]] = [[] for _ in groups]  # per group: cluster representatives (keys), by id
    key_cluster: list[dict[str, int]] = [{} for _ in groups]
    for position in range(max((len(d) for d in distinct), default=0)):
        pairs: list[tuple[str, str]] = []
        asked: list[tuple[int, int]] = []  # (group, number of comparisons it asked for)
        for g, row in enumerate(distinct):
            if position < len(row):
                candidate = texts[g][row[position]]
                pairs += [(texts[g][rep], candidate) for rep in reps[g]]
                asked.append((g, len(reps[g])))
        answers = equivalent(pairs) if pairs else []
        if len(answers) != len(pairs):
            raise ValueError(f"equivalence returned {len(answers)} results for {len(pairs)} pairs")
        offset = 0
        for g, count in asked:
            verdicts = answers[offset : offset + count]
            offset += count
            key = distinct[g][position]
            match = next((c for c, same in enumerate(verdicts) if same), None)
            if match is None:
                match = len(reps[g])
                reps[g].append(key)
            key_cluster[g][key] = match
    return [[None if k is None else key_cluster[g][k] for k in row] for g, row in enumerate(keys)]


@dataclass(frozen=True)
class VoteResult:
    label: str | None  # first-seen answer of the largest cluster (first such cluster on a tie); None = none
    label_cluster: int | None  # its cluster id
    vote_ratio: float  # label cluster size / num_samples (unparsed samples count in the denominator)
    num_votes: int  # label cluster size
    num_samples: int  # k
    num_parsed: int  # samples with an answer
    skip: str | None  # None = the label is kept; else one of VOTE_SKIPS (label is then only a candidate)

    @property
    def kept(self) -> bool:
        return self.skip is None


def compute_vote(
    cluster_ids: Sequence[int | None],
    answers: Sequence[str | None],
    threshold: float = 0.5,
    tie: str = "skip",
) -> VoteResult:
    """The majority vote of one group from its cluster ids (`cluster_answer_groups`).

    Args:
        cluster_ids: per sample, its cluster id or None (no answer: not a candidate, still counted in k).
        answers: per sample, the extracted answer (the label is the first-seen answer of its cluster).
        threshold: tau; a label is kept iff vote_ratio >= tau.
        tie: "skip" (two or more largest clusters: no label) or "first_seen" (the first of them wins).
    Returns:
        VoteResult; skip is vote_no_answer (nothing parsed), vote_below_threshold, or vote_tie (two or
        more largest clusters at or above tau), checked in that order.
    """
    if len(cluster_ids) != len(answers):
        raise ValueError(f"{len(cluster_ids)} cluster ids but {len(answers)} answers")
    if tie not in ("skip", "first_seen"):
        raise ValueError(f"tie must be skip or first_seen, got {tie!r}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    k = len(cluster_ids)
    sizes = Counter(c for c in cluster_ids if c is not None)
    parsed = sum(sizes.values())
    if not sizes:
        return VoteResult(None, None, 0.0, 0, k, 0, "vote_no_answer")
    top = max(sizes.values())
    winners = sorted(c for c, size in sizes.items() if size == top)  # ids are in first-appearance order
    label_cluster = winners[0]
    label = next(a for a, c in zip(answers, cluster_ids, strict=True) if c == label_cluster)
    ratio = top / k
    skip = None
    if ratio < threshold:
        skip = "vote_below_threshold"
    elif len(winners) > 1 and tie == "skip":  # with tau >= 0.5 only a 50/50 split reaches this
        skip = "vote_tie"
    return VoteResult(label.strip() if label else label, label_cluster, ratio, top, k, parsed, skip)


def vote_groups(
    groups: Sequence[Sequence[str | None]],
    equivalent: Equivalence,
    threshold: float = 0.5,
    tie: str = "skip",
) -> list[VoteResult]:
    """`compute_vote` for every group, clustered in one batched pass (`cluster_answer_groups`)."""
    ids = cluster_answer_groups(groups, equivalent)
    return [compute_vote(c, a, threshold, tie) for c, a in zip(ids, groups, strict=True)]
