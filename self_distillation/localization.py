"""Token-level self-localization (SD-Zero's explanation, paper Sec. 3.2 and its first ablation): per-token
statistics of where the teacher's divergence sits in the per-token dumps of `token_dump.py`.

    header, records = load_dump(path)                                  # token_dump
    metrics = compute_localization_metrics(records)                   # {"localization/r0/top5_share": ...}

Statistics, per reward value r (samples with total KL 0 are left out of the concentration terms):
    position profile   token i of n goes to bin floor(B * i / n); per sample the mean KL of each bin, then
                       the mean over samples that have a token in that bin (B = 10 by default).
    top{5,10}_share    per sample the KL of its ceil(q * n) largest-KL tokens / its total KL; mean over samples.
    gini               per sample sum_i (2i - n - 1) x_(i) / (n * sum x), x ascending (0 = uniform,
                       (n-1)/n = all on one token); mean over samples. Negative round-off KLs count as 0.
    answer tokens      the tokens whose decoded text overlaps the span of the LAST `\\boxed{...}`/`\\fbox{...}`
                       of the decoded response, from the backslash to the closing brace (the `\\boxed 5` form:
                       to the end of its argument); a zero-length piece (the first bytes of a character that
                       the next token completes) goes with that next token. answer_kl_share = their KL / the
                       total KL; answer_token_share = their count / n (the share a uniform KL would give).
    departure          (a reference solution exists) allowed = every number of the problem, the reference
                       solution and its answer; the departure is the first number of the response whose value
                       is not allowed (numbers compared as exact rationals of their absolute values, commas
                       dropped; list markers "3." / "3)" at a line start ignored); its token is the one
                       covering the number's first character. distance = peak token - departure token
                       (peak = the first token of largest KL; < 0: the peak comes before the departure).
                       It cannot see errors that are not numbers (a wrong method, sign or unit whose numbers
                       all occur in the reference), counts a correct alternative route with other
                       intermediate numbers as a departure, reads \\frac{1}{2} as 1 and 2, and misses numbers
                       written as words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from self_distillation.token_dump import CONCENTRATION_QUANTILES, POSITION_BINS, DumpRecord
from self_revision_training.shared.answers import _BOX_COMMAND, _match_braces


def token_offsets(pieces: Sequence[str]) -> list[tuple[int, int]]:
    """[start, end) character span of each token in "".join(pieces); a zero-length piece takes the span of
    the next non-empty piece (the token that completes its character)."""
    spans, pos = [], 0
    for piece in pieces:
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    for i in range(len(spans) - 2, -1, -1):
        if spans[i][0] == spans[i][1]:
            spans[i] = spans[i + 1]
    return spans


def find_final_answer_span(text: str) -> tuple[int, int] | None:
    """[start, end) of the last well-formed `\\boxed{...}`/`\\fbox{...}` (or `\\boxed 5`) with a non-empty
    argument, from its backslash to its closing brace inclusive; None when there is none."""
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            close = _match_braces(text, i)
            if close is not None and text[i + 1 : close].strip():
                return match.start(), close + 1
        elif i < len(text) and i > match.end():
            arg = re.match(r"[^\s$]+", text[i:])
            if arg:
                return match.start(), i + len(arg.group(0).rstrip(".,;"))
    return None


def final_answer_tokens(pieces: Sequence[str]) -> list[int] | None:
    """Indices of the tokens overlapping the final-answer span, or None when the response has none."""
    span = find_final_answer_span("".join(pieces))
    if span is None:
        return None
    return [i for i, (a, b) in enumerate(token_offsets(pieces)) if a < span[1] and b > span[0]]


_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+")
_LIST_MARKER = re.compile(r"(?m)^[ \t]*\d+[.)](?=\s)")


def _numbers(text: str) -> list[tuple[int, Fraction]]:
    markers = {m.start() + len(m.group(0)) - len(m.group(0).lstrip()) for m in _LIST_MARKER.finditer(text)}
    out = []
    for m in _NUMBER.finditer(text):
        raw = m.group(0).rstrip(",").replace(",", "")
        if m.start() in markers or not raw.strip("."):
            continue
        out.append((m.start(), Fraction(raw)))
    return out


def find_departure(response: str, problem: str, reference: str, answer: str | None = None) -> int | None:
    """Character offset of the first number in `response` whose value occurs in neither the problem, the
    reference solution nor its answer (module docstring), or None."""
    allowed = {v for text in (problem, reference, answer or "") for _, v in _numbers(text)}
    return next((pos for pos, value in _numbers(response) if value not in allowed), None)


def _sample_stats(record: DumpRecord, bins: int) -> dict[str, Any]:
    kl = [max(0.0, float(v)) for v in record.fields.kl]  # round-off can leave a tiny negative KL
    n, total = len(kl), sum(kl)
    out: dict[str, Any] = {"num_tokens": n, "kl_mean": total / n if n else math.nan}
    sums, counts = [0.0] * bins, [0] * bins
    length = max(n, record.num_tokens)  # a capped sample fills only the early bins
    for i, v in enumerate(kl):
        b = bins * i // length
        sums[b] += v
        counts[b] += 1
    out["position"] = [s / c if c else None for s, c in zip(sums, counts, strict=True)]
    if n and total > 0:
        ordered = sorted(kl, reverse=True)
        for q in CONCENTRATION_QUANTILES:
            out[f"top{round(100 * q)}_share"] = sum(ordered[: math.ceil(q * n)]) / total
        ascending = ordered[::-1]
        out["gini"] = sum((2 * i - n - 1) * x for i, x in enumerate(ascending, 1)) / (n * total)
    peak = max(range(n), key=lambda i: (kl[i], -i)) if n else None
    out["peak_rel_position"] = None if peak is None else peak / length
    answer = final_answer_tokens(record.token_strings)
    if answer is not None and n:
        answer_kl = sum(kl[i] for i in answer)
        out["answer_token_share"] = len(answer) / n
        out["answer_kl_share"] = answer_kl / total if total > 0 else None
        out["answer_kl_mean"] = answer_kl / len(answer) if answer else None
        out["rest_kl_mean"] = (total - answer_kl) / (n - len(answer)) if n > len(answer) else None
    if record.reference_solution and n:
        text = "".join(record.token_strings)
        pos = find_departure(text, record.problem, record.reference_solution, record.reference_answer)
        out["departure_found"] = float(pos is not None)
        if pos is not None:
            token = next(i for i, (a, b) in enumerate(token_offsets(record.token_strings)) if b > pos)
            out["departure_token"] = token
            out["peak_departure_distance"] = peak - token
            out["peak_departure_abs"] = abs(peak - token)
    return out


def _mean(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


SCALAR_STATS = (
    "kl_mean", "top5_share", "top10_share", "gini", "peak_rel_position", "answer_token_share",
    "answer_kl_share", "answer_kl_mean", "rest_kl_mean", "departure_found", "peak_departure_distance",
    "peak_departure_abs",
)  # fmt: skip


def compute_localization_stats(records: Sequence[DumpRecord], bins: int = POSITION_BINS) -> dict[str, Any]:
    """Per reward value ("r0", "r1"): the module docstring's statistics, averaged over that r's samples,
    plus counts and the position profile [bins] (None where no sample has a token in the bin)."""
    groups: dict[str, list[dict[str, Any]]] = {"r0": [], "r1": []}
    for record in records:
        groups.setdefault(f"r{int(record.reward)}", []).append(_sample_stats(record, bins))
    out = {}
    for key, samples in groups.items():
        stats: dict[str, Any] = {
            "num_samples": len(samples),
            "num_tokens": sum(s["num_tokens"] for s in samples),
            "answer_span_found": sum("answer_token_share" in s for s in samples),
        }
        stats |= {name: _mean([s.get(name) for s in samples]) for name in SCALAR_STATS}
        profile = [_mean([s["position"][b] for s in samples]) for b in range(bins)]
        stats["position"] = [None if math.isnan(v) else v for v in profile]
        out[key] = stats
    return out


def compute_localization_metrics(
    records: Sequence[DumpRecord], bins: int = POSITION_BINS, prefix: str = "localization"
) -> dict[str, float]:
    """The flat per-step metric dict: f"{prefix}/r{0,1}/{stat}" for every `SCALAR_STATS` entry, the counts,
    and f"{prefix}/r{r}/position_b{j}"; NaN where undefined (no sample of that r, no answer span, ...)."""
    flat: dict[str, float] = {}
    for key, stats in compute_localization_stats(records, bins).items():
        for name, value in stats.items():
            if name == "position":
                for b, v in enumerate(value):
                    flat[f"{prefix}/{key}/position_b{b}"] = math.nan if v is None else float(v)
            else:
                flat[f"{prefix}/{key}/{name}"] = float(value)
    return flat
