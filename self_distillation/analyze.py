"""Where does a teacher correct a student? Per-token dumps and the token page for any rollout file, no training.

    python -m self_distillation.analyze student.path=RUN/srt/stage2/final teacher.path=RUN/srt/stage2/final \\
        rollouts=RUN/eval/srt/samples.jsonl dataset.path=DATA/test.jsonl teacher_context=self_revision \\
        loss.kl_type=mixed loss.top_k=64 output_dir=RUN/analysis/srt
    python -m self_distillation.analyze --config FILE.yaml ...   # a YAML of AnalyzeConfig's keys (below);
        # its student/teacher/prompt/loss/teacher_context/max_teacher_tokens sections mean what they mean
        # in a Phase-2 config, so they can be copied from a run's config.yaml

The same records Phase 2 dumps (`localization.py`): each rollout y becomes the (student, teacher) pair of
the teacher context (`teacher_context.build_teacher_context`; SD-Zero's default chat(x) + y' + P_r block +
y, P_r from r), the teacher scores it (`teacher.Teacher`: top-k log-probs, or hidden states for the full
vocabulary), and one no-grad student forward computes every per-token field with the learner objective's
own divergence (`localization.score_dump_samples`). CPU (or one GPU) Hugging Face models, no Ray or vLLM.

Rollout rows (JSONL): {problem, answer, solution?, response, correct?, finish_reason?}, or the samples.jsonl
`evaluate` writes ({problem_index, ground_truth, response, correct, finish_reason, ...}: the problem text and
reference solution come from `dataset`, row `problem_index`). r = the row's `correct` when present, else
math-verify against its answer. y = the response text re-encoded (an evaluation's samples.jsonl keeps
text, not token ids) plus the end-of-turn token unless the row's
finish_reason is "length". Outputs in output_dir: config.yaml, dump.jsonl.gz, tokens.html, localization.json.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from self_distillation.config import LossConfig, TeacherContextName
from self_distillation.localization import compute_localization_metrics, compute_localization_stats
from self_distillation.losses import Divergence
from self_distillation.rollout_data import LearnerSample
from self_distillation.teacher_context import GroupSample, build_teacher_context
from self_distillation.token_dump import DumpLimits, build_dump_record, save_dump, score_dump_samples
from self_distillation.token_page import save_token_page
from self_revision_training.shared.config import (
    ConfigError,
    DatasetConfig,
    GradingConfig,
    ModelConfig,
    PromptConfig,
    parse_cli,
    to_dict,
)
from self_revision_training.shared.problems import Problem, load_problems
from self_revision_training.shared.prompts import (
    PROMPT_SPEC_FILE,
    build_generation_prompt,
    check_prompt_spec,
    encode_text,
    load_prompt_spec,
)
from self_revision_training.shared.rewards import Verdict, build_reward_source
from self_revision_training.shared.run_config import save_run_config
from self_revision_training.shared.storage import DataFileError, atomic_write_json, iter_jsonl

log = logging.getLogger("sdzero.analyze")

DUMP_FILE, PAGE_FILE, STATS_FILE = "dump.jsonl.gz", "tokens.html", "localization.json"


@dataclass
class AnalyzeConfig:
    student: ModelConfig = field(default_factory=ModelConfig)  # the model whose distributions are compared
    teacher: ModelConfig = field(default_factory=ModelConfig)  # the teacher (e.g. the SRT checkpoint)
    prompt: PromptConfig = field(default_factory=PromptConfig)  # when prompt_source=config
    prompt_source: Literal["auto", "config"] = "auto"  # auto: teacher dir's sdzero_prompt.json, else prompt.*
    teacher_context: TeacherContextName = "self_revision"  # what the teacher reads before y
    loss: LossConfig = field(default_factory=LossConfig)  # the divergence (kl_type, top_k, temperature, ...)
    rollouts: str = ""  # required: the rollout JSONL (module docstring)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)  # problems for rows without `problem`
    grading: GradingConfig = field(default_factory=lambda: GradingConfig(num_workers=1))  # rows without r
    max_samples: int = 64  # rollout rows analysed (the first ones)
    max_tokens_per_sample: int = 8192  # response tokens kept per dumped sample
    max_teacher_tokens: int = 32768  # teacher sequence budget (y is cut in both copies to fit)
    micro_batch_size: int = 4  # sequences per forward
    device: str | None = None  # torch device; None = cuda when available, else cpu
    output_dir: str = ""  # required: config.yaml, dump.jsonl.gz, tokens.html, localization.json
    title: str = ""  # page title; "" = from the paths

    def __post_init__(self) -> None:
        if not self.output_dir or not self.rollouts:
            raise ConfigError("output_dir and rollouts are required")
        if not self.student.path or not self.teacher.path:
            raise ConfigError("student.path and teacher.path are required")
        if self.teacher_context == "none":
            raise ConfigError("teacher_context=none has no teacher to compare with")
        for key in ("max_samples", "max_tokens_per_sample", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")


def resolve_prompt(cfg: AnalyzeConfig, tokenizer: Any) -> PromptConfig:
    """The teacher's recorded prompt (its sdzero_prompt.json) with prompt_source=auto when it has one."""
    if cfg.prompt_source == "auto" and (Path(cfg.teacher.path) / PROMPT_SPEC_FILE).is_file():
        prompt_cfg, spec = load_prompt_spec(cfg.teacher.path)
        check_prompt_spec(spec, tokenizer, prompt_cfg)
        return prompt_cfg
    if cfg.prompt_source == "auto":
        log.info("%s has no %s: using prompt.*", cfg.teacher.path, PROMPT_SPEC_FILE)
    return cfg.prompt


