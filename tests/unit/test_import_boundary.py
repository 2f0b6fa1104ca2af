"""Core modules import without vLLM, Ray or torch.distributed; Phase 1 never imports Phase 2."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "self_revision_training.config",
    "self_revision_training.prompts",
    "self_revision_training.grading",
    "self_revision_training.problems",
    "self_revision_training.storage",
    "self_revision_training.code_sandbox",
    "self_revision_training.worker_pool",
]

PROBE = """
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('vllm', 'ray') or name.startswith('torch.distributed'):
            raise ImportError(f'blocked: {name}')
        return None
sys.meta_path.insert(0, Block())
for module in sys.argv[1:]:
    importlib.import_module(module)
bad = [m for m in sys.modules if m.startswith('self_distillation')]
assert not bad, bad
"""


def test_core_imports_without_heavy_deps():
    proc = subprocess.run([sys.executable, "-c", PROBE, *CORE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
