"""Token-level self-localization (SD-Zero's explanation, paper Sec. 3.2 and its first ablation): per-token
teacher-student dumps of Phase-2 rollouts and statistics of where the teacher's divergence sits.

    fields = compute_token_fields(student_logits, teacher, target_ids, div)   # pure, per token
    fields = score_dump_samples(model, samples, pad_id, device, div, teacher_weight)  # a real forward
    record = build_dump_record(fields, decode, step=..., problem_index=..., reward=..., ...)
    path = save_dump(dump_path(output_dir, step), step, records)     # dumps/step_000010.jsonl.gz
    header, records = load_dump(path)
    metrics = compute_localization_metrics(records)                   # {"localization/r0/top5_share": ...}

The per-token KL is computed by the learner's own functions (`compute_sparse_token_divergence` against the
teacher's top-k, `compute_token_divergence_stats` against its full-vocabulary logits), so the mean of a
dump's KLs over its tokens is the learner's loss on those tokens (every response token is a target).
Top-5 probabilities are of the full distributions at the divergence temperature (before top-k
renormalisation); the sampled-token log-probs are of the raw (temperature 1) distributions.

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

import dataclasses
import gzip
import json
import math
import os
import random
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from self_distillation.losses import (
    Divergence,
    compute_sparse_token_divergence,
    compute_token_divergence_stats,
)
from self_distillation.rollout_data import LearnerSample, collate_sequences
from self_revision_training.shared.answers import _BOX_COMMAND, _match_braces
from self_revision_training.shared.target_logits import TargetLogitsLM, upcast_logits

DUMP_SCHEMA = 1
TOP_N = 5  # alternatives per side per token
POSITION_BINS = 10
CONCENTRATION_QUANTILES = (0.05, 0.10)


@dataclass
class TokenFields:
    """Per-token values of one response (n tokens, in order); plain lists, JSON-ready."""

    kl: list[float]  # [n] divergence of the configured objective (the learner's per-token loss term)
    student_logprob: list[float]  # [n] raw log-prob of the sampled token under the student
    teacher_logprob: list[float]  # [n] raw log-prob of the sampled token under the teacher
    student_top_ids: list[list[int]]  # [n, 5] at the divergence temperature
    student_top_probs: list[list[float]]
    teacher_top_ids: list[list[int]]
    teacher_top_probs: list[list[float]]


def _top(logprobs: torch.Tensor, k: int) -> tuple[list[list[int]], list[list[float]]]:
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # sorted, largest first
    return ids.tolist(), values.exp().tolist()


def compute_token_fields(
    student_logits: torch.Tensor,
    teacher: Mapping[str, Any],
    target_ids: torch.Tensor,
    div: Divergence,
    teacher_weight: torch.Tensor | None = None,
    top_n: int = TOP_N,
) -> TokenFields:
    """Every per-token field of one response, with the learner objective's own divergence functions.

    Args:
        student_logits: [n, V] float32+ (float64 stays float64) student logits at the target positions.
        teacher: as the Teacher sends it for this sample (`teacher.teacher_outputs`): top-k
            {"ids" [n, k], "logprobs" [n, k] at div.temperature, "target_logprobs" [n]}; full vocabulary
            (ids None) {"logits" [n, V]} or {"hidden" [n, H]} with `teacher_weight` [V, H] (logits =
            hidden @ weight.T, as `objectives.py` computes them); "target_logprobs" optional there.
        target_ids: [n] the sampled tokens.
    """
    with torch.no_grad():
        student = upcast_logits(student_logits.detach())  # [n, V]
        targets = target_ids.to(student.device).long()
        student_raw = student.log_softmax(-1)
        student_lp = student_raw.gather(-1, targets[:, None]).squeeze(-1)  # [n]
        student_scaled = (
            student_raw if div.temperature == 1.0 else (student / div.temperature).log_softmax(-1)
        )
        if teacher.get("ids") is not None:
            ids, logprobs = teacher["ids"].to(student.device).long(), teacher["logprobs"].to(student.device)
            kl = compute_sparse_token_divergence(student, logprobs, ids, div).values
            order = logprobs.argsort(dim=-1, descending=True)[:, :top_n]
            teacher_top = (ids.gather(-1, order).tolist(), logprobs.gather(-1, order).exp().tolist())
            teacher_lp = teacher["target_logprobs"]
        else:
            logits = teacher.get("logits")
            if logits is None:
                if teacher_weight is None:
                    raise ValueError(
                        "full-vocabulary teacher outputs need 'logits', or 'hidden' and teacher_weight"
                    )
                logits = teacher["hidden"].to(student.device) @ teacher_weight.to(student.device).T
            logits = upcast_logits(logits.to(student.device))  # [n, V], as the teacher's lm_head
            kl = compute_token_divergence_stats(student, logits, div).values
            teacher_raw = logits.log_softmax(-1)
            scaled = teacher_raw if div.temperature == 1.0 else (logits / div.temperature).log_softmax(-1)
            teacher_top = _top(scaled, top_n)
            teacher_lp = teacher.get("target_logprobs")
            if teacher_lp is None:
                teacher_lp = teacher_raw.gather(-1, targets[:, None]).squeeze(-1)
        student_top = _top(student_scaled, top_n)
    return TokenFields(
        kl=kl.tolist(),
        student_logprob=student_lp.tolist(),
        teacher_logprob=torch.as_tensor(teacher_lp).tolist(),
        student_top_ids=student_top[0],
        student_top_probs=student_top[1],
        teacher_top_ids=teacher_top[0],
        teacher_top_probs=teacher_top[1],
    )


def _dump_chunk(rows, lm_head, targets, teacher_a, teacher_b, teacher_target_lp, div, weight, top_n):
    """`target_logits.map_chunks` function: the fields of one chunk of student target rows."""
    if div.top_k is not None:
        teacher = {"ids": teacher_b, "logprobs": teacher_a, "target_logprobs": teacher_target_lp}
    else:
        teacher = {"ids": None, "hidden": teacher_a, "target_logprobs": teacher_target_lp}
    weight = lm_head.weight.detach() if weight is None and div.top_k is None else weight
    return compute_token_fields(upcast_logits(lm_head(rows)), teacher, targets, div, weight, top_n)


@torch.no_grad()
def score_dump_samples(
    model: TargetLogitsLM,
    samples: Sequence[LearnerSample],
    pad_id: int,
    device: torch.device,
    div: Divergence,
    teacher_weight: torch.Tensor | None = None,
    top_n: int = TOP_N,
) -> list[TokenFields]:
    """Per sample, its `TokenFields` from one no-grad student forward (chunked like the objective).

    `samples` carry their teacher outputs (`LearnerSample.teacher`); full vocabulary: `teacher_weight` is the
    teacher's lm_head (None = the model's own, a learner-scored teacher). Under FSDP every rank must call
    this with the same number of samples (the forward has collectives).
    """
    if not samples:
        return []
    batch = {
        k: v.to(device)
        for k, v in collate_sequences([(s.student_ids, s.student_mask) for s in samples], pad_id).items()
    }
    if div.top_k is not None:
        per_row = (
            torch.cat([s.teacher["logprobs"] for s in samples]).to(device),
            torch.cat([s.teacher["ids"] for s in samples]).long().to(device),
        )
    else:
        per_row = (torch.cat([s.teacher["hidden"] for s in samples]).to(device), None)
    target_lp = torch.cat([torch.as_tensor(s.teacher["target_logprobs"]) for s in samples]).to(device)
    weight = None if teacher_weight is None else teacher_weight.to(device)
    was_training = model.training
    model.eval()
    try:
        chunks, _ = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["position_ids"],
            batch["target_mask"][:, 1:].bool(),
            _dump_chunk,
            (*per_row, target_lp),
            (div, weight, top_n),
        )
    finally:
        model.train(was_training)
    merged = {
        f.name: [v for c in chunks for v in getattr(c, f.name)] for f in dataclasses.fields(TokenFields)
    }
    out, offset = [], 0
    for s in samples:
        n = s.num_targets
        out.append(TokenFields(**{k: v[offset : offset + n] for k, v in merged.items()}))
        offset += n
    return out


# -- records, writer and reader


@dataclass(frozen=True)
class DumpLimits:
    max_samples: int = 16  # samples per dump file (the rest are counted in the header)
    max_tokens_per_sample: int = 8192  # response tokens kept per sample (the first ones; the rest counted)
    max_context_chars: int = 6000  # teacher-context text kept (head and tail, the middle elided)


@dataclass
class DumpRecord:
    """One Phase-2 rollout as the teacher scored it (schema DUMP_SCHEMA)."""

    step: int
    problem_index: int
    reward: int  # r in {0, 1}
    teacher_context: str  # context name (teacher_context.TEACHER_CONTEXTS)
    teacher_context_text: str  # decoded teacher sequence before the targets (capped, see DumpLimits)
    token_ids: list[int]
    token_strings: list[str]  # decoded pieces; "".join(...) is the decoded response
    fields: TokenFields
    strings: dict[int, str]  # decoded text of every id in the top-5 lists
    num_tokens: int  # response tokens before the cap (len(token_ids) <= num_tokens)
    sample_index: int = 0
    problem: str = ""
    reference_solution: str | None = None
    reference_answer: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def decode_pieces(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[str]:
    """Per-token text such that "".join(pieces) is the decoded text: a token that ends inside a multi-byte
    character gets "" and the token completing it the whole character; one token of left context keeps
    leading spaces for tokenizers that drop them at the start of a decode."""
    pieces: list[str] = []
    start = 0
    for i in range(len(ids)):
        ctx = max(0, start - 1)
        base = decode(list(ids[ctx:start])) if start > ctx else ""
        text = decode(list(ids[ctx : i + 1]))
        if text.endswith("\ufffd") and i + 1 < len(ids) and i - start < 6:
            pieces.append("")
            continue
        pieces.append(text[len(base) :] if text.startswith(base) else text)
        start = i + 1
    return pieces


def _cap_text(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + f"\n[... {len(text) - 2 * half} characters elided ...]\n" + text[-half:]


def build_dump_record(
    fields: TokenFields,
    decode: Callable[[list[int]], str],
    *,
    step: int,
    problem_index: int,
    reward: bool | int,
    teacher_context: str,
    token_ids: Sequence[int],
    teacher_prefix_ids: Sequence[int],
    sample_index: int = 0,
    problem: str = "",
    reference_solution: str | None = None,
    reference_answer: str | None = None,
    limits: DumpLimits = DumpLimits(),
) -> DumpRecord:
    """A record from one sample's fields; `teacher_prefix_ids` = the teacher sequence before its first
    target (its prompt, for SD-Zero chat(x) + y' + P_r block); `decode` keeps special tokens."""
    n, keep = len(token_ids), min(len(token_ids), limits.max_tokens_per_sample)
    if len(fields.kl) != n:
        raise ValueError(f"{len(fields.kl)} token fields for {n} response tokens")
    kept = TokenFields(**{f.name: getattr(fields, f.name)[:keep] for f in dataclasses.fields(TokenFields)})
    alternatives = {i for row in kept.student_top_ids + kept.teacher_top_ids for i in row}
    context = decode(list(teacher_prefix_ids))
    return DumpRecord(
        step=step,
        problem_index=problem_index,
        reward=int(bool(reward)),
        teacher_context=teacher_context,
        teacher_context_text=_cap_text(context, limits.max_context_chars),
        token_ids=list(token_ids[:keep]),
        token_strings=decode_pieces(decode, list(token_ids[:keep])),
        fields=kept,
        strings={i: decode([i]) for i in sorted(alternatives)},
        num_tokens=n,
        sample_index=sample_index,
        problem=problem,
        reference_solution=reference_solution,
        reference_answer=reference_answer,
        info={"context_chars": len(context)},
    )


def select_dump_indices(
    rewards: Sequence[bool | int], per_reward: int, step: int, seed: int = 0
) -> list[int]:
    """Up to `per_reward` sample indices per reward value, chosen by a generator seeded by (seed, step);
    sorted. Pure: the same inputs always give the same indices."""
    rng = random.Random(seed * 1_000_003 + step)
    chosen: list[int] = []
    for value in sorted({int(bool(r)) for r in rewards}):
        pool = [i for i, r in enumerate(rewards) if int(bool(r)) == value]
        chosen += rng.sample(pool, min(per_reward, len(pool)))
    return sorted(chosen)


def dump_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "dumps" / f"step_{step:06d}.jsonl.gz"


def _round(values: list, digits: int = 6) -> list:
    return [_round(v, digits) if isinstance(v, list) else float(f"{v:.{digits}g}") for v in values]


def record_to_dict(record: DumpRecord) -> dict[str, Any]:
    out = dataclasses.asdict(record)
    f = out.pop("fields")
    out["kl"] = f["kl"]  # full precision: averaging reproduces the loss
    for name in ("student_logprob", "teacher_logprob", "student_top_probs", "teacher_top_probs"):
        out[name] = _round(f[name])
    out["student_top_ids"], out["teacher_top_ids"] = f["student_top_ids"], f["teacher_top_ids"]
    out["strings"] = {str(k): v for k, v in record.strings.items()}
    return out


def record_from_dict(row: Mapping[str, Any]) -> DumpRecord:
    row = dict(row)
    row.pop("type", None)
    fields = TokenFields(**{f.name: row.pop(f.name) for f in dataclasses.fields(TokenFields)})
    row["strings"] = {int(k): v for k, v in row["strings"].items()}
    return DumpRecord(fields=fields, **row)


def save_dump(
    path: str | Path,
    step: int,
    records: Sequence[DumpRecord],
    limits: DumpLimits = DumpLimits(),
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a header line and one line per record (at most limits.max_samples) to `path` (.jsonl.gz),
    atomically (temp file in the same directory, fsync, rename). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = list(records[: limits.max_samples])
    header = {
        "type": "header",
        "schema": DUMP_SCHEMA,
        "step": step,
        "num_samples": len(kept),
        "samples_dropped": len(records) - len(kept),
        "tokens_dropped": sum(r.num_tokens - len(r.token_ids) for r in kept),
        "limits": dataclasses.asdict(limits),
        **(meta or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
                for row in [header, *({"type": "sample", **record_to_dict(r)} for r in kept)]:
                    handle.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_dump(path: str | Path) -> tuple[dict[str, Any], list[DumpRecord]]:
    """(header, records) of a dump written by `save_dump`."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    if not rows or rows[0].get("type") != "header":
        raise ValueError(f"{path}: not a token dump (no header line)")
    if rows[0].get("schema") != DUMP_SCHEMA:
        raise ValueError(f"{path}: dump schema {rows[0].get('schema')}, this code reads {DUMP_SCHEMA}")
    return rows[0], [record_from_dict(r) for r in rows[1:] if r.get("type") == "sample"]


# -- statistics


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
