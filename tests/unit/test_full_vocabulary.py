"""The full-vocabulary objective at scale: the teacher sends hidden states at the target positions and the
learner computes the teacher's logits chunk by chunk with its lm_head; loss and gradients equal the dense
top_k=None reference on unpadded sequences (float64), for a padded batch of unequal lengths."""

from __future__ import annotations

import pytest
import torch

from self_distillation.losses import Divergence, distillation_loss
from self_distillation.objectives import build_objective
from self_distillation.rollout_data import LearnerSample
from self_distillation.teacher import Teacher
from self_revision_training.shared.config import ModelConfig
from self_revision_training.shared.target_logits import TargetLogitsLM

SEQUENCES = [  # (ids, target mask): unequal lengths, so the teacher's micro-batch is padded
    ([3, 4, 5, 6, 7, 8, 9], [0, 0, 0, 1, 1, 1, 1]),
    ([10, 11, 12], [0, 1, 1]),
    ([13, 14, 15, 16, 17], [0, 0, 1, 1, 1]),
]


def _models(tiny_model_dir, div):
    from transformers import AutoModelForCausalLM

    teacher = Teacher(ModelConfig(path=str(tiny_model_dir), dtype="float32"), div, device="cpu")
    teacher.model.double()
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    return teacher, student


def _dense_reference(student, teacher_model, div):
    total = 0.0
    for ids, mask in SEQUENCES:
        s_logits = student(torch.tensor([ids])).logits[:, :-1]
        with torch.no_grad():
            t_logits = teacher_model(torch.tensor([ids])).logits[:, :-1]
        loss, metrics = distillation_loss(s_logits, t_logits, torch.tensor([mask[1:]]).double(), div)
        total = total + loss * metrics["num_tokens"]
    return total


@pytest.mark.parametrize("kl_type", ["reverse", "mixed", "forward"])
def test_full_vocabulary_path_equals_the_dense_reference(tiny_model_dir, kl_type):
    div = Divergence(kl_type, top_k=None, temperature=0.8, clip_per_token=5.0)
    teacher, student = _models(tiny_model_dir, div)
    scores = teacher.score(SEQUENCES)
    assert all(s["ids"] is None and s["hidden"].shape[1] == student.config.hidden_size for s in scores)
    # what crosses Ray per target token: H values, not V log-probs
    assert all(
        s["hidden"].shape[0] == sum(m) - (m[0] == 1) for s, (_, m) in zip(scores, SEQUENCES, strict=True)
    )
    samples = [LearnerSample(ids, m, True, None, s) for (ids, m), s in zip(SEQUENCES, scores, strict=True)]
    objective = build_objective("distillation", div, student.config.vocab_size)
    objective.set_teacher_lm_head(teacher.lm_head_weight())
    loss_sum, values = objective.micro_batch_loss(
        TargetLogitsLM(student, chunk_size=3), samples, 0, torch.device("cpu")
    )
    grads = torch.autograd.grad(loss_sum, list(student.parameters()))
    reference = _dense_reference(student, teacher.model, div)
    ref_grads = torch.autograd.grad(reference, list(student.parameters()))
    torch.testing.assert_close(loss_sum, reference, rtol=1e-6, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    assert values["divergence"].shape == (sum(sum(m) for _, m in SEQUENCES),)


def test_full_vocabulary_needs_the_teacher_head(tiny_model_dir):
    div = Divergence("reverse", top_k=None)
    teacher, student = _models(tiny_model_dir, div)
    samples = [LearnerSample(*SEQUENCES[0], True, None, teacher.score(SEQUENCES[:1])[0])]
    objective = build_objective("distillation", div, student.config.vocab_size)
    with pytest.raises(RuntimeError, match="set_teacher_lm_head"):
        objective.micro_batch_loss(TargetLogitsLM(student), samples, 0, torch.device("cpu"))
