"""What a run consumed (budget.json), so that two methods can be held to the same sample budget.

Every stage (Phase-1 collection, an SFT stage, Phase 2) writes `budget.json` in its output directory:

    stage                  "collect" | "sft" | "distill" | ...
    samples_generated      responses sampled for training (validation and evaluation samples are separate)
    tokens_generated       their tokens
    tokens_trained         target tokens the learner's loss saw (completion tokens in SFT)
    teacher_tokens_scored  target tokens a teacher scored (Phase-2 distillation)
    optimizer_steps
    validation_samples     responses sampled for periodic validation (not training budget)
    problems               {dataset: sorted problem indices used}; the total counts their union
    wall_seconds           {part: seconds} (rollout, grading, teacher, training, sync, validation, ...)

A stage keeps its counters in its own resumable state (attempt log, trainer state, driver state), so a
resumed run reports what the uninterrupted run would (work redone after a kill is not counted twice).
`sum_budgets` adds the stages of a method (`python -m self_revision_training.shared.budget RUN_DIR` writes
RUN_DIR/budget.json from every stage's budget.json below it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from self_revision_training.shared.storage import atomic_write_json

BUDGET_FILE = "budget.json"
COUNTERS = (
    "samples_generated",
    "tokens_generated",
    "tokens_trained",
    "teacher_tokens_scored",
    "optimizer_steps",
    "validation_samples",
)


@dataclass
class Budget:
    stage: str
    samples_generated: int = 0
    tokens_generated: int = 0
    tokens_trained: int = 0
    teacher_tokens_scored: int = 0
    optimizer_steps: int = 0
    validation_samples: int = 0
    problems: dict[str, list[int]] = field(default_factory=dict)
    wall_seconds: dict[str, float] = field(default_factory=dict)

    def add_problems(self, dataset: str, indices: Iterable[int]) -> None:
        seen = set(self.problems.get(dataset, ()))
        seen.update(int(i) for i in indices)
        self.problems[dataset] = sorted(seen)

    def add_generation_batch(self, dataset: str, marker: dict[str, Any], num_samples: int) -> None:
        """A committed Phase-1 batch (a `BatchLog` marker with indices, prompt_too_long, generated_tokens
        and seconds) that sampled `num_samples` responses."""
        self.samples_generated += num_samples
        self.tokens_generated += int(marker.get("generated_tokens", 0))
        skipped = set(marker.get("prompt_too_long", ()))
        self.add_problems(dataset, (i for i in marker["indices"] if i not in skipped))
        self.add_time("generation", float(marker.get("seconds", 0.0)))

    def add_time(self, part: str, seconds: float) -> None:
        self.wall_seconds[part] = round(self.wall_seconds.get(part, 0.0) + float(seconds), 3)

    def state_dict(self) -> dict[str, Any]:
        """The counters alone (what a resumable state stores; `from_dict` reads it back)."""
        return asdict(self)

    def to_dict(self) -> dict[str, Any]:
        """budget.json: the counters plus the problem count and the total wall time."""
        out = asdict(self)
        out["num_problems"] = sum(len(v) for v in self.problems.values())
        out["wall_seconds_total"] = round(sum(self.wall_seconds.values()), 3)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        keep = {k: data[k] for k in ("stage", *COUNTERS, "problems", "wall_seconds") if k in data}
        return cls(**keep)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / BUDGET_FILE
        atomic_write_json(path, self.to_dict())
        return path


def sum_budgets(budgets: Iterable[tuple[str, Budget]]) -> dict[str, Any]:
    """The total of named stage budgets: counters added, problems united per dataset, wall time per stage."""
    total = Budget(stage="total")
    stages = {}
    for name, budget in budgets:
        for counter in COUNTERS:
            setattr(total, counter, getattr(total, counter) + getattr(budget, counter))
        for dataset, indices in budget.problems.items():
            total.add_problems(dataset, indices)
        for part, seconds in budget.wall_seconds.items():
            total.add_time(f"{name}/{part}", seconds)
        stages[name] = budget.to_dict()
    return {**total.to_dict(), "stages": stages}


def collect_run_budget(run_dir: str | Path, stage_dirs: Iterable[str | Path] = ()) -> dict[str, Any]:
    """Sum every stage's budget.json below `run_dir` (its own top-level budget.json excluded), or below each
    of `stage_dirs` when given (a method built on another's stages, e.g. SD-Zero on the SRT run)."""
    root = Path(run_dir)
    roots = [Path(d) for d in stage_dirs] or [root]
    found = sorted({p for r in roots for p in r.rglob(BUDGET_FILE)})
    loaded = {p: json.loads(p.read_text(encoding="utf-8")) for p in found}
    # a total (this function's output, e.g. a nested loop's own budget.json) is not a stage: its stages are
    files = [p for p in found if loaded[p].get("stage") != "total"]
    if not files:
        raise FileNotFoundError(
            f"no {BUDGET_FILE} under {', '.join(map(str, roots))}: no stage has written one"
        )

    def name(path: Path) -> str:
        try:
            return str(path.parent.relative_to(root))
        except ValueError:  # a stage outside run_dir: its path
            return str(path.parent)

    return sum_budgets((name(p), Budget.from_dict(loaded[p])) for p in files)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m self_revision_training.shared.budget RUN_DIR [STAGE_DIR ...]`: write RUN_DIR/budget.json,
    the total of the stages below RUN_DIR (or below the STAGE_DIRs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m self_revision_training.shared.budget RUN_DIR [STAGE_DIR ...]")
    total = collect_run_budget(args[0], args[1:])
    atomic_write_json(Path(args[0]) / BUDGET_FILE, total)
    keys = ("samples_generated", "tokens_generated", "tokens_trained", "optimizer_steps", "num_problems")
    print(json.dumps({k: total[k] for k in keys}))
    return total


if __name__ == "__main__":
    main()
