"""Teacher sync: a hard copy, and the EMA on a float32 shadow (exact in fp32; not stuck in bf16 storage);
the shadow survives a checkpoint round trip."""

from __future__ import annotations

import torch

from self_distillation.losses import Divergence
from self_distillation.teacher import Teacher
from self_revision_training.shared.config import ModelConfig


def _student_dir(tmp_path, teacher: Teacher, drift: float):
    """A directory of 'student' weights = the teacher's + a fixed drift (what learner rank 0 writes)."""
    from safetensors.torch import save_file

    state = {k: (v.detach().float() + drift).contiguous() for k, v in teacher.model.state_dict().items()}
    out = tmp_path / "student"
    out.mkdir(exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    return out, state


def test_ema_is_exact_in_float32_and_a_copy_replaces(tiny_model_dir, tmp_path):
    teacher = Teacher(ModelConfig(path=str(tiny_model_dir), dtype="float32"), Divergence(), device="cpu")
    old = {k: v.detach().clone() for k, v in teacher.model.state_dict().items()}
    weights, new = _student_dir(tmp_path, teacher, 1e-3)
    teacher.load_weights(str(weights), ema_decay=0.9)
    for key, value in teacher.model.state_dict().items():
        expected = old[key].clone().mul_(0.9).add_(new[key], alpha=1 - 0.9)  # the same fp32 ops
        assert torch.equal(value, expected), key
    teacher.load_weights(str(weights), ema_decay=0.0)
    assert all(torch.equal(v, new[k]) for k, v in teacher.model.state_dict().items())


def test_bf16_teacher_follows_the_float32_ema(tiny_model_dir, tmp_path):
    teacher = Teacher(ModelConfig(path=str(tiny_model_dir), dtype="bfloat16"), Divergence(), device="cpu")
    start = {k: v.detach().float().clone() for k, v in teacher.model.state_dict().items()}
    weights, target = _student_dir(tmp_path, teacher, 2e-4)
    exact = {k: v.clone() for k, v in start.items()}
    naive = {k: v.detach().clone() for k, v in teacher.model.state_dict().items()}  # EMA in bf16 storage
    for _ in range(30):
        teacher.load_weights(str(weights), ema_decay=0.99)
        for key in exact:
            exact[key].mul_(0.99).add_(target[key], alpha=0.01)
            naive[key].copy_(0.99 * naive[key] + 0.01 * target[key].to(torch.bfloat16))
    moved = total = stuck = 0
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, exact[key].to(torch.bfloat16)), key  # the shadow, rounded once
        moved += int((value.float() != start[key]).sum())
        stuck += int((naive[key].float() == start[key]).sum())
        total += value.numel()
    assert moved / total > 0.5 and stuck / total > 0.5  # the bf16-storage EMA leaves most weights unchanged


def test_the_shadow_survives_a_checkpoint(tiny_model_dir, tmp_path):
    teacher = Teacher(ModelConfig(path=str(tiny_model_dir), dtype="bfloat16"), Divergence(), device="cpu")
    weights, _ = _student_dir(tmp_path, teacher, 2e-4)
    teacher.load_weights(str(weights), ema_decay=0.99)
    teacher.save_weights(str(tmp_path / "ckpt"))
    resumed = Teacher(ModelConfig(path=str(tiny_model_dir), dtype="bfloat16"), Divergence(), device="cpu")
    resumed.restore_weights(str(tmp_path / "ckpt"))
    for a, b in ((teacher, resumed),):
        assert a._shadow.keys() == b._shadow.keys()
        assert all(torch.equal(a._shadow[k], b._shadow[k]) for k in a._shadow)
        assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    teacher.load_weights(str(weights), ema_decay=0.99)
    resumed.load_weights(str(weights), ema_decay=0.99)
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in teacher.model.state_dict().items())
