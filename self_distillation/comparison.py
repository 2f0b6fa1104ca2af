"""Method comparison: paired statistics over shared problems, a comparison table, sample-efficiency curves.

Pure core of the method-comparison harness (numpy; matplotlib only inside `plot_sample_efficiency`). A
driver evaluates every method (SD-Zero, RFT, GRPO, OPSD, SSD, ...) from the same base model on the same
held-out problems with `python -m self_distillation.evaluate`, then calls:

    runs = [load_method_run("base", "RUN/eval_base"), load_method_run("sd-zero", "RUN/eval_sdzero", budget),
            failed_method_run("grpo", "OOM at step 12")]
    comparison = build_comparison(runs, base_label="base")      # JSON-serialisable dict
    print(format_comparison_text(comparison))                   # or format_comparison_markdown(...)
    plot_sample_efficiency({"sd-zero": extract_curve_points("RUN/sdzero/metrics.jsonl")}, "curves.png")

The statistics (paired bootstrap interval, sign-flip permutation p-value, unpaired intervals; the unit is
the problem) are in `paired_stats.py`; two overlapping unpaired intervals do not mean "no difference" when
the paired interval excludes 0 (the table marks it).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from self_distillation.paired_stats import (
    SAMPLES_FILE,
    SUMMARY_FILE,
    PerProblemAccuracy,
    align_per_problem,
    compute_paired_difference,
    load_per_problem_accuracy,
)


class CurvePoint(NamedTuple):
    samples: float  # cumulative samples generated when the accuracy was measured
    accuracy: float  # in [0, 1]
    wall_seconds: float | None = None  # cumulative wall time at that point


@dataclass(frozen=True)
class MethodRun:
    label: str
    status: Literal["ok", "failed"]
    reason: str = ""  # why a failed run failed ("" when ok)
    eval_dir: str = ""
    summary: dict[str, Any] | None = None  # summary.json of the evaluation (None when failed)
    per_problem: PerProblemAccuracy | None = None
    budget: dict[str, Any] | None = None  # samples_generated, tokens_generated, wall_seconds (any subset)


# ---------------------------------------------------------------- method runs and the comparison dict


def load_method_run(label: str, eval_dir: str | Path, budget: dict[str, Any] | None = None) -> MethodRun:
    """An evaluated method: summary.json and per-problem accuracy from its evaluation dir.

    A missing summary.json or samples.jsonl gives a failed run (its row still appears in the table).
    """
    eval_dir = Path(eval_dir)
    missing = [name for name in (SUMMARY_FILE, SAMPLES_FILE) if not (eval_dir / name).is_file()]
    if missing:
        return MethodRun(
            label, "failed", f"no {' or '.join(missing)} in {eval_dir}", str(eval_dir), None, None, budget
        )
    summary = json.loads((eval_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    return MethodRun(label, "ok", "", str(eval_dir), summary, load_per_problem_accuracy(eval_dir), budget)


def failed_method_run(label: str, reason: str, budget: dict[str, Any] | None = None) -> MethodRun:
    """A method whose training or evaluation failed; `reason` is shown in its table row."""
    return MethodRun(label, "failed", reason or "failed", budget=budget)


TESTS_NOTE = (
    "delta vs X = this row's method - X: the mean over problems of the per-problem avg@k accuracy difference, "
    "in percentage points; "
    "[lo, hi] = paired bootstrap 95% percentile interval (problems resampled with replacement, "
    "{num_bootstrap} resamples, seed {seed}); p = two-sided paired sign-flip permutation test (exact over "
    "2^m sign vectors when the m non-zero deltas are <= {exact_max_nonzero}, else {num_permutations} "
    "Monte Carlo sign vectors, p = (1 + hits) / (1 + R)); avg@k CI = unpaired mean +- 1.96 s/sqrt(P); "
    "'!' = the paired interval excludes 0 although the two unpaired intervals overlap"
)


def build_comparison(
    runs: Sequence[MethodRun],
    base_label: str,
    reference_label: str = "sd-zero",
    num_bootstrap: int = 10_000,
    num_permutations: int = 10_000,
    exact_max_nonzero: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """The comparison of methods as a JSON-serialisable dict (the renderers read only this dict).

    Args:
        runs: one MethodRun per method, in table order; labels must be unique and include `base_label`.
        base_label: every ok method gets `vs_base` = PairedDifference(base -> method) as a dict.
        reference_label: likewise `vs_reference`; None for the method itself, no column when absent.
        num_bootstrap, num_permutations, exact_max_nonzero, seed: see compute_paired_difference.
    Returns:
        {num_problems, samples_per_problem, base, reference (None when absent), settings, tests (text),
        methods: [{label, status, reason, eval_dir, avg@k, pass@k, maj@k, mean_response_tokens,
        truncation_rate, samples_generated, tokens_generated, wall_seconds, vs_base, vs_reference}]}.
        ValueError when ok methods differ in problem set or samples per problem.
    """
    labels = [run.label for run in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique, got {labels}")
    if base_label not in labels:
        raise ValueError(f"base method {base_label!r} is not among {labels}")
    ok = {run.label: run for run in runs if run.status == "ok"}
    if any(run.per_problem is None or run.summary is None for run in ok.values()):
        raise ValueError("an ok MethodRun needs its summary and per-problem accuracy")
    vectors = align_per_problem({label: run.per_problem for label, run in ok.items()})  # type: ignore[misc]
    settings = {"num_bootstrap": num_bootstrap, "num_permutations": num_permutations,
                "exact_max_nonzero": exact_max_nonzero, "seed": seed}  # fmt: skip
    reference = reference_label if reference_label in labels else None

    def paired(other: str | None, label: str) -> dict[str, Any] | None:
        if other is None or other == label or other not in ok or label not in ok:
            return None
        return asdict(compute_paired_difference(vectors[other], vectors[label], other, label, **settings))

    methods = []
    for run in runs:
        summary, budget = run.summary or {}, run.budget or {}
        methods.append({
            "label": run.label, "status": run.status, "reason": run.reason, "eval_dir": run.eval_dir,
            "avg@k": summary.get("avg@k"), "pass@k": summary.get("pass@k", {}), "maj@k": summary.get("maj@k", {}),
            "mean_response_tokens": summary.get("mean_response_tokens"),
            "truncation_rate": summary.get("truncation_rate"),
            **{key: budget.get(key) for key in ("samples_generated", "tokens_generated", "wall_seconds")},
            "vs_base": paired(base_label, run.label), "vs_reference": paired(reference, run.label),
        })  # fmt: skip
    first = next(iter(ok.values()), None)
    return {
        "num_problems": len(first.per_problem.problem_indices) if first and first.per_problem else None,
        "samples_per_problem": first.per_problem.samples_per_problem if first and first.per_problem else None,
        "base": base_label,
        "reference": reference,
        "settings": settings,
        "tests": TESTS_NOTE.format(**settings),
        "methods": methods,
    }


# ---------------------------------------------------------------- rendering


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return (
        f"{seconds:.0f}s"
        if seconds < 120
        else f"{seconds / 60:.1f}m"
        if seconds < 7200
        else f"{seconds / 3600:.2f}h"
    )


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def format_delta(diff: dict[str, Any] | None) -> str:
    """A PairedDifference dict as "+x.x [lo, hi] p=..." in percentage points ("-" when None)."""
    if diff is None:
        return "-"
    cell = f"{100 * diff['mean_delta']:+.1f} [{100 * diff['ci_low']:+.1f}, {100 * diff['ci_high']:+.1f}]"
    cell += f" p={_p(diff['p_value'])}"
    return cell + (" !" if diff["paired_excludes_zero"] and diff["unpaired_overlap"] else "")


def _avg_cell(avg: dict[str, Any] | None) -> str:
    if not avg:
        return "-"
    if avg.get("ci_low") is None or avg.get("ci_high") is None:
        return _pct(avg["mean"])
    return f"{_pct(avg['mean'])} [{_pct(avg['ci_low'])}, {_pct(avg['ci_high'])}]"


def comparison_cells(comparison: dict[str, Any]) -> list[list[str]]:
    """The table as rows of strings: a header row, then one row per method (failed ones included)."""
    methods = comparison["methods"]
    pass_ks = sorted({int(k) for m in methods for k in m["pass@k"]})
    maj_ks = sorted({int(k) for m in methods for k in m["maj@k"]})
    n = comparison["samples_per_problem"]
    header = ["method", "status", f"avg@{n if n else 'k'} (95% CI)"]
    header += [f"pass@{k}" for k in pass_ks] + [f"maj@{k}" for k in maj_ks]
    header += ["len", "trunc", "samples", "tokens", "wall", f"delta vs {comparison['base']}"]
    if comparison["reference"] is not None:
        header.append(f"delta vs {comparison['reference']}")
    table = [header + ["note"]]
    for m in methods:
        row = [m["label"], m["status"], _avg_cell(m["avg@k"])]
        row += [_pct(m["pass@k"].get(str(k))) for k in pass_ks] + [
            _pct(m["maj@k"].get(str(k))) for k in maj_ks
        ]
        length = m["mean_response_tokens"]
        row += ["-" if length is None else f"{length:.0f}", _pct(m["truncation_rate"])]
        row += [_count(m["samples_generated"]), _count(m["tokens_generated"]), _duration(m["wall_seconds"])]
        row.append(format_delta(m["vs_base"]))
        if comparison["reference"] is not None:
            row.append(format_delta(m["vs_reference"]))
        table.append(row + [m["reason"] if m["status"] == "failed" else ""])
    return table


def _footer(comparison: dict[str, Any]) -> str:
    return (
        f"{comparison['num_problems']} problems x {comparison['samples_per_problem']} samples. "
        + comparison["tests"]
    )


def format_comparison_text(comparison: dict[str, Any]) -> str:
    """Fixed-width text: header, rule, one line per method, then a line naming the tests used."""
    table = comparison_cells(comparison)
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]

    def render(cells: list[str]) -> str:
        middle = [cell.rjust(w) for cell, w in zip(cells[2:-1], widths[2:-1], strict=True)]
        return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]), *middle, cells[-1]]).rstrip()

    lines = [render(table[0]), "  ".join("-" * w for w in widths)] + [render(row) for row in table[1:]]
    return "\n".join([*lines, "", textwrap.fill(_footer(comparison), width=110)])


def format_comparison_markdown(comparison: dict[str, Any]) -> str:
    """A Markdown pipe table of the same cells, then the tests used as a paragraph."""
    table = [[cell.replace("|", "\\|") for cell in row] for row in comparison_cells(comparison)]
    align = ["---", "---"] + ["---:"] * (len(table[0]) - 3) + ["---"]
    lines = ["| " + " | ".join(row) + " |" for row in [table[0], align, *table[1:]]]
    return "\n".join([*lines, "", _footer(comparison)])


# ---------------------------------------------------------------- sample-efficiency curves


def extract_curve_points(
    metrics_path: str | Path, extra: Sequence[CurvePoint | tuple[float, ...]] = ()
) -> list[CurvePoint]:
    """Validation accuracy against cumulative samples (and wall time) from a Phase-2 metrics.jsonl.

    Args:
        metrics_path: rows with "val/accuracy" become points; x is the row's cumulative
            "budget/samples_generated" (0 for a step-0 row without it, taken before any training
            sample), wall time its "budget/wall_seconds" when present.
        extra: further points (e.g. a final evaluation), appended.
    Returns:
        The points sorted by samples; ValueError when a validation row after step 0 has no budget.
    """
    points = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        accuracy = row.get("val/accuracy")
        if not isinstance(accuracy, int | float) or math.isnan(accuracy):
            continue
        samples, wall = row.get("budget/samples_generated"), row.get("budget/wall_seconds")
        if samples is None:
            if row.get("step") != 0:
                raise ValueError(f"{metrics_path}: step {row.get('step')} has val/accuracy but no budget")
            samples = 0
            wall = 0.0 if wall is None else wall
        points.append(CurvePoint(float(samples), float(accuracy), None if wall is None else float(wall)))
    return sorted([*points, *(CurvePoint(*p) for p in extra)], key=lambda p: p.samples)


def plot_sample_efficiency(
    curves: Mapping[str, Sequence[CurvePoint | tuple[float, ...]]],
    png_path: str | Path,
    x: Literal["samples", "wall_seconds"] = "samples",
    title: str = "",
) -> Any:
    """One PNG with one line per method: accuracy (%) against samples generated or wall time (hours).

    Args:
        curves: {method: [(samples, accuracy[, wall_seconds]), ...]}; a single point draws a marker.
        png_path: written (parent directories created); matplotlib's Agg canvas, no pyplot state.
        x: the x axis; with "wall_seconds" points without wall time are left out (a method with none
            gets no line).
    Returns:
        The matplotlib Figure (its single Axes holds the lines, labelled by method).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, raw in curves.items():
        points = [CurvePoint(*q) for q in raw]
        if x == "samples":
            xy = sorted((p.samples, 100 * p.accuracy) for p in points)
        else:  # wall time in hours; points without it have no x
            xy = sorted(
                (p.wall_seconds / 3600, 100 * p.accuracy) for p in points if p.wall_seconds is not None
            )
        if xy:
            ax.plot([q[0] for q in xy], [q[1] for q in xy], marker="o", label=label)
    ax.set_xlabel("samples generated" if x == "samples" else "wall time (hours)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "sample efficiency")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return fig
