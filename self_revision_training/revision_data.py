"""Self-revision records (paper Sec. 3.1, Phase 1): the collection log, its statistics, and prepare_data.

The collector appends every attempt to `attempts.jsonl` through the shared committed batch log
(`storage.BatchLog`: one fsync'ed write per batch, ending with a `batch_done` marker; an uncommitted tail
is cut on restart), so a rerun resumes with whole batches only and never duplicates a record. Record types:

    init      one per y_init sample: the response, its sampled token ids (`y_init_ids`, without the
              end-of-turn token), its grade r, and whether it was revised (and why not)
    revision  one per y_revised sample, with the reference's fields (x, y_init, p_r, y_revised,
              ground_truth, y_init_correct, y_revised_correct, *_extracted, original_index,
              response_idx, revision_idx) plus both sampled id lists (`y_init_ids`, `y_revised_ids`,
              without end-of-turn), lengths, finish reasons and `verified`
    batch_done  the problem indices the batch covered (including `prompt_too_long`: problems whose
              prompt does not fit the engine's context, skipped), its wall time and generated tokens

The SFT trains on the stored ids (the tokens Phase 1 sampled), not on re-encoded text: re-encoding
merges tokens across what were separate samples (Qwen: "." + "\n\n" -> ".\n\n").

`verified` = the revision is graded correct and finished on its own (not cut at max_tokens).
`verified.jsonl` holds exactly the verified revision records and is rebuilt from the attempts file on
restart; `summary.json` is computed from the attempts file alone (`CollectionStats`).

Cleaning, de-duplication and the split into the two SFT stages live in `stage_split`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from self_revision_training.shared.storage import BATCH_DONE, DataFileError, iter_jsonl, read_json_list

ATTEMPTS_FILE = "attempts.jsonl"
VERIFIED_FILE = "verified.jsonl"
SUMMARY_FILE = "summary.json"

REVISION_FIELDS = ("x", "y_init", "p_r", "y_revised", "y_init_correct", "y_revised_correct")


# ----------------------------------------------------------------------------------------------
# the collection log (a storage.BatchLog of init / revision records)

RECORD_TYPES = ("init", "revision")


def _sampled_ids(sample: Any, eos_token_ids: frozenset[int]) -> list[int]:
    """The sampled token ids without a final end-of-turn token (SFT appends the template's own)."""
    ids = list(sample.token_ids)
    return ids[:-1] if ids and ids[-1] in eos_token_ids else ids


def build_init_record(
    problem: Any,
    k: int,
    sample: Any,
    verdict: Any,
    batch: int,
    version: int,
    eos_token_ids: frozenset[int] = frozenset(),
) -> dict:
    """The `init` record of y_init number k of `problem` (not yet revised; the collector fills that in)."""
    return {
        "type": "init",
        "original_index": problem.index,
        "response_idx": k,
        "x": problem.problem,
        "ground_truth": problem.answer,
        "y_init": sample.text,
        "y_init_ids": _sampled_ids(sample, eos_token_ids),
        "y_init_correct": verdict.correct,
        "y_init_extracted": verdict.extracted,
        "y_init_reason": verdict.reason,
        "y_init_num_tokens": len(sample.token_ids),
        "y_init_finish_reason": sample.finish_reason,
        "revised": False,
        "skip_reason": None,
        "batch": batch,
        "policy_version": version,
    }


def build_revision_record(
    init: dict, p_r: str, j: int, sample: Any, verdict: Any, eos_token_ids: frozenset[int] = frozenset()
) -> dict:
    """The `revision` record of y_revised number j of an init record; `verified` is decided here."""
    keep = (
        "original_index",
        "response_idx",
        "x",
        "ground_truth",
        "y_init",
        "y_init_ids",
        "y_init_correct",
        "y_init_extracted",
    )
    return {
        "type": "revision",
        **{k: init[k] for k in keep},
        "revision_idx": j,
        "p_r": p_r,
        "y_revised": sample.text,
        "y_revised_ids": _sampled_ids(sample, eos_token_ids),
        "y_revised_correct": verdict.correct,
        "y_revised_extracted": verdict.extracted,
        "y_revised_reason": verdict.reason,
        "y_revised_num_tokens": len(sample.token_ids),
        "y_revised_finish_reason": sample.finish_reason,
        "verified": verdict.correct and sample.finish_reason == "stop",
        "batch": init["batch"],
        "policy_version": init["policy_version"],
    }


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
    prompt_too_long: int = 0  # problems skipped: the prompt leaves no room in the engine's context
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
        self.prompt_too_long += len(marker.get("prompt_too_long", ()))
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
            "problems_skipped": {"prompt_too_long": self.prompt_too_long},
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
    seen: dict[tuple, tuple[Path, str]] = {}
    for path in files:
        for where, rec in _iter_revision_records(path):
            _check_fields(rec, where)
            if not is_verified(rec):
                continue
            key = (rec.get("original_index"), rec.get("response_idx"), rec.get("revision_idx"))
            if None not in key:
                if key in seen:
                    first_path, first_where = seen[key]
                    if first_path == path:
                        raise DataFileError(
                            f"{where}: duplicate tuples within one shard: tuple {key} also appears at "
                            f"{first_where} (two collectors wrote into this shard directory at once?)"
                        )
                    raise DataFileError(
                        f"{where}: tuple {key} also appears at {first_where} (overlapping shards: two "
                        "collections with different shard settings in one input directory?)"
                    )
                seen[key] = (path, where)
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
        elif kind == BATCH_DONE:
            yield from pending
            pending = []
    if path.name != ATTEMPTS_FILE:
        yield from pending
    # an attempts file's records after its last batch_done belong to a batch cut by a kill: not committed
