"""The Phase-2 teacher: scores teacher sequences at their target positions only (no grad, eval mode).

Per sequence it returns, for each of its n target tokens in order, the teacher's distribution at the
divergence's temperature as top-k ids + log-probs (`top_k` set; the reference's default k=64) or full
log-probs (`top_k=None`), plus the raw (temperature 1) log-prob of the target token for the gap metric.
Only the target positions go through the lm_head (`target_logits.select_target_rows`).

Weights: frozen by default; `load_weights` copies (or EMA-blends) the student's weights in for the
teacher-sync ablation. A plain class: `actors.py` places it with Ray, tests build it directly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from self_distillation.losses import Divergence
from self_distillation.rollout_data import collate_sequences
from self_revision_training.shared.config import ModelConfig
from self_revision_training.shared.target_logits import check_plain_lm_head, select_target_rows, upcast_logits
from self_revision_training.shared.training import load_causal_lm, resolve_dtype


def load_weights_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files in `directory`."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


class Teacher:
    """Frozen teacher: log-probs at the target positions of teacher sequences (no grad, eval mode)."""

    def __init__(
        self,
        model: ModelConfig,
        divergence: Divergence,
        device: str | None = None,
        offload: bool = False,
        micro_batch_size: int = 4,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        auto = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.model = load_causal_lm(model, resolve_dtype(model.dtype, auto)).eval().requires_grad_(False)
        check_plain_lm_head(self.model)
        self.divergence = divergence
        self.offload = offload and self.device.type == "cuda"  # colocated GPU runs: free memory when idle
        self.micro_batch_size = micro_batch_size
        self.model.to("cpu" if self.offload else self.device)

    @torch.no_grad()
    def score(self, sequences: list[tuple[list[int], list[int]]]) -> list[dict[str, torch.Tensor | None]]:
        """Per sequence: ids [n, k] (None when full-vocabulary), logprobs [n, k or V] at temperature T,
        target_logprobs [n] (raw distribution), for its n target tokens in order."""
        if self.offload:
            self.model.to(self.device)
        results = []
        temperature, top_k = self.divergence.temperature, self.divergence.top_k
        for start in range(0, len(sequences), self.micro_batch_size):
            chunk = sequences[start : start + self.micro_batch_size]
            batch = {k: v.to(self.device) for k, v in collate_sequences(chunk, 0).items()}
            hidden = self.model.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=False,
            ).last_hidden_state  # [B, T, H]
            for row in range(len(chunk)):
                rows, targets = select_target_rows(  # [n, H], [n]
                    hidden[row : row + 1],
                    batch["input_ids"][row : row + 1, 1:],
                    batch["target_mask"][row : row + 1, 1:].bool(),
                )
                logits = upcast_logits(self.model.lm_head(rows))  # [n, V]
                raw = logits.log_softmax(-1)
                target_lp = raw.gather(-1, targets[:, None]).squeeze(-1)
                scaled = raw if temperature == 1.0 else (logits / temperature).log_softmax(-1)
                if top_k is not None and top_k < scaled.shape[-1]:
                    values, ids = scaled.topk(top_k, dim=-1)
                    results.append(
                        {"ids": ids.int().cpu(), "logprobs": values.cpu(), "target_logprobs": target_lp.cpu()}
                    )
                else:
                    results.append(
                        {"ids": None, "logprobs": scaled.cpu(), "target_logprobs": target_lp.cpu()}
                    )
        if self.offload:
            self.model.to("cpu")
        return results

    def load_weights(self, weights_dir: str, ema_decay: float = 0.0) -> None:
        """Teacher sync: copy (ema_decay 0) or EMA-blend the student's weights into the teacher."""
        state = load_weights_dir(weights_dir)
        own = self.model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                target = own[key]
                value = value.to(target.device, target.dtype)
                target.copy_(value if ema_decay == 0 else ema_decay * target + (1 - ema_decay) * value)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    def save_weights(self, directory: str) -> None:
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(Path(directory) / "model.safetensors"))
