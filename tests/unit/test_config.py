"""Config: defaults < YAML < dotted overrides; unknown keys and bad values are clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from self_revision_training.shared.config import (
    ConfigError,
    DatasetConfig,
    GradingConfig,
    PromptConfig,
    SamplingConfig,
    load_config,
    parse_cli,
    parse_override,
    to_dict,
)
from self_revision_training.shared.run_config import check_resume_config, diff_configs, save_run_config


@dataclass
class DemoConfig:
    output_dir: str = ""  # where outputs go
    lr: float = 5e-6  # learning rate
    steps: int = 10  # optimizer steps
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)


def test_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-5\nsteps: 20\nsampling:\n  temperature: 0.7\n  stop: ['Q:']\n")
    cfg = load_config(
        DemoConfig, path, ["steps=30", "sampling.top_p=0.9", "lr=2e-5", "dataset.end_index=null"]
    )
    assert (cfg.lr, cfg.steps) == (2e-5, 30)
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.stop) == (0.7, 0.9, ["Q:"])
    assert cfg.sampling.max_tokens == SamplingConfig().max_tokens  # default kept
    assert load_config(DemoConfig).steps == 10


def test_override_values_parse_as_yaml():
    assert parse_override("a.b=1e-5") == ("a.b", 1e-5)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=hello world") == ("a", "hello world")
    assert parse_override("a=") == ("a", "")
    assert parse_override("prompt.system_prompt=null") == ("prompt.system_prompt", None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["sampling.temprature=0.5"],
            r"unknown config key 'sampling.temprature' \(did you mean 'sampling.temperature'\?\)",
        ),
        (["nope=1"], "unknown config key 'nope'"),
        (["steps=ten"], "steps: expected an integer, got 'ten'"),
        (["steps=1.5"], "steps: expected an integer"),
        (["lr=true"], "lr: expected a number"),
        (["sampling.top_p=1.5"], r"sampling.top_p must be in \(0, 1\]"),
        (["sampling.temperature=-1"], "sampling.temperature must be >= 0"),
        (["dataset.on_bad_row=ignore"], r"dataset.on_bad_row: 'ignore' is not one of \['error', 'skip'\]"),
        (["dataset.start_index=5", "dataset.end_index=2"], "dataset.end_index"),
        (["sampling=3"], "sampling: expected a mapping"),
        (["sampling.stop=x"], "sampling.stop: expected a list"),
        (["noequals"], "not of the form key=value"),
        (["bad key=1"], "bad key"),
        (["prompt.correct_phrase=Wait, this response is wrong. Let me correct it."], "must differ"),
    ],
)
def test_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DemoConfig, None, overrides)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  n: 0\n")
    with pytest.raises(ConfigError, match=r"sampling.* \(from .*c\.yaml\)"):
        load_config(DemoConfig, path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(DemoConfig, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DemoConfig, tmp_path / "missing.yaml")


def test_cli_exits_with_a_message(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(DemoConfig, ["steps=x"])
    assert exc.value.code == 2
    assert "steps: expected an integer" in capsys.readouterr().err
    assert parse_cli(DemoConfig, ["steps=3"]).steps == 3


def test_save_run_config_round_trips(tmp_path):
    cfg = load_config(DemoConfig, None, ["steps=7", "prompt.chat_template_kwargs={enable_thinking: false}"])
    path = save_run_config(cfg, tmp_path / "out")
    saved = yaml.safe_load(path.read_text())
    assert "git_sha" in saved
    saved.pop("git_sha")
    assert saved == to_dict(cfg)
    reloaded = load_config(DemoConfig, path.with_name("clean.yaml") if False else None, None)
    assert reloaded.steps == 10
    clean = tmp_path / "clean.yaml"
    clean.write_text(yaml.safe_dump(saved))
    assert load_config(DemoConfig, clean) == cfg


def test_grading_config_validation():
    with pytest.raises(ValueError):
        GradingConfig(timeout_s=0)
    with pytest.raises(ValueError):
        GradingConfig(num_workers=0)


def test_integers_with_leading_zeros_are_decimal(tmp_path):
    # YAML 1.1 (PyYAML) reads 010 as octal 8 and 1:30 as 90; a knob 010 means ten.
    assert parse_override("steps=010") == ("steps", 10)
    assert parse_override("steps=-007") == ("steps", -7)
    assert parse_override("steps=08") == ("steps", 8)  # 1.1: the string '08'
    assert parse_override("a=0x1F") == ("a", 31) and parse_override("a=0o10") == ("a", 8)
    assert parse_override("a=1_000") == ("a", 1000) and parse_override("a=1:30") == ("a", "1:30")
    assert parse_override("a=[010, 2]") == ("a", [10, 2]) and parse_override("a=0.5") == ("a", 0.5)
    path = tmp_path / "c.yaml"
    path.write_text("steps: 010\ndataset:\n  start_index: 0100\n")
    cfg = load_config(DemoConfig, path, ["dataset.end_index=0200"])
    assert (cfg.steps, cfg.dataset.start_index, cfg.dataset.end_index) == (10, 100, 200)


def test_check_resume_config_lists_refused_keys_and_returns_allowed_ones():
    saved = to_dict(load_config(DemoConfig, None, ["steps=10", "output_dir=a"]))
    current = to_dict(
        load_config(DemoConfig, None, ["steps=20", "lr=1e-5", "sampling.top_p=0.9", "output_dir=a"])
    )
    with pytest.raises(
        ConfigError, match=r"changed settings \(lr: 5e-06 -> 1e-05; sampling.top_p: 1.0 -> 0.9\)"
    ):
        check_resume_config(saved, current, allowed=["steps"], where="run x")
    changed = check_resume_config(saved, current, allowed=["steps", "lr", "sampling"], where="run x")
    assert changed == {"steps": (10, 20), "lr": (5e-6, 1e-5), "sampling.top_p": (1.0, 0.9)}
    assert check_resume_config(saved, current, allowed=["s*", "l?"], where="x").keys() == changed.keys()
    # a key the saved config lacks (written before the key existed) and git_sha are not compared
    older = {k: v for k, v in saved.items() if k != "lr"} | {"git_sha": "abc"}
    assert diff_configs(older, saved) == {}
    # a section that gained entries is reported with its new value
    grown = to_dict(load_config(DemoConfig, None, ["prompt.chat_template_kwargs={enable_thinking: false}"]))
    assert diff_configs(saved, grown)["prompt.chat_template_kwargs"] == ({}, {"enable_thinking": False})


def test_dataset_config_deduplicate_is_an_opt_in_knob():
    assert DatasetConfig().deduplicate is False
    assert load_config(DemoConfig, None, ["dataset.deduplicate=true"]).dataset.deduplicate is True


@dataclass
class PhaseDefaultsConfig:
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(top_p=0.9, max_tokens=8192))
    dataset: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="test"))


def test_a_partial_section_keeps_the_fields_own_defaults(tmp_path):
    # Before: `sampling.temperature=0.7` rebuilt SamplingConfig() from the class defaults (max_tokens 1024,
    # top_p 1.0), and `dataset.path=...` turned an evaluation's split "test" into "train".
    cfg = load_config(PhaseDefaultsConfig, None, ["sampling.temperature=0.7", "dataset.path=x.jsonl"])
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_tokens) == (0.7, 0.9, 8192)
    assert (cfg.dataset.path, cfg.dataset.split) == ("x.jsonl", "test")
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  n: 2\n")
    assert load_config(PhaseDefaultsConfig, path).sampling.max_tokens == 8192
    with pytest.raises(ConfigError, match="unknown config key 'sampling.temprature'"):
        load_config(PhaseDefaultsConfig, None, ["sampling.temprature=0.7"])
