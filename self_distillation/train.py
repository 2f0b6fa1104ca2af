"""SD-Zero Phase 2: on-policy self-distillation from the frozen SRT teacher (paper Sec. 3.2).

    python -m self_distillation.train --config configs/phase2_distill.yaml student.path=BASE \\
        teacher.path=RUN/srt/stage2/final train_data.path=DATA/train.jsonl output_dir=RUN/distill

Each step: NUM_PROMPTS x NUM_GENERATIONS responses y ~ pi_theta(.|x) (rollout worker); r from the reward
source (`reward`); the teacher context (`teacher_context`; SD-Zero: chat(x) + y + "\\n\\n" + P_r + "\\n\\n"
+ y); teacher top-k log-probs on the targets; one learner update with the objective (`objective`; the
masked token-level KL, token mean over the whole step); weights written by learner rank 0 and reloaded by
the rollout engine. Validation avg@k at start / every val_period / end; checkpoints every save_period
(latest keep_last + best by validation accuracy). Rerunning the same command resumes from the newest
checkpoint. Outputs: config.yaml, metrics.jsonl, checkpoints/, weights/, final/.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from self_distillation.actors import ActorFailure, Workers, build_workers
from self_distillation.config import SelfDistillationConfig
from self_distillation.objectives import select_rollouts
from self_distillation.rollout_data import (
    DataPosition,
    LearnerSample,
    RolloutItem,
    build_rollout_items,
    plan_micro_batches,
    take_problem_indices,
)
from self_distillation.step_metrics import StepStats, compute_rollout_metrics
from self_distillation.teacher_context import TeacherContext, build_teacher_context
from self_revision_training.shared import checkpoints
from self_revision_training.shared.budget import Budget
from self_revision_training.shared.config import (
    ConfigError,
    check_resume_config,
    load_yaml,
    parse_cli,
    save_run_config,
    to_dict,
)
from self_revision_training.shared.problems import Problem, load_problems
from self_revision_training.shared.prompts import (
    PROMPT_SPEC_FILE,
    PromptSpecError,
    build_generation_prompt,
    build_prompt_spec,
    check_prompt_spec,
    load_prompt_spec,
)
from self_revision_training.shared.rewards.majority_vote import compute_vote_audit
from self_revision_training.shared.run_lock import RunLockError, acquire_run_lock
from self_revision_training.shared.run_log import MetricsLogger

CONSOLE_METRICS = ("train/kl_r1", "train/kl_r0", "train/clip_fraction", "train/ratio_mean", "train/entropy")
# What a resumed run may change: its length and sample cap (the lr schedule is warm-up then constant and the
# data order depends on the seed and epoch only), logging, checkpoint cadence and retention, Ray placement and
# engine memory. Everything else (data, models, prompts, teacher, reward, objective, loss, sampling, optimiser,
# batch sizes, seed) is the run's identity, and a change is refused with the list of changed keys.
PHASE2_RESUME_ALLOWED = (
    "max_num_steps",
    "max_num_epochs",
    "max_samples",
    "val_period",
    "val_at_end",
    "save_period",
    "keep_last",
    "log_every",
    "wandb*",
    "tensorboard",
    "output_dir",
    "ray.*",
    "backend.gpu_memory_utilization",
    "backend.kv_cache_gb",
    "backend.enforce_eager",
    "grading.num_workers",
    "dump_*",
)


def check_tokenizers(student_dir: str, teacher_dir: str) -> Any:
    """Student and teacher must share the vocabulary (the loss compares distributions id by id)."""
    from transformers import AutoConfig, AutoTokenizer

    student, teacher = AutoTokenizer.from_pretrained(student_dir), AutoTokenizer.from_pretrained(teacher_dir)
    if len(student) != len(teacher) or student.get_vocab() != teacher.get_vocab():
        raise SystemExit(
            f"student {student_dir} and teacher {teacher_dir} have different tokenizers/vocabularies"
        )
    sizes = {AutoConfig.from_pretrained(d).vocab_size for d in (student_dir, teacher_dir)}
    if len(sizes) != 1:
        raise SystemExit(f"student and teacher config vocab_size differ: {sorted(sizes)}")
    return student


def resolve_prompt(cfg: SelfDistillationConfig, tokenizer: Any):
    """The prompt config the teacher was trained with (its sdzero_prompt.json), never a path heuristic;
    the tokenizer's chat template must be the one recorded there (else the student's and the teacher's
    prompts would differ from the ones SFT trained on)."""
    if cfg.prompt_source == "auto":
        if not (Path(cfg.teacher.path) / PROMPT_SPEC_FILE).is_file():
            raise ConfigError(
                f"{cfg.teacher.path} has no {PROMPT_SPEC_FILE}; set prompt_source=config and prompt.*"
            )
        prompt_cfg, spec = load_prompt_spec(cfg.teacher.path)
        try:
            check_prompt_spec(spec, tokenizer, prompt_cfg)
        except PromptSpecError as exc:
            raise ConfigError(
                f"{cfg.teacher.path}/{PROMPT_SPEC_FILE} vs the student's tokenizer: {exc}"
            ) from exc
        return prompt_cfg
    return cfg.prompt


class PromptCache:
    """Student prompt ids per (split, problem index), built once (teacher prompts: the teacher context)."""

    def __init__(self, tokenizer: Any, prompt_cfg: Any):
        self.tokenizer, self.prompt_cfg = tokenizer, prompt_cfg
        self._student: dict[tuple[str, int], list[int]] = {}

    def student(self, split: str, problem: Problem) -> list[int]:
        key = (split, problem.index)
        if key not in self._student:
            self._student[key] = build_generation_prompt(self.tokenizer, problem.problem, self.prompt_cfg).ids
        return self._student[key]


@dataclass
class RolloutBatch:
    problems: list[Problem]  # the problems that were sampled (a prompt with no room is left out)
    prompts: list[list[int]]  # their student prompt ids
    samples: list[list[tuple[list[int], str, str, list[float] | None]]]  # (ids, text, finish, logprobs)
    verdicts: list[list[Any]]  # per problem, per sample
    policy_version: int
    no_room: int  # prompts that leave no room to generate under max_total_sequence_length


def sample_and_grade(
    workers: Workers,
    cfg: SelfDistillationConfig,
    prompts: PromptCache,
    split: str,
    problems: list[Problem],
    n: int,
    call_key: int,
    context: str,
    timing: dict[str, float],
) -> RolloutBatch:
    """n samples per problem from the rollout engine, scored by the reward source (times into `timing`)."""
    ids = [prompts.student(split, p) for p in problems]
    budgets = [cfg.max_total_sequence_length - len(p) for p in ids]
    keep = [j for j, b in enumerate(budgets) if b >= 1]
    sampling = dataclasses.replace(cfg.sampling, n=n)
    limits = [min(cfg.sampling.max_tokens, budgets[j]) for j in keep]
    t0 = time.perf_counter()
    rows, version = workers.rollout.generate([ids[j] for j in keep], sampling, limits, call_key, context)
    timing["rollout"] = time.perf_counter() - t0
    kept = [problems[j] for j in keep]
    t0 = time.perf_counter()
    verdicts = workers.reward.call("score", kept, [[s[1] for s in row] for row in rows], context=context)
    timing["grading"] = time.perf_counter() - t0
    return RolloutBatch(kept, [ids[j] for j in keep], rows, verdicts, version, len(problems) - len(keep))


def validate(workers, cfg, prompts, problems, step, state, timing) -> dict[str, float]:
    """avg@val_k on the validation problems; records the accuracy in `state["val_accuracy"]`."""
    batch = sample_and_grade(
        workers, cfg, prompts, "val", problems, cfg.val_k, 2 * step + 1, f"at step {step}", timing
    )
    lengths = [len(s[0]) for row in batch.samples for s in row]
    # correctness against the gold answer when the reward source is not it (e.g. a majority vote)
    flat = [v.correct if v.gold_correct is None else v.gold_correct for row in batch.verdicts for v in row]
    acc = sum(flat) / max(1, len(flat))
    state["val_accuracy"][str(step)] = acc
    return {
        "val/accuracy": acc,
        "val/response_length_mean": sum(lengths) / max(1, len(lengths)),
        "val/num_samples": float(len(flat)),
    }


def record_step(
    budget: Budget, cfg: SelfDistillationConfig, batch: RolloutBatch, items, learner_out, timing
) -> None:
    """Add one training step to the run's budget (samples, tokens, teacher tokens, optimizer steps, time)."""
    budget.samples_generated += sum(len(row) for row in batch.samples)
    budget.tokens_generated += sum(len(s[0]) for row in batch.samples for s in row)
    budget.tokens_trained += int(learner_out["num_tokens"])
    if cfg.teacher_source != "none":
        budget.teacher_tokens_scored += sum(i.num_targets for i in items)
    budget.optimizer_steps += int(learner_out["optimizer_steps"])
    budget.add_problems(cfg.train_data.path, (p.index for p in batch.problems))
    for part, seconds in timing.items():
        budget.add_time(part, seconds)


