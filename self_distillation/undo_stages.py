"""UNDO's configuration and the stages each iteration runs (`self_distillation.undo` is the loop): every stage
is an existing entry point (evaluate, undo_data, sft under torchrun, train), called through a runner
(`SubprocessRunner`, or a scripted one in the tests) with its settings checked against its own config class
before anything runs."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from self_revision_training.shared.config import (
    BackendConfig,
    ConfigError,
    DatasetConfig,
    GradingConfig,
    ModelConfig,
    load_config,
    to_dict,
)
from self_revision_training.shared.run_config import flatten_config

log = logging.getLogger("sdzero.undo")


@dataclass
class StageOptions:
    config: str | None = None  # the stage entry point's YAML; null = its dataclass defaults
    overrides: dict[str, Any] = field(default_factory=dict)  # its config keys (nested or dotted), every run


@dataclass
class UndoConfig:
    inner: Literal["sft", "distill"] = "sft"  # what one iteration trains: UNDO's SFT, or a Phase-2 run
    student: ModelConfig = field(
        default_factory=ModelConfig
    )  # S_0, the base student (distill: the SRT model)
    teacher: ModelConfig = field(
        default_factory=ModelConfig
    )  # sft: the rationale teacher; distill: the first
    student_init: Literal["base", "previous"] = "base"  # each iteration trains from S_0 or from S_{k-1}
    train_data: DatasetConfig = field(default_factory=DatasetConfig)  # D
    val_data: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="train"))  # V (error signals)
    test_data: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="test"))  # path "" = none
    max_iterations: int = 5  # trained iterations at most
    patience: int = 1  # stop after this many iterations in a row without a new best validation accuracy
    min_delta: float = 0.0  # a new best must beat the old by more than this (accuracy, 0-1)
    val_n: int = 1  # samples per validation problem (avg@val_n decides)
    test_n: int = 4  # samples per test problem
    backend: BackendConfig = field(default_factory=BackendConfig)  # engines of evaluation and regeneration
    grading: GradingConfig = field(default_factory=GradingConfig)  # every stage's verifier
    evaluate: StageOptions = field(default_factory=lambda: StageOptions(config="configs/eval.yaml"))
    regenerate: StageOptions = field(default_factory=StageOptions)  # self_revision_training.undo_data
    sft: StageOptions = field(default_factory=lambda: StageOptions(config="configs/phase1_sft_stage1.yaml"))
    distill: StageOptions = field(default_factory=lambda: StageOptions(config="configs/phase2_distill.yaml"))
    regenerate_shards: int = 1  # teacher processes run at once (data-parallel shards)
    gpus_per_shard: int = 0  # CUDA devices per shard (CUDA_VISIBLE_DEVICES slices); 0 = leave it unset
    nproc_per_node: int = 1  # torchrun ranks of an SFT stage
    python: str = ""  # interpreter of the stages; "" = this one
    output_dir: str = ""  # required: iter-k/ per iteration, state.json, summary.json, budget.json, best

    def __post_init__(self) -> None:
        for name in ("output_dir", "student.path", "train_data.path", "val_data.path"):
            obj, _, key = name.rpartition(".")
            if not getattr(getattr(self, obj) if obj else self, key):
                raise ValueError(f"{name} is required")
        if self.inner == "sft" and not self.teacher.path:
            raise ValueError("teacher.path is required for inner=sft (the SRT model by default in undo.sh)")
        for name in ("max_iterations", "patience", "val_n", "test_n", "regenerate_shards", "nproc_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_delta < 0 or self.gpus_per_shard < 0:
            raise ValueError("min_delta and gpus_per_shard must be >= 0")


# Settings a resumed loop may change: when to stop, and resources. The rest decides what each stage did.

# ----------------------------------------------------------------------------------------------
# stages: what each iteration runs, as entry-point calls a runner executes


@dataclass
class StageCall:
    name: str  # "iter-2/regen", for logs
    module: str  # the entry point (python -m MODULE)
    argv: list[str]  # its arguments: --config FILE key=value ...
    log_file: Path  # its stdout and stderr
    torchrun: bool = False  # launch under torch.distributed.run (SFT)
    env: dict[str, str] = field(default_factory=dict)  # extra environment (CUDA_VISIBLE_DEVICES of a shard)


class StageRunner(Protocol):
    def run(self, calls: list[StageCall]) -> None:
        """Run the calls (at once when several) and return when all succeeded; raise otherwise."""
        ...


class StageError(RuntimeError):
    """A stage exited with an error; the message names its log."""


def _die_with_parent() -> None:  # preexec: a stage gets SIGTERM when the loop dies, even by SIGKILL
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


class SubprocessRunner:
    """Each call is `python -m module argv` (or torchrun); output goes to its log file and to stdout."""

    def __init__(self, python: str, nproc_per_node: int):
        self.python, self.nproc_per_node = python, nproc_per_node

    def command(self, call: StageCall) -> list[str]:
        if not call.torchrun:
            return [self.python, "-m", call.module, *call.argv]
        with socket.socket() as sock:  # a free rendezvous port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launch = ["--nnodes", "1", "--nproc_per_node", str(self.nproc_per_node)]
        launch += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
        return [self.python, "-m", "torch.distributed.run", *launch, "-m", call.module, *call.argv]

    def run(self, calls: list[StageCall]) -> None:
        procs, threads = [], []
        for call in calls:
            cmd = self.command(call)
            call.log_file.parent.mkdir(parents=True, exist_ok=True)
            handle = open(call.log_file, "a", encoding="utf-8")  # noqa: SIM115 - closed by its copier
            print(f"[undo] {call.name}: {' '.join(cmd)}  (log {call.log_file})", flush=True)
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, **call.env},
                text=True,
                errors="replace",
                preexec_fn=_die_with_parent,
            )
            thread = threading.Thread(
                target=_copy, args=(proc.stdout, handle, f"[{call.name}] "), daemon=True
            )
            thread.start()
            procs.append((call, proc))
            threads.append(thread)
        failed = [(call, proc.wait()) for call, proc in procs]
        for thread in threads:
            thread.join()
        failed = [(c, rc) for c, rc in failed if rc != 0]
        if failed:
            raise StageError("; ".join(f"{c.name} exited with {rc} (log {c.log_file})" for c, rc in failed))


def _copy(stream, handle, prefix: str) -> None:
    with handle:
        for line in stream:
            handle.write(line)
            handle.flush()
            sys.stdout.write(prefix + line)
            sys.stdout.flush()


def _overrides(prefix: str, values: dict[str, Any]) -> list[str]:
    """Nested or dotted config values -> `key=value` overrides (values as JSON, which YAML reads back)."""
    return [f"{prefix}{key}={json.dumps(value)}" for key, value in flatten_config(values).items()]


def _stage_argv(options: StageOptions, shared: list[str], owned: dict[str, Any]) -> list[str]:
    """config < the loop's shared sections < the stage's own overrides < what the loop decides."""
    head = ["--config", options.config] if options.config else []
    return head + shared + _overrides("", options.overrides) + _overrides("", owned)


class Stages:
    """The entry-point calls of one loop (paths and settings); `main` checks them before the first runs."""

    def __init__(self, cfg: UndoConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.shared = _overrides("backend.", to_dict(cfg.backend)) + _overrides(
            "grading.", to_dict(cfg.grading)
        )

    def iter_dir(self, k: int) -> Path:
        return self.out / f"iter-{k}"

    def model_dir(self, k: int) -> str:
        """S_k: the base student for k = 0, else iteration k's exported model."""
        if k == 0:
            return self.cfg.student.path
        return str(self.iter_dir(k) / ("sft" if self.cfg.inner == "sft" else "distill") / "final")

    def evaluate(self, k: int, name: str, model: str, data: DatasetConfig, n: int) -> StageCall:
        owned = {
            "model": {**to_dict(self.cfg.student), "path": model},
            "dataset": to_dict(data),
            "sampling.n": n,
            "ks": sorted({1, n}),
            "output_dir": str(self.iter_dir(k) / name),
            "label": f"iter-{k}",
            "reuse": True,
            "progress": False,
        }
        argv = _stage_argv(self.cfg.evaluate, self.shared, owned)
        return StageCall(
            f"iter-{k}/{name}", "self_distillation.evaluate", argv, self.iter_dir(k) / f"{name}.log"
        )

    def regenerate(self, k: int) -> list[StageCall]:
        cfg, prev = self.cfg, self.iter_dir(k - 1)
        owned = {
            "model": to_dict(cfg.teacher),
            "dataset": to_dict(cfg.train_data),
            "student_samples": str(self.iter_dir(k) / "answers" / "samples.jsonl"),
            "validation_samples": str(prev / "eval_val" / "samples.jsonl"),
            "validation_data": to_dict(cfg.val_data),
            "previous_rationales": str(prev / "regen" / "rationales.jsonl") if k > 1 else "",
            "iteration": k,
            "student_tokenizer": cfg.student.path,
            "output_dir": str(self.iter_dir(k) / "regen"),
            "num_shards": cfg.regenerate_shards,
            "progress": False,
        }
        calls = []
        for shard in range(cfg.regenerate_shards):
            argv = _stage_argv(cfg.regenerate, self.shared, {**owned, "shard_index": shard})
            env = {}
            if cfg.gpus_per_shard:
                first = shard * cfg.gpus_per_shard
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(first, first + cfg.gpus_per_shard)))
            log_file = self.iter_dir(k) / f"regen-shard-{shard}.log"
            calls.append(
                StageCall(f"iter-{k}/regen", "self_revision_training.undo_data", argv, log_file, env=env)
            )
        return calls

    def sft(self, k: int) -> StageCall:
        init = self.cfg.student.path if self.cfg.student_init == "base" else self.model_dir(k - 1)
        owned = {
            "stage": 1,
            "model.path": init,
            "data.train_file": str(self.iter_dir(k) / "regen" / "sft.jsonl"),
            "data.layout": "prompt_completion",
            "output_dir": str(self.iter_dir(k) / "sft"),
        }
        argv = _stage_argv(self.cfg.sft, [], owned)
        return StageCall(
            f"iter-{k}/sft", "self_revision_training.sft", argv, self.iter_dir(k) / "sft.log", True
        )

    def distill(self, k: int, teacher: str) -> StageCall:
        cfg = self.cfg
        init = cfg.student.path if cfg.student_init == "base" else self.model_dir(k - 1)
        owned = {
            "student.path": init,  # dtypes, Ray and the rest: the distill config and distill.overrides
            "teacher.path": teacher,
            "train_data": to_dict(cfg.train_data),
            "output_dir": str(self.iter_dir(k) / "distill"),
        }
        argv = _stage_argv(cfg.distill, _overrides("grading.", to_dict(cfg.grading)), owned)
        return StageCall(
            f"iter-{k}/distill", "self_distillation.train", argv, self.iter_dir(k) / "distill.log"
        )

    def first_teacher(self) -> str:
        return self.cfg.teacher.path or self.cfg.student.path

    def check(self) -> None:
        """Parse iteration 1's calls with their entry points' configs: a bad key fails before any stage runs."""
        from self_distillation.evaluate import EvalConfig
        from self_revision_training.undo_data import UndoDataConfig

        calls = [
            (EvalConfig, self.evaluate(1, "eval_val", self.model_dir(0), self.cfg.val_data, self.cfg.val_n))
        ]
        if self.cfg.inner == "sft":
            from self_revision_training.sft import SFTConfig

            calls += [(UndoDataConfig, c) for c in self.regenerate(1)] + [(SFTConfig, self.sft(1))]
        else:
            from self_distillation.config import SelfDistillationConfig

            calls.append((SelfDistillationConfig, self.distill(1, self.first_teacher())))
        for cls, call in calls:
            config = call.argv[1] if call.argv[:1] == ["--config"] else None
            overrides = call.argv[2:] if config else call.argv
            try:
                load_config(cls, config, overrides)
            except ConfigError as exc:
                raise ConfigError(f"{call.name} ({call.module}): {exc}") from exc
