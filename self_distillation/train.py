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

from self_distillation.actors import ActorFailure, build_workers
from self_distillation.config import SelfDistillationConfig
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
from self_revision_training.shared.config import ConfigError, parse_cli, save_run_config, to_dict
from self_revision_training.shared.problems import Problem, load_problems
from self_revision_training.shared.prompts import (
    PROMPT_SPEC_FILE,
    build_generation_prompt,
    build_phrase_ids,
    build_prompt_spec,
    build_teacher_prompt,
    load_prompt_spec,
)
from self_revision_training.shared.run_log import MetricsLogger


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
    """The prompt config the teacher was trained with (its sdzero_prompt.json), never a path heuristic."""
    if cfg.prompt_source == "auto":
        if not (Path(cfg.teacher.path) / PROMPT_SPEC_FILE).is_file():
            raise ConfigError(
                f"{cfg.teacher.path} has no {PROMPT_SPEC_FILE}; set prompt_source=config and prompt.*"
            )
        return load_prompt_spec(cfg.teacher.path)[0]
    return cfg.prompt


class PromptCache:
    """Student and teacher prompt ids per (split, problem index), built once."""

    def __init__(self, tokenizer: Any, prompt_cfg: Any):
        self.tokenizer, self.prompt_cfg = tokenizer, prompt_cfg
        self._student: dict[tuple[str, int], list[int]] = {}
        self._teacher: dict[int, list[int]] = {}

    def student(self, split: str, problem: Problem) -> list[int]:
        key = (split, problem.index)
        if key not in self._student:
            self._student[key] = build_generation_prompt(self.tokenizer, problem.problem, self.prompt_cfg).ids
        return self._student[key]

    def teacher(self, problem: Problem) -> list[int]:
        if problem.index not in self._teacher:
            self._teacher[problem.index] = build_teacher_prompt(
                self.tokenizer, problem.problem, self.prompt_cfg, problem.solution
            ).ids
        return self._teacher[problem.index]


@dataclass
class RolloutBatch:
    problems: list[Problem]  # the problems that were sampled (a prompt with no room is left out)
    prompts: list[list[int]]  # their student prompt ids
    samples: list[list[tuple[list[int], str, str, list[float] | None]]]  # (ids, text, finish, logprobs)
    verdicts: list[list[Any]]  # per problem, per sample
    policy_version: int
    no_room: int  # prompts that leave no room to generate under max_total_sequence_length


def sample_and_grade(
    workers: dict[str, Any],
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
    rows, version = workers["rollout"].call(
        "generate", [ids[j] for j in keep], sampling, limits, call_key, context=context
    )
    timing["rollout"] = time.perf_counter() - t0
    kept = [problems[j] for j in keep]
    t0 = time.perf_counter()
    verdicts = workers["reward"].call("score", kept, [[s[1] for s in row] for row in rows], context=context)
    timing["grading"] = time.perf_counter() - t0
    return RolloutBatch(kept, [ids[j] for j in keep], rows, verdicts, version, len(problems) - len(keep))


def validate(workers, cfg, prompts, problems, step, state, timing) -> dict[str, float]:
    """avg@val_k on the validation problems; records the accuracy in `state["val_accuracy"]`."""
    batch = sample_and_grade(
        workers, cfg, prompts, "val", problems, cfg.val_k, 2 * step + 1, f"at step {step}", timing
    )
    lengths = [len(s[0]) for row in batch.samples for s in row]
    flat = [v.correct for row in batch.verdicts for v in row]
    acc = sum(flat) / max(1, len(flat))
    state["val_accuracy"][str(step)] = acc
    return {"val/accuracy": acc, "val/response_length_mean": sum(lengths) / max(1, len(lengths))}


def sync_rollout(workers: dict[str, Any], weights_root: Path, tag: str, step: int) -> None:
    """Learner rank 0 writes the weights; the rollout engine reloads them; older weight dirs are removed."""
    target = weights_root / tag
    learners = workers["learners"]
    learners.call_all("save_weights", [(str(target),)] * len(learners.handles), f"at step {step}")
    workers["rollout"].call("update_weights", str(target), context=f"at step {step}")
    for old in weights_root.glob("*"):
        if old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    root: Path, step: int, workers: dict, driver_state: dict, cfg: SelfDistillationConfig
) -> None:
    """tmp dir -> learner shards + teacher (when it changes) + driver_state.json -> fsync + atomic rename."""
    tmp, final = checkpoints.stage_dir(root, step)
    ctx = f"at step {step}"
    learners = workers["learners"]
    learners.call_all("save_checkpoint", [(str(tmp / "learner"),)] * len(learners.handles), ctx)
    if cfg.teacher_sync_every:
        workers["teacher"].call("save_weights", str(tmp / "teacher"), context=ctx)
    (tmp / "driver_state.json").write_text(json.dumps(driver_state))
    checkpoints.publish_dir(tmp, final)
    steps = [int(p.name.split("_")[1]) for p in checkpoints.list_checkpoints(root)]
    val = {int(k): v for k, v in driver_state["val_accuracy"].items()}
    for old in checkpoints.select_checkpoints_to_delete(steps, val, cfg.keep_last):
        shutil.rmtree(root / f"step_{old:06d}", ignore_errors=True)


