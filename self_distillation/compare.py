"""The method comparison of one `scripts/compare.sh` run: one table and the sample-efficiency curves.

    python -m self_distillation.compare RUN_DIR --methods base,rft,sd-zero,grpo --base base --reference sd-zero

RUN_DIR holds one directory per method (written by scripts/compare.sh through each method's own driver):

    <method>/status.json     {"status": "ok" | "failed", "reason": ..., "seconds": ...}
    <method>/budget.json     what the method consumed, every stage summed (shared/budget.py)
    <method>/eval/           the final model on the held-out problems (samples.jsonl, summary.json)
    <method>/val_eval/       the final model on the validation problems (a Phase-1-only method's last point)
    <method>/distill/metrics.jsonl   Phase 2's periodic validation (iterative methods' curves)

Writes RUN_DIR/comparison.{txt,md,json} (avg@k with CI, pass@k, maj@k, length, truncation, samples, tokens,
wall time; the paired difference per held-out problem against the base and the reference method, with a
paired bootstrap interval and a sign-flip permutation p-value: paired_stats.py) and RUN_DIR/curves.png /
curves_wall.png (validation accuracy against samples consumed / wall time; x includes the samples of the
stages before Phase 2, so SD-Zero's curve starts after its Phase-1 collection). A failed method is a row
marked failed, never dropped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from self_distillation.comparison import (
    CurvePoint,
    build_comparison,
    extract_curve_points,
    failed_method_run,
    format_comparison_markdown,
    format_comparison_text,
    load_method_run,
    plot_sample_efficiency,
)
from self_revision_training.shared.storage import atomic_write_json, atomic_write_text


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_run(run_dir: Path, label: str):
    """A method's MethodRun (failed when its status says so or its evaluation is missing)."""
    method = run_dir / label
    status = _read(method / "status.json") or {"status": "failed", "reason": f"no status.json in {method}"}
    budget = _read(method / "budget.json") or {}
    budget = {**budget, "wall_seconds": budget.get("wall_seconds_total", status.get("seconds"))}
    if status.get("status") != "ok":
        return failed_method_run(label, status.get("reason", "failed"), budget)
    return load_method_run(label, method / "eval", budget)


def method_curve(run_dir: Path, label: str) -> list[CurvePoint]:
    """Validation accuracy against total samples (and wall time) for one method."""
    method = run_dir / label
    budget = _read(method / "budget.json") or {}
    stages = budget.get("stages", {})
    before = [s for name, s in stages.items() if not name.startswith("distill")]
    offset = float(sum(s.get("samples_generated", 0) for s in before))
    wall_offset = float(sum(s.get("wall_seconds_total", 0.0) for s in before))
    points = []
    metrics = method / "distill" / "metrics.jsonl"
    if metrics.is_file():
        for p in extract_curve_points(metrics):
            wall = None if p.wall_seconds is None else p.wall_seconds + wall_offset
            points.append(CurvePoint(p.samples + offset, p.accuracy, wall))
    final = _read(method / "val_eval" / "summary.json")
    if final is not None and not points:  # a Phase-1 method: one point, where its budget ends
        total = float(budget.get("samples_generated", 0))
        points.append(CurvePoint(total, final["avg@k"]["mean"], budget.get("wall_seconds_total")))
    return points


TRAINING_METRICS = ("distill/metrics.jsonl", "sft/metrics.jsonl", "srt/stage1/metrics.jsonl")


def health_runs(run_dir: Path, labels: list[str]) -> dict[str, Path]:
    """The training run of each method whose health metrics health.png shows (its last training stage:
    Phase 2, else the one-stage SFT, else SRT's Stage 1)."""
    found = {}
    for label in labels:
        for name in TRAINING_METRICS:
            if (run_dir / label / name).is_file():
                found[label] = run_dir / label / name
                break
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--methods", required=True, help="comma-separated method labels (directories)")
    parser.add_argument("--base", default="base", help="the paired baseline")
    parser.add_argument("--reference", default="sd-zero", help="the second paired comparison")
    parser.add_argument("--num-bootstrap", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    labels = [m for m in args.methods.split(",") if m]
    runs = [load_run(args.run_dir, label) for label in labels]
    comparison = build_comparison(
        runs, args.base, args.reference, num_bootstrap=args.num_bootstrap, seed=args.seed
    )
    text = format_comparison_text(comparison)
    atomic_write_text(args.run_dir / "comparison.txt", text + "\n")
    atomic_write_text(args.run_dir / "comparison.md", format_comparison_markdown(comparison) + "\n")
    atomic_write_json(args.run_dir / "comparison.json", comparison)
    curves = {label: method_curve(args.run_dir, label) for label in labels}
    curves = {label: points for label, points in curves.items() if points}
    atomic_write_json(args.run_dir / "curves.json", {k: [p._asdict() for p in v] for k, v in curves.items()})
    if curves:
        plot_sample_efficiency(
            curves, args.run_dir / "curves.png", x="samples", title="validation accuracy vs samples"
        )
        plot_sample_efficiency(
            curves, args.run_dir / "curves_wall.png", x="wall_seconds", title="vs wall time"
        )
    health = health_runs(args.run_dir, labels)
    if health:
        from self_distillation.report import plot_health_curves

        plot_health_curves(health, args.run_dir / "health.png")
    print(text)
    return comparison


if __name__ == "__main__":
    main()
