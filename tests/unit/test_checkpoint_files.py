"""Checkpoint discovery trusts only complete step_* directories; a resumed run can really change its lr."""

from __future__ import annotations

import logging

import pytest
import torch

from self_revision_training.shared import checkpoints
from self_revision_training.shared.training import build_lr_lambda


def make_step(root, step: int, files: list[str]):
    path = root / f"step_{step:06d}"
    path.mkdir(parents=True)
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("{}")
    return path


def test_empty_or_partial_step_dirs_are_ignored_with_a_warning(tmp_path, caplog):
    sft = make_step(tmp_path, 2, ["trainer_state.json", "model_optim/.metadata"])
    distill = make_step(
        tmp_path, 3, ["driver_state.json", "learner/model_optim/.metadata", "learner/scheduler.json"]
    )
    make_step(tmp_path, 4, [])  # e.g. made by hand, or a copy that stopped early
    make_step(tmp_path, 5, ["trainer_state.json"])  # no DCP metadata: the shards are not all there
    with caplog.at_level(logging.WARNING, logger="sdzero.checkpoints"):
        found = checkpoints.list_checkpoints(tmp_path)
    assert found == [sft, distill]
    assert "step_000004: not a complete checkpoint" in caplog.text and "step_000005" in caplog.text
    assert checkpoints.list_checkpoints(tmp_path, "sft") == [sft]
    assert checkpoints.list_checkpoints(tmp_path, "distill") == [distill]
    assert checkpoints.list_checkpoints(tmp_path / "missing") == []


def test_apply_resumed_lr_changes_optimizer_and_schedule(tmp_path):
    def build(lr: float):
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.SGD([param], lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda("linear", 10, 2))
        return param, optimizer, scheduler

    _, optimizer, scheduler = build(1e-2)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved_opt, saved_sched = optimizer.state_dict(), scheduler.state_dict()

    param, optimizer, scheduler = build(1e-3)  # the resumed run's config says lr=1e-3 ...
    optimizer.load_state_dict(saved_opt)  # ... but the checkpoint restores 1e-2 everywhere
    scheduler.load_state_dict(saved_sched)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * build_lr_lambda("linear", 10, 2)(4))
    checkpoints.apply_resumed_lr(optimizer, scheduler, 1e-2, 1e-3)
    multiplier = build_lr_lambda("linear", 10, 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * multiplier(4))
    assert scheduler.get_last_lr() == pytest.approx([1e-3 * multiplier(4)])
    before = param.detach().clone()
    param.grad = torch.ones(3)
    optimizer.step()  # the update uses the new lr
    assert torch.allclose(before - param.detach(), torch.full((3,), 1e-3 * multiplier(4)))
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * multiplier(5))
    with pytest.raises(TypeError, match="LambdaLR"):
        checkpoints.apply_resumed_lr(optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1), 1e-3, 1e-4)