def train_step(
    workers: dict[str, Any],
    cfg: SelfDistillationConfig,
    context: TeacherContext,
    batch: RolloutBatch,
    step: int,
    timing: dict[str, float],
) -> tuple[list[RolloutItem], dict[str, float], dict[str, float]]:
    """Teacher contexts, teacher scoring and the learner update of one step -> (items, rollout, learner)."""
    ctx = f"at step {step}"
    items, skipped = build_rollout_items(
        context, batch.problems, batch.prompts, batch.samples, batch.verdicts, policy_version=batch.policy_version
    )
    skipped["no_prompt_budget"] = batch.no_room
    stats = StepStats(
        [v.correct for row in batch.verdicts for v in row],
        [len(s[0]) for row in batch.samples for s in row],
        [s[2] for row in batch.samples for s in row],
    )
    rollout_metrics = compute_rollout_metrics(stats, items, skipped)
    t0 = time.perf_counter()
    scores = (
        workers["teacher"].call("score", [(i.teacher_ids, i.teacher_mask) for i in items], context=ctx)
        if items
        else []
    )
    timing["teacher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = [
        LearnerSample(i.student_ids, i.student_mask, i.reward, i.rollout_logprobs, s)
        for i, s in zip(items, scores, strict=True)
    ]
    learners = workers["learners"]
    world = len(learners.handles)
    plan = plan_micro_batches(
        [len(i.student_ids) for i in items],
        world,
        cfg.micro_batch_size,
        cfg.optimizer_steps_per_step if items else 1,
    )
    per_rank = [([[[samples[i] for i in mb] for mb in opt[r]] for opt in plan],) for r in range(world)]
    learner_out = learners.call_all("train_step", per_rank, ctx)[0]
    timing["training"] = time.perf_counter() - t0
    return items, rollout_metrics, learner_out


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(SelfDistillationConfig, argv, description=__doc__)
    out = Path(cfg.output_dir)
    ckpt_root, weights_root = out / "checkpoints", out / "weights"
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, out)
    checkpoints.remove_partial(ckpt_root)
    tokenizer = check_tokenizers(cfg.student.path, cfg.teacher.path)
    prompt_cfg = resolve_prompt(cfg, tokenizer)
    train_problems, _ = load_problems(cfg.train_data)
    val_problems = load_problems(cfg.val_data)[0][: cfg.val_max_samples] if cfg.val_data.path else []
    prompts = PromptCache(tokenizer, prompt_cfg)

    existing = checkpoints.list_checkpoints(ckpt_root)
    state = {"step": 0, "epoch": 0, "offset": 0, "val_accuracy": {}, "best_step": None}
    if existing:
        state = json.loads((existing[-1] / "driver_state.json").read_text())
    start = state["step"]
    print(
        f"[distill] {len(train_problems)} train / {len(val_problems)} val problems; start at step {start + 1}",
        flush=True,
    )

    workers: dict[str, Any] = {}
    timing: dict[str, float] = {}
    step = start
    try:
        workers = build_workers(cfg)
        rollout, teacher, learners = (workers[k] for k in ("rollout", "teacher", "learners"))
        world = len(learners.handles)
        context = build_teacher_context(
            cfg.teacher_context,
            teacher_prompt_ids=prompts.teacher,
            phrase_ids=build_phrase_ids(tokenizer, prompt_cfg),
            eos_token_ids=frozenset(rollout.call("info")["eos_token_ids"]),
            keep_first_copy_eos=cfg.loss.keep_first_copy_eos,
            max_teacher_tokens=cfg.max_teacher_tokens,
        )
        if existing:
            learners.call_all("load_checkpoint", [(str(existing[-1] / "learner"),)] * world, "on resume")
            if cfg.teacher_sync_every:
                teacher.call("load_weights", str(existing[-1] / "teacher"), 0.0, context="on resume")
            sync_rollout(workers, weights_root, f"step_{start:06d}", start)
            print(f"[distill] resumed from {existing[-1]}", flush=True)

        logger = MetricsLogger(
            out / "metrics.jsonl",
            start,
            config=to_dict(cfg),
            wandb=cfg.wandb,
            wandb_project=cfg.wandb_project,
            tensorboard=cfg.tensorboard,
        )
        if val_problems and cfg.val_at_start and start == 0:
            row = {"step": 0, **validate(workers, cfg, prompts, val_problems, 0, state, timing)}
            logger.log(row)
            print(f"[distill] step 0 {row}", flush=True)
        position = DataPosition(state["epoch"], state["offset"])
        last_step = cfg.max_num_steps
        for step in range(start + 1, last_step + 1):
            timing.clear()
            t_step = time.perf_counter()
            taken = take_problem_indices(
                position, len(train_problems), cfg.num_prompts_per_step, cfg.seed, cfg.max_num_epochs
            )
            if taken is None:
                print(f"[distill] {cfg.max_num_epochs} epochs done before step {step}", flush=True)
                step -= 1
                break
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
            items, rollout_metrics, learner_out = train_step(workers, cfg, context, batch, step, timing)
            t0 = time.perf_counter()
            sync_rollout(workers, weights_root, f"step_{step:06d}", step)
            if cfg.teacher_sync_every and step % cfg.teacher_sync_every == 0:
                teacher.call(
                    "load_weights",
                    str(weights_root / f"step_{step:06d}"),
                    cfg.teacher_ema_decay,
                    context=f"at step {step}",
                )
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
                row |= validate(workers, cfg, prompts, val_problems, step, state, timing)
            elif val_problems and cfg.val_at_end and step == last_step:
                row |= validate(workers, cfg, prompts, val_problems, step, state, timing)
            logger.log(row)
            if step % cfg.log_every == 0 or step == last_step:
                print(
                    f"[distill] step {step} loss {row['train/loss']:.4f} reward {row['train/reward']:.3f} "
                    f"kl r1/r0 {row['train/kl_r1']:.4f}/{row['train/kl_r0']:.4f} "
                    f"lr {row['train/lr']:.3g} {seconds:.2f}s {timing}",
                    flush=True,
                )
            state.update(step=step, epoch=position.epoch, offset=position.offset)
            if (cfg.save_period and step % cfg.save_period == 0) or step == last_step:
                save_checkpoint(ckpt_root, step, workers, state, cfg)
        spec = build_prompt_spec(tokenizer, prompt_cfg)
        learners.call_all("export_hf", [(str(out / "final"), spec)] * world, "at the final export")
        print(f"[distill] wrote {out / 'final'} (step {step})", flush=True)
    except ActorFailure as exc:
        raise SystemExit(
            f"[distill] stopped at step {step}: {exc}. Rerun the same command to resume from the "
            f"last checkpoint in {ckpt_root}"
        ) from exc
    finally:
        for handle in workers.values():
            if hasattr(handle, "kill"):
                try:
                    handle.kill()
                except Exception:  # noqa: BLE001 - best effort at shutdown; the actor may be dead already
                    pass
        if workers and not workers["rollout"].remote:
            workers["learners"].call_all("close")  # local mode: leave no process group behind


if __name__ == "__main__":
    main()
