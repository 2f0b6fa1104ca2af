"""Self-revision records (paper Sec. 3.1, Phase 1): the collection log, its statistics, and prepare_data.

The collector appends every attempt to `attempts.jsonl`, one batch at a time, and ends each batch with a
`batch_done` marker line; the batch is committed once its marker is on disk. Lines after the last marker
(a batch cut by a kill) are removed on restart by `recover_attempts`, so a rerun resumes with whole
batches only and never duplicates a record. Record types:

    init      one per y_init sample: the response, its grade r, and whether it was revised (and why not)
    revision  one per y_revised sample, with the reference's fields (x, y_init, p_r, y_revised,
              ground_truth, y_init_correct, y_revised_correct, *_extracted, original_index,
              response_idx, revision_idx) plus lengths, finish reasons and `verified`
    batch_done  the problem indices the batch covered, its wall time and generated tokens

`verified` = the revision is graded correct and finished on its own (not cut at max_tokens).
`verified.jsonl` holds exactly the verified revision records and is rebuilt from the attempts file on
restart; `summary.json` is computed from the attempts file alone (`CollectionStats`).

prepare_data (`build_stage_records`): clean, de-duplicate, split into the two SFT stages (reference §3):
    Stage 1: prompt x,                                   completion y_init + d + P_r + d + y_revised
    Stage 2: prompt x + d + y_init + d + P_r,            completion y_revised          (d = "\\n\\n")
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from self_revision_training.shared.storage import DataFileError, iter_jsonl, read_json_list

ATTEMPTS_FILE = "attempts.jsonl"
VERIFIED_FILE = "verified.jsonl"
SUMMARY_FILE = "summary.json"

REVISION_FIELDS = ("x", "y_init", "p_r", "y_revised", "y_init_correct", "y_revised_correct")


# ----------------------------------------------------------------------------------------------
# the collection log


def recover_attempts(path: str | Path) -> int:
    """Cut everything after the last `batch_done` marker (a batch killed mid-write); return lines dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    committed = 0
    dropped = 0
    offset = 0
    with open(path, "rb") as handle:
        for line in handle:
            offset += len(line)
            dropped += 1
            if not line.endswith(b"\n"):
                continue  # torn last line
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # only a torn or half-flushed tail can be unparseable; it is uncommitted
            if isinstance(record, dict) and record.get("type") == "batch_done":
                committed, dropped = offset, 0
    if offset > committed:
        with open(path, "rb+") as handle:
            handle.truncate(committed)
    return dropped


