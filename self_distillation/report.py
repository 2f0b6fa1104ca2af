"""A fixed-width comparison table of evaluation summaries (summary.json files of `evaluate`).

    python -m self_distillation.report RUN/eval_base/summary.json RUN/eval_sdzero/summary.json

Accuracies are shown in percent with one decimal; avg@k carries its 95% CI half-width (problems as the
unit, see evaluation.py); pass@k and maj@k columns are the union of the budgets of all rows ("-" where a
row lacks one); `len` is the mean response length in tokens and `trunc` the share cut at max_tokens.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _avg_cell(avg: dict[str, Any]) -> str:
    if avg.get("ci_low") is None or avg.get("ci_high") is None:
        return _pct(avg["mean"])
    return f"{_pct(avg['mean'])} ± {100 * (avg['ci_high'] - avg['ci_low']) / 2:.1f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Render summaries (dicts from `evaluation.summarize` plus an optional `label`) as a text table.

    Args:
        rows: one summary per line of the table; `label` names the row (else its position).
    Returns:
        The table: a header, a rule, one line per row; columns padded to their widest cell.
    """
    ks = sorted({int(k) for row in rows for key in ("pass@k", "maj@k") for k in row.get(key, {})})
    maj_ks = sorted({int(k) for row in rows for k in row.get("maj@k", {})})
    ns = {row["samples_per_problem"] for row in rows}
    avg_name = f"avg@{ns.pop()} (95% CI)" if len(ns) == 1 else "avg@n (95% CI)"
    temps = [row.get("decoding", {}).get("temperature") for row in rows]
    show_t = len(set(temps)) > 1  # a temperature sweep (eval.sh TEMPERATURES): one column for T
    header = ["model", "problems", "n", *(["T"] if show_t else []), avg_name]
    header += [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in maj_ks] + ["len", "trunc"]
    table = [header]
    for i, row in enumerate(rows):
        cells = [
            str(row.get("label") or f"run {i}"),
            str(row["num_problems"]),
            str(row["samples_per_problem"]),
        ]
        if show_t:
            cells.append("-" if temps[i] is None else f"{temps[i]:g}")
        cells.append(_avg_cell(row["avg@k"]))
        cells += [_pct(row.get("pass@k", {}).get(str(k))) for k in ks]
        cells += [_pct(row.get("maj@k", {}).get(str(k))) for k in maj_ks]
        cells += [f"{row['mean_response_tokens']:.0f}", _pct(row["truncation_rate"])]
        table.append(cells)
    widths = [max(len(line[c]) for line in table) for c in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True))])

    lines = [render(header), "  ".join("-" * w for w in widths)]
    lines += [render(cells) for cells in table[1:]]
    return "\n".join(lines)


