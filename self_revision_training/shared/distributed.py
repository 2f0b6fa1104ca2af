"""Distributed adapter: process group, FSDP2 wrapping, full/sharded state dicts (torch.distributed only).

Used by `self_revision_training.sft` and, later, the Phase-2 learner. Works under `torchrun` (reads
RANK / LOCAL_RANK / WORLD_SIZE) and as a plain single process (a 1-rank group is created so the same
FSDP2 code path runs everywhere). Backend: nccl on CUDA, gloo on CPU. Only FSDP2 (`fully_shard`):
FSDP1 full-state-dict gathering with CPU offload segfaults on CPU (see the project's env notes), and
accelerate's FSDP plugin silently falls back to DDP on CPU.

Checkpoints of model + optimizer use torch.distributed.checkpoint (DCP, sharded, one file per rank,
resharded on load); the consolidated Hugging Face export gathers a full state dict to CPU on rank 0.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

_OWN_GROUP = False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init(
    timeout_s: float = 1800.0,
    *,
    rendezvous: tuple[str, int, int, int] | None = None,
    use_cuda: bool | None = None,
) -> torch.device:
    """Join (or create) the process group; returns this rank's device.

    Args:
        rendezvous: (master address, port, rank, world size) for processes not started by torchrun (the
            Phase-2 learner ranks are Ray actors); None = torchrun's environment, or a private 1-rank group.
        use_cuda: None = whenever CUDA is available.
    """
    global _OWN_GROUP
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if rendezvous is not None:  # a Ray actor sees only its own GPU(s): the current device
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    backend = "nccl" if use_cuda else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if rendezvous is not None:
        addr, port, rank_, world = rendezvous
        dist.init_process_group(
            backend, init_method=f"tcp://{addr}:{port}", rank=rank_, world_size=world, timeout=timeout
        )
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout, device_id=device if use_cuda else None)
    else:  # single process without torchrun: a private 1-rank group
        store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    _OWN_GROUP = True
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum" | "max" | "min" | "avg" via sum / world size); returns the tensor."""
    if not dist.is_initialized() or world_size() == 1:
        return tensor
    ops = {
        "sum": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
        "avg": dist.ReduceOp.SUM,
    }
    dist.all_reduce(tensor, op=ops[op])
    if op == "avg":
        tensor /= world_size()
    return tensor


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized() or world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def cleanup() -> None:
    global _OWN_GROUP
    if dist.is_initialized() and _OWN_GROUP:
        dist.destroy_process_group()
    _OWN_GROUP = False


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks (`model.model.layers` in Llama/Qwen layouts, also under a wrapper)."""
    for root in (model, getattr(model, "causal_lm", None)):
        layers = getattr(getattr(root, "model", None), "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find decoder layers (.model.layers) in {type(model).__name__}")


def wrap_fsdp(
    model: nn.Module,
    device: torch.device,
    mixed_precision: bool = False,
    activation_checkpointing: bool = False,
    compile_backend: str = "",
) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, final norm, lm_head).

    mixed_precision: bf16 parameters/compute with float32 gradient reduction (master weights stay in the
    dtype the model was loaded in, float32 for training). Activation checkpointing (non-reentrant)
    recomputes each decoder layer in backward. compile_backend ("" = off, e.g. "inductor"): each decoder
    layer is compiled in place (`nn.Module.compile`: parameter names do not change) before sharding.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = find_decoder_layers(model)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for layer in layers:
        if compile_backend:
            layer.compile(backend=compile_backend)
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def get_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Consolidated state dict on CPU (every rank takes part; only rank 0 receives tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Model + optimizer state with DCP (each rank writes its shards; all ranks call this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Inverse of `save_sharded_state`; DCP reshards, so the world size may differ from the saving run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
