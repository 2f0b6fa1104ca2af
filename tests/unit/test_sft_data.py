"""SFT data: per-layout token ids and labels, overlong handling, input errors, and the step sampler."""

from __future__ import annotations

import json

import pytest

from self_revision_training.sft_data import (
    IGNORE_INDEX,
    build_epoch_order,
    build_sft_examples,
    build_step_batches,
    compute_end_of_turn_ids,
    load_records,
)
from self_revision_training.shared.config import PromptConfig
from self_revision_training.shared.prompts import (
    build_generation_prompt,
    build_phrase_block,
    build_revision_stage_texts,
    select_phrase,
)
from self_revision_training.shared.storage import DataFileError

CFG = PromptConfig()


def sdzero_record(stage: int, i: int = 0, correct: bool = False, pad: int = 0) -> dict:
    x = f"What is {i} + 7?"
    y_init = f"We get {i} + 7 = {i + 8}. The answer is \\boxed{{{i + 8}}}." + " so" * pad
    y_rev = f"First {i} + 7 = {i + 7}. Therefore the answer is \\boxed{{{i + 7}}}."
    p_r = select_phrase(correct, CFG)
    if stage == 1:
        prompt, completion = x, y_init + "\n\n" + p_r + "\n\n" + y_rev
    else:
        prompt, completion = x + "\n\n" + y_init + "\n\n" + p_r, y_rev
    return dict(
        prompt=prompt,
        completion=completion,
        x=x,
        y_init=y_init,
        p_r=p_r,
        y_revised=y_rev,
        y_init_correct=correct,
    )


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build(tok, records, stage=1, **kw):
    kw.setdefault("max_length", 4096)
    return build_sft_examples(
        tok, [(f"f.jsonl:{i + 1}", r) for i, r in enumerate(records)], stage=stage, prompt_cfg=CFG, **kw
    )


def split(tok, ex):
    n_prompt = next(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in ex.labels[:n_prompt])
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]  # every completion token is trained
    return tok.decode(ex.input_ids[:n_prompt]), tok.decode(ex.input_ids[n_prompt:]), n_prompt


