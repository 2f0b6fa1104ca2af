"""The run's identity on disk: `save_run_config` writes the resolved config.yaml (+ the git SHA) next to
every output, and `check_resume_config` compares a resumed run's config with it (an allow-list of dotted
keys or fnmatch patterns may change; any other changed key is an error listing both values).

    changed = check_resume_config(saved, to_dict(cfg), allowed=RESUME_ALLOWED, where="collection OUT")
"""

from __future__ import annotations

import fnmatch
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from self_revision_training.shared.config import ConfigError, to_dict
from self_revision_training.shared.storage import atomic_write_text


def flatten_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested sections become dotted keys (lists and other values are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def diff_configs(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ: {key: (saved, current)}.

    Keys the saved config does not have are not compared (a config written by an older version, before
    the key existed); `git_sha` is never compared.
    """
    old, new = flatten_config(saved), flatten_config(current)
    return {
        key: (old[key], new[key] if key in new else _lookup(current, key))
        for key in sorted(old)
        if key != "git_sha" and (key not in new or old[key] != new[key])
    }


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key of a nested dict (None when absent), e.g. a section that gained entries."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _allowed(key: str, patterns: Iterable[str]) -> bool:
    """fnmatch patterns on dotted keys; "a" also allows the whole section "a.*"."""
    return any(fnmatch.fnmatchcase(key, p) or key.startswith(f"{p}.") for p in patterns)


def check_resume_config(
    saved: dict[str, Any], current: dict[str, Any], *, allowed: Iterable[str], where: str
) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume with changed settings, except the allow-listed ones.

    Args:
        saved: the config the run being resumed was written with (nested dict, e.g. `to_dict(cfg)` as
            saved in a checkpoint or config.yaml).
        current: this run's config as a nested dict.
        allowed: dotted keys or fnmatch patterns that may change on resume (`max_steps`, `wandb*`, `ray`).
        where: what is being resumed, for the message (e.g. the checkpoint directory).
    Returns:
        The allowed keys that changed: {key: (saved, current)} (the caller logs or applies them).
    Raises:
        ConfigError: listing every changed key that is not allowed, with both values.
    """
    allowed = list(allowed)
    changed = diff_configs(saved, current)
    refused = {k: v for k, v in changed.items() if not _allowed(k, allowed)}
    if refused:
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"cannot resume {where} with changed settings ({lines}). These change the data or the objective; "
            f"use a new output_dir, or restore them. Settings a resume may change: {allowed}"
        )
    return {k: v for k, v in changed.items() if k not in refused}


def git_sha(repo_dir: str | Path | None = None) -> str | None:
    """The git commit of this checkout (with '-dirty' when there are local changes), or None."""
    cwd = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def save_run_config(cfg: Any, output_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config (plus `git_sha`) atomically to `output_dir/name`."""
    payload = {"git_sha": git_sha(), **to_dict(cfg)}
    path = Path(output_dir) / name
    atomic_write_text(path, yaml.safe_dump(payload, sort_keys=False, allow_unicode=True))
    return path
