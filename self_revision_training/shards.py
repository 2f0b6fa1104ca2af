"""Data-parallel shards of a Phase-1 data stage (`sample_data`, `undo_data`): `output_dir/shard-k-of-N`
directories, each with its batch log, config.yaml, summary.json (status) and budget.json; the resume check of
a shard; and whether every shard has finished (the stage's merged outputs are written then)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from self_revision_training.shared.budget import Budget
from self_revision_training.shared.config import ConfigError, load_yaml, to_dict
from self_revision_training.shared.run_config import check_resume_config
from self_revision_training.shared.storage import atomic_write_json

SUMMARY_FILE = "summary.json"
FINISHED = ("done", "budget")  # a shard's final statuses: its range is done, or the sample budget is


def shard_dir(output_dir: str | Path, shard_index: int, num_shards: int) -> Path:
    return Path(output_dir) / f"shard-{shard_index}-of-{num_shards}"


def check_shard_resume(
    cfg: Any, out: Path, data_file: str, allowed: Iterable[str], what: str, num_shards: int | None = None
) -> None:
    """Refuse to mix runs in `out`'s stage directory: another shard count with data (the problems would be
    processed twice), or a committed shard whose config.yaml differs outside `allowed`."""
    if num_shards is not None:
        for other in out.parent.glob("shard-*-of-*"):
            match = re.fullmatch(r"shard-\d+-of-(\d+)", other.name)
            if match and int(match.group(1)) != num_shards and (other / data_file).is_file():
                raise ConfigError(
                    f"{out.parent} holds {what} from {match.group(1)} shards ({other.name}); num_shards="
                    f"{num_shards} would process problems twice. Use a new output_dir."
                )
    saved, data = out / "config.yaml", out / data_file
    if saved.is_file() and data.is_file() and data.stat().st_size:
        saved_cfg = load_yaml(saved.read_text(encoding="utf-8")) or {}
        check_resume_config(saved_cfg, to_dict(cfg), allowed=allowed, where=f"the {what} in {out}")


def shard_finished(shard: Path) -> bool:
    path = shard / SUMMARY_FILE
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("status") in FINISHED


def write_shard_summary(out: Path, budget: Budget, batches: int, status: str) -> None:
    """budget.json and summary.json ({status, batches, the budget}) of one shard."""
    budget.save(out)
    atomic_write_json(out / SUMMARY_FILE, {"status": status, "batches": batches, **budget.to_dict()})
