"""Layer rules: the core modules of both packages import neither vLLM, Ray nor torch.distributed (directly
or through any project module they pull in); Phase 1 (self_revision_training) never imports Phase 2."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CORE = [
    # shared infrastructure, core layer
    "self_revision_training.shared.config",
    "self_revision_training.shared.run_config",
    "self_revision_training.shared.storage",
    "self_revision_training.shared.problems",
    "self_revision_training.shared.prompts",
    "self_revision_training.shared.answers",
    "self_revision_training.shared.worker_pool",
    "self_revision_training.shared.rewards",
    "self_revision_training.shared.rewards.math_verify",
    "self_revision_training.shared.rewards.code_tests",
    "self_revision_training.shared.rewards.majority_vote",
    "self_revision_training.shared.rewards.equivalence",
    "self_revision_training.shared.budget",
    "self_revision_training.shared.run_lock",
    "self_revision_training.shared.health",
    # Phase 1 core
    "self_revision_training.revision_data",
    "self_revision_training.stage_split",
    "self_revision_training.sft_data",
    "self_revision_training.ssd_filter",
    "self_revision_training.undo_data",
    "self_revision_training.undo_tutor",
    # Phase 2 core
    "self_distillation.config",
    "self_distillation.teacher_context",
    "self_distillation.sequences",
    "self_distillation.losses",
    "self_distillation.objectives",
    "self_distillation.rollout_data",
    "self_distillation.step_metrics",
    "self_distillation.evaluation",
    "self_distillation.comparison",
    "self_distillation.paired_stats",
    "self_distillation.grpo",
    "self_distillation.localization",
    "self_distillation.token_dump",
    "self_distillation.token_page",
]
FORBIDDEN = ("vllm", "ray", "torch.distributed")

# torch itself imports torch.distributed, so torch is imported first; after that, any further import of
# vllm, ray or a not-yet-loaded torch.distributed submodule (fsdp, checkpoint, ...) fails, and the project
# modules that were loaded are reported for the static check below.
PROBE = """
import importlib, json, sys
try:
    import torch  # noqa: F401
except ImportError:
    pass
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('vllm', 'ray') or name.startswith('torch.distributed'):
            raise ImportError(f'blocked: {name}')
        return None
sys.meta_path.insert(0, Block())
for module in sys.argv[1:]:
    importlib.import_module(module)
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('self_revision_training', 'self_distillation'))))
"""


def _imports(path: Path) -> list[str]:
    """Every module name an `import` / `from ... import` in the file names (function bodies included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def _source(module: str) -> Path:
    path = ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_core_imports_without_heavy_deps():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *CORE], capture_output=True, text=True, timeout=180, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(CORE) <= set(loaded)
    bad = {
        module: name
        for module in loaded
        for name in _imports(_source(module))
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not bad, f"core modules (or what they import) reach vLLM/Ray/torch.distributed: {bad}"


def test_phase_1_never_imports_phase_2():
    offenders = {
        str(path.relative_to(ROOT)): name
        for path in (ROOT / "self_revision_training").rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] == "self_distillation"
    }
    assert not offenders, offenders


def test_core_list_covers_every_pure_module():
    """A new module under a core name pattern must be added to CORE (or documented as an adapter)."""
    adapters = {
        "self_revision_training.shared.generation",
        "self_revision_training.shared.distributed",
        "self_revision_training.shared.checkpoints",
        "self_revision_training.shared.training",
        "self_revision_training.shared.target_logits",
        "self_revision_training.shared.run_log",
        "self_revision_training.shared.lora",
        "self_revision_training.shared.rewards.sandbox_exec",
        "self_revision_training.shared",
    }
    shared = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "self_revision_training" / "shared").rglob("*.py")
    }
    assert shared - adapters <= set(CORE), sorted(shared - adapters - set(CORE))