def run_validation(workers, cfg, prompts, problems, step, state, budget: Budget) -> dict[str, float]:
    t0, timing = time.perf_counter(), {}
    metrics = validate(workers, cfg, prompts, problems, step, state, timing)
    budget.validation_samples += int(metrics["val/num_samples"])
    budget.add_time("validation", time.perf_counter() - t0)
    return metrics


def budget_metrics(budget: Budget) -> dict[str, float]:
    """Cumulative budget columns of metrics.jsonl (sample-efficiency curves read them)."""
    return {
        "budget/samples_generated": float(budget.samples_generated),
        "budget/tokens_generated": float(budget.tokens_generated),
        "budget/wall_seconds": round(sum(budget.wall_seconds.values()), 3),
    }


def sync_rollout(workers: Workers, weights_root: Path, tag: str, step: int) -> None:
    """Learner rank 0 writes the weights; every rollout engine reloads them; older weight dirs are removed."""
    target = weights_root / tag
    learners = workers.learners
    learners.call_all("save_weights", [(str(target),)] * len(learners.handles), f"at step {step}")
    workers.rollout.update_weights(str(target), f"at step {step}")
    for old in weights_root.glob("*"):
        if old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


def count_steps(cfg: SelfDistillationConfig, num_problems: int) -> int:
    """The run's last step: max_num_steps, or fewer when the epochs run out (drop_last within an epoch)."""
    if cfg.num_prompts_per_step > num_problems:
        raise ConfigError(
            f"num_prompts_per_step ({cfg.num_prompts_per_step}) > the {num_problems} training problems"
        )
    steps = min(cfg.max_num_steps, cfg.max_num_epochs * (num_problems // cfg.num_prompts_per_step))
    if cfg.max_samples:  # the sample budget: only steps whose samples fit in it
        steps = min(steps, cfg.max_samples // cfg.samples_per_step)
        if steps < 1:
            raise ConfigError(f"max_samples={cfg.max_samples} < one step's {cfg.samples_per_step} samples")
    return steps


def push_teacher_head(workers: Workers, cfg: SelfDistillationConfig, context: str) -> None:
    """Full-vocabulary distillation: the learners compute the teacher's logits from its hidden states, so
    they need its current lm_head (at start and after every teacher sync)."""
    if cfg.loss.top_k is None and workers.teacher is not None:
        weight = workers.teacher.call("lm_head_weight", context=context)
        learners = workers.learners
        learners.call_all("set_teacher_lm_head", [(weight,)] * len(learners.handles), context)


def save_checkpoint(
    root: Path, step: int, workers: Workers, driver_state: dict, cfg: SelfDistillationConfig
) -> None:
    """tmp dir -> learner shards + teacher (when it changes) + driver_state.json -> fsync + atomic rename."""
    tmp, final = checkpoints.stage_dir(root, step)
    ctx = f"at step {step}"
    learners = workers.learners
    learners.call_all("save_checkpoint", [(str(tmp / "learner"),)] * len(learners.handles), ctx)
    if cfg.teacher_mode in ("sync", "ema"):
        workers.teacher.call("save_weights", str(tmp / "teacher"), context=ctx)
    (tmp / "driver_state.json").write_text(json.dumps(driver_state))
    checkpoints.publish_dir(tmp, final)
    steps = [int(p.name.split("_")[1]) for p in checkpoints.list_checkpoints(root)]
    val = {int(k): v for k, v in driver_state["val_accuracy"].items()}
    for old in checkpoints.select_checkpoints_to_delete(steps, val, cfg.keep_last):
        shutil.rmtree(root / f"step_{old:06d}", ignore_errors=True)


def dump_step_tokens(
    workers: Workers,
    cfg: SelfDistillationConfig,
    tokenizer: Any,
    batch: RolloutBatch,
    items: list[RolloutItem],
    samples: list[LearnerSample],
    step: int,
) -> dict[str, float]:
    """Per-token KL dump of a few samples per reward (dumps/step_N.jsonl.gz + a token page), at the weights
    the step's first optimizer step uses; returns the localization metrics of the dumped samples."""
    from self_distillation.localization import (
        DumpLimits,
        build_dump_record,
        compute_localization_metrics,
        dump_path,
        save_dump,
        select_dump_indices,
    )
    from self_distillation.token_page import save_token_page

    chosen = select_dump_indices([s.reward for s in samples], cfg.dump_per_reward, step, cfg.seed)
    learners = workers.learners
    per_rank = [([samples[i] for i in chosen],)] * len(learners.handles)
    fields = learners.call_all("dump_tokens", per_rank, f"at step {step}")[0]
    problems = {p.index: p for p in batch.problems}
    limits = DumpLimits(max_samples=2 * cfg.dump_per_reward, max_tokens_per_sample=cfg.dump_max_tokens)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    records = []
    for i, f in zip(chosen, fields, strict=True):
        item, problem = items[i], problems[items[i].problem_index]
        records.append(
            build_dump_record(
                f,
                decode,
                step=step,
                problem_index=item.problem_index,
                reward=item.reward,
                teacher_context=cfg.teacher_context,
                token_ids=[t for t, m in zip(item.student_ids, item.student_mask, strict=True) if m],
                teacher_prefix_ids=item.teacher_ids[: item.teacher_mask.index(1)],
                sample_index=i,
                problem=problem.problem,
                reference_solution=problem.solution,
                reference_answer=problem.answer or None,
                limits=limits,
            )
        )
    meta = {"teacher_context": cfg.teacher_context, "divergence": to_dict(cfg.loss)}
    path = save_dump(dump_path(cfg.output_dir, step), step, records, limits, meta)
    save_token_page(path.with_name(f"step_{step:06d}.html"), records, title=f"step {step}")
    return compute_localization_metrics(records)


def train_step(
    workers: Workers,
    cfg: SelfDistillationConfig,
    context: TeacherContext,
    batch: RolloutBatch,
    step: int,
    timing: dict[str, float],
    tokenizer: Any = None,
) -> tuple[list[RolloutItem], dict[str, float], dict[str, float]]:
    """Teacher contexts, teacher scoring and the learner update of one step -> (items, rollout, learner)."""
    ctx = f"at step {step}"
    selection = select_rollouts(
        cfg.objective, cfg.grpo, [[float(v.correct) for v in row] for row in batch.verdicts]
    )
    kept = [j for j, keep in enumerate(selection.keep) if keep]
    items, skipped = build_rollout_items(
        context,
        [batch.problems[j] for j in kept],
        [batch.prompts[j] for j in kept],
        [batch.samples[j] for j in kept],
        [batch.verdicts[j] for j in kept],
        policy_version=batch.policy_version,
        drop_truncated=cfg.truncated_rollouts == "drop",
        advantages=selection.advantages,
    )
    skipped["no_prompt_budget"] = batch.no_room
    stats = StepStats(
        [v.correct for row in batch.verdicts for v in row if v.skip is None],
        [len(s[0]) for row in batch.samples for s in row],
        [s[2] for row in batch.samples for s in row],
        [v.reason for row in batch.verdicts for v in row],
    )
    rollout_metrics = compute_rollout_metrics(stats, items, skipped) | selection.metrics
    if any(v.vote_ratio is not None for row in batch.verdicts for v in row):  # the reward is a vote
        rollout_metrics |= compute_vote_audit(batch.verdicts, prefix="vote/")
    t0 = time.perf_counter()
    if workers.teacher is not None and items:
        scores = workers.teacher.call("score", [(i.teacher_ids, i.teacher_mask) for i in items], context=ctx)
    else:  # no items, or the learner scores the teacher sequences itself (cfg.teacher_source)
        scores = [None] * len(items)
    timing["teacher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = [
        LearnerSample(
            i.student_ids,
            i.student_mask,
            i.reward,
            i.rollout_logprobs,
            s,
            i.teacher_ids,
            i.teacher_mask,
            i.advantage,
        )
        for i, s in zip(items, scores, strict=True)
    ]
    if cfg.dump_every and step % cfg.dump_every == 0 and cfg.objective == "distillation" and samples:
        t0 = time.perf_counter()
        rollout_metrics |= dump_step_tokens(workers, cfg, tokenizer, batch, items, samples, step)
        timing["dump"] = time.perf_counter() - t0
    learners = workers.learners
    world = len(learners.handles)
    plan = plan_micro_batches(
        [len(i.student_ids) for i in items],
        world,
        cfg.micro_batch_size,
        cfg.optimizer_steps_per_step if items else 1,
    ) * (cfg.grpo.epochs if cfg.objective == "grpo" else 1)
    per_rank = [([[[samples[i] for i in mb] for mb in opt[r]] for opt in plan],) for r in range(world)]
    learner_out = learners.call_all("train_step", per_rank, ctx)[0]
    timing["training"] = time.perf_counter() - t0
    return items, rollout_metrics, learner_out


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(SelfDistillationConfig, argv, description=__doc__)
    out = Path(cfg.output_dir)
    ckpt_root, weights_root = out / "checkpoints", out / "weights"
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = acquire_run_lock(out, "distillation")  # one writer per output directory
    except RunLockError as exc:
        raise SystemExit(f"[distill] {exc}") from None
    with lock:
        run(cfg, out, ckpt_root, weights_root)


def check_resume(cfg: SelfDistillationConfig, out: Path, existing: list[Path]) -> None:
    """A resumed run must be the same run: every setting outside PHASE2_RESUME_ALLOWED matches config.yaml."""
    if not existing or not (out / "config.yaml").is_file():
        return
    try:
        changed = check_resume_config(
            load_yaml((out / "config.yaml").read_text()),
            to_dict(cfg),
            allowed=PHASE2_RESUME_ALLOWED,
            where=f"the distillation in {out} (last checkpoint {existing[-1].name})",
        )
    except ConfigError as exc:
        raise SystemExit(f"[distill] {exc}") from None
    for key, (old, new) in changed.items():
        print(f"[distill] resume: {key} changed {old!r} -> {new!r} (allowed)", flush=True)


def run(cfg: SelfDistillationConfig, out: Path, ckpt_root: Path, weights_root: Path) -> None:
    checkpoints.remove_partial(ckpt_root)
    check_resume(cfg, out, checkpoints.list_checkpoints(ckpt_root, "distill"))
    save_run_config(cfg, out)  # only once the resume check passed: config.yaml is the run's identity
    tokenizer = check_tokenizers(cfg.student.path, cfg.teacher.path)
    prompt_cfg = resolve_prompt(cfg, tokenizer)
    train_problems, _ = load_problems(cfg.train_data)
    val_problems = load_problems(cfg.val_data)[0][: cfg.val_max_samples] if cfg.val_data.path else []
    prompts = PromptCache(tokenizer, prompt_cfg)

    existing = checkpoints.list_checkpoints(ckpt_root, "distill")
    state = {"step": 0, "epoch": 0, "offset": 0, "val_accuracy": {}, "best_step": None}
    if existing:
        state = json.loads((existing[-1] / "driver_state.json").read_text())
    budget = Budget.from_dict(state["budget"]) if "budget" in state else Budget(stage="distill")
    start = state["step"]
    print(
        f"[distill] {len(train_problems)} train / {len(val_problems)} val problems; start at step {start + 1}",
        flush=True,
    )

    workers: Workers | None = None
    timing: dict[str, float] = {}
    step = start
    try:
        workers = build_workers(cfg)
        teacher, learners = workers.teacher, workers.learners
        world = len(learners.handles)
        context = build_teacher_context(
            cfg.teacher_context,
            tokenizer,
            prompt_cfg,
            eos_token_ids=frozenset(workers.rollout.info()["eos_token_ids"]),
            keep_first_copy_eos=cfg.loss.keep_first_copy_eos,
            max_teacher_tokens=cfg.max_teacher_tokens,
        )
        if existing:
            learners.call_all("load_checkpoint", [(str(existing[-1] / "learner"),)] * world, "on resume")
            if cfg.teacher_mode in ("sync", "ema"):
                teacher.call("restore_weights", str(existing[-1] / "teacher"), context="on resume")
            sync_rollout(workers, weights_root, f"step_{start:06d}", start)
            print(f"[distill] resumed from {existing[-1]}", flush=True)
        push_teacher_head(workers, cfg, "at start")

        logger = MetricsLogger(
            out / "metrics.jsonl",
            start,
            config=to_dict(cfg),
            wandb=cfg.wandb,
            wandb_project=cfg.wandb_project,
            tensorboard=cfg.tensorboard,
        )
        if val_problems and cfg.val_at_start and start == 0:
            row = {"step": 0, **run_validation(workers, cfg, prompts, val_problems, 0, state, budget)}
            row |= budget_metrics(budget)
            logger.log(row)
            print(f"[distill] step 0 {row}", flush=True)
        position = DataPosition(state["epoch"], state["offset"])
        last_step = count_steps(cfg, len(train_problems))
        if last_step < cfg.max_num_steps:
            print(f"[distill] {cfg.max_num_epochs} epochs end at step {last_step} (max_num_steps "
                  f"{cfg.max_num_steps}): it is validated and checkpointed as the last step", flush=True)  # fmt: skip
        for step in range(start + 1, last_step + 1):
            timing.clear()
            t_step = time.perf_counter()
            taken = take_problem_indices(
                position, len(train_problems), cfg.num_prompts_per_step, cfg.seed, cfg.max_num_epochs
            )
            if taken is None:  # count_steps ends at the last full step of the last epoch
                raise RuntimeError(f"no training problems left at step {step} (epoch {position.epoch})")
            indices, position = taken
            batch = sample_and_grade(
                workers,
                cfg,
                prompts,
                "train",
                [train_problems[i] for i in indices],
                cfg.num_generations_per_prompt,
                2 * step,
                f"at step {step}",
                timing,
            )
            items, rollout_metrics, learner_out = train_step(
                workers, cfg, context, batch, step, timing, tokenizer
            )
            record_step(budget, cfg, batch, items, learner_out, timing)
            t0 = time.perf_counter()
            sync_rollout(workers, weights_root, f"step_{step:06d}", step)
            if cfg.teacher_mode == "ema" or (
                cfg.teacher_mode == "sync" and step % cfg.teacher_sync_every == 0
            ):
                teacher.call(
                    "load_weights",
                    str(weights_root / f"step_{step:06d}"),
                    cfg.teacher_ema_decay,  # 0 (sync) = a hard copy
                    context=f"at step {step}",
                )
                push_teacher_head(workers, cfg, f"at step {step}")
            timing["sync"] = time.perf_counter() - t0
            seconds = time.perf_counter() - t_step
            tokens = sum(len(i.student_ids) for i in items)
            row = {
                "step": step,
                "epoch": position.epoch,
                **rollout_metrics,
                **{k: v for k, v in learner_out.items() if k.startswith("train/")},
                "train/loss": learner_out["loss"],
                "train/grad_norm": learner_out["grad_norm"],
                "train/lr": learner_out["lr"],
                "train/num_target_tokens": learner_out["num_tokens"],
                "train/tokens_per_s": tokens / seconds,
                "policy_version": batch.policy_version,
                **{f"time/{k}": v for k, v in timing.items()},
                "time/step": seconds,
            }
            if val_problems and cfg.val_period and step % cfg.val_period == 0:
                row |= run_validation(workers, cfg, prompts, val_problems, step, state, budget)
            elif val_problems and cfg.val_at_end and step == last_step:
                row |= run_validation(workers, cfg, prompts, val_problems, step, state, budget)
            row |= budget_metrics(budget)
            logger.log(row)
            if step % cfg.log_every == 0 or step == last_step:
                headline = " ".join(f"{k[6:]} {row[k]:.4f}" for k in CONSOLE_METRICS if k in row)
                print(
                    f"[distill] step {step} loss {row['train/loss']:.4f} reward {row['train/reward']:.3f} "
                    f"{headline} lr {row['train/lr']:.3g} {seconds:.2f}s {timing}",
                    flush=True,
                )
            state.update(step=step, epoch=position.epoch, offset=position.offset, budget=budget.state_dict())
            if (cfg.save_period and step % cfg.save_period == 0) or step == last_step:
                save_checkpoint(ckpt_root, step, workers, state, cfg)
                budget.save(out)  # what the checkpointed run consumed
        spec = build_prompt_spec(tokenizer, prompt_cfg)
        learners.call_all("export_hf", [(str(out / "final"), spec)] * world, "at the final export")
        print(f"[distill] wrote {out / 'final'} (step {step})", flush=True)
    except ActorFailure as exc:
        raise SystemExit(
            f"[distill] stopped at step {step}: {exc}. Rerun the same command to resume from the "
            f"last checkpoint in {ckpt_root}"
        ) from exc
    finally:
        if workers is not None:
            workers.shutdown()


if __name__ == "__main__":
    main()
