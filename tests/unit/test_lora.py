"""LoRA (PEFT) on the tiny model: the merged state equals PEFT's own merge; disabling the adapters gives the
base model; only the adapters train."""

from __future__ import annotations

import pytest
import torch

from self_revision_training.shared.config import LoRAConfig
from self_revision_training.shared.lora import adapters_disabled, apply_lora, has_lora, merge_lora_state

CFG = LoRAConfig(enabled=True, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])


def _lora_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64), CFG)
    with torch.no_grad():  # PEFT initialises B = 0 (a no-op adapter); give it a value
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_merged_state_equals_peft_merge_and_only_adapters_train(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = _lora_model(tiny_model_dir)
    assert has_lora(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    merged = merge_lora_state(model.state_dict(), CFG)
    reference = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64),
        LoraConfig(r=CFG.rank, lora_alpha=CFG.alpha, target_modules=CFG.target_modules),
    )
    reference.load_state_dict(
        {f"base_model.model.{k}": v for k, v in model.state_dict().items()}, strict=False
    )
    plain = reference.merge_and_unload().state_dict()
    assert merged.keys() == plain.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], plain[key], rtol=1e-12, atol=1e-12)
    ids = torch.tensor([[3, 4, 5, 6]])
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    fresh.load_state_dict(merged)
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=1e-10, atol=1e-10)


def test_disabled_adapters_give_the_base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = _lora_model(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    with torch.no_grad():
        with adapters_disabled(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(model(ids).logits, base(ids).logits)  # enabled again afterwards


def test_bad_targets_are_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError):
        apply_lora(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            LoRAConfig(enabled=True, target_modules=["nope"]),
        )
