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

import json
import shutil
import time
from pathlib import Path
from typing import Any

from self_distillation.actors import ActorFailure, Workers, build_workers
from self_distillation.config import SelfDistillationConfig
from self_distillation.rollout_data import (
    DataPosition,
    take_problem_indices,
)
from self_distillation.step import (
    PendingBatch,
    PromptCache,
    ResponseLengths,
    budget_metrics,
    finish_sampling,
    ready,
    record_step,
    restore_batch,
    run_validation,
    start_sampling,
    train_step,
)
from self_distillation.teacher_context import build_teacher_context
from self_revision_training.shared import checkpoints
from self_revision_training.shared.budget import Budget
from self_revision_training.shared.config import ConfigError, load_yaml, parse_cli, to_dict
from self_revision_training.shared.problems import load_problems
from self_revision_training.shared.prompts import (
    PROMPT_SPEC_FILE,
    PromptSpecError,
    build_prompt_spec,
    check_prompt_spec,
    load_prompt_spec,
)
from self_revision_training.shared.run_config import check_resume_config, save_run_config
from self_revision_training.shared.run_lock import lock_directory
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


def sync_rollout(workers: Workers, weights_root: Path, tag: str, step: int, mode: str = "file") -> Any:
    """The learner's current weights into every rollout engine (`ray.weight_sync`); returns them for the
    teacher's sync. file: learner rank 0 writes weights_root/tag (safetensors), every engine reloads it;
    returns the directory. memory: nothing is written; rank 0 hands the tensors over (with Ray: one object
    it put into the object store, read by every engine; without: the dict itself) and they are returned.
    Either way older weight dirs are removed."""
    learners, ctx = workers.learners, f"at step {step}"
    if mode == "memory":
        remote = learners.handles[0].remote
        weights = learners.call_all("export_weights", [(remote,)] * len(learners.handles), ctx)[0]
        weights = weights[0] if remote else weights  # with Ray: [ObjectRef]
    else:
        weights = str(weights_root / tag)
        learners.call_all("save_weights", [(weights,)] * len(learners.handles), ctx)
    workers.rollout.update_weights(weights, ctx)
    for old in weights_root.glob("*"):
        if old.name != tag or mode == "memory":
            shutil.rmtree(old, ignore_errors=True)
    return weights


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


PENDING_FILE = "pending_rollouts.json"  # async_rollouts: the next step's sampled batch, saved with a checkpoint


def save_checkpoint(
    root: Path,
    step: int,
    workers: Workers,
    driver_state: dict,
    cfg: SelfDistillationConfig,
    pending: dict | None = None,
) -> None:
    """tmp dir -> learner shards + teacher (when it changes) + driver_state.json (+ the next step's sampled
    batch under async_rollouts, so that a resumed run trains on the same samples) -> fsync + atomic rename."""
    tmp, final = checkpoints.stage_dir(root, step)
    ctx = f"at step {step}"
    learners = workers.learners
    learners.call_all("save_checkpoint", [(str(tmp / "learner"),)] * len(learners.handles), ctx)
    if cfg.teacher_mode in ("sync", "ema"):
        workers.teacher.call("save_weights", str(tmp / "teacher"), context=ctx)
    (tmp / "driver_state.json").write_text(json.dumps(driver_state))
    if pending is not None:
        (tmp / PENDING_FILE).write_text(json.dumps(pending))
    checkpoints.publish_dir(tmp, final)
    steps = [int(p.name.split("_")[1]) for p in checkpoints.list_checkpoints(root)]
    val = {int(k): v for k, v in driver_state["val_accuracy"].items()}
    for old in checkpoints.select_checkpoints_to_delete(steps, val, cfg.keep_last):
        shutil.rmtree(root / f"step_{old:06d}", ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(SelfDistillationConfig, argv, description=__doc__)
    out = Path(cfg.output_dir)
    ckpt_root, weights_root = out / "checkpoints", out / "weights"
    out.mkdir(parents=True, exist_ok=True)
    with lock_directory(out, "distillation", "[distill]"):
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
    lengths = ResponseLengths(state.get("response_lengths")) if cfg.ray.num_rollout_engines > 1 else None
    start = state["step"]
    pending: PendingBatch | None = None  # async_rollouts: the next step's batch, sampled one step behind
    if existing and (existing[-1] / PENDING_FILE).is_file():
        saved = json.loads((existing[-1] / PENDING_FILE).read_text())
        pending = restore_batch(saved, train_problems, prompts, cfg)
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
            sync_rollout(workers, weights_root, f"step_{start:06d}", start, cfg.ray.weight_sync)
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
        def start_step(at: int, weights_step: int) -> PendingBatch:
            """Take step `at`'s problems and submit their rollouts (the engines hold step weights_step's)."""
            nonlocal position
            taken = take_problem_indices(
                position, len(train_problems), cfg.num_prompts_per_step, cfg.seed, cfg.max_num_epochs
            )
            if taken is None:  # count_steps ends at the last full step of the last epoch
                raise RuntimeError(f"no training problems left at step {at} (epoch {position.epoch})")
            indices, position = taken
            chosen = [train_problems[i] for i in indices]
            n = cfg.num_generations_per_prompt
            return start_sampling(workers, cfg, prompts, "train", chosen, n, 2 * at, weights_step, lengths)

        for step in range(start + 1, last_step + 1):
            timing.clear()
            t_step = time.perf_counter()
            t0 = time.perf_counter()
            this = pending if pending is not None else start_step(step, step - 1)
            timing["rollout"] = time.perf_counter() - t0  # sampling now (or, async, what is left to wait)
            batch = finish_sampling(workers, this, f"at step {step}", timing)
            pending = None
            if lengths is not None:
                lengths.update(batch)
            if cfg.async_rollouts and step < last_step:  # runs on the engines during this step's update
                pending = start_step(step + 1, step - 1)
            items, rollout_metrics, learner_out = train_step(
                workers, cfg, context, batch, step, timing, tokenizer
            )
            record_step(budget, cfg, batch, items, learner_out, timing)
            t0 = time.perf_counter()
            weights = sync_rollout(workers, weights_root, f"step_{step:06d}", step, cfg.ray.weight_sync)
            if cfg.teacher_mode == "ema" or (
                cfg.teacher_mode == "sync" and step % cfg.teacher_sync_every == 0
            ):
                teacher.call(
                    "load_weights",
                    weights,  # the synced directory, or the tensors (ray.weight_sync=memory)
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
                "train/policy_lag": float(step - 1 - batch.weights_step),  # steps behind the learner
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
            if lengths is not None:
                state["response_lengths"] = lengths.state_dict()
            if (cfg.save_period and step % cfg.save_period == 0) or step == last_step:
                saved = None
                if pending is not None:  # the next step's samples go with the checkpoint (position is past them)
                    saved = ready(workers, pending, f"at step {step}", {}).to_json()
                save_checkpoint(ckpt_root, step, workers, state, cfg, saved)
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
