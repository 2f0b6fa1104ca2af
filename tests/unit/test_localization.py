"""Self-localization statistics on hand-made token records (known concentration, peak, answer share,
departure), the dump's round trip and caps, the rollout sampler, and the dumped KLs of a real tiny-model
forward reproducing the learner's loss (top-k and full vocabulary, float64)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from self_distillation.localization import (
    compute_localization_metrics,
    compute_localization_stats,
    final_answer_tokens,
    find_departure,
    find_final_answer_span,
)
from self_distillation.losses import Divergence, compute_sparse_token_divergence, distillation_loss
from self_distillation.token_dump import (
    DumpLimits,
    DumpRecord,
    TokenFields,
    build_dump_record,
    compute_token_fields,
    decode_pieces,
    dump_path,
    load_dump,
    save_dump,
    score_dump_samples,
    select_dump_indices,
)


def fields_of(kl: list[float]) -> TokenFields:
    n = len(kl)
    return TokenFields(
        kl=list(kl),
        student_logprob=[-1.0] * n,
        teacher_logprob=[-0.5] * n,
        student_top_ids=[[1, 2]] * n,
        student_top_probs=[[0.6, 0.4]] * n,
        teacher_top_ids=[[2, 1]] * n,
        teacher_top_probs=[[0.7, 0.3]] * n,
    )


def record(kl, pieces=None, reward=0, **kw) -> DumpRecord:
    pieces = pieces or [f"t{i} " for i in range(len(kl))]
    return DumpRecord(
        step=kw.pop("step", 3),
        problem_index=kw.pop("problem_index", 0),
        reward=reward,
        teacher_context="self_revision",
        teacher_context_text="ctx",
        token_ids=list(range(len(kl))),
        token_strings=pieces,
        fields=fields_of(kl),
        strings={1: "a", 2: "b"},
        num_tokens=kw.pop("num_tokens", len(kl)),
        **kw,
    )


def gini_brute(x):
    n, mean = len(x), sum(x) / len(x)
    return sum(abs(a - b) for a in x for b in x) / (2 * n * n * mean)


def test_concentration_of_a_single_spike_and_of_a_uniform_kl():
    spike = compute_localization_stats([record([0.0] * 19 + [10.0])])["r0"]
    assert spike["top5_share"] == 1.0 and spike["top10_share"] == 1.0
    assert spike["gini"] == pytest.approx(19 / 20)
    flat = compute_localization_stats([record([2.0] * 20, reward=1)])["r1"]
    assert flat["top5_share"] == pytest.approx(1 / 20) and flat["top10_share"] == pytest.approx(2 / 20)
    assert flat["gini"] == pytest.approx(0.0, abs=1e-12)


def test_concentration_of_a_ramp_matches_brute_force():
    kl = [float(i) for i in range(1, 11)]  # 10 tokens: top 5% = ceil(0.5) = 1 token, top 10% = 1 token
    stats = compute_localization_stats([record(kl)])["r0"]
    assert stats["top5_share"] == pytest.approx(10 / 55)
    assert stats["top10_share"] == pytest.approx(10 / 55)
    assert stats["gini"] == pytest.approx(gini_brute(kl))
    kl40 = [float(i % 7) for i in range(40)]  # top 10% = 4 tokens
    got = compute_localization_stats([record(kl40)])["r0"]
    assert got["top10_share"] == pytest.approx(sum(sorted(kl40)[-4:]) / sum(kl40))
    assert got["gini"] == pytest.approx(gini_brute(kl40))


def test_stats_average_per_sample_and_split_by_reward():
    records = [record([0.0] * 9 + [1.0]), record([1.0] * 10), record([1.0] * 10, reward=1)]
    stats = compute_localization_stats(records)
    assert stats["r0"]["num_samples"] == 2 and stats["r1"]["num_samples"] == 1
    assert stats["r0"]["top5_share"] == pytest.approx((1.0 + 0.1) / 2)  # mean of the per-sample shares
    assert stats["r0"]["num_tokens"] == 20


def test_known_peak_and_position_profile():
    kl = [0.1] * 10
    kl[7] = 5.0
    stats = compute_localization_stats([record(kl)])["r0"]
    assert stats["peak_rel_position"] == pytest.approx(0.7)
    assert stats["position"][7] == pytest.approx(5.0)
    assert stats["position"][0] == pytest.approx(0.1)
    # 20 tokens in 10 bins: two tokens per bin, the bin's mean
    kl20 = [float(i) for i in range(20)]
    profile = compute_localization_stats([record(kl20)])["r0"]["position"]
    assert profile == pytest.approx([(2 * b + 2 * b + 1) / 2 for b in range(10)])
    # a capped sample (kept 5 of 20 tokens) fills only the first bins of its full length
    capped = compute_localization_stats([record([1.0] * 5, num_tokens=20)])["r0"]["position"]
    assert capped[:3] == [1.0, 1.0, 1.0] and capped[3:] == [None] * 7


def test_a_tie_takes_the_first_peak_and_an_all_zero_sample_has_no_concentration():
    stats = compute_localization_stats([record([0.0, 3.0, 3.0, 0.0])])["r0"]
    assert stats["peak_rel_position"] == pytest.approx(0.25)
    zero = compute_localization_stats([record([0.0] * 5)])["r0"]
    assert math.isnan(zero["top5_share"]) and math.isnan(zero["gini"])


BOXED_PIECES = ["So", " the", " answer", " is", " $\\", "boxed", "{", "4", "2", "}$", "."]


def test_final_answer_span_and_tokens():
    text = "".join(BOXED_PIECES)
    start, end = find_final_answer_span(text)
    assert text[start:end] == "\\boxed{42}"
    assert final_answer_tokens(BOXED_PIECES) == [
        4,
        5,
        6,
        7,
        8,
        9,
    ]  # " $\\" holds the backslash, "}$" the brace
    assert find_final_answer_span("\\boxed{1} then \\boxed{a{b}c} end") == (15, 28)
    assert find_final_answer_span("no box here, \\boxed{} empty") is None
    text5 = "thus \\boxed 5."
    s, e = find_final_answer_span(text5)
    assert text5[s:e] == "\\boxed 5"
    assert final_answer_tokens(["no", " answer"]) is None


def test_known_answer_token_share():
    kl = [0.0] * 11
    for i in (4, 5, 6, 7, 8, 9):
        kl[i] = 1.0
    kl[0] = 2.0  # total 8, answer 6
    stats = compute_localization_stats([record(kl, BOXED_PIECES)])["r0"]
    assert stats["answer_kl_share"] == pytest.approx(6 / 8)
    assert stats["answer_token_share"] == pytest.approx(6 / 11)
    assert stats["answer_kl_mean"] == pytest.approx(1.0)
    assert stats["rest_kl_mean"] == pytest.approx(2 / 5)
    assert stats["answer_span_found"] == 1
    assert math.isnan(compute_localization_stats([record(kl)])["r0"]["answer_kl_share"])  # no box


def test_zero_length_pieces_go_with_the_token_that_completes_the_character():
    pieces = ["a", "", "é", "\\boxed{", "1", "}"]
    assert final_answer_tokens(pieces) == [3, 4, 5]
    assert final_answer_tokens(["x", "", "\\boxed{1}"]) == [1, 2]


def test_departure_rule_and_peak_distance():
    problem = "Tom has 3 apples and buys 4 more. How many?"
    reference = "He has 3 + 4 = 7 apples. #### 7"
    assert find_departure("1. Tom has 3 apples, 3 + 4 = 7.", problem, reference, "7") is None  # "1." marker
    response = "1. Tom has 3 apples, 3 + 4 = 8, so \\boxed{8}"
    pos = find_departure(response, problem, reference, "7")
    assert response[pos] == "8" and pos == response.index("8")
    assert find_departure("we get 1,000 or 0.50", "1000 and .5", "") is None  # commas, trailing zeros
    pieces = [c for c in response]  # one token per character
    kl = [0.0] * len(pieces)
    kl[pos + 2] = 4.0  # the peak two tokens after the departure
    rec = record(kl, pieces, problem=problem, reference_solution=reference, reference_answer="7")
    stats = compute_localization_stats([rec])["r0"]
    assert stats["departure_found"] == 1.0
    assert stats["peak_departure_distance"] == 2 and stats["peak_departure_abs"] == 2
    no_ref = compute_localization_stats([record(kl, pieces)])["r0"]
    assert math.isnan(no_ref["departure_found"])


def test_metric_keys_are_flat_and_nan_where_undefined():
    metrics = compute_localization_metrics([record([0.0] * 19 + [10.0])])
    assert metrics["localization/r0/top5_share"] == 1.0
    assert metrics["localization/r0/num_samples"] == 1.0
    assert math.isnan(metrics["localization/r1/top5_share"]) and metrics["localization/r1/num_samples"] == 0.0
    assert (
        "localization/r0/position_b9" in metrics and metrics["localization/r0/position_b9"] == 5.0
    )  # tokens 18, 19
    assert all(isinstance(v, float) for v in metrics.values())


def test_select_dump_indices_is_seeded_capped_per_reward_and_sorted():
    rewards = [True, False] * 10 + [True] * 5
    chosen = select_dump_indices(rewards, 3, step=10)
    assert chosen == sorted(chosen) and len(chosen) == 6
    assert sum(rewards[i] for i in chosen) == 3
    assert chosen == select_dump_indices(rewards, 3, step=10)
    assert any(select_dump_indices(rewards, 3, step=s) != chosen for s in range(11, 20))
    assert select_dump_indices([False, False], 5, step=1) == [0, 1]
    assert select_dump_indices([], 5, step=1) == []


def test_dump_round_trip_is_exact_for_kl_capped_and_atomic(tmp_path):
    kl = [0.1234567890123, 1e-9, 2.5]
    records = [record(kl, ["a", "b", "c"], problem_index=i, reward=i % 2) for i in range(5)]
    path = save_dump(
        dump_path(tmp_path, 10), 10, records, DumpLimits(max_samples=3), {"teacher_context": "x"}
    )
    assert path == tmp_path / "dumps" / "step_000010.jsonl.gz"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    header, back = load_dump(path)
    assert header["num_samples"] == 3 and header["samples_dropped"] == 2 and header["teacher_context"] == "x"
    assert [r.problem_index for r in back] == [0, 1, 2]
    assert back[0].fields.kl == kl and back[0].strings == {1: "a", 2: "b"}
    assert back[1].reward == 1 and back[0].token_strings == ["a", "b", "c"]


def test_build_dump_record_caps_tokens_and_context(tiny_tokenizer):
    def decode(ids):
        return tiny_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    ids = tiny_tokenizer("the answer is \\boxed{42}")["input_ids"]
    fields = fields_of([0.5] * len(ids))
    rec = build_dump_record(
        fields,
        decode,
        step=1,
        problem_index=7,
        reward=True,
        teacher_context="self_revision",
        token_ids=ids,
        teacher_prefix_ids=tiny_tokenizer("x " * 50)["input_ids"],
        limits=DumpLimits(max_tokens_per_sample=3, max_context_chars=20),
    )
    assert len(rec.token_ids) == 3 and rec.num_tokens == len(ids) and len(rec.fields.kl) == 3
    assert "elided" in rec.teacher_context_text and rec.reward == 1
    assert rec.strings == {1: decode([1]), 2: decode([2])}
    with pytest.raises(ValueError, match="token fields"):
        build_dump_record(fields_of([0.1]), decode, step=1, problem_index=0, reward=0,
                          teacher_context="c", token_ids=ids, teacher_prefix_ids=[1])  # fmt: skip


def test_decode_pieces_join_to_the_decoded_text(tiny_tokenizer):
    def decode(ids):
        return tiny_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    text = "Let me rephrase: 12 + 5 = \\boxed{17} ✓ é<|im_end|>"
    ids = tiny_tokenizer(text)["input_ids"]
    pieces = decode_pieces(decode, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == decode(ids) == text
    assert "" in pieces  # the multi-byte characters are split across byte tokens
    assert final_answer_tokens(pieces) is not None


# -- the pure function against the learner's divergence


def _random_case(n=6, V=40, k=8, seed=0, temperature=0.8):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (n,), generator=g)
    scaled = (teacher / temperature).log_softmax(-1)
    values, ids = scaled.topk(k, dim=-1)
    raw_lp = teacher.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return student, teacher, targets, {"ids": ids.int(), "logprobs": values, "target_logprobs": raw_lp}


@pytest.mark.parametrize("kl_type", ["reverse", "mixed", "jsd"])
def test_token_fields_top_k_use_the_sparse_divergence(kl_type):
    div = Divergence(kl_type, top_k=8, temperature=0.8)
    student, teacher, targets, sent = _random_case()
    fields = compute_token_fields(student, sent, targets, div)
    expected = compute_sparse_token_divergence(student, sent["logprobs"], sent["ids"], div).values
    assert fields.kl == expected.tolist()
    dense, _ = distillation_loss(student[None], teacher[None], torch.ones(1, 6, dtype=torch.float64), div)
    assert sum(fields.kl) / 6 == pytest.approx(float(dense), rel=1e-12)
    assert fields.teacher_top_ids == sent["ids"][:, :5].tolist()
    assert fields.teacher_top_probs[0] == pytest.approx(sent["logprobs"][0, :5].exp().tolist())
    s_scaled = (student / 0.8).log_softmax(-1)
    assert fields.student_top_probs[0] == pytest.approx(s_scaled[0].topk(5).values.exp().tolist())
    raw = student.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert fields.student_logprob == pytest.approx(raw.tolist())
    assert fields.teacher_logprob == pytest.approx(sent["target_logprobs"].tolist())


def test_token_fields_full_vocabulary_from_logits_or_hidden_rows():
    div = Divergence("mixed", top_k=None, temperature=0.8)
    student, teacher, targets, _ = _random_case()
    from_logits = compute_token_fields(student, {"ids": None, "logits": teacher}, targets, div)
    dense, _ = distillation_loss(student[None], teacher[None], torch.ones(1, 6, dtype=torch.float64), div)
    assert sum(from_logits.kl) / 6 == pytest.approx(float(dense), rel=1e-12)
    assert from_logits.teacher_logprob == pytest.approx(
        teacher.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1).tolist()
    )
    g = torch.Generator().manual_seed(3)
    hidden, weight = (
        torch.randn(6, 5, generator=g, dtype=torch.float64),
        torch.randn(40, 5, generator=g, dtype=torch.float64),
    )
    from_rows = compute_token_fields(
        student, {"ids": None, "hidden": hidden}, targets, div, teacher_weight=weight
    )
    reference = compute_token_fields(student, {"ids": None, "logits": hidden @ weight.T}, targets, div)
    assert from_rows.kl == reference.kl
    with pytest.raises(ValueError, match="teacher_weight"):
        compute_token_fields(student, {"ids": None, "hidden": hidden}, targets, div)


# -- a real forward: the dumped KLs reproduce the objective's loss

SEQUENCES = [  # (ids, target mask): unequal lengths, so the batch is padded
    ([3, 4, 5, 6, 7, 8, 9, 40, 41], [0, 0, 0, 1, 1, 1, 1, 1, 1]),
    ([10, 11, 12], [0, 1, 1]),
    ([13, 14, 15, 16, 17], [0, 0, 1, 1, 1]),
]


@pytest.mark.parametrize("top_k", [16, None])
def test_dumped_kls_average_to_the_learner_loss(tiny_model_dir, tiny_tokenizer, tmp_path, top_k):
    from transformers import AutoModelForCausalLM

    from self_distillation.objectives import build_objective
    from self_distillation.rollout_data import LearnerSample
    from self_distillation.teacher import Teacher
    from self_revision_training.shared.config import ModelConfig
    from self_revision_training.shared.target_logits import TargetLogitsLM

    div = Divergence("mixed", top_k=top_k, temperature=0.8)
    teacher = Teacher(ModelConfig(path=str(tiny_model_dir), dtype="float32"), div, device="cpu")
    teacher.model.double()
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    scores = teacher.score(SEQUENCES)
    samples = [
        LearnerSample(ids, m, i % 2 == 0, None, s)
        for i, ((ids, m), s) in enumerate(zip(SEQUENCES, scores, strict=True))
    ]
    weight = teacher.lm_head_weight() if top_k is None else None
    objective = build_objective("distillation", div, student.config.vocab_size)
    if top_k is None:
        objective.set_teacher_lm_head(weight)
    model = TargetLogitsLM(student, chunk_size=4)
    with torch.no_grad():
        loss_sum, values = objective.micro_batch_loss(model, samples, 0, torch.device("cpu"))
    learner_loss = float(loss_sum) / sum(objective.count(samples))

    fields = score_dump_samples(
        TargetLogitsLM(student, chunk_size=3), samples, 0, torch.device("cpu"), div, weight
    )

    def decode(ids):
        return tiny_tokenizer.decode(ids, skip_special_tokens=False)

    records = [
        build_dump_record(
            f,
            decode,
            step=2,
            problem_index=i,
            reward=s.reward,
            teacher_context="self_revision",
            token_ids=[t for t, m in zip(s.student_ids, s.student_mask, strict=True) if m],
            teacher_prefix_ids=s.student_ids[:2],
        )  # fmt: skip
        for i, (f, s) in enumerate(zip(fields, samples, strict=True))
    ]
    _, back = load_dump(save_dump(dump_path(tmp_path, 2), 2, records))
    dumped = [v for r in back for v in r.fields.kl]
    assert len(dumped) == sum(s.num_targets for s in samples)
    assert dumped == pytest.approx(values["divergence"].tolist(), rel=1e-10, abs=1e-14)
    assert math.fsum(dumped) / len(dumped) == pytest.approx(learner_loss, rel=1e-10)
    # the sampled-token log-probs: the student's as the objective's statistics, the teacher's as it sent them
    assert [v for r in back for v in r.fields.student_logprob] == pytest.approx(
        values["logprobs"].tolist(), rel=1e-5
    )
    assert [v for r in back for v in r.fields.teacher_logprob] == pytest.approx(
        torch.cat([s["target_logprobs"] for s in scores]).tolist(), rel=1e-5
    )
    # dense reference: the same tokens through distillation_loss on full logits (the tiny vocabulary fits)
    total = 0.0
    for ids, mask in SEQUENCES:
        with torch.no_grad():
            s_logits = student(torch.tensor([ids])).logits[:, :-1]
            t_logits = teacher.model(torch.tensor([ids])).logits[:, :-1]
        loss, metrics = distillation_loss(s_logits, t_logits, torch.tensor([mask[1:]]).double(), div)
        total += float(loss) * metrics["num_tokens"]
    assert math.fsum(dumped) / len(dumped) == pytest.approx(total / len(dumped), rel=1e-9)


def test_concentration_curves_plot_from_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    from self_distillation.report import plot_localization_curves

    lines = [{"step": 1, "train/loss": 1.0}]  # a step without a dump has no localization/* keys
    for step in (2, 4):
        metrics = compute_localization_metrics(
            [record([0.0] * 9 + [float(step)]), record([1.0] * 10, reward=1)]
        )
        lines.append({"step": step, "train/loss": 0.5, **metrics})
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps(line) + "\n" for line in lines)
    )  # NaN here; MetricsLogger writes null: both skipped
    png = plot_localization_curves(path, tmp_path / "plots" / "localization.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path.write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no localization"):
        plot_localization_curves(path, tmp_path / "x.png")
