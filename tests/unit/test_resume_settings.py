"""The resume check for Phase 2: `shared.run_config.check_resume_config` with the allow-list proposed for
`self_distillation.train` (pinned against SelfDistillationConfig)."""

from __future__ import annotations

import pytest

from self_distillation.config import SelfDistillationConfig
from self_distillation.train import PHASE2_RESUME_ALLOWED  # noqa: E402
from self_revision_training.shared.config import ConfigError, load_config, to_dict
from self_revision_training.shared.run_config import check_resume_config, flatten_config

REQUIRED = ["student.path=s", "teacher.path=t", "train_data.path=d.jsonl", "output_dir=o"]


def cfg(*overrides: str) -> dict:
    return to_dict(load_config(SelfDistillationConfig, None, [*REQUIRED, *overrides]))


def test_every_allowed_pattern_names_a_real_key():
    keys = flatten_config(cfg())
    from fnmatch import fnmatchcase

    for pattern in PHASE2_RESUME_ALLOWED:
        assert any(fnmatchcase(k, pattern) for k in keys), pattern


@pytest.mark.parametrize(
    "override",
    [
        "max_num_steps=2000",
        "val_period=5",
        "save_period=50",
        "keep_last=5",
        "log_every=10",
        "wandb=true",
        "wandb_project=other",
        "tensorboard=true",
        "ray.num_learners=4",
        "ray.placement=split",
    ],
)
def test_phase2_allowed_changes_pass(override):
    changed = check_resume_config(cfg(), cfg(override), allowed=PHASE2_RESUME_ALLOWED, where="distill o")
    assert len(changed) == 1


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train_data.path=other.jsonl", "train_data.path"),
        ("train_data.split=test", "train_data.split"),
        ("train_data.end_index=100", "train_data.end_index"),
        ("loss.kl_type=reverse", "loss.kl_type"),
        ("loss.top_k=null", "loss.top_k"),
        ("sampling.temperature=0.7", "sampling.temperature"),
        ("student.path=other", "student.path"),
        ("optim.lr=1e-6", "optim.lr"),
        ("num_prompts_per_step=64", "num_prompts_per_step"),
        ("seed=1", "seed"),
    ],
)
def test_phase2_data_or_objective_changes_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"cannot resume distill o with changed settings \({key}: "):
        check_resume_config(cfg(), cfg(override), allowed=PHASE2_RESUME_ALLOWED, where="distill o")