def load_summaries(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read summary.json files (a directory means its summary.json)."""
    out = []
    for path in map(Path, paths):
        file = path / "summary.json" if path.is_dir() else path
        out.append(json.loads(file.read_text(encoding="utf-8")))
    return out


def _save_figure(fig: Any, png_path: str | Path) -> Path:
    """tight layout, write the PNG (parents created), close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


CURVES = (
    ("train/loss", "loss"),
    ("train/reward", "training reward (accuracy)"),
    ("train/kl_r0", "KL on r=0 samples"),
    ("train/kl_r1", "KL on r=1 samples"),
)


def plot_training_curves(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Phase 2 curves (loss, training reward, KL by r) from metrics.jsonl to a PNG (needs matplotlib)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line]
    rows = [r for r in rows if "train/loss" in r]
    if not rows:
        raise ValueError(f"{metrics_path}: no training steps to plot")
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        points = [
            (r["step"], r[key])
            for r in rows
            if isinstance(r.get(key), int | float) and not math.isnan(r[key])
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o")
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
    return _save_figure(fig, png_path)


HEALTH_CURVES = (
    ("gns_b_simple", "gradient noise scale B_simple", True),
    ("frac_weights_changed", "fraction of weights changed", False),
    ("update_to_weight_ratio", "|update| / |weights|", True),
)


def _health_value(row: dict[str, Any], stat: str) -> float | None:
    import math

    value = row.get(stat, row.get(f"train/{stat}"))  # SFT logs `stat`, the Phase-2 learner `train/stat`
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def plot_health_curves(runs: dict[str, str | Path], png_path: str | Path) -> Path:
    """Training health per optimizer step for several runs (SFT or Phase-2 metrics.jsonl, one line each):
    the noise scale (a large B_simple = updates dominated by noise), weights changed, update ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(HEALTH_CURVES), figsize=(4 * len(HEALTH_CURVES), 3.2))
    plotted, colors = False, plt.get_cmap("tab10")
    for n, (label, path) in enumerate(runs.items()):  # one colour per run, the same in every panel
        rows = [
            json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        for ax, (stat, _, _) in zip(axes, HEALTH_CURVES, strict=True):
            points = [
                (r["step"], v) for r in rows if "step" in r and (v := _health_value(r, stat)) is not None
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=label, color=colors(n % 10))
                plotted = True
    if not plotted:
        plt.close(fig)
        raise ValueError(f"no health metrics in {sorted(runs)}")
    for ax, (_, title, log_scale) in zip(axes, HEALTH_CURVES, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        if log_scale and ax.has_data():
            ax.set_yscale("log")
        if ax.has_data():
            ax.legend(fontsize=7)
    return _save_figure(fig, png_path)


LOCALIZATION_CURVES = (
    ("top5_share", "KL share of the top 5% tokens"),
    ("top10_share", "KL share of the top 10% tokens"),
    ("gini", "Gini of per-token KL"),
    ("answer_kl_share", "KL share on final-answer tokens"),
)


def plot_localization_curves(
    metrics_path: str | Path, png_path: str | Path, prefix: str = "localization"
) -> Path:
    """Concentration of the teacher-student KL by r over training (keys f"{prefix}/r{0,1}/{stat}" of
    `localization.compute_localization_metrics`, logged on dump steps) from metrics.jsonl to a PNG."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line]
    rows = [r for r in rows if any(k.startswith(f"{prefix}/") for k in r)]
    if not rows:
        raise ValueError(f"{metrics_path}: no {prefix}/* metrics to plot (no dump steps)")
    fig, axes = plt.subplots(1, len(LOCALIZATION_CURVES), figsize=(4 * len(LOCALIZATION_CURVES), 3.2))
    for ax, (stat, title) in zip(axes, LOCALIZATION_CURVES, strict=True):
        plotted = False
        for r, color in (("r0", "tab:red"), ("r1", "tab:blue")):
            key = f"{prefix}/{r}/{stat}"
            points = [
                (row["step"], row[key])
                for row in rows
                if isinstance(row.get(key), int | float) and not math.isnan(row[key])
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=color, label=r.replace("r", "r="))
                plotted = True
        if plotted:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    return _save_figure(fig, png_path)


def main(argv: list[str] | None = None) -> str:
    """`python -m self_distillation.report SUMMARY_OR_DIR ... [--plot METRICS.jsonl OUT.png]
    [--plot-localization METRICS.jsonl OUT.png]`"""
    args = list(sys.argv[1:] if argv is None else argv)
    for flag, plot in (("--plot", plot_training_curves), ("--plot-localization", plot_localization_curves)):
        if flag in args:
            i = args.index(flag)
            print(f"wrote {plot(args[i + 1], args[i + 2])}", file=sys.stderr)
            del args[i : i + 3]
    if not args:
        raise SystemExit(
            "usage: python -m self_distillation.report SUMMARY_OR_DIR [...] [--plot METRICS PNG]"
        )
    table = format_table(load_summaries(args))
    print(table)
    return table


if __name__ == "__main__":
    main()
