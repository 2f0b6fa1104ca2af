"""UNDO's data stage: the teacher regenerates a rationale for each training problem from the student's answer,
its score, the previous rationale and the student's validation errors; verified rationales become one-stage
SFT data (UNDO, arXiv 2504.02521; ../shared/reference/related_methods.md section 5).

    python -m self_revision_training.undo_data model.path=TEACHER dataset.path=D/train.jsonl \\
        student_samples=RUN/iter-1/answers/samples.jsonl validation_samples=RUN/iter-0/eval_val/samples.jsonl \\
        validation_data.path=D/val.jsonl previous_rationales=RUN/iter-1/regen/rationales.jsonl iteration=2 \\
        output_dir=RUN/iter-2/regen

One iteration k of the outer loop (`self_distillation.undo` runs it) calls this stage with
    student_samples      the current student's answers on the training problems (an `evaluate` samples.jsonl)
    validation_samples   the current student's validation evaluation; E_k = problems with accuracy <=
                         `error_threshold` over their samples, at most `max_errors`, a seeded choice
    previous_rationales  R_{k-1}: the latest verified rationale per problem (rationales.jsonl of k-1)
The teacher prompt is a template (`teacher_prompt.template`, a config value): `undo` = the public
re-implementation's iteration>=1 tutor prompt (MT121201/undo-iterative-distill:src/prompt/teacher_prompt.py,
quoted verbatim, with the validation examples inserted after its separator line), `undo_iteration0` = its
iteration-0 prompt (R_0 = T(x): system prompt + problem, no student), `self_revision` = SD-Zero's own layout
chat(x) + y_student + "\\n\\n" + P_r + "\\n\\n" with P_r chosen by the student's verdict (the SRT teacher
continues it with a revision), or a literal template. Placeholders ({question} {iteration} {teacher_answer}
{student_answer} {score} {validation_examples}) are filled in one pass by name, never with str.format, so
LaTeX braces and a student answer that happens to contain "{score}" survive as written. Prompts use the
teacher's own tokenizer and chat template. A problem without an earlier verified rationale uses
`teacher_prompt.first_template` (null = `template`).

Only verified rationales are kept (`select_verified`): one sample per problem, graded on the text kept for
SFT; truncated, empty, wrong and unscorable ones are dropped and counted by reason in summary.json.
Durability follows `sample_data`: records are committed per batch to `shard-k-of-N/samples.jsonl` (a
`BatchLog`; a rerun resumes after the last committed batch and refuses changed settings), budget.json per
shard, one writer per shard (run lock). When every shard is done: `sft.jsonl` (prompt_completion layout;
`completion_ids` only when `student_tokenizer` is the teacher's tokenizer), `rationales.jsonl` (R_k: R_{k-1}
updated with this iteration's kept rationales), `errors.jsonl` (E_k) and `summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from self_revision_training.shards import check_shard_resume, shard_dir, shard_finished, write_shard_summary
from self_revision_training.shared.budget import Budget
from self_revision_training.shared.config import (
    BackendConfig,
    ConfigError,
    DatasetConfig,
    GradingConfig,
    ModelConfig,
    PromptConfig,
    SamplingConfig,
    parse_cli,
    to_dict,
)
from self_revision_training.shared.problems import Problem, load_problems
from self_revision_training.shared.prompts import (
    PROMPT_SPEC_FILE,
    check_prompt_spec,
    load_prompt_spec,
    strip_eos,
)
from self_revision_training.shared.run_config import save_run_config
from self_revision_training.shared.run_lock import lock_directory
from self_revision_training.shared.storage import (
    BatchLog,
    atomic_write_json,
    atomic_write_text,
    iter_committed_batches,
    read_jsonl,
)
from self_revision_training.undo_tutor import (
    TeacherPromptSettings,
    build_teacher_request,
    build_validation_examples,
    extract_rationale,
    load_student_answers,
    merge_rationales,
    needs_student,
    same_tokenizer,
    select_errors,
    select_verified,
    shows_examples,
    template_for,
)

log = logging.getLogger("sdzero.undo_data")

SAMPLES_FILE = "samples.jsonl"
SFT_FILE = "sft.jsonl"
RATIONALES_FILE = "rationales.jsonl"
ERRORS_FILE = "errors.jsonl"
SUMMARY_FILE = "summary.json"

# ----------------------------------------------------------------------------------------------
# the stage


@dataclass
class UndoDataConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the teacher (any HF model; own tokenizer)
    backend: BackendConfig = field(default_factory=BackendConfig)
    prompt: PromptConfig = field(
        default_factory=PromptConfig
    )  # the teacher's chat prompt (self_revision: x, P_r)
    prompt_source: Literal["auto", "config"] = (
        "auto"  # auto: the teacher dir's sdzero_prompt.json when present, else prompt.*
    )
    teacher_prompt: TeacherPromptSettings = field(default_factory=TeacherPromptSettings)
    sampling: SamplingConfig = field(  # the re-implementation's teacher: greedy, 512 new tokens
        default_factory=lambda: SamplingConfig(temperature=0.0, max_tokens=512)
    )
    grading: GradingConfig = field(default_factory=GradingConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)  # the training problems D
    student_samples: str = (
        ""  # the student's evaluate samples.jsonl on `dataset`; "" = none (undo_iteration0 only)
    )
    validation_samples: str = ""  # the student's evaluate samples.jsonl on validation_data; "" = no examples
    validation_data: DatasetConfig = field(default_factory=DatasetConfig)  # V (path "" = none)
    previous_rationales: str = ""  # rationales.jsonl of iteration k-1; "" = none (iteration 1)
    iteration: int = 1  # k (recorded in rationales.jsonl; {iteration} of the next prompt)
    error_threshold: float = 0.0  # a validation problem is an error at accuracy <= this
    max_errors: int = 4  # validation errors shown in every tutor prompt (seeded choice); 0 = none
    error_seed: int = 0
    student_tokenizer: str = (
        ""  # the student's model dir: completion_ids kept when it tokenizes as the teacher
    )
    batch_size: int = 64  # problems per committed batch
    num_shards: int = 1
    shard_index: int = 0
    output_dir: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("output_dir", "model.path", "dataset.path"):
            obj, _, key = name.rpartition(".")
            if not getattr(getattr(self, obj) if obj else self, key):
                raise ValueError(f"{name} is required")
        if self.sampling.n != 1:
            raise ValueError("sampling.n must be 1: one rationale per problem")
        if self.validation_samples and not self.validation_data.path:
            raise ValueError("validation_samples needs validation_data.path (the problems' text)")
        needed = {template_for(self.teacher_prompt, None), self.teacher_prompt.template}
        if any(needs_student(t) for t in needed) and not self.student_samples:
            raise ValueError(
                f"teacher_prompt templates {sorted(needed)} show the student's answer: set student_samples"
            )
        if self.iteration < 1 or self.batch_size < 1 or self.num_shards < 1 or self.max_errors < 0:
            raise ValueError("iteration, batch_size, num_shards must be >= 1 and max_errors >= 0")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}")


RESUME_ALLOWED = tuple(
    "dataset.on_bad_row batch_size output_dir progress grading.num_workers backend.name "
    "backend.gpu_memory_utilization backend.kv_cache_gb backend.tensor_parallel_size "
    "backend.distributed_executor_backend backend.enforce_eager backend.enable_prefix_caching "
    "backend.hf_batch_size backend.device".split()
)


def check_resume(cfg: UndoDataConfig, out: Path) -> None:
    check_shard_resume(cfg, out, SAMPLES_FILE, RESUME_ALLOWED, "rationales")


def load_inputs(cfg: UndoDataConfig) -> dict[str, Any]:
    """Student answers, R_{k-1} and E_k, read from the files the config names."""
    answers = load_student_answers(read_jsonl(cfg.student_samples)) if cfg.student_samples else {}
    previous = {}
    if cfg.previous_rationales:
        previous = {int(r["original_index"]): r for r in read_jsonl(cfg.previous_rationales)}
    errors = []
    if cfg.validation_samples and cfg.max_errors:
        val, _ = load_problems(cfg.validation_data)
        errors = select_errors(
            read_jsonl(cfg.validation_samples),
            {p.index: p.problem for p in val},
            cfg.error_threshold,
            cfg.max_errors,
            cfg.error_seed,
        )
    examples = build_validation_examples(errors, cfg.teacher_prompt.example_template)
    return {"answers": answers, "previous": previous, "errors": errors, "examples": examples}


def regenerate_batch(cfg, batch_no, problems, inputs, backend, tokenizer, prompt_cfg, reward, ids_ok):
    """Ask the teacher once per problem of the batch and grade the kept text -> records, tokens generated,
    and the problems skipped ({reason: [index]}: prompt_too_long, no_student_answer)."""
    prompts, limits, fitting, requests = [], [], [], []
    skipped: dict[str, list[int]] = {"prompt_too_long": [], "no_student_answer": []}
    for problem in problems:
        student = inputs["answers"].get(problem.index)
        previous = inputs["previous"].get(problem.index)
        if needs_student(template_for(cfg.teacher_prompt, previous)) and student is None:
            skipped["no_student_answer"].append(problem.index)
            continue
        request, name = build_teacher_request(
            tokenizer, problem.problem, student, previous, inputs["examples"], cfg.teacher_prompt, prompt_cfg
        )
        limit = min(cfg.sampling.max_tokens, backend.max_model_len - len(request.ids))
        if limit < 1:
            skipped["prompt_too_long"].append(problem.index)
            continue
        prompts.append(request.ids)
        limits.append(limit)
        fitting.append(problem)
        requests.append((request, name, student, previous))
    rows = backend.generate(prompts, cfg.sampling, max_tokens=limits) if prompts else []
    kept_texts = [extract_rationale(row[0].text, cfg.teacher_prompt.strip_answer_header) for row in rows]
    verdicts = reward.score(fitting, [[t] for t in kept_texts]) if fitting else []
    records, generated = [], 0
    for problem, row, text, (verdict,), (request, name, student, previous) in zip(
        fitting, rows, kept_texts, verdicts, requests, strict=True
    ):
        sample = row[0]
        generated += len(sample.token_ids)
        records.append(
            {
                "type": "rationale",
                "original_index": problem.index,
                "x": problem.problem,
                "ground_truth": problem.answer,
                "template": name,
                "prompt_text": request.text,
                "student_answer": None if student is None else student.response,
                "student_score": None if student is None else student.score,
                "previous_iteration": None if previous is None else previous["iteration"],
                "text": sample.text,
                "token_ids": strip_eos(sample.token_ids, backend.eos_token_ids),
                "num_tokens": len(sample.token_ids),
                "finish_reason": sample.finish_reason,
                "completion": text,
                "completion_ids_usable": ids_ok and text == sample.text,
                "correct": verdict.correct,
                "reason": verdict.reason,
                "extracted": verdict.extracted,
                "skip": verdict.skip,
                "batch": batch_no,
                "policy_version": backend.policy_version,
            }
        )
    return records, generated, skipped


def to_sft_record(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": rec["x"],
        "completion": rec["completion"],
        "completion_ids": rec["token_ids"] if rec["completion_ids_usable"] else None,
        "original_index": rec["original_index"],
        "response_idx": 0,
        "source": "undo",
    }


def finalize(cfg: UndoDataConfig, inputs: dict[str, Any]) -> dict | None:
    """Once every shard is done: R_k -> sft.jsonl, rationales.jsonl, errors.jsonl, summary.json."""
    root = Path(cfg.output_dir)
    shards = [shard_dir(root, k, cfg.num_shards) for k in range(cfg.num_shards)]
    pending = [s.name for s in shards if not shard_finished(s)]
    if pending:
        log.info("rationales written; sft.jsonl follows when shards %s have finished", pending)
        return None
    records, skipped = [], {}
    for s in shards:
        for marker, batch in iter_committed_batches(s / SAMPLES_FILE, ("rationale",)):
            records += batch
            for reason, indices in marker.get("skipped", {}).items():
                skipped[reason] = skipped.get(reason, 0) + len(indices)
    records.sort(key=lambda r: r["original_index"])
    kept, report = select_verified(records)
    atomic_write_text(
        root / SFT_FILE, "".join(json.dumps(to_sft_record(r), ensure_ascii=False) + "\n" for r in kept)
    )
    merged = merge_rationales(inputs["previous"], kept, cfg.iteration)
    atomic_write_text(
        root / RATIONALES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged)
    )
    atomic_write_text(
        root / ERRORS_FILE, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in inputs["errors"])
    )
    templates: dict[str, int] = {}
    for rec in records:
        templates[rec["template"]] = templates.get(rec["template"], 0) + 1
    scores = [r["student_score"] for r in records if r["student_score"] is not None]
    summary = {
        "iteration": cfg.iteration,
        "teacher": cfg.model.path,
        "problems_asked": len(records),
        "problems_skipped": skipped,
        "teacher_accuracy": sum(r["correct"] for r in records) / len(records) if records else None,
        "student_accuracy": sum(scores) / len(scores) if scores else None,
        "validation_errors_selected": len(inputs["errors"]),  # E_k
        "prompts_with_validation_errors": sum(shows_examples(r["template"]) for r in records),
        "templates": templates,
        "filter": report,
        "rationales_carried": len(merged),
        "files": {"sft": SFT_FILE, "rationales": RATIONALES_FILE, "errors": ERRORS_FILE},
        "config": to_dict(cfg),
    }
    atomic_write_json(root / SUMMARY_FILE, summary)
    log.info(
        "%s: kept %d of %d rationales (dropped %s; wrong by reason %s); %d validation errors in %d prompts",
        root / SFT_FILE, len(kept), len(records), report["dropped"], report["wrong_reasons"], len(inputs["errors"]),
        summary["prompts_with_validation_errors"],
    )  # fmt: skip
    return summary


def resolve_teacher_prompt(cfg: UndoDataConfig, tokenizer: Any) -> PromptConfig:
    """The teacher's prompt config: its model dir's sdzero_prompt.json (auto, when present) or prompt.*."""
    if cfg.prompt_source == "auto" and (Path(cfg.model.path) / PROMPT_SPEC_FILE).is_file():
        prompt_cfg, spec = load_prompt_spec(cfg.model.path)
        if cfg.prompt != PromptConfig() and cfg.prompt != prompt_cfg:
            raise ConfigError(
                f"prompt.* is set but {cfg.model.path}/{PROMPT_SPEC_FILE} differs; set prompt_source=config"
            )
        check_prompt_spec(spec, tokenizer, prompt_cfg)
        return prompt_cfg
    return cfg.prompt


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_cli(UndoDataConfig, argv, description=__doc__.splitlines()[0])
    out = shard_dir(cfg.output_dir, cfg.shard_index, cfg.num_shards)
    with lock_directory(out, "rationale regeneration", "undo_data"):
        check_resume(cfg, out)
        problems, _ = load_problems(cfg.dataset)
        inputs = load_inputs(cfg)
        mine = [p for p in problems if p.index % cfg.num_shards == cfg.shard_index]
        with BatchLog(out / SAMPLES_FILE) as samples:
            _regenerate(cfg, out, samples, mine, inputs)
    return finalize(cfg, inputs)


def _regenerate(
    cfg: UndoDataConfig, out: Path, samples: BatchLog, mine: list[Problem], inputs: dict[str, Any]
) -> None:
    budget, done, batches = Budget(stage="undo_regenerate"), set(), 0
    for marker, records in samples.batches(("rationale",)):
        done.update(marker["indices"])
        budget.add_generation_batch(cfg.dataset.path, marker, len(records))
        batches += 1
    todo = [p for p in mine if p.index not in done]
    if todo:
        from transformers import AutoTokenizer

        from self_revision_training.shared.generation import create_backend
        from self_revision_training.shared.rewards import build_reward_source

        remote = cfg.model.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=remote)
        prompt_cfg = resolve_teacher_prompt(cfg, tokenizer)
        ids_ok = bool(cfg.student_tokenizer) and same_tokenizer(
            tokenizer, AutoTokenizer.from_pretrained(cfg.student_tokenizer, trust_remote_code=remote)
        )
        backend = create_backend(
            cfg.model, dataclasses.replace(cfg.backend, seed=cfg.backend.seed + cfg.shard_index)
        )
        save_run_config(cfg, out)  # the run's identity, once the model has loaded
        try:
            with build_reward_source("ground_truth", cfg.dataset.mode, cfg.grading) as reward:
                for start in range(0, len(todo), cfg.batch_size):
                    batch = todo[start : start + cfg.batch_size]
                    t0 = time.time()
                    records, generated, skipped = regenerate_batch(
                        cfg, batches, batch, inputs, backend, tokenizer, prompt_cfg, reward, ids_ok
                    )
                    marker = samples.commit(
                        records,
                        indices=[p.index for p in batch],
                        prompt_too_long=skipped["prompt_too_long"] + skipped["no_student_answer"],
                        skipped=skipped,
                        generated_tokens=generated,
                        seconds=round(time.time() - t0, 3),
                    )
                    budget.add_generation_batch(cfg.dataset.path, marker, len(records))
                    batches += 1
                    write_shard_summary(out, budget, batches, "running")
                    log.info(
                        "%s: %d rationales, %d tokens", out, budget.samples_generated, budget.tokens_generated
                    )
        finally:
            backend.close()
    write_shard_summary(out, budget, batches, "done")


if __name__ == "__main__":
    main()
