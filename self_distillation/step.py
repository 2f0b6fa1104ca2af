"""The pieces of one Phase-2 step, for the loop in `train.py`: the prompt cache, sampling and grading a
batch (and validation), the teacher contexts, teacher scoring and the learner update (`train_step`), the
per-token dumps of a dump step, and the step's budget accounting."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from self_distillation.actors import PendingRollouts, Workers
from self_distillation.config import SelfDistillationConfig
from self_distillation.objectives import select_rollouts
from self_distillation.rollout_data import (
    LearnerSample,
    RolloutItem,
    build_rollout_items,
    plan_micro_batches,
)
from self_distillation.step_metrics import StepStats, compute_rollout_metrics
from self_distillation.teacher_context import TeacherContext
from self_revision_training.shared.budget import Budget
from self_revision_training.shared.config import (
    to_dict,
)
from self_revision_training.shared.problems import Problem
from self_revision_training.shared.prompts import (
    build_generation_prompt,
)
from self_revision_training.shared.rewards.majority_vote import compute_vote_audit


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
    weights_step: int = 0  # the learner step whose weights sampled it (async_rollouts: one step behind)


class ResponseLengths:
    """Expected response tokens per training problem (the mean of its last sampled group), so that a step's
    prompts are split between several rollout engines by expected cost; a problem not yet seen counts as
    the mean of those seen (none seen: its token limit). Kept in the driver state, so that a resumed run
    splits exactly as the uninterrupted one (one engine: nothing is tracked)."""

    def __init__(self, state: dict[str, float] | None = None):
        self.by_problem = {int(k): float(v) for k, v in (state or {}).items()}

    def expected(self, problems: list[Problem], limits: list[int]) -> list[float]:
        seen = self.by_problem
        default = sum(seen.values()) / len(seen) if seen else None
        return [
            seen.get(p.index, default if default is not None else float(limit))
            for p, limit in zip(problems, limits, strict=True)
        ]

    def update(self, batch: RolloutBatch) -> None:
        for problem, row in zip(batch.problems, batch.samples, strict=True):
            self.by_problem[problem.index] = round(sum(len(s[0]) for s in row) / max(1, len(row)), 3)

    def state_dict(self) -> dict[str, float]:
        return {str(k): v for k, v in sorted(self.by_problem.items())}


@dataclass
class PendingBatch:
    """A batch being sampled (`pending`) or sampled and not yet graded (`rows`: restored from a checkpoint)."""

    problems: list[Problem]  # the problems asked for
    ids: list[list[int]]  # their prompt ids
    keep: list[int]  # the ones with room to generate
    split: str
    weights_step: int
    pending: PendingRollouts | None = None
    rows: list[Any] | None = None
    policy_version: int = 0

    def to_json(self) -> dict[str, Any]:
        """The sampled batch for a checkpoint (call after `ready`): what grading and training need."""
        assert self.rows is not None, "collect the batch before saving it"
        return {
            "problem_indices": [p.index for p in self.problems],
            "split": self.split,
            "weights_step": self.weights_step,
            "policy_version": self.policy_version,
            "rows": self.rows,
        }


def start_sampling(
    workers: Workers,
    cfg: SelfDistillationConfig,
    prompts: PromptCache,
    split: str,
    problems: list[Problem],
    n: int,
    call_key: int,
    weights_step: int,
    lengths: ResponseLengths | None = None,
) -> PendingBatch:
    """Submit n samples per problem to the rollout engines (with Ray the call runs while the driver goes
    on: `async_rollouts`; without, it runs now)."""
    ids = [prompts.student(split, p) for p in problems]
    budgets = [cfg.max_total_sequence_length - len(p) for p in ids]
    keep = [j for j, b in enumerate(budgets) if b >= 1]
    sampling = dataclasses.replace(cfg.sampling, n=n)
    limits = [min(cfg.sampling.max_tokens, budgets[j]) for j in keep]
    expected = lengths.expected([problems[j] for j in keep], limits) if lengths is not None else None
    pending = workers.rollout.submit([ids[j] for j in keep], sampling, limits, call_key, expected)
    return PendingBatch(problems, ids, keep, split, weights_step, pending)


def ready(workers: Workers, batch: PendingBatch, context: str, timing: dict[str, float]) -> PendingBatch:
    """Wait for a submitted batch's samples (the wait is `timing["rollout"]`)."""
    if batch.rows is None:
        t0 = time.perf_counter()
        batch.rows, batch.policy_version = workers.rollout.collect(batch.pending, context)
        timing["rollout"] = timing.get("rollout", 0.0) + time.perf_counter() - t0
        batch.pending = None
    return batch


def restore_batch(
    saved: dict[str, Any], problems: list[Problem], prompts: PromptCache, cfg: SelfDistillationConfig
) -> PendingBatch:
    """A batch saved with a checkpoint (`PendingBatch.to_json`), for the resumed run to grade and train."""
    chosen = [problems[i] for i in saved["problem_indices"]]
    ids = [prompts.student(saved["split"], p) for p in chosen]
    keep = [j for j, p in enumerate(ids) if cfg.max_total_sequence_length - len(p) >= 1]
    rows = [[(list(s[0]), s[1], s[2], s[3]) for s in row] for row in saved["rows"]]
    return PendingBatch(
        chosen, ids, keep, saved["split"], saved["weights_step"], rows=rows,
        policy_version=saved["policy_version"],
    )  # fmt: skip


def finish_sampling(
    workers: Workers, batch: PendingBatch, context: str, timing: dict[str, float]
) -> RolloutBatch:
    """Collect a submitted batch and score it with the reward source (times into `timing`)."""
    ready(workers, batch, context, timing)
    kept = [batch.problems[j] for j in batch.keep]
    t0 = time.perf_counter()
    groups = [[s[1] for s in row] for row in batch.rows]
    verdicts = workers.reward.call("score", kept, groups, batch.split, context=context)
    timing["grading"] = time.perf_counter() - t0
    return RolloutBatch(
        kept,
        [batch.ids[j] for j in batch.keep],
        batch.rows,
        verdicts,
        batch.policy_version,
        len(batch.problems) - len(batch.keep),
        batch.weights_step,
    )


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
    """n samples per problem from the rollout engines, scored by the reward source (times into `timing`)."""
    t0 = time.perf_counter()
    batch = start_sampling(workers, cfg, prompts, split, problems, n, call_key, weights_step=0)
    timing["rollout"] = time.perf_counter() - t0
    return finish_sampling(workers, batch, context, timing)


def validate(workers, cfg, prompts, problems, step, state, timing) -> dict[str, float]:
    """avg@val_k on the validation problems; records the accuracy in `state["val_accuracy"]`."""
    batch = sample_and_grade(
        workers, cfg, prompts, "val", problems, cfg.val_k, 2 * step + 1, f"at step {step}", timing
    )
    lengths = [len(s[0]) for row in batch.samples for s in row]
    flat = [v.correct for row in batch.verdicts for v in row]  # graded against gold (RewardWorker)
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
    from self_distillation.localization import compute_localization_metrics
    from self_distillation.token_dump import (
        DumpLimits,
        build_dump_record,
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
