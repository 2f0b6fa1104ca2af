"""The Phase-2 teacher: scores teacher sequences at their target positions only (no grad, eval mode).

Per sequence it returns, for each of its n target tokens in order, the teacher's distribution at the
divergence's temperature as top-k ids + log-probs (`top_k` set; the reference's default k=64), plus the raw
(temperature 1) log-prob of the target token for the gap metric. Only the target positions go through the
lm_head (`target_logits.select_target_rows`).

Batching (`pack_tokens`, config `teacher_pack_tokens`): the sequences are sorted by length and packed into
rows of at most that many tokens without padding, position ids restarting at 0 for each sequence, so no
token attends across a boundary (`target_logits.packed_position_ids`, checked once per model by
`check_packed_attention`); 0 = the padded micro-batches of `micro_batch_size` in input order. Packed and
padded scoring give the same top-k ids and log-probs (float32: within 1e-5; tests/unit/test_teacher_packing.py).

Full vocabulary (`top_k=None`, the paper's objective): [n, V] float32 log-probs would be ~0.6 MB per target
token for a 151,936-entry vocabulary (~230 GB for a 128-sample step of 3k tokens). The teacher sends its
final hidden states at the target positions instead ([n, H] in its compute dtype: 2 KB per token for H=1024
in bf16), and the learner computes the teacher's logits chunk by chunk with the teacher's lm_head
(`lm_head_weight`, sent to the learners once per weights version) inside its loss (`objectives.py`).

Weights: frozen by default; `load_weights` copies (or EMA-blends) the student's weights in for the
teacher-sync ablation, from a safetensors directory or from the learner's tensors (`ray.weight_sync`).
A plain class: `actors.py` places it with Ray, tests build it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from self_distillation.losses import Divergence
from self_distillation.rollout_data import collate_sequences
from self_revision_training.shared.config import ModelConfig
from self_revision_training.shared.target_logits import (
    check_packed_attention,
    check_plain_lm_head,
    plan_packed_rows,
    select_target_rows,
    upcast_logits,
    use_packed_attention,
)
from self_revision_training.shared.training import load_causal_lm, resolve_dtype

EMA_SHADOW_FILE = "ema_shadow.fp32"  # not *.safetensors: load_weights_dir reads only the weights


def load_weights_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files in `directory`."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


SHARED_DTYPES = "__torch_dtypes__"  # key of share_weights' {name: dtype} for tensors numpy cannot hold


def share_weights(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """{name: numpy array} sharing the tensors' memory, for `ray.put`: Ray stores numpy arrays so that every
    reader maps the one shared-memory copy (no deserialisation copy; a torch tensor is pickled and copied by
    each reader: measured 1 s vs 5 ms for SmolLM2-135M in fp32). bf16 travels as its int16 bit pattern."""
    shared: dict[str, Any] = {}
    dtypes: dict[str, str] = {}
    for key, value in state.items():
        value = value.detach().contiguous()
        if value.dtype == torch.bfloat16:
            dtypes[key], value = "bfloat16", value.view(torch.int16)
        shared[key] = value.numpy()
    shared[SHARED_DTYPES] = dtypes
    return shared


def resolve_weights(weights: str | Path | dict[str, Any]) -> dict[str, torch.Tensor]:
    """{name: tensor} of a weights source: a safetensors directory, tensors, or `share_weights` arrays
    (read-only views of Ray's shared memory: every consumer copies them into its own parameters)."""
    if isinstance(weights, (str, Path)):
        return load_weights_dir(weights)
    if SHARED_DTYPES not in weights:
        return weights
    import warnings

    dtypes = weights[SHARED_DTYPES]
    state = {}
    with warnings.catch_warnings():  # "non-writable array": the views are only read (copied from)
        warnings.simplefilter("ignore", UserWarning)
        for key, value in weights.items():
            if key != SHARED_DTYPES:
                tensor = torch.from_numpy(value)
                state[key] = tensor.view(getattr(torch, dtypes[key])) if key in dtypes else tensor
    return state


def teacher_outputs(
    logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, div: Divergence
) -> dict[str, torch.Tensor | None]:
    """What the teacher sends for n target tokens, from its [n, V] logits (float32+) and [n, H] rows.

    Top-k: {"ids" [n, k] int32, "logprobs" [n, k] at div.temperature, "target_logprobs" [n] raw}; full
    vocabulary (div.top_k None): {"ids": None, "hidden" [n, H], "target_logprobs"} (module docstring).
    """
    raw = logits.log_softmax(-1)
    target_lp = raw.gather(-1, targets[:, None]).squeeze(-1)
    if div.top_k is None:  # the learner computes the logits from these rows
        return {"ids": None, "hidden": rows, "target_logprobs": target_lp}
    scaled = raw if div.temperature == 1.0 else (logits / div.temperature).log_softmax(-1)
    if div.top_k < scaled.shape[-1]:
        values, ids = scaled.topk(div.top_k, dim=-1)
    else:  # k >= V: the whole (sorted) vocabulary
        values, ids = scaled.sort(dim=-1, descending=True)
    return {"ids": ids.int(), "logprobs": values, "target_logprobs": target_lp}


def score_chunk(
    rows: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, div: Divergence
) -> dict[str, torch.Tensor | None]:
    """`target_logits.map_chunks` function: the teacher outputs of one chunk of target rows."""
    return teacher_outputs(upcast_logits(lm_head(rows)), rows, targets, div)


class Teacher:
    """Frozen teacher: log-probs at the target positions of teacher sequences (no grad, eval mode)."""

    def __init__(
        self,
        model: ModelConfig,
        divergence: Divergence,
        device: str | None = None,
        offload: bool = False,
        micro_batch_size: int = 4,
        pack_tokens: int = 0,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        auto = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.model = load_causal_lm(model, resolve_dtype(model.dtype, auto)).eval().requires_grad_(False)
        check_plain_lm_head(self.model)
        self.divergence = divergence
        self.offload = offload and self.device.type == "cuda"  # colocated GPU runs: free memory when idle
        self.micro_batch_size = micro_batch_size  # padded path (pack_tokens 0): sequences per forward
        self.pack_tokens = pack_tokens  # > 0: packed rows of at most this many tokens (sorted by length)
        self.model.to("cpu" if self.offload else self.device)
        if pack_tokens:
            use_packed_attention(self.model)  # sdpa: causal attention per packed sequence (varlen)
            check_packed_attention(self.model)  # raises if this model's attention mixes packed sequences
        self._shadow: dict[str, torch.Tensor] = {}  # float32 EMA shadow (teacher sync with ema_decay > 0)

    @torch.no_grad()
    def score(self, sequences: list[tuple[list[int], list[int]]]) -> list[dict[str, torch.Tensor | None]]:
        """Per sequence: ids [n, k] (None when full-vocabulary), logprobs [n, k or V] at temperature T,
        target_logprobs [n] (raw distribution), for its n target tokens in order."""
        if self.offload:
            self.model.to(self.device)
        if self.pack_tokens:
            results = self._score_packed(sequences)
        else:
            results = []
            for start in range(0, len(sequences), self.micro_batch_size):
                results += self._score_rows(sequences[start : start + self.micro_batch_size], False)
        if self.offload:
            self.model.to("cpu")
        return results

    def _score_packed(
        self, sequences: list[tuple[list[int], list[int]]]
    ) -> list[dict[str, torch.Tensor | None]]:
        """Packed rows of up to `pack_tokens` tokens, longest sequences first (no padding at all)."""
        results: list[dict[str, torch.Tensor | None]] = [{}] * len(sequences)
        for row in plan_packed_rows([len(ids) for ids, _ in sequences], self.pack_tokens):
            for i, out in zip(row, self._score_rows([sequences[i] for i in row], True), strict=True):
                results[i] = out
        return results

    def _score_rows(
        self, chunk: list[tuple[list[int], list[int]]], packed: bool
    ) -> list[dict[str, torch.Tensor | None]]:
        """The teacher outputs of `chunk`, run as one padded batch or one packed row."""
        batch = {k: v.to(self.device) for k, v in collate_sequences(chunk, 0, packed).items()}
        hidden = self.model.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
            use_cache=False,
        ).last_hidden_state  # [B, T, H] (packed: [1, sum of lengths, H])
        if packed:  # the targets in order, sequence by sequence; split them by each sequence's count
            rows, targets = select_target_rows(
                hidden, batch["input_ids"][:, 1:], batch["target_mask"][:, 1:].bool()
            )  # [N, H], [N]
            counts = [sum(mask) for _, mask in chunk]
            # clones: a view would pickle (Ray) the whole row's storage with every sequence's hidden rows
            parts = zip([r.clone() for r in rows.split(counts)], targets.split(counts), strict=True)
        else:
            parts = (
                select_target_rows(  # [n, H], [n]
                    hidden[row : row + 1],
                    batch["input_ids"][row : row + 1, 1:],
                    batch["target_mask"][row : row + 1, 1:].bool(),
                )
                for row in range(len(chunk))
            )
        results = []
        for rows, targets in parts:
            out = score_chunk(rows, self.model.lm_head, targets, self.divergence)
            results.append({k: None if v is None else v.cpu() for k, v in out.items()})
        return results

    def lm_head_weight(self) -> torch.Tensor:
        """[V, H] the lm_head weight on CPU, for a learner computing full-vocabulary teacher logits."""
        head = self.model.lm_head
        if getattr(head, "bias", None) is not None:
            raise ValueError("the teacher's lm_head has a bias; the full-vocabulary path assumes none")
        return head.weight.detach().cpu()

    def load_weights(self, weights: str | dict[str, Any], ema_decay: float = 0.0) -> None:
        """Teacher sync: copy (ema_decay 0) or EMA-blend the student's weights into the teacher.

        `weights` is a directory of safetensors files (weight_sync=file) or the learner's gathered tensors
        (weight_sync=memory: the dict, or `share_weights` arrays through Ray; read only).

        The EMA runs on a float32 shadow of every weight (created at the first blend from the teacher's
        current weights), and the teacher computes with the shadow rounded to its dtype: in bf16 storage,
        a blend with decay 0.99 moves most weights by less than half a unit in the last place, so an EMA
        computed in bf16 would leave them unchanged (audit finding 13).
        """
        state = resolve_weights(weights)
        own = self.model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                target = own[key]
                if ema_decay == 0:
                    target.copy_(value.to(target.device, target.dtype))
                    self._shadow.pop(key, None)
                    continue
                shadow = self._shadow.get(key)
                if shadow is None:
                    shadow = self._shadow[key] = target.detach().to(torch.float32).clone()
                shadow.mul_(ema_decay).add_(value.to(shadow.device, torch.float32), alpha=1 - ema_decay)
                target.copy_(shadow)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    def save_weights(self, directory: str) -> None:
        """The teacher's weights (and its float32 EMA shadow, when there is one) for a checkpoint."""
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(Path(directory) / "model.safetensors"))
        if self._shadow:
            shadow = {k: v.cpu().contiguous() for k, v in self._shadow.items()}
            save_file(shadow, str(Path(directory) / EMA_SHADOW_FILE))

    def restore_weights(self, directory: str) -> None:
        """Inverse of `save_weights` (resume): the weights exactly, and the EMA shadow when saved."""
        from safetensors.torch import load_file

        self.load_weights(directory, 0.0)
        shadow_file = Path(directory) / EMA_SHADOW_FILE
        self._shadow = dict(load_file(str(shadow_file))) if shadow_file.is_file() else {}