def test_end_of_turn_from_template(tiny_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert compute_end_of_turn_ids(tiny_tokenizer, CFG) == [im_end]  # not the "\n" after it


def test_end_of_turn_other_template_and_fallbacks(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<think>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    )
    assert compute_end_of_turn_ids(tok, CFG) == [tok.convert_tokens_to_ids("<think>")]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # no special after content
    assert compute_end_of_turn_ids(tok, CFG) == [tok.eos_token_id]
    tok.eos_token = None
    with pytest.raises(DataFileError, match="end-of-turn"):
        compute_end_of_turn_ids(tok, CFG)


@pytest.mark.parametrize("correct", [False, True])
def test_stage1_layout(tiny_tokenizer, correct):
    rec = sdzero_record(1, correct=correct)
    (ex,), report = build(tiny_tokenizer, [rec])
    prompt_text, completion_text, n_prompt = split(tiny_tokenizer, ex)
    chat = build_generation_prompt(tiny_tokenizer, rec["x"], CFG)
    assert ex.input_ids[:n_prompt] == chat.ids and prompt_text == chat.text
    block = build_phrase_block(correct, CFG)
    assert completion_text == rec["y_init"] + block + rec["y_revised"] + "<|im_end|>"
    assert ex.labels[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert report.layouts == {"stage1": 1} and report.num_examples == 1


def test_stage2_continuation_layout(tiny_tokenizer):
    rec = sdzero_record(2)
    (ex,), _ = build(tiny_tokenizer, [rec], stage=2)
    prompt_text, completion_text, _ = split(tiny_tokenizer, ex)
    chat = build_generation_prompt(tiny_tokenizer, rec["x"], CFG)
    assert prompt_text == chat.text + rec["y_init"] + build_phrase_block(False, CFG)
    assert completion_text == rec["y_revised"] + "<|im_end|>"


def test_stage2_user_turn_layout(tiny_tokenizer):
    rec = sdzero_record(2)
    (ex,), report = build(tiny_tokenizer, [rec], stage=2, stage2_layout="user_turn")
    prompt_text, completion_text, n_prompt = split(tiny_tokenizer, ex)
    assert ex.input_ids[:n_prompt] == build_generation_prompt(tiny_tokenizer, rec["prompt"], CFG).ids
    assert completion_text == rec["y_revised"] + "<|im_end|>"
    assert report.layouts == {"stage2_user_turn": 1}


def test_generic_records(tiny_tokenizer, tmp_path):
    path = tmp_path / "generic.json"
    path.write_text(json.dumps([{"prompt": "What is 2 + 2?", "completion": "It is \\boxed{4}."}]))
    (ex,), report = build_sft_examples(
        tiny_tokenizer,
        load_records(path),
        stage=2,
        prompt_cfg=CFG,
        max_length=512,
        layout="prompt_completion",
    )
    prompt_text, completion_text, _ = split(tiny_tokenizer, ex)
    assert prompt_text == build_generation_prompt(tiny_tokenizer, "What is 2 + 2?", CFG).text
    assert completion_text == "It is \\boxed{4}.<|im_end|>"
    assert report.layouts == {"prompt_completion": 1}
    with pytest.raises(DataFileError, match="layout=prompt_completion"):  # no side path into the SRT stages
        build_sft_examples(tiny_tokenizer, load_records(path), stage=1, prompt_cfg=CFG, max_length=512)


def test_overlong_truncate_and_drop(tiny_tokenizer):
    recs = [sdzero_record(1, i, pad=pad) for i, pad in enumerate([0, 200, 0])]
    full, _ = build(tiny_tokenizer, recs[:1])
    prompt_len = split(tiny_tokenizer, full[0])[2]
    limit = len(full[0].input_ids) + 5
    examples, report = build(tiny_tokenizer, recs, max_length=limit)
    assert report.num_truncated == 1 and report.num_examples == 3
    assert max(len(e.input_ids) for e in examples) == limit
    examples, report = build(tiny_tokenizer, recs, max_length=limit, overlong="drop")
    assert report.num_dropped_overlong == 1 and report.num_examples == 2
    examples, report = build(tiny_tokenizer, recs[:1], max_length=prompt_len)  # prompt alone fills it
    assert report.num_dropped_overlong == 1 and examples == []
    _, report = build(tiny_tokenizer, [{"prompt": "q", "completion": ""}], layout="prompt_completion")
    assert report.num_examples == 1  # the end-of-turn token is still trained
    assert "kept" in report.summary()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("completion"), r"f.jsonl:1: missing field 'completion'"),
        (lambda r: r.pop("y_init"), r"f.jsonl:1: SD-Zero record without \['y_init'\]"),
        (lambda r: r.update(p_r="Hmm."), r"f.jsonl:1: p_r 'Hmm.' differs"),
        (lambda r: r.update(y_init_correct="no"), r"f.jsonl:1: field 'y_init_correct'"),
        (lambda r: r.update(prompt=3), r"f.jsonl:1: field 'prompt' must be a string"),
        (lambda r: r.update(promt="x"), r"f.jsonl:1: unknown field\(s\) \['promt'\]"),
        (lambda r: r.update(completion="other"), r"f.jsonl:1: .*Stage-1 layout"),
    ],
)
def test_record_errors_name_file_and_line(tiny_tokenizer, mutate, message):
    rec = sdzero_record(1)
    mutate(rec)
    with pytest.raises(DataFileError, match=message):
        build(tiny_tokenizer, [rec])


def test_stage_mismatch_and_extra_fields(tiny_tokenizer):
    with pytest.raises(DataFileError, match="Stage-2 layout"):
        build(tiny_tokenizer, [sdzero_record(1)], stage=2)
    rec = {**sdzero_record(1), "note": "kept"}
    _, report = build(tiny_tokenizer, [rec], extra_fields="ignore")
    assert report.num_examples == 1


def test_load_records_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{not json}\n{"prompt": "c", "completion": "d"}\n')
    with pytest.raises(DataFileError, match=r"bad.jsonl:2"):
        load_records(bad)
    with pytest.raises(DataFileError, match="not found"):
        load_records(tmp_path / "missing.jsonl")
    lst = tmp_path / "x.json"
    lst.write_text(json.dumps({"prompt": "a"}))
    with pytest.raises(DataFileError, match="expected a JSON list"):
        load_records(lst)
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "completion": "b"}])
    assert load_records(good) == [(f"{good}:1", {"prompt": "a", "completion": "b"})]