def load_rollouts(cfg: AnalyzeConfig) -> list[tuple[Problem, dict[str, Any]]]:
    """(problem, row) per rollout row, the problem from the row or from `dataset` by problem_index."""
    by_index: dict[int, Problem] = {}
    if cfg.dataset.path:
        by_index = {p.index: p for p in load_problems(cfg.dataset)[0]}
    out = []
    for lineno, row in iter_jsonl(cfg.rollouts):
        if len(out) >= cfg.max_samples:
            break
        where = f"{cfg.rollouts}:{lineno}"
        if not isinstance(row.get("response"), str):
            raise DataFileError(f"{where}: no `response` string")
        index = int(row.get("problem_index", lineno - 1))
        if isinstance(row.get("problem"), str):
            answer = row.get("answer", row.get("ground_truth"))
            solution = row.get("solution") or row.get("reference_solution")
            problem = Problem(index, row["problem"], "" if answer is None else str(answer), solution=solution)
        elif index in by_index:
            problem = by_index[index]
        else:
            raise DataFileError(
                f"{where}: no `problem` text, and problem_index {index} is not in dataset.path"
            )
        out.append((problem, row))
    if not out:
        raise DataFileError(f"{cfg.rollouts}: no rollout rows")
    return out


def grade_rows(cfg: AnalyzeConfig, rows: list[tuple[Problem, dict[str, Any]]]) -> list[Verdict]:
    """r per row: its `correct` field, else math-verify against the problem's answer."""
    verdicts: list[Verdict | None] = [
        Verdict(bool(row["correct"]), None, "from_rollouts") if "correct" in row else None for _, row in rows
    ]
    todo = [i for i, v in enumerate(verdicts) if v is None]
    if todo:
        with build_reward_source("ground_truth", "math", cfg.grading) as reward:
            graded = reward.score([rows[i][0] for i in todo], [[rows[i][1]["response"]] for i in todo])
        for i, row in zip(todo, graded, strict=True):
            verdicts[i] = row[0]
    return verdicts  # type: ignore[return-value]


