"""SD-Zero Phase 2: on-policy self-distillation from the frozen SRT teacher (paper Sec. 3.2).

    python -m self_distillation.train --config configs/phase2_distill.yaml student.path=BASE \
        teacher.path=RUN/srt/stage2/final train_data.path=DATA/train.jsonl output_dir=RUN/distill

Each step: NUM_PROMPTS x NUM_GENERATIONS responses y ~ pi_theta(.|x) (rollout worker); binary r (verifier);
teacher sequences chat(x) + y + "\\n\\n" + P_r + "\\n\\n" + y; teacher top-k log-probs on the second copy
of y; one learner update (masked token-level KL, token mean over the whole step); weights written by
learner rank 0 and reloaded by the rollout engine. Validation avg@k at start / every val_period / end;
checkpoints every save_period (latest keep_last + best by validation accuracy). Rerunning the same command
resumes from the newest checkpoint. Outputs: config.yaml, metrics.jsonl, checkpoints/, weights/, final/.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from self_distillation.actors import ActorFailure, LearnerSample, build_workers
from self_distillation.config import SelfDistillationConfig
from self_distillation.rollout_data import (
    DataPosition,
    StepStats,
    build_rollout_items,
    compute_learner_metrics,
    compute_rollout_metrics,
    plan_micro_batches,
    select_checkpoints_to_delete,
    take_problem_indices,
)
from self_revision_training.sft import MetricsLogger
from self_revision_training.shared import checkpoints
from self_revision_training.shared.config import ConfigError, SamplingConfig, parse_cli, save_run_config
from self_revision_training.shared.problems import load_problems
from self_revision_training.shared.prompts import (
    PROMPT_SPEC_FILE,
    build_generation_prompt,
    build_phrase_block,
    build_prompt_spec,
    encode_text,
    load_prompt_spec,
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
    """The prompt config the teacher was trained with (its sdzero_prompt.json), never a path heuristic."""
    if cfg.prompt_source == "auto":
        if not (Path(cfg.teacher.path) / PROMPT_SPEC_FILE).is_file():
            raise ConfigError(
                f"{cfg.teacher.path} has no {PROMPT_SPEC_FILE}; set prompt_source=config and prompt.*"
            )
        return load_prompt_spec(cfg.teacher.path)[0]
    return cfg.prompt


def save_checkpoint(
    root: Path, step: int, workers: dict, driver_state: dict, cfg: SelfDistillationConfig
) -> None:
    """tmp dir -> learner shards + teacher (when it changes) + driver_state.json -> atomic rename."""
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx = f"at step {step}"
    workers["learners"].call_all(
        "save_checkpoint", [(str(tmp / "learner"),)] * len(workers["learners"].handles), ctx
    )
    if cfg.teacher_sync_every:
        workers["teacher"].call("save_weights", str(tmp / "teacher"), context=ctx)
    (tmp / "driver_state.json").write_text(json.dumps(driver_state))
    os.rename(tmp, final)
    steps = [int(p.name.split("_")[1]) for p in checkpoints.list_checkpoints(root)]
    val = {int(k): v for k, v in driver_state["val_accuracy"].items()}
    for old in select_checkpoints_to_delete(steps, val, cfg.keep_last):
        shutil.rmtree(root / f"step_{old:06d}", ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(SelfDistillationConfig, argv, description=__doc__)
    out = Path(cfg.output_dir)
    ckpt_root, weights_root = out / "checkpoints", out / "weights"
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, out)
    checkpoints.remove_partial(ckpt_root)
    tokenizer = check_tokenizers(cfg.student.path, cfg.teacher.path)
    prompt_cfg = resolve_prompt(cfg, tokenizer)
    phrase_ids = {r: encode_text(tokenizer, build_phrase_block(r, prompt_cfg)) for r in (True, False)}
    train_problems, _ = load_problems(cfg.train_data)
    val_problems = load_problems(cfg.val_data)[0][: cfg.val_max_samples] if cfg.val_data.path else []
    prompt_cache: dict[tuple[str, int], list[int]] = {}

    def prompt_ids(split: str, problems: list, index: int) -> list[int]:
        key = (split, index)
        if key not in prompt_cache:
            prompt_cache[key] = build_generation_prompt(tokenizer, problems[index].problem, prompt_cfg).ids
        return prompt_cache[key]

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
        rollout, verifier, teacher, learners = (
            workers[k] for k in ("rollout", "verifier", "teacher", "learners")
        )
        world = len(learners.handles)
        eos = frozenset(rollout.call("info")["eos_token_ids"])

        def sync_rollout(tag: str) -> None:
            target = weights_root / tag
            learners.call_all("save_weights", [(str(target),)] * world, f"at step {step}")
            rollout.call("update_weights", str(target), context=f"at step {step}")
            for old in weights_root.glob("*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)

        if existing:
            learners.call_all("load_checkpoint", [(str(existing[-1] / "learner"),)] * world, "on resume")
            if cfg.teacher_sync_every:
                teacher.call("load_weights", str(existing[-1] / "teacher"), 0.0, context="on resume")
            sync_rollout(f"step_{start:06d}")
            print(f"[distill] resumed from {existing[-1]}", flush=True)

        def sample(split: str, problems: list, indices: list[int], n: int, call_key: int):
            prompts = [prompt_ids(split, problems, i) for i in indices]
            budgets = [cfg.max_total_sequence_length - len(p) for p in prompts]
            keep = [j for j, b in enumerate(budgets) if b >= 1]
            sampling = SamplingConfig(**{**cfg.sampling.__dict__, "n": n})
            limits = [min(cfg.sampling.max_tokens, budgets[j]) for j in keep]
            t0 = time.perf_counter()
            rows, version = rollout.call(
                "generate", [prompts[j] for j in keep], sampling, limits, call_key, context=f"at step {step}"
            )
            flat = [(keep[j], s) for j, row in enumerate(rows) for s in row]
            timing["rollout"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            verdicts = verifier.call(
                "grade",
                [s[1] for _, s in flat],
                [problems[indices[j]] for j, _ in flat],
                context=f"at step {step}",
            )
            timing["grading"] = time.perf_counter() - t0
            return prompts, keep, rows, verdicts, version, len(prompts) - len(keep)

        def validate() -> dict[str, float]:
            _, _, rows, verdicts, _, _ = sample(
                "val", val_problems, list(range(len(val_problems))), cfg.val_k, 2 * step + 1
            )
            lengths = [len(s[0]) for row in rows for s in row]
            acc = sum(c for c, _ in verdicts) / max(1, len(verdicts))
            state["val_accuracy"][str(step)] = acc
            return {"val/accuracy": acc, "val/response_length_mean": sum(lengths) / max(1, len(lengths))}

        logger = MetricsLogger(cfg, start)  # type: ignore[arg-type]  (same logging fields as SFTConfig)
        if val_problems and cfg.val_at_start and start == 0:
            row = {"step": 0, **validate()}
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
            prompts, keep, rows, verdicts, version, no_room = sample(
                "train", train_problems, indices, cfg.num_generations_per_prompt, 2 * step
            )
            rewards, it = [], iter(verdicts)
            rewards = [[next(it)[0] for _ in row] for row in rows]
            items, skipped = build_rollout_items(
                [prompts[j] for j in keep],
                [[(s[0], s[2], s[3]) for s in row] for row in rows],
                rewards,
                phrase_ids,
                problem_indices=[indices[j] for j in keep],
                eos_token_ids=eos,
                max_teacher_tokens=cfg.max_teacher_tokens,
                keep_first_copy_eos=cfg.loss.keep_first_copy_eos,
                policy_version=version,
            )
            skipped["no_prompt_budget"] = no_room
            stats = StepStats(
                [r for row in rewards for r in row],
                [len(s[0]) for row in rows for s in row],
                [s[2] for row in rows for s in row],
            )
            metrics = compute_rollout_metrics(stats, items, skipped)
            t0 = time.perf_counter()
            scores = (
                teacher.call(
                    "score", [(i.teacher_ids, i.teacher_mask) for i in items], context=f"at step {step}"
                )
                if items
                else []
            )
            timing["teacher"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            samples = [
                LearnerSample(i.student_ids, i.student_mask, i.reward, i.rollout_logprobs, s)
                for i, s in zip(items, scores, strict=True)
            ]
            plan = plan_micro_batches(
                [len(i.student_ids) for i in items],
                world,
                cfg.micro_batch_size,
                cfg.optimizer_steps_per_step if items else 1,
            )
            per_rank = [
                ([[[samples[i] for i in mb] for mb in opt[r]] for opt in plan],) for r in range(world)
            ]
            learner_out = learners.call_all("train_step", per_rank, f"at step {step}")[0]
            timing["training"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            sync_rollout(f"step_{step:06d}")
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
                **metrics,
                **compute_learner_metrics(learner_out),
                "train/loss": learner_out["loss"],
                "train/grad_norm": learner_out["grad_norm"],
                "train/lr": learner_out["lr"],
                "train/num_target_tokens": learner_out["num_tokens"],
                "train/tokens_per_s": tokens / seconds,
                "policy_version": version,
                **{f"time/{k}": v for k, v in timing.items()},
                "time/step": seconds,
            }
            if val_problems and cfg.val_period and step % cfg.val_period == 0:
                row |= validate()
            elif val_problems and cfg.val_at_end and step == last_step:
                row |= validate()
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