# ----------------------------------------------------------------------------------------------
# sampler


def all_steps(lengths, epoch_steps, **kw):
    return [build_step_batches(lengths, s, **kw) for s in range(epoch_steps)]


@pytest.mark.parametrize(("world", "micro", "accum"), [(1, 1, 1), (2, 1, 2), (3, 2, 1), (2, 3, 2)])
def test_sampler_covers_every_example_once_per_epoch(world, micro, accum):
    lengths = [(i * 37) % 101 + 1 for i in range(23)]
    global_batch = world * micro * accum
    steps = -(-len(lengths) // global_batch)
    for epoch in range(2):
        seen = []
        for s in range(epoch * steps, (epoch + 1) * steps):
            batches = build_step_batches(
                lengths, s, seed=3, world_size=world, micro_batch_size=micro, grad_accum=accum
            )
            assert len(batches) == world and all(len(r) == accum for r in batches)
            seen += [i for rank in batches for mb in rank for i in mb]
        assert sorted(seen) == list(range(len(lengths)))


def test_sampler_deterministic_resumable_and_split_invariant():
    lengths = list(range(1, 40))
    kw = dict(seed=5, micro_batch_size=1, batching="length_grouped")
    a = build_step_batches(lengths, 7, world_size=2, grad_accum=1, **kw)
    assert a == build_step_batches(lengths, 7, world_size=2, grad_accum=1, **kw)  # resume = recompute step 7
    b = build_step_batches(lengths, 7, world_size=1, grad_accum=2, **kw)
    assert sorted(i for r in a for m in r for i in m) == sorted(i for r in b for m in r for i in m)
    other_epoch = build_step_batches(lengths, 7 + 20, world_size=2, grad_accum=1, **kw)
    assert other_epoch != a  # a new shuffle each epoch
    assert build_step_batches(lengths, 7, world_size=2, grad_accum=1, **{**kw, "seed": 6}) != a


def test_length_grouping_reduces_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 1000) for _ in range(400)]

    def padding(batching):
        waste = 0
        for s in range(100):
            for rank in build_step_batches(
                lengths, s, seed=0, world_size=2, micro_batch_size=2, grad_accum=1, batching=batching
            ):
                for mb in rank:
                    waste += sum(max(lengths[i] for i in mb) - lengths[i] for i in mb)
        return waste

    assert padding("length_grouped") < 0.1 * padding("none")
    order = build_epoch_order(lengths, 0, 0, 4, "length_grouped", mega_batches=10)
    assert sorted(order) == list(range(400))
    batch = [lengths[i] for i in order[:4]]
    assert batch == sorted(batch, reverse=True)


PROBE = """
import importlib, sys
blocked = sys.argv[1].split(",")
class Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
for module in sys.argv[2:]:
    importlib.import_module(module)
"""


@pytest.mark.parametrize(
    ("blocked", "modules"),
    [
        # core: no vllm, ray, FSDP or DCP (`import torch` itself loads torch.distributed in torch 2.13)
        (
            "vllm,ray,torch.distributed.fsdp,torch.distributed.checkpoint",
            ["self_revision_training.sft_data", "self_revision_training.sft_loss"],
        ),
        # the SFT entry point must run on a GPU box with only torch + transformers (scripts/bench_sft.py)
        (
            "vllm,ray,datasets,math_verify",
            ["self_revision_training.sft", "self_revision_training.shared.checkpoints"],
        ),
    ],
)
def test_import_boundaries(blocked, modules):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", PROBE, blocked, *modules], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("stage", [1, 2])
def test_prepare_data_records_are_accepted(tiny_tokenizer, stage):
    """The contract with Phase 1's prepare_data: its Stage-1/2 records tokenise without errors."""
    from self_revision_training import stage_split

    base = sdzero_record(1)
    tuple_ = {k: base[k] for k in ("x", "y_init", "p_r", "y_revised", "y_init_correct")}
    tuple_ |= {"original_index": 3, "response_idx": 0, "revision_idx": 1}
    fmt = stage_split.format_stage1 if stage == 1 else stage_split.format_stage2
    (ex,), report = build(tiny_tokenizer, [fmt(tuple_)], stage=stage)
    assert report.num_examples == 1 and tiny_tokenizer.decode(ex.input_ids).endswith(
        base["y_revised"] + "<|im_end|>"
    )


