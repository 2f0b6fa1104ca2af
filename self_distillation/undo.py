"""UNDO's outer loop (arXiv 2504.02521; ../shared/reference/related_methods.md section 5): diagnose the student
on a validation set, have the teacher regenerate rationales for its errors, retrain, stop when validation
accuracy stops improving. The project's outer-loop seam: every stage is an existing entry point.

    python -m self_distillation.undo --config configs/undo.yaml student.path=BASE \\
        teacher.path=RUN/srt/stage2/final train_data.path=D/train.jsonl val_data.path=D/val.jsonl \\
        test_data.path=D/test.jsonl output_dir=RUN/undo          # or: bash scripts/undo.sh

Iteration 0 evaluates the base student S_0 (validation, and test when given). Iteration k >= 1, inner=sft:
    answers/    S_{k-1} answers every training problem once            (self_distillation.evaluate, n=1)
    regen/      the teacher regenerates a rationale per problem from its tutor prompt: the problem, R_{k-1},
                S_{k-1}'s answer and score, and E_k = S_{k-1}'s errors in iter-(k-1)/eval_val; verified
                rationales kept -> sft.jsonl (R_k), errors.jsonl, rationales.jsonl (self_revision_training.undo_data)
    sft/        one-stage SFT (problem -> rationale) from the base (student_init=base) or from S_{k-1}
                (previous), under torchrun like scripts/sft.sh     (self_revision_training.sft,
                data.layout=prompt_completion); S_k = sft/final
    eval_val/   S_k on the validation set; eval_test/ on the test set when given (reported, never used)
inner=distill (the SD-Zero paper's iterative self-evolution): each iteration is one Phase-2 run
(self_distillation.train) from the base or S_{k-1}, with the teacher re-synchronised to the best student so
far (at k=1: teacher.path, or student.path when unset); then eval_val / eval_test.
Stop when the validation accuracy (avg@val_n) has not beaten the best by more than min_delta for `patience`
iterations, or at max_iterations, or when an iteration keeps no rationale. The best iteration (first to
reach the highest accuracy) is linked as output_dir/best and named in summary.json.

Resume: rerun the same command. state.json records each finished stage; a stage that was running is rerun
and resumes itself (regeneration per committed batch, SFT / Phase 2 from their checkpoints, evaluations
with reuse=true). output_dir/budget.json is the total of every stage's budget.json below output_dir (the
student's training answers count as generated samples, validation as validation samples, test not at all).
The validation set must be disjoint from the test set (problem texts compared; an error naming both files).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from self_distillation.undo_stages import StageCall, StageRunner, Stages, SubprocessRunner, UndoConfig
from self_revision_training.shared.budget import Budget, collect_run_budget
from self_revision_training.shared.config import (
    ConfigError,
    load_yaml,
    parse_cli,
    to_dict,
)
from self_revision_training.shared.problems import load_problems
from self_revision_training.shared.run_config import check_resume_config, save_run_config
from self_revision_training.shared.run_lock import lock_directory
from self_revision_training.shared.storage import atomic_write_json, read_jsonl
from self_revision_training.undo_tutor import check_stop, compute_best_iteration

log = logging.getLogger("sdzero.undo")

STATE_FILE = "state.json"
SUMMARY_FILE = "summary.json"


RESUME_ALLOWED = tuple(
    "max_iterations patience min_delta output_dir python nproc_per_node regenerate_shards gpus_per_shard "
    "grading.num_workers backend.gpu_memory_utilization backend.kv_cache_gb backend.tensor_parallel_size "
    "backend.enforce_eager backend.hf_batch_size backend.device".split()
)


# ----------------------------------------------------------------------------------------------
# the loop


def load_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"done": [], "val": {}, "test": {}}


def save_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write_json(out / STATE_FILE, state)


def check_disjoint(cfg: UndoConfig) -> None:
    """The validation problems (shown to the teacher as errors) must not be test problems."""
    if not cfg.test_data.path:
        return
    val, _ = load_problems(cfg.val_data)
    test, _ = load_problems(cfg.test_data)
    shared = sorted({p.problem.strip() for p in val} & {p.problem.strip() for p in test})
    if shared:
        raise ConfigError(
            f"validation set {cfg.val_data.path} and test set {cfg.test_data.path} share {len(shared)} problems "
            f"(e.g. {shared[0][:80]!r}): the student's validation errors are shown to the teacher, so the "
            "reported test accuracy would be contaminated; use disjoint files"
        )


def save_eval_budget(directory: Path, stage: str, dataset: str) -> float:
    """budget.json of an evaluation stage (training answers: generated samples; validation: validation
    samples); returns its avg@k."""
    summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
    records = read_jsonl(directory / "samples.jsonl")
    budget = Budget(stage=stage)
    if stage == "undo_student_answers":
        budget.samples_generated = len(records)
        budget.tokens_generated = sum(int(r["num_tokens"]) for r in records)
        budget.add_problems(dataset, (r["problem_index"] for r in records))
        budget.add_time("generation", summary.get("seconds", 0.0))
    else:
        budget.validation_samples = len(records)
        budget.add_time("validation", summary.get("seconds", 0.0))
    budget.save(directory)
    return float(summary["avg@k"]["mean"])


def _avg(directory: Path) -> dict[str, Any]:
    avg = json.loads((directory / "summary.json").read_text(encoding="utf-8"))["avg@k"]
    return {k: avg[k] for k in ("k", "mean", "ci_low", "ci_high")}


def run_loop(cfg: UndoConfig, out: Path, runner: StageRunner) -> dict[str, Any]:
    stages, state = Stages(cfg, out), load_state(out)

    def step(key: str, calls: list[StageCall], after=None) -> None:
        if key in state["done"]:
            return
        runner.run(calls)
        if after is not None:
            after()
        state["done"].append(key)
        save_state(out, state)

    def evaluate(k: int, model: str) -> None:
        directory = stages.iter_dir(k)

        def record_val() -> None:
            state["val"][str(k)] = save_eval_budget(
                directory / "eval_val", "undo_validation", cfg.val_data.path
            )

        def record_test() -> None:
            state["test"][str(k)] = _avg(directory / "eval_test")["mean"]

        step(f"{k}/eval_val", [stages.evaluate(k, "eval_val", model, cfg.val_data, cfg.val_n)], record_val)
        if cfg.test_data.path:
            step(
                f"{k}/eval_test",
                [stages.evaluate(k, "eval_test", model, cfg.test_data, cfg.test_n)],
                record_test,
            )

    evaluate(0, stages.model_dir(0))
    stop = None
    while True:
        history = {int(k): v for k, v in state["val"].items() if int(k) >= 1}
        stop = check_stop(history, cfg.patience, cfg.min_delta, cfg.max_iterations) or state.get("stop")
        if stop:
            break
        k = max(history, default=0) + 1
        print(f"[undo] iteration {k} (inner={cfg.inner})", flush=True)
        if cfg.inner == "sft":
            answers = stages.iter_dir(k) / "answers"
            call = stages.evaluate(k, "answers", stages.model_dir(k - 1), cfg.train_data, 1)
            after = functools.partial(save_eval_budget, answers, "undo_student_answers", cfg.train_data.path)
            step(f"{k}/answers", [call], after)
            step(f"{k}/regenerate", stages.regenerate(k))
            regen = json.loads((stages.iter_dir(k) / "regen" / "summary.json").read_text(encoding="utf-8"))
            if not regen["filter"]["kept"]:
                state["stop"] = f"no verified rationale at iteration {k}"
                save_state(out, state)
                continue
            step(f"{k}/sft", [stages.sft(k)])
        else:
            best = compute_best_iteration(history, cfg.min_delta)
            teacher = stages.first_teacher() if best is None else stages.model_dir(best)
            step(f"{k}/distill", [stages.distill(k, teacher)])
        evaluate(k, stages.model_dir(k))
        write_summary(cfg, out, stages, state, None)
    return write_summary(cfg, out, stages, state, stop)


def write_summary(
    cfg: UndoConfig, out: Path, stages: Stages, state: dict[str, Any], stop: str | None
) -> dict:
    """summary.json (per-iteration table, best iteration), output_dir/best, output_dir/budget.json."""
    history = {int(k): v for k, v in state["val"].items() if int(k) >= 1}
    best = compute_best_iteration(history, cfg.min_delta)
    rows = []
    for k in sorted({0, *history}):
        row: dict[str, Any] = {
            "iteration": k,
            "model": stages.model_dir(k),
            "val": _avg(stages.iter_dir(k) / "eval_val"),
        }
        if str(k) in state["test"]:
            row["test"] = _avg(stages.iter_dir(k) / "eval_test")
        regen = stages.iter_dir(k) / "regen" / "summary.json"
        if k and regen.is_file():
            report = json.loads(regen.read_text(encoding="utf-8"))
            row["rationales"] = {
                "kept": report["filter"]["kept"],
                "dropped": report["filter"]["dropped"],
                "validation_errors": report.get("validation_errors_selected"),
                "prompts_with_validation_errors": report.get("prompts_with_validation_errors"),
            }
        rows.append(row)
    if best is not None and stop:
        link, tmp = out / "best", out / ".best.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(stages.model_dir(best), out))
        os.replace(tmp, link)
    summary = {
        "status": "done" if stop else "running",
        "stop_reason": stop,
        "inner": cfg.inner,
        "best_iteration": best,
        "best_model": stages.model_dir(best) if best is not None else None,
        "best_link": str(out / "best") if best is not None and stop else None,
        "best_val": history.get(best) if best is not None else None,
        "iterations": rows,
    }
    atomic_write_json(out / SUMMARY_FILE, summary)
    try:
        atomic_write_json(out / "budget.json", collect_run_budget(out))
    except FileNotFoundError:
        pass  # no stage has written a budget yet
    return summary


def check_resume(cfg: UndoConfig, out: Path) -> None:
    saved = out / "config.yaml"
    if saved.is_file() and (out / STATE_FILE).is_file():
        check_resume_config(
            load_yaml(saved.read_text(encoding="utf-8")) or {},
            to_dict(cfg),
            allowed=RESUME_ALLOWED,
            where=f"the loop in {out}",
        )


def main(argv: list[str] | None = None, runner: StageRunner | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_cli(UndoConfig, argv, description=__doc__.splitlines()[0])
    out = Path(cfg.output_dir)
    with lock_directory(out, "UNDO loop", "undo"):
        check_resume(cfg, out)
        check_disjoint(cfg)
        Stages(cfg, out).check()
        save_run_config(cfg, out)
        runner = runner or SubprocessRunner(cfg.python or sys.executable, cfg.nproc_per_node)
        summary = run_loop(cfg, out, runner)
    table = "; ".join(
        f"iter {r['iteration']}: val {r['val']['mean']:.3f}"
        + (f", test {r['test']['mean']:.3f}" if "test" in r else "")
        for r in summary["iterations"]
    )
    print(
        f"[undo] stopped ({summary['stop_reason']}); best iteration {summary['best_iteration']}; {table}",
        flush=True,
    )
    return summary


if __name__ == "__main__":
    main()
