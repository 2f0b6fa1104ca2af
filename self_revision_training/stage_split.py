"""From verified self-revision tuples to the two SFT stages: cleaning, de-duplication, the split (reference §3).

    Stage 1: prompt x,                                   completion y_init + d + P_r + d + y_revised
    Stage 2: prompt x + d + y_init + d + P_r,            completion y_revised          (d = "\\n\\n")

Cleaning trims degenerate repeating tails (y_init, y_revised) and sycophantic openings (y_revised);
de-duplication is exact on (x, y_init, y_revised); Stage 2 takes its quota correct-init first, Stage 1
the remaining incorrect-init tuples. The sampled token ids (`y_init_ids`, `y_revised_ids`) travel with
their texts into the stage records, so the SFT trains on the tokens Phase 1 sampled; when cleaning
changes a text its ids no longer describe it and are dropped (the SFT then encodes the cleaned text;
`stats["token_ids"]` counts both cases). The text layouts come from `prompts.build_revision_stage_texts`, the
one place they are written. Pure Python; `prepare_data` is the entry point.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from self_revision_training.shared.prompts import build_revision_stage_texts

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


TOKEN_ID_FIELDS = {"y_init": "y_init_ids", "y_revised": "y_revised_ids"}  # text field -> its sampled ids


def clean_record(record: dict[str, Any]) -> dict[str, Any]:
    """Trimmed texts; a text that changed loses its sampled ids (they would no longer decode to it)."""
    out = dict(record)
    out["y_init"] = trim_repeating_tail(record["y_init"])
    out["y_revised"] = strip_sycophantic_opening(trim_repeating_tail(record["y_revised"]))
    for text_field, ids_field in TOKEN_ID_FIELDS.items():
        if out[text_field] != record[text_field] and out.get(ids_field) is not None:
            out[ids_field] = None
    return out


def count_token_ids(records: list[dict[str, Any]], originals: list[dict[str, Any]]) -> dict[str, int]:
    """How many texts keep their sampled ids, lost them to cleaning, or never had any (older/reference data)."""
    counts = {"kept": 0, "reencoded_after_cleaning": 0, "missing": 0}
    for rec, orig in zip(records, originals, strict=True):
        for ids_field in TOKEN_ID_FIELDS.values():
            if rec.get(ids_field) is not None:
                counts["kept"] += 1
            elif orig.get(ids_field) is not None:
                counts["reencoded_after_cleaning"] += 1
            else:
                counts["missing"] += 1
    return counts


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
        stats["cleaned_changed"] = sum(
            (c["y_init"], c["y_revised"]) != (r["y_init"], r["y_revised"])
            for c, r in zip(cleaned, records, strict=True)
        )
        stats["token_ids"] = count_token_ids(cleaned, records)
        records = cleaned
    else:
        stats["token_ids"] = count_token_ids(records, records)
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
    "y_init_ids",
    "y_revised_ids",
    "original_index",
    "response_idx",
    "revision_idx",
)


def _format(rec: dict[str, Any], stage: int, delimiter: str) -> dict[str, Any]:
    texts = build_revision_stage_texts(rec["x"], rec["y_init"], rec["p_r"], rec["y_revised"], delimiter)
    prompt, completion = texts[stage]
    return {"prompt": prompt, "completion": completion, **{k: rec.get(k) for k in _KEPT_FIELDS}}


def format_stage1(rec: dict[str, Any], delimiter: str = "\n\n") -> dict[str, Any]:
    """prompt x; completion y_init + d + P_r + d + y_revised (generate-then-revise)."""
    return _format(rec, 1, delimiter)


def format_stage2(rec: dict[str, Any], delimiter: str = "\n\n") -> dict[str, Any]:
    """prompt x + d + y_init + d + P_r; completion y_revised (revise a given response)."""
    return _format(rec, 2, delimiter)
