"""LoRA adapters (PEFT) on a Hugging Face causal LM, for the Phase-2 learner and the SFT (adapter layer).

`apply_lora` injects PEFT LoRA layers in place (`peft.inject_adapter_in_model`), so the model keeps its own
layout (`.model` decoder, `.lm_head`; FSDP2 shards it as usual) and only the adapters are trainable. The
rollout engine and the exported `final/` get merged weights (`merge_lora_state`: W + (alpha / r) B A, the
keys of the plain model), so vLLM and transformers load them as an ordinary checkpoint. `adapters_disabled`
turns every adapter off for a forward: the base weights, e.g. OPSD's fixed teacher without a second copy.

    causal_lm = apply_lora(causal_lm, LoRAConfig(enabled=True, rank=64, alpha=128))
    with adapters_disabled(causal_lm): ...          # the base model
    state = merge_lora_state(full_state_dict, lora_cfg)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from self_revision_training.shared.config import LoRAConfig

_BASE, _A, _B = ".base_layer.", ".lora_A.default.", ".lora_B.default."


def apply_lora(causal_lm: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Inject LoRA adapters into `causal_lm` in place; every other weight is frozen. Returns the model."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    inject_adapter_in_model(config, causal_lm)
    trainable = 0
    for name, param in causal_lm.named_parameters():
        param.requires_grad_(".lora_" in name)
        trainable += param.numel() if param.requires_grad else 0
    if not trainable:
        raise ValueError(
            f"lora.target_modules {cfg.target_modules} match no module of {type(causal_lm).__name__}"
        )
    return causal_lm


def has_lora(model: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, every LoRA layer computes with its base weight only."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merge_lora_state(state: dict[str, torch.Tensor], cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """A full state dict with LoRA layers -> the plain model's state dict with W + (alpha / r) B A merged.

    Keys `...proj.base_layer.weight` become `...proj.weight`; the adapter tensors are dropped. The product
    is computed in float32 (float64 stays float64) and cast back to the weight's dtype.
    """
    scaling = cfg.alpha / cfg.rank
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _A in key or _B in key:
            continue
        if _BASE not in key:
            merged[key] = value
            continue
        prefix, suffix = key.split(_BASE, 1)
        plain = f"{prefix}.{suffix}"
        a, b = state.get(f"{prefix}{_A}weight"), state.get(f"{prefix}{_B}weight")
        if suffix != "weight" or a is None or b is None:
            merged[plain] = value
            continue
        dtype = torch.promote_types(value.dtype, torch.float32)
        merged[plain] = (value.to(dtype) + scaling * (b.to(dtype) @ a.to(dtype))).to(value.dtype)
    return merged