def iter_committed_batches(path: str | Path) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(marker, records) per committed batch of an attempts file that `recover_attempts` has cleaned."""
    pending: list[dict[str, Any]] = []
    if not Path(path).exists():
        return
    for lineno, record in iter_jsonl(path, allow_torn_tail=False):
        kind = record.get("type")
        if kind == "batch_done":
            yield record, pending
            pending = []
        elif kind in ("init", "revision"):
            pending.append(record)
        else:
            raise DataFileError(f"{path}:{lineno}: unknown record type {kind!r}")
    if pending:
        raise DataFileError(f"{path}: {len(pending)} records after the last batch_done marker (run recovery)")


def is_verified(record: dict[str, Any]) -> bool:
    """A revision whose answer verified and that ended on its own (a cut-off one cannot end its turn)."""
    if "verified" in record:
        return bool(record["verified"])
    return bool(record.get("y_revised_correct"))  # the reference's records have no `verified`


def _mean(total: float, count: int) -> float | None:
    return round(total / count, 3) if count else None


@dataclass
class CollectionStats:
    """Counts over committed batches; every number in summary.json comes from here."""

    batches: int = 0
    problems: int = 0
    seconds: float = 0.0
    generated_tokens: int = 0
    init_total: int = 0
    init_correct: int = 0
    init_truncated: int = 0
    init_tokens: int = 0
    init_revised: int = 0
    init_not_revised: Counter = field(default_factory=Counter)  # reason -> count
    init_grade_reasons: Counter = field(default_factory=Counter)
    revisions: dict[str, Counter] = field(default_factory=lambda: {"r0": Counter(), "r1": Counter()})
    revision_grade_reasons: Counter = field(default_factory=Counter)

    def add_batch(self, marker: dict[str, Any], records: Iterable[dict[str, Any]]) -> None:
        self.batches += 1
        self.problems += len(marker["indices"])
        self.seconds += float(marker.get("seconds", 0.0))
        self.generated_tokens += int(marker.get("generated_tokens", 0))
        for rec in records:
            if rec["type"] == "init":
                self.init_total += 1
                self.init_correct += bool(rec["y_init_correct"])
                self.init_truncated += rec["y_init_finish_reason"] == "length"
                self.init_tokens += rec["y_init_num_tokens"]
                self.init_grade_reasons[rec["y_init_reason"]] += 1
                if rec["revised"]:
                    self.init_revised += 1
                else:
                    self.init_not_revised[rec["skip_reason"]] += 1
            else:
                bucket = self.revisions["r1" if rec["y_init_correct"] else "r0"]
                bucket["total"] += 1
                bucket["correct"] += bool(rec["y_revised_correct"])
                bucket["verified"] += bool(rec["verified"])
                bucket["truncated"] += rec["y_revised_finish_reason"] == "length"
                bucket["tokens"] += rec["y_revised_num_tokens"]
                self.revision_grade_reasons[rec["y_revised_reason"]] += 1

    @property
    def verified(self) -> int:
        return sum(b["verified"] for b in self.revisions.values())

    def to_dict(self) -> dict[str, Any]:
        rev_total = sum(b["total"] for b in self.revisions.values())
        by_r = {
            r: {
                "revisions": b["total"],
                "correct": b["correct"],
                "verified": b["verified"],
                "yield": _mean(b["verified"], b["total"]),
                "truncation_rate": _mean(b["truncated"], b["total"]),
                "mean_tokens": _mean(b["tokens"], b["total"]),
            }
            for r, b in self.revisions.items()
        }
        return {
            "batches": self.batches,
            "problems_done": self.problems,
            "verified_tuples": self.verified,
            "init": {
                "samples": self.init_total,
                "correct": self.init_correct,
                "accuracy": _mean(self.init_correct, self.init_total),
                "truncation_rate": _mean(self.init_truncated, self.init_total),
                "mean_tokens": _mean(self.init_tokens, self.init_total),
                "revised": self.init_revised,
                "not_revised": dict(self.init_not_revised),
                "grade_reasons": dict(self.init_grade_reasons),
            },
            "revision": {
                "samples": rev_total,
                "yield": _mean(self.verified, rev_total),
                "by_r": by_r,
                "grade_reasons": dict(self.revision_grade_reasons),
            },
            "throughput": {
                "collection_seconds": round(self.seconds, 3),
                "generated_tokens": self.generated_tokens,
                "tokens_per_s": _mean(self.generated_tokens, self.seconds) if self.seconds else None,
                "problems_per_hour": round(3600 * self.problems / self.seconds, 2) if self.seconds else None,
            },
        }


# ----------------------------------------------------------------------------------------------
# reading verified tuples (a collection directory, or the reference's d_revision.json / *.jsonl)


def _check_fields(record: dict[str, Any], where: str) -> None:
    missing = [k for k in REVISION_FIELDS if k not in record]
    if missing:
        raise DataFileError(f"{where}: revision record lacks {missing}")
    for key in ("x", "y_init", "p_r", "y_revised"):
        if not isinstance(record[key], str):
            raise DataFileError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")


def load_verified(source: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Verified revision records from a collection dir (all shards) or a JSON/JSONL file.

    Returns the records in collection order and the files read. Shards must be disjoint: the same
    (original_index, response_idx, revision_idx) in two files is an error.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(source.rglob(ATTEMPTS_FILE))
        if not files:
            raise DataFileError(
                f"{source}: no {ATTEMPTS_FILE} under this directory (is it a collection dir?)"
            )
    elif source.is_file():
        files = [source]
    else:
        raise DataFileError(f"{source}: no such file or directory")
    records: list[dict[str, Any]] = []
    seen: dict[tuple, str] = {}
    for path in files:
        for where, rec in _iter_revision_records(path):
            _check_fields(rec, where)
            if not is_verified(rec):
                continue
            key = (rec.get("original_index"), rec.get("response_idx"), rec.get("revision_idx"))
            if None not in key:
                if key in seen:
                    raise DataFileError(
                        f"{where}: tuple {key} also appears at {seen[key]} (overlapping shards?)"
                    )
                seen[key] = where
            records.append(rec)
    return records, [str(f) for f in files]


def _iter_revision_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    if path.suffix == ".json":
        for i, rec in enumerate(read_json_list(path)):
            yield f"{path}: item {i}", rec
        return
    pending: list[tuple[str, dict[str, Any]]] = []
    for lineno, rec in iter_jsonl(path):
        kind = rec.get("type", "revision")  # the reference's *_all_responses.jsonl has no type
        if kind == "revision":
            pending.append((f"{path}:{lineno}", rec))
        elif kind == "batch_done":
            yield from pending
            pending = []
    if path.name != ATTEMPTS_FILE:
        yield from pending
    # an attempts file's records after its last batch_done belong to a batch cut by a kill: not committed


# ----------------------------------------------------------------------------------------------
# cleaning


_SYCOPHANTIC_OPENINGS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"(?:you['\u2019]re|you are)\s+(?:absolutely\s+)?right\s+to\b[^.!?]*[.!?]\s*",
        r"(?:(?:yes|indeed),\s*)?(?:you['\u2019]re|you are)\s+(?:absolutely\s+)?right\s*[\u2014,:.!-]\s*",
        r"thank\s+you\s+for\b[^.!?]*[.!?]\s*",
        r"great\s+question\b[^.!?]*[.!?]\s*",
        r"(?:good|nice)\s+(?:catch|point|observation)\b[^.!?]*[.!?]\s*",
    )
]


def strip_sycophantic_opening(text: str) -> str:
    """Remove flattering openers ("You're right ...", "Great question!") from a revision, repeatedly."""
    stripped = text.lstrip()
    changed = False
    while True:
        for pattern in _SYCOPHANTIC_OPENINGS:
            match = pattern.match(stripped)
            if match and match.end() > 0:
                stripped = stripped[match.end() :]
                changed = True
                break
        else:
            break
    if not changed:
        return text
    return stripped[:1].upper() + stripped[1:]


def trim_repeating_tail(
    text: str, min_period: int = 10, max_period: int = 1500, min_repeats: int = 3, max_passes: int = 5
) -> str:
    """Keep one copy of a degenerate loop at the end of `text` (a period repeated >= min_repeats times).

    For each period L (smallest first) the periodic region is extended backwards from the end; if it
    spans at least `min_repeats` periods, everything after its first copy is dropped (and trailing
    whitespace). The kept copy may start a few characters early when the loop's last characters also
    precede it, as in the reference.
    """
    for _ in range(max_passes):
        n = len(text)
        for period in range(min_period, min(max_period, n // min_repeats) + 1):
            j = n - 1
            while j - period >= 0 and text[j] == text[j - period]:
                j -= 1
            span = (n - 1 - j) + period  # characters in the periodic tail region
            if span >= min_repeats * period:
                text = text[: j + 1].rstrip()
                break
        else:
            return text
    return text


def clean_record(record: dict[str, Any]) -> dict[str, Any]:
    out = dict(record)
    out["y_init"] = trim_repeating_tail(record["y_init"])
    out["y_revised"] = strip_sycophantic_opening(trim_repeating_tail(record["y_revised"]))
    return out


# ----------------------------------------------------------------------------------------------
# stage split


@dataclass
class StageSplit:
    stage1: list[dict[str, Any]]
    stage2: list[dict[str, Any]]
    stats: dict[str, Any]


def build_stage_records(
    records: list[dict[str, Any]], *, stage2_size: int, seed: int, delimiter: str = "\n\n", clean: bool = True
) -> StageSplit:
    """Clean, de-duplicate and split verified tuples into Stage-1 and Stage-2 SFT records (reference §3).

    Stage 2 takes up to `stage2_size` tuples, correct-init ones first, then incorrect-init ones;
    Stage 1 is every remaining incorrect-init tuple (correct-init tuples beyond the quota are unused,
    as in the reference). Raises ValueError when either stage would be empty.
    """
    if stage2_size < 1:
        raise ValueError(f"stage2_size must be >= 1, got {stage2_size}")
    stats: dict[str, Any] = {"input": len(records)}
    if clean:
        cleaned = [clean_record(r) for r in records]
        stats["cleaned_changed"] = sum(c != r for c, r in zip(cleaned, records, strict=True))
        records = cleaned
    unique, seen = [], set()
    for rec in records:
        key = (rec["x"], rec["y_init"], rec["y_revised"])
        if key not in seen and rec["y_revised"].strip():
            seen.add(key)
            unique.append(rec)
    stats["duplicates_or_empty_removed"] = len(records) - len(unique)
    incorrect = [r for r in unique if not r["y_init_correct"]]
    correct = [r for r in unique if r["y_init_correct"]]
    rng = random.Random(seed)
    rng.shuffle(incorrect)
    rng.shuffle(correct)
    stage2 = correct[:stage2_size]
    fill = stage2_size - len(stage2)
    stage2 += incorrect[:fill]
    stage1 = incorrect[fill:]
    rng.shuffle(stage2)
    stats |= {
        "correct_init": len(correct),
        "incorrect_init": len(incorrect),
        "stage1": len(stage1),
        "stage2": len(stage2),
        "stage2_correct_init": sum(bool(r["y_init_correct"]) for r in stage2),
        "unused_correct_init": max(0, len(correct) - stage2_size),
    }
    if not stage2:
        raise ValueError(f"Stage 2 would be empty: no verified tuples after cleaning ({stats})")
    if not stage1:
        raise ValueError(
            f"Stage 1 would be empty: all {len(incorrect)} incorrect-init tuples went to Stage 2 "
            f"(stage2_size={stage2_size}); collect more data or lower the Stage-2 size ({stats})"
        )
    return StageSplit(
        stage1=[format_stage1(r, delimiter) for r in stage1],
        stage2=[format_stage2(r, delimiter) for r in stage2],
        stats=stats,
    )


_KEPT_FIELDS = (
    "x",
    "y_init",
    "p_r",
    "y_revised",
    "y_init_correct",
    "original_index",
    "response_idx",
    "revision_idx",
)


def format_stage1(rec: dict[str, Any], delimiter: str = "\n\n") -> dict[str, Any]:
    """prompt x; completion y_init + d + P_r + d + y_revised (generate-then-revise)."""
    completion = rec["y_init"] + delimiter + rec["p_r"] + delimiter + rec["y_revised"]
    return {"prompt": rec["x"], "completion": completion, **{k: rec.get(k) for k in _KEPT_FIELDS}}


def format_stage2(rec: dict[str, Any], delimiter: str = "\n\n") -> dict[str, Any]:
    """prompt x + d + y_init + d + P_r; completion y_revised (revise a given response)."""
    prompt = rec["x"] + delimiter + rec["y_init"] + delimiter + rec["p_r"]
    return {"prompt": prompt, "completion": rec["y_revised"], **{k: rec.get(k) for k in _KEPT_FIELDS}}
