"""Self-Revision Training (SRT) data: records -> token ids + labels, and the per-step batch sampler.

Pure core for `self_revision_training.sft` (paper Sec. 3, Phase 1 "Self-Revision Training"; reference:
`self-revision-training/sft/sft.py`). Record layouts written by `prepare_data` (one JSON object a line):

    Stage 1: prompt = x;                        completion = y_init + "\n\n" + P_r + "\n\n" + y_revised
    Stage 2: prompt = x + "\n\n" + y_init + "\n\n" + P_r; completion = y_revised

SD-Zero records also carry the structured fields `x`, `y_init`, `p_r`, `y_revised`, `y_init_correct`
(layout `revision`, the two SRT stages). Layout `prompt_completion` is the plain one-stage SFT every other
data stage writes (rejection sampling, SSD, teacher rationales): chat(prompt) -> completion + end-of-turn.
Token ids are built per segment (chat prompt | y_init | phrase block | y_revised | end-of-turn) and never
by re-encoding joined text (see `prompts.py`). The response segments use the token ids Phase 1 sampled
when the record carries them (`y_init_ids`, `y_revised_ids`; `completion_ids` in the prompt_completion
layout) and they decode to the segment's text; otherwise the text is encoded on its own (re-encoding a
sampled text can merge tokens the model sampled separately, e.g. Qwen's "." + "\n\n" -> ".\n\n"), and
`TokenizeReport` counts both. So SFT sees the token sequences Phase 1 sampled and the Phase-2 teacher is
queried with. Stage 2 defaults to the *continuation* layout
(chat(x) + y_init + P_r block as the masked prompt), which is the layout the Phase-2 teacher is queried
in; `stage2_layout="user_turn"` reproduces the reference (the record's `prompt` string in the user turn).

The sampler (`build_step_batches`) is a pure function of (seed, epoch, step), so a run resumes from
its global step alone and the batches do not depend on how the global batch is split over ranks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from self_revision_training.shared.config import PromptConfig
from self_revision_training.shared.prompts import (
    ChatTokenizer,
    build_generation_prompt,
    build_phrase_block,
    build_revision_stage_texts,
    encode_text,
    select_phrase,
)
from self_revision_training.shared.storage import DataFileError, iter_jsonl, read_json_list

IGNORE_INDEX = -100  # label of positions that are not trained (prompt, padding)
STRUCTURED_FIELDS = ("x", "y_init", "p_r", "y_revised", "y_init_correct")
BASE_FIELDS = ("prompt", "completion")
# Bookkeeping keys a data file may carry besides the ones above; anything else is an error (typo guard)
# unless `extra_fields="ignore"`.
TOKEN_ID_FIELDS = {"y_init": "y_init_ids", "y_revised": "y_revised_ids", "completion": "completion_ids"}
METADATA_FIELDS = frozenset(
    {"id", "idx", "index", "source", "answer", "ground_truth", "meta", "metadata", "stage", "problem_id"}
    | {"original_index", "response_idx", "revision_idx"}  # written by revision_data.format_stage{1,2}
)
_SENTINEL = "SDZERO_END_OF_TURN_PROBE_7f3a"

Stage = Literal[1, 2]
Layout = Literal["revision", "prompt_completion"]  # revision = the SRT stages; prompt_completion = plain SFT
Stage2Layout = Literal["continuation", "user_turn"]
Overlong = Literal["truncate", "drop"]
Batching = Literal["length_grouped", "none"]


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt positions; the token id where it is trained
    source: str  # "file:line", for error messages and debugging

    @property
    def num_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class TokenizeReport:
    num_records: int = 0
    num_examples: int = 0
    num_truncated: int = 0  # completion cut to fit max_length
    num_dropped_overlong: int = 0  # overlong=drop, or the prompt alone does not fit
    num_dropped_empty: int = 0  # no trained token
    layouts: dict[str, int] = field(default_factory=dict)  # layout name -> examples
    num_sampled_ids: int = 0  # response segments trained on the token ids Phase 1 sampled
    num_ids_reencoded: int = 0  # stored ids that do not decode to their text: the text was encoded instead

    def summary(self) -> str:
        return (
            f"{self.num_examples}/{self.num_records} examples kept; truncated {self.num_truncated}, "
            f"dropped overlong {self.num_dropped_overlong}, dropped empty {self.num_dropped_empty}; "
            f"layouts {self.layouts}; segments on sampled ids {self.num_sampled_ids}, "
            f"re-encoded (ids did not match the text) {self.num_ids_reencoded}"
        )


def load_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Read a .jsonl file (one object a line) or a .json list of objects -> [("file:line", record)]."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: training data file not found")
    if path.suffix == ".json":
        data = read_json_list(path)
        return [(f"{path}:item {i}", rec) for i, rec in enumerate(data)]
    return [(f"{path}:{lineno}", rec) for lineno, rec in iter_jsonl(path, allow_torn_tail=False)]


def compute_end_of_turn_ids(tokenizer: ChatTokenizer, prompt_cfg: PromptConfig) -> list[int]:
    """The special token(s) the chat template writes right after an assistant message's content.

    Renders a conversation whose assistant message is a sentinel and takes the run of special tokens
    that follows it (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3; not the newline after them),
    so nothing is hard-coded (reference flaw: `"<|im_end|>"` for every model). Falls back to the eos token.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items() if tok.special}
    suffix_ids: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": _SENTINEL}]
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False, **prompt_cfg.chat_template_kwargs
        )
        if isinstance(text, str) and _SENTINEL in text:
            suffix = text[text.rindex(_SENTINEL) + len(_SENTINEL) :]
            for tok in encode_text(tokenizer, suffix):
                if tok not in special:
                    break
                suffix_ids.append(tok)
    if suffix_ids:
        return suffix_ids
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        return [int(eos)]
    raise DataFileError(
        "cannot find the end-of-turn token: the chat template emits no special token after the assistant "
        "message and the tokenizer has no eos_token"
    )


