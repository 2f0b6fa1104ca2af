"""Training checkpoints (resume) and the consolidated Hugging Face export, written atomically.

Layout of `<output_dir>/checkpoints/step_000120/`:
    model_optim/          DCP shards of the FSDP2 model + optimizer (one file per rank; resharded on load)
    trainer_state.json    step, epoch, world size, global batch, scheduler state, resolved config
    rng_rank{r}.pt        python / numpy / torch (/ cuda) RNG states of rank r
Everything is written into `.tmp_step_000120` next to it, fsync'ed, then renamed, so a directory named
`step_*` is always complete; a leftover `.tmp_*` (killed mid-write) is deleted on the next start. A
`step_*` directory that lacks its writer's files (`CHECKPOINT_FILES`: SFT's trainer_state.json and DCP
metadata, Phase 2's driver_state.json and learner shards), e.g. one made by hand or half-copied, is
ignored with a warning, never resumed from.
Needs a filesystem shared by all ranks (multi-node: a network filesystem), like DCP itself.

`save_hf_export` gathers the full state dict to rank 0 and writes safetensors + config.json +
generation_config.json + tokenizer files (+ whatever `extra_files` adds, e.g. sdzero_prompt.json) into a
temp dir that is renamed into place; transformers and vLLM load the result directly.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from self_revision_training.shared import distributed as dist_utils
from self_revision_training.shared.storage import atomic_write_json

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
log = logging.getLogger("sdzero.checkpoints")

# What a complete checkpoint directory holds, per writer; a step_* dir is complete when it has all the
# files of one writer (DCP writes `.metadata` last, after every shard).
CHECKPOINT_FILES: dict[str, tuple[str, ...]] = {
    "sft": ("trainer_state.json", "model_optim/.metadata"),
    "distill": ("driver_state.json", "learner/model_optim/.metadata", "learner/scheduler.json"),
}


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_publish(tmp: Path, final: Path) -> None:
    _fsync_tree(tmp)
    if final.exists():  # e.g. a re-export of `final/`: move the old one aside first, then drop it
        old = final.with_name(f".old_{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def is_complete_checkpoint(path: str | Path, writer: str | None = None) -> bool:
    """Whether `path` holds every file of `writer`'s checkpoints (None: of any writer in CHECKPOINT_FILES)."""
    path = Path(path)
    writers = [writer] if writer is not None else list(CHECKPOINT_FILES)
    return any(all((path / name).is_file() for name in CHECKPOINT_FILES[w]) for w in writers)


def list_checkpoints(ckpt_root: str | Path, writer: str | None = None) -> list[Path]:
    """Complete checkpoints, oldest first; an incomplete `step_*` directory is skipped with a warning.

    Args:
        writer: "sft" or "distill" (the files `CHECKPOINT_FILES` lists); None accepts either.
    """
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    complete = []
    for _, path in sorted(found):
        if is_complete_checkpoint(path, writer):
            complete.append(path)
            continue
        names = (
            CHECKPOINT_FILES[writer] if writer else sorted({n for f in CHECKPOINT_FILES.values() for n in f})
        )
        log.warning(
            "ignoring %s: not a complete checkpoint (it lacks %s); it was not written by a finished save "
            "and is not resumed from (delete it, or restore its files)",
            path, [n for n in names if not (path / n).is_file()],
        )  # fmt: skip
    return complete


def remove_partial(ckpt_root: str | Path) -> list[Path]:
    """Delete leftovers of an interrupted save (main rank only); returns what was removed."""
    root = Path(ckpt_root)
    removed = [p for p in root.glob(".tmp_*")] if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def select_checkpoints_to_delete(
    steps: list[int], val_accuracy: dict[int, float], keep_last: int
) -> list[int]:
    """Checkpoint steps to delete: all but the newest `keep_last` (0 = keep all) and the best by validation."""
    keep = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set(steps)
    scored = [s for s in steps if s in val_accuracy]
    if scored:
        keep.add(max(scored, key=lambda s: (val_accuracy[s], s)))
    return [s for s in steps if s not in keep]


def stage_dir(ckpt_root: str | Path, step: int) -> tuple[Path, Path]:
    """(temporary dir to write checkpoint `step` into, its final name); main rank only."""
    root = Path(ckpt_root)
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp, final


