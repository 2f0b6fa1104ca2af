"""Per-step metrics of a training run: metrics.jsonl on the main rank, plus W&B / TensorBoard when enabled.

Used by the SFT and the Phase-2 loop. On resume, rows a killed run logged after its last checkpoint are
dropped, so every step appears once. Values are written as strict JSON: a NaN or infinite number (a
metric with no samples this step, e.g. the KL of r=1 samples when every sample was wrong) becomes null.

    logger = MetricsLogger(out / "metrics.jsonl", resume_step, enabled=is_main, config=to_dict(cfg))
    logger.log({"step": 1, "loss": 0.3})
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """metrics.jsonl (+ optional W&B / TensorBoard when installed and enabled) on the main rank."""

    def __init__(
        self,
        path: str | Path,
        resume_step: int,
        *,
        enabled: bool = True,
        config: dict[str, Any] | None = None,
        wandb: bool = False,
        wandb_project: str = "sd-zero",
        tensorboard: bool = False,
    ):
        self.enabled = enabled
        self.path = Path(path)
        self.wandb = self.tb = None
        if not self.enabled:
            return
        if self.path.exists():  # drop rows a killed run logged after its last checkpoint
            rows = [r for r in self.path.read_text(encoding="utf-8").splitlines() if r.strip()]
            kept = [r for r in rows if r.endswith("}") and json.loads(r)["step"] <= resume_step]
            self.path.write_text("".join(r + "\n" for r in kept), encoding="utf-8")
        if wandb and importlib.util.find_spec("wandb"):
            import wandb as wandb_module

            self.wandb = wandb_module.init(project=wandb_project, config=config, dir=str(self.path.parent))
        if tensorboard and importlib.util.find_spec("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({k: _strict(v) for k, v in row.items()}, allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and key != "step":
                    self.tb.add_scalar(key, value, row["step"])