# ---------------------------------------------------------------- the token ids Phase 1 sampled

SAMPLED_INIT = "We get 3 + 4 = 8.\n\nSo the answer is \\boxed{8}."
SAMPLED_REV = "First 3 + 4 = 7.\n\nTherefore the answer is \\boxed{7}."


def sampled_pair(tok, text: str) -> list[int]:
    """Ids as a model samples them: "." and "\\n\\n" as two tokens (re-encoding the text merges them)."""
    head, tail = text.split("\n\n", 1)
    return encode(tok, head) + encode(tok, "\n\n" + tail)


def encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize(("stage", "layout"), [(1, "continuation"), (2, "continuation"), (2, "user_turn")])
def test_sft_trains_on_the_sampled_ids_not_on_re_encoded_text(qwen_tokenizer, stage, layout):
    tok = qwen_tokenizer
    period, newlines, merged = (tok.convert_tokens_to_ids(t) for t in (".", "ĊĊ", ".ĊĊ"))
    init_ids, rev_ids = sampled_pair(tok, SAMPLED_INIT), sampled_pair(tok, SAMPLED_REV)
    assert encode(tok, SAMPLED_INIT) != init_ids and merged in encode(tok, SAMPLED_INIT)  # the BPE merge
    assert tok.decode(init_ids) == SAMPLED_INIT
    base = sdzero_record(stage, correct=False) | {"y_init": SAMPLED_INIT, "y_revised": SAMPLED_REV}
    texts = build_revision_stage_texts(base["x"], SAMPLED_INIT, base["p_r"], SAMPLED_REV, "\n\n")[stage]
    base |= {"prompt": texts[0], "completion": texts[1]}
    with_ids = base | {"y_init_ids": init_ids, "y_revised_ids": rev_ids}
    (ex, plain), report = build(tok, [with_ids, base], stage=stage, stage2_layout=layout)
    trained = [t for t in ex.labels if t != IGNORE_INDEX]
    assert contains(trained, rev_ids + compute_end_of_turn_ids(tok, CFG))  # y_revised as sampled, then EOT
    if layout == "continuation":
        assert contains(ex.input_ids, init_ids)  # the sampled "." + "\n\n" pair survives into the example
        assert tok.decode(ex.input_ids) == tok.decode(plain.input_ids)  # same text, other tokens
    assert contains(trained, [period, newlines])  # trained on "." then "\n\n", as sampled
    reencoded = encode(tok, SAMPLED_REV)  # without ids: the text re-encoded, "." + "\n\n" merged
    assert not contains(trained, reencoded) and contains(plain.labels, reencoded)
    segments = 2 if layout == "continuation" else 1
    assert (report.num_sampled_ids, report.num_ids_reencoded) == (segments, 0)


def test_prompt_completion_layout_uses_completion_ids(qwen_tokenizer):
    tok = qwen_tokenizer
    ids = sampled_pair(tok, SAMPLED_REV)
    rec = {"prompt": "What is 3 + 4?", "completion": SAMPLED_REV, "completion_ids": ids}
    (ex,), report = build(tok, [rec], layout="prompt_completion")
    assert [t for t in ex.labels if t != IGNORE_INDEX] == ids + compute_end_of_turn_ids(tok, CFG)
    assert report.num_sampled_ids == 1


def test_ids_that_do_not_decode_to_the_text_are_re_encoded_and_counted(qwen_tokenizer):
    tok = qwen_tokenizer
    rec = sdzero_record(1) | {"y_init_ids": encode(tok, "something else"), "y_revised_ids": [10**9]}
    (ex,), report = build(tok, [rec])
    (plain,), _ = build(tok, [sdzero_record(1)])
    assert ex.input_ids == plain.input_ids and (report.num_sampled_ids, report.num_ids_reencoded) == (0, 2)
    assert "re-encoded (ids did not match the text) 2" in report.summary()
    with pytest.raises(DataFileError, match="f.jsonl:1: field 'y_init_ids' must be a list of token ids"):
        build(tok, [sdzero_record(1) | {"y_init_ids": "1 2 3"}])
