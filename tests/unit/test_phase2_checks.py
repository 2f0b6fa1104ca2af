"""Phase-2 start-up checks: the tokenizer's chat template against the teacher's recorded prompt spec, and
models whose logits are not lm_head(hidden) refused by every target-position path (learner, teacher, SFT)."""

from __future__ import annotations

import copy

import pytest

from self_distillation.config import SelfDistillationConfig
from self_distillation.train import resolve_prompt
from self_revision_training.shared.config import ConfigError, PromptConfig
from self_revision_training.shared.prompts import save_prompt_spec
from self_revision_training.shared.target_logits import TargetLogitsLM, check_plain_lm_head


def test_phase_2_refuses_a_chat_template_other_than_the_teachers(tiny_tokenizer, tmp_path):
    from self_revision_training.shared.config import DatasetConfig, ModelConfig

    save_prompt_spec(tmp_path, tiny_tokenizer, PromptConfig())
    cfg = SelfDistillationConfig(
        output_dir="o",
        train_data=DatasetConfig(path="d"),
        student=ModelConfig(path="s"),
        teacher=ModelConfig(path=str(tmp_path)),
    )
    assert resolve_prompt(cfg, tiny_tokenizer) == PromptConfig()
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = tiny_tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(ConfigError, match="chat template"):
        resolve_prompt(cfg, other)


def test_models_that_transform_their_logits_are_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                 num_key_value_heads=1, head_dim=32)  # fmt: skip
    gemma = Gemma2ForCausalLM(Gemma2Config(**small))  # final_logit_softcapping = 30
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        check_plain_lm_head(gemma)
    with pytest.raises(ValueError, match="transforms its logits"):
        TargetLogitsLM(gemma)  # the learner's and the SFT's wrapper (CompletionLossModel subclasses it)
    TargetLogitsLM(Qwen3ForCausalLM(Qwen3Config(**small)))  # a plain lm_head is accepted