def eos_token_ids(path: str, tokenizer: Any) -> frozenset[int]:
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        generation = None
    ids = set(generation if isinstance(generation, list) else [generation]) | {tokenizer.eos_token_id}
    return frozenset(i for i in ids if i is not None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_cli(AnalyzeConfig, argv, description=__doc__.splitlines()[0])
    import torch
    from transformers import AutoTokenizer

    from self_distillation.teacher import Teacher
    from self_revision_training.shared.target_logits import TargetLogitsLM
    from self_revision_training.shared.training import load_causal_lm, resolve_dtype

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, out)
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.student.path, trust_remote_code=cfg.student.trust_remote_code
    )
    teacher_tokenizer = AutoTokenizer.from_pretrained(
        cfg.teacher.path, trust_remote_code=cfg.teacher.trust_remote_code
    )
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise SystemExit(
            f"student {cfg.student.path} and teacher {cfg.teacher.path} have different vocabularies"
        )
    prompt_cfg = resolve_prompt(cfg, tokenizer)
    eos = eos_token_ids(cfg.student.path, tokenizer)
    rows = load_rollouts(cfg)
    verdicts = grade_rows(cfg, rows)

    responses = []  # y per row: the same list objects in the groups (contexts find a sample by identity)
    for _, row in rows:
        ids = encode_text(tokenizer, row["response"])
        if row.get("finish_reason") != "length" and (not ids or ids[-1] not in eos):
            ids.append(min(eos) if tokenizer.eos_token_id is None else tokenizer.eos_token_id)
        responses.append(ids)
    groups: dict[int, list[GroupSample]] = {}
    for (problem, row), ids, verdict in zip(rows, responses, verdicts, strict=True):
        groups.setdefault(problem.index, []).append(GroupSample(ids, row["response"], verdict))
    context = build_teacher_context(
        cfg.teacher_context,
        tokenizer,
        prompt_cfg,
        eos_token_ids=eos,
        keep_first_copy_eos=cfg.loss.keep_first_copy_eos,
        max_teacher_tokens=cfg.max_teacher_tokens,
    )
    built, skipped = [], {}
    for j, ((problem, row), ids, verdict) in enumerate(zip(rows, responses, verdicts, strict=True)):
        prompt_ids = build_generation_prompt(tokenizer, problem.problem, prompt_cfg).ids
        result = context.build(problem, prompt_ids, ids, verdict, groups[problem.index])
        if result.pair is None:
            skipped[result.skip_reason or "unknown"] = skipped.get(result.skip_reason or "unknown", 0) + 1
            continue
        built.append((j, problem, row, verdict, result.pair))
    if not built:
        raise SystemExit(f"no rollout could be paired with teacher context {cfg.teacher_context}: {skipped}")

    div = Divergence.from_config(cfg.loss)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = Teacher(cfg.teacher, div, device=str(device), micro_batch_size=cfg.micro_batch_size)
    scores = teacher.score([(p.teacher.input_ids, p.teacher.target_mask) for *_, p in built])
    teacher_weight = teacher.lm_head_weight() if div.top_k is None else None
    del teacher
    auto = torch.float32 if device.type == "cpu" else torch.bfloat16
    student = load_causal_lm(cfg.student, resolve_dtype(cfg.student.dtype, auto)).to(device).eval()
    model = TargetLogitsLM(student, cfg.loss.chunk_size)
    samples = [
        LearnerSample(p.student.input_ids, p.student.target_mask, v.correct, None, s)
        for (_, _, _, v, p), s in zip(built, scores, strict=True)
    ]
    fields = []
    for start in range(0, len(samples), cfg.micro_batch_size):
        part = samples[start : start + cfg.micro_batch_size]
        fields += score_dump_samples(model, part, tokenizer.pad_token_id or 0, device, div, teacher_weight)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    limits = DumpLimits(max_samples=len(built), max_tokens_per_sample=cfg.max_tokens_per_sample)
    records = []
    for (j, problem, row, verdict, pair), f in zip(built, fields, strict=True):
        first_target = pair.teacher.target_mask.index(1)
        records.append(
            build_dump_record(
                f,
                decode,
                step=0,
                problem_index=problem.index,
                reward=verdict.correct,
                teacher_context=cfg.teacher_context,
                token_ids=pair.response_ids,
                teacher_prefix_ids=pair.teacher.input_ids[:first_target],
                sample_index=int(row.get("sample_index", j)),
                problem=problem.problem,
                reference_solution=problem.solution,
                reference_answer=problem.answer or None,
                limits=limits,
            )
        )
    meta = {"teacher_context": cfg.teacher_context, "divergence": to_dict(cfg.loss), "skipped": skipped,
            "student": cfg.student.path, "teacher": cfg.teacher.path, "rollouts": cfg.rollouts}  # fmt: skip
    save_dump(out / DUMP_FILE, 0, records, limits, meta)
    stats = compute_localization_stats(records)
    metrics = compute_localization_metrics(records)
    title = (
        cfg.title
        or f"{cfg.teacher_context}: teacher {Path(cfg.teacher.path).name} vs student {Path(cfg.student.path).name}"
    )
    page = save_token_page(
        out / PAGE_FILE, records, stats, title, {k: meta[k] for k in ("teacher_context", "rollouts")}
    )
    summary = {
        "num_rows": len(rows),
        "num_samples": len(records),
        "skipped": skipped,
        "kl_mean": math.fsum(v for r in records for v in r.fields.kl)
        / max(1, sum(len(r.fields.kl) for r in records)),
        "metrics": {k: None if math.isnan(v) else v for k, v in metrics.items()},  # strict JSON
        "files": {"dump": DUMP_FILE, "page": PAGE_FILE},
    }
    atomic_write_json(out / STATS_FILE, summary)
    print(f"[analyze] {len(records)} samples ({skipped or 'none skipped'}); page: {page}", flush=True)
    return summary


if __name__ == "__main__":
    main()