def _check_record(source: str, rec: dict[str, Any], extra_fields: str) -> bool:
    """Validate fields and types; returns True for a structured SD-Zero record."""
    for key in BASE_FIELDS:
        if key not in rec:
            raise DataFileError(f"{source}: missing field '{key}' (have {sorted(rec)})")
        if not isinstance(rec[key], str):
            raise DataFileError(f"{source}: field '{key}' must be a string, got {type(rec[key]).__name__}")
    present = [k for k in STRUCTURED_FIELDS if k in rec]
    if present and len(present) != len(STRUCTURED_FIELDS):
        missing = [k for k in STRUCTURED_FIELDS if k not in rec]
        raise DataFileError(f"{source}: SD-Zero record without {missing} (has {present})")
    if present:
        for key in ("x", "y_init", "p_r", "y_revised"):
            if not isinstance(rec[key], str):
                raise DataFileError(f"{source}: field '{key}' must be a string")
        if not isinstance(rec["y_init_correct"], bool):
            raise DataFileError(f"{source}: field 'y_init_correct' must be true/false")
    for ids_field in TOKEN_ID_FIELDS.values():
        ids = rec.get(ids_field)
        if ids is not None and (
            not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise DataFileError(f"{source}: field '{ids_field}' must be a list of token ids (or null)")
    if extra_fields == "error":
        known = set(BASE_FIELDS) | set(STRUCTURED_FIELDS) | set(TOKEN_ID_FIELDS.values()) | METADATA_FIELDS
        unknown = sorted(set(rec) - known)
        if unknown:
            raise DataFileError(
                f"{source}: unknown field(s) {unknown}; set data.extra_fields=ignore to accept them"
            )
    return bool(present)


def sampled_or_encoded_ids(
    tokenizer: ChatTokenizer, rec: dict[str, Any], text_field: str, report: TokenizeReport | None = None
) -> list[int]:
    """Token ids of the response segment `rec[text_field]`: the stored sampled ids when they decode to the
    text exactly, else the text encoded on its own (counted in `report`)."""
    text, ids = rec[text_field], rec.get(TOKEN_ID_FIELDS[text_field])
    if ids is not None:
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        valid = all(0 <= i < vocab for i in ids) if vocab else all(i >= 0 for i in ids)
        if (
            valid
            and tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text
        ):
            if report is not None:
                report.num_sampled_ids += 1
            return list(ids)
        if report is not None:
            report.num_ids_reencoded += 1
    return encode_text(tokenizer, text)


def build_example_segments(
    tokenizer: ChatTokenizer,
    rec: dict[str, Any],
    source: str,
    stage: Stage,
    stage2_layout: Stage2Layout,
    prompt_cfg: PromptConfig,
    end_of_turn_ids: list[int],
    extra_fields: str = "error",
    layout: Layout = "revision",
    report: TokenizeReport | None = None,
) -> tuple[list[int], list[int], str]:
    """One record -> (prompt_ids, completion_ids incl. end-of-turn, layout name)."""
    structured = _check_record(source, rec, extra_fields)
    if layout == "prompt_completion":
        prompt_ids = build_generation_prompt(tokenizer, rec["prompt"], prompt_cfg).ids
        completion_ids = sampled_or_encoded_ids(tokenizer, rec, "completion", report)
        return prompt_ids, completion_ids + end_of_turn_ids, "prompt_completion"
    if not structured:
        raise DataFileError(
            f"{source}: a plain prompt/completion record in the SRT (revision) layout; "
            "set data.layout=prompt_completion for one-stage SFT data"
        )
    x, y_init, y_rev, correct = rec["x"], rec["y_init"], rec["y_revised"], rec["y_init_correct"]
    phrase = select_phrase(correct, prompt_cfg)
    if rec["p_r"] != phrase:
        raise DataFileError(
            f"{source}: p_r {rec['p_r']!r} differs from the configured phrase for y_init_correct={correct} "
            f"({phrase!r}); the data and the prompt config disagree"
        )
    # The string fields must describe the same sequence as the structured ones (catches a Stage-2 file
    # passed to Stage 1 and vice versa).
    expected = build_revision_stage_texts(x, y_init, phrase, y_rev, prompt_cfg.delimiter)[stage]
    if (rec["prompt"], rec["completion"]) != expected:
        layout = "x | y_init+P_r+y" if stage == 1 else "x+y_init+P_r | y"
        raise DataFileError(f"{source}: prompt/completion do not follow the Stage-{stage} layout ({layout})")
    block = build_phrase_block(correct, prompt_cfg)
    prompt_ids = build_generation_prompt(tokenizer, x, prompt_cfg).ids
    block_ids = encode_text(tokenizer, block)
    rev_ids = sampled_or_encoded_ids(tokenizer, rec, "y_revised", report) + end_of_turn_ids
    if stage == 2 and stage2_layout == "user_turn":  # y_init is inside the user turn's text
        user_prompt_ids = build_generation_prompt(tokenizer, rec["prompt"], prompt_cfg).ids
        return user_prompt_ids, rev_ids, "stage2_user_turn"
    y_init_ids = sampled_or_encoded_ids(tokenizer, rec, "y_init", report)
    if stage == 1:
        return prompt_ids, y_init_ids + block_ids + rev_ids, "stage1"
    return prompt_ids + y_init_ids + block_ids, rev_ids, "stage2_continuation"


def build_sft_examples(
    tokenizer: ChatTokenizer,
    records: list[tuple[str, dict[str, Any]]],
    *,
    stage: Stage,
    prompt_cfg: PromptConfig,
    max_length: int,
    stage2_layout: Stage2Layout = "continuation",
    overlong: Overlong = "truncate",
    extra_fields: str = "error",
    layout: Layout = "revision",
) -> tuple[list[SFTExample], TokenizeReport]:
    """Tokenise records into completion-only SFT examples.

    Args:
        records: ("file:line", record) pairs from `load_records`.
        layout: `revision` (SD-Zero records, Stage 1 or 2) or `prompt_completion` (plain records).
        max_length: tokens per sequence; longer ones are truncated (the completion is cut, the prompt
            kept) or dropped (`overlong="drop"`). A prompt that alone fills max_length is always dropped.
    Returns:
        (examples, report): labels are IGNORE_INDEX on prompt tokens and the token id on completion
        tokens, including the end-of-turn token that teaches the model to stop.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    end_of_turn = compute_end_of_turn_ids(tokenizer, prompt_cfg)
    report = TokenizeReport(num_records=len(records))
    examples: list[SFTExample] = []
    for source, rec in records:
        prompt_ids, completion_ids, name = build_example_segments(
            tokenizer,
            rec,
            source,
            stage,
            stage2_layout,
            prompt_cfg,
            end_of_turn,
            extra_fields,
            layout,
            report,
        )
        if not completion_ids:
            report.num_dropped_empty += 1
            continue
        if len(prompt_ids) + len(completion_ids) > max_length:
            if overlong == "drop" or len(prompt_ids) >= max_length:
                report.num_dropped_overlong += 1
                continue
            completion_ids = completion_ids[: max_length - len(prompt_ids)]
            report.num_truncated += 1
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)
        examples.append(SFTExample(prompt_ids + completion_ids, labels, source))
        report.layouts[name] = report.layouts.get(name, 0) + 1
    report.num_examples = len(examples)
    return examples, report


# ----------------------------------------------------------------------------------------------
# Sampler: which examples each rank trains on at each optimizer step


def compute_steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Optimizer steps per epoch; the last step of an epoch may be partial (no example is skipped)."""
    return math.ceil(num_examples / global_batch)


def build_epoch_order(
    lengths: list[int], epoch: int, seed: int, global_batch: int, batching: Batching, mega_batches: int = 50
) -> list[int]:
    """The order in which an epoch visits the examples (a permutation of range(len(lengths))).

    `length_grouped` shuffles, sorts each chunk of `mega_batches * global_batch` examples by length (so
    micro-batches hold similar lengths: little padding), then shuffles the order of the full global
    batches (so epochs differ even when one chunk holds the whole data set); a partial batch stays last.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    if batching == "length_grouped":
        chunk = max(1, mega_batches * global_batch)
        order = [
            i
            for start in range(0, len(order), chunk)
            for i in sorted(order[start : start + chunk], key=lambda j: -lengths[j])
        ]
        num_full = len(order) // global_batch
        batches = [order[b * global_batch : (b + 1) * global_batch] for b in range(num_full)]
        rng.shuffle(batches)
        order = [i for batch in batches for i in batch] + order[num_full * global_batch :]
    return order


def build_step_batches(
    lengths: list[int],
    step: int,
    *,
    seed: int,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    batching: Batching = "length_grouped",
) -> list[list[list[int]]]:
    """Example indices for global optimizer `step` (0-based across epochs): [rank][micro_batch] -> indices.

    The global batch is micro_batch_size x grad_accum x world_size examples. Micro-batch k of the step
    takes items [k*m, (k+1)*m) and goes to rank k % world_size, accumulation slot k // world_size; the
    last step of an epoch may leave some micro-batches empty (the trainer runs a zero-weight dummy there
    so every rank makes the same collective calls).
    """
    if not lengths:
        raise ValueError("no training examples")
    global_batch = micro_batch_size * grad_accum * world_size
    steps_per_epoch = compute_steps_per_epoch(len(lengths), global_batch)
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    order = build_epoch_order(lengths, epoch, seed, global_batch, batching)
    items = order[step_in_epoch * global_batch : (step_in_epoch + 1) * global_batch]
    out: list[list[list[int]]] = [[[] for _ in range(grad_accum)] for _ in range(world_size)]
    for k in range(world_size * grad_accum):
        out[k % world_size][k // world_size] = items[k * micro_batch_size : (k + 1) * micro_batch_size]
    return out