def publish_dir(tmp: str | Path, final: str | Path) -> Path:
    """fsync everything under `tmp`, then rename it to `final` (a `step_*` dir is always complete)."""
    _atomic_publish(Path(tmp), Path(final))
    return Path(final)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """DCP shards of model + optimizer and this rank's RNG into `directory` (all ranks call this)."""
    directory = Path(directory)
    if dist_utils.is_main():
        directory.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier()
    dist_utils.save_sharded_state(model, optimizer, directory / "model_optim")
    torch.save(_rng_state(), directory / f"rng_rank{dist_utils.rank()}.pt")
    dist_utils.barrier()


def load_training_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Inverse of `save_training_state`; the RNG only when saved by a run of the same world size."""
    directory = Path(directory)
    dist_utils.load_sharded_state(model, optimizer, directory / "model_optim")
    rng_file = directory / f"rng_rank{dist_utils.rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` (all ranks call this) and keep only the newest `keep_last`."""
    root = Path(ckpt_root)
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    if dist_utils.is_main():
        stage_dir(root, step)
    save_training_state(tmp, model, optimizer)
    if dist_utils.is_main():
        atomic_write_json(tmp / "trainer_state.json", trainer_state)
        publish_dir(tmp, final)
        for old in list_checkpoints(root)[: -keep_last or None] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()
    return final


def apply_resumed_lr(optimizer: torch.optim.Optimizer, scheduler: Any, saved_lr: float, lr: float) -> None:
    """Make a resumed run really train with a changed peak learning rate.

    Loading a checkpoint restores the saved run's lr into the optimizer's param groups and the
    scheduler's `base_lrs`; this rescales both by lr / saved_lr (groups keep their ratios), so the
    schedule continues from the current step with the new peak: lr_t = lr * multiplier(t).

    Args:
        scheduler: a `torch.optim.lr_scheduler.LambdaLR` (the SFT's and Phase 2's schedulers), already
            loaded from the checkpoint.
    """
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"apply_resumed_lr supports LambdaLR schedulers, got {type(scheduler).__name__}")
    if saved_lr <= 0 or lr <= 0:
        raise ValueError(f"learning rates must be > 0, got {saved_lr} and {lr}")
    ratio = lr / saved_lr
    scheduler.base_lrs = [base * ratio for base in scheduler.base_lrs]
    current = [
        base * fn(scheduler.last_epoch)
        for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, base, value in zip(optimizer.param_groups, scheduler.base_lrs, current, strict=True):
        group["initial_lr"] = base
        group["lr"] = value
    scheduler._last_lr = list(current)  # what get_last_lr() reports until the next step


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model + optimizer (+ this rank's RNG when saved by a run of the same world size)."""
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    load_training_state(path, model, optimizer)
    return state


def save_hf_export(
    model: nn.Module,
    out_dir: str | Path,
    hf_config: Any,
    tokenizer: Any,
    *,
    save_dtype: torch.dtype,
    generation_config: Any = None,
    strip_prefix: str = "",
    extra_files: Callable[[Path], None] | None = None,
    max_shard_size: str = "5GB",
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Consolidated Hugging Face directory (all ranks call this; rank 0 writes).

    Args:
        transform: applied to the (prefix-stripped) state dict before saving, e.g. merging LoRA adapters.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    full = dist_utils.get_full_state_dict(model)
    out = Path(out_dir)
    if dist_utils.is_main():
        state = {k.removeprefix(strip_prefix): v for k, v in full.items()}
        state = {
            k: v.to(save_dtype).contiguous() for k, v in (transform(state) if transform else state).items()
        }
        if getattr(hf_config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight; HF/vLLM re-tie on load
        tmp = out.with_name(f".tmp_{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: state[k] for k in keys}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
            atomic_write_json(
                tmp / "model.safetensors.index.json", {**index, "weight_map": split.tensor_to_filename}
            )
        hf_config.dtype = save_dtype
        hf_config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if extra_files is not None:
            extra_files(tmp)
        _atomic_publish(tmp, out)
    dist_utils.barrier()
    return out
