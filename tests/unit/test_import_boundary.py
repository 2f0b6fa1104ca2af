"""Core modules import without vLLM, Ray or torch.distributed; Phase 1 never imports Phase 2."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "self_revision_training.shared.config",
    "self_revision_training.shared.prompts",
    "self_revision_training.shared.rewards.math_verify",
    "self_revision_training.shared.problems",
    "self_revision_training.shared.storage",
    "self_revision_training.shared.rewards.code_tests",
    "self_revision_training.shared.worker_pool",
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
