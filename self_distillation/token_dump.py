"""Per-token teacher-student dumps of Phase-2 rollouts (the records `localization.py` computes statistics
of and `token_page.py` renders).

    fields = compute_token_fields(student_logits, teacher, target_ids, div)   # pure, per token
    fields = score_dump_samples(model, samples, pad_id, device, div, teacher_weight)  # a real forward
    record = build_dump_record(fields, decode, step=..., problem_index=..., reward=..., ...)
    path = save_dump(dump_path(output_dir, step), step, records)     # dumps/step_000010.jsonl.gz
    header, records = load_dump(path)

The per-token KL is computed by the learner's own functions (`compute_sparse_token_divergence` against the
teacher's top-k, `compute_token_divergence_stats` against its full-vocabulary logits), so the mean of a
dump's KLs over its tokens is the learner's loss on those tokens (every response token is a target).
Top-5 probabilities are of the full distributions at the divergence temperature (before top-k
renormalisation); the sampled-token log-probs are of the raw (temperature 1) distributions.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from self_distillation.losses import (
    Divergence,
    compute_sparse_token_divergence,
    compute_token_divergence_stats,
)
from self_distillation.rollout_data import LearnerSample, collate_sequences
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
