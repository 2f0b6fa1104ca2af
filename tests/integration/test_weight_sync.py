"""Weight sync without the disk (`ray.weight_sync=memory`): the learner's gathered tensors go straight into the
rollout engine (HF and vLLM backends), the teacher's sync takes them too, and the loop runs on them.

After an in-memory sync the engine's log-probs of the sampled tokens equal the learner's (< 1e-4; tied
embeddings, so a stale lm_head would show), the engine holds exactly the weights the file path gives, and a
local run gives the same losses with either path while writing no weights directory. Real learner (FSDP2,
gloo), real backends; no mocks. The NCCL broadcast into GPU workers and vLLM sleep/wake are not implemented.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny  # noqa: I001 - tests/fixtures is on sys.path (conftest)
import torch

from self_revision_training.shared.config import ModelConfig, PromptConfig, SamplingConfig
from self_revision_training.shared.prompts import save_prompt_spec

REPO = Path(__file__).resolve().parents[2]
TINY_CFG = str(REPO / "configs" / "tiny" / "distill.yaml")
LOCAL = ["ray.enabled=false", "ray.num_learners=1", "backend.name=hf"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("weight_sync")
    tiny.build_tiny_model(out / "student", tiny_tokenizer, seed=0, tie_word_embeddings=True)
    tiny.build_tiny_model(out / "teacher", tiny_tokenizer, seed=1, tie_word_embeddings=True)
    save_prompt_spec(out / "teacher", tiny_tokenizer, PromptConfig())
    data = out / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n"
            for i in range(12)
        )
    )
    return {"student": out / "student", "teacher": out / "teacher", "data": data}


@pytest.fixture()
def learner(setup):
    """A 1-rank learner on the tied tiny student, moved off its initial weights by two optimizer steps."""
    from self_distillation.config import SelfDistillationConfig
    from self_distillation.learner import Learner
    from self_revision_training.shared.config import load_config

    cfg = load_config(
        SelfDistillationConfig,
        TINY_CFG,
        [f"student.path={setup['student']}", f"teacher.path={setup['teacher']}", f"train_data.path={setup['data']}",
         "output_dir=unused", "ray.num_learners=1", "optim.warmup_steps=0", "optim.lr=1e-2"],
    )  # fmt: skip
    learner = Learner(cfg, 0, 1)
    learner.setup(*learner.address())
    try:
        for seed in (0, 1):
            learner.train_step([[_samples(seed)]])
        yield learner
    finally:
        learner.close()


def _samples(seed: int, sequences: list[list[int]] | None = None, prompt: int = 4) -> list:
    """Learner samples with random teacher top-k (16) targets; `sequences` default to random ones."""
    from self_distillation.rollout_data import LearnerSample

    gen = torch.Generator().manual_seed(seed)
    if sequences is None:
        sequences = [torch.randint(5, 1000, (prompt + 12,), generator=gen).tolist() for _ in range(3)]
    out = []
    for ids in sequences:
        n = len(ids) - prompt
        logprobs, top = torch.randn(n, 1024, generator=gen).log_softmax(-1).topk(16, -1)
        teacher = {"ids": top.int(), "logprobs": logprobs, "target_logprobs": torch.zeros(n)}
        out.append(LearnerSample(ids, [0] * prompt + [1] * n, True, None, teacher))
    return out


def _gap(learner, backend) -> float:
    """max |engine log-prob - learner log-prob| over greedy samples of a few fixed prompts (the
    train/rollout_minus_learner_logprob_abs_max metric of the loop)."""
    prompts = [[5, 6, 7, 8], [100, 200, 300, 400], [11, 12, 13, 14]]
    rows = backend.generate(prompts, SamplingConfig(temperature=0.0, max_tokens=10), return_logprobs=True)
    gaps = []
    for prompt, (sample,) in zip(prompts, rows, strict=True):
        assert sample.token_ids
        evaluated = learner.evaluate(_samples(7, [prompt + sample.token_ids]))
        engine = torch.tensor(sample.logprobs)
        gaps.append(float((engine - evaluated["student_logprobs"].float()).abs().max()))
    return max(gaps)


@pytest.mark.slow
def test_hf_backend_in_memory_sync_matches_the_learner_and_the_file_path(setup, learner, tmp_path):
    from self_revision_training.shared.config import BackendConfig
    from self_revision_training.shared.generation import HFBackend

    model = ModelConfig(path=str(setup["student"]), dtype="float32")
    memory, file = HFBackend(model, BackendConfig(name="hf")), HFBackend(model, BackendConfig(name="hf"))
    assert _gap(learner, memory) > 1e-2  # before the sync: the engine holds the initial weights
    memory.update_weights(learner.export_weights(False))
    learner.save_weights(str(tmp_path / "weights"))
    file.update_weights(str(tmp_path / "weights"))
    assert memory.policy_version == file.policy_version == 1
    assert _gap(learner, memory) < 1e-4
    own = memory.model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in file.model.state_dict().items())  # the same weights
    assert memory.model.lm_head.weight.data_ptr() == memory.model.model.embed_tokens.weight.data_ptr()  # tied


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_backend_in_memory_sync_matches_the_learner(setup, learner):
    """The vLLM CPU engine loads the tensors through its in-place reload; the tied lm_head is re-packed (a
    stale one would keep the old embedding's log-probs)."""
    from self_revision_training.shared.config import BackendConfig
    from self_revision_training.shared.generation import VLLMBackend

    backend = VLLMBackend(
        ModelConfig(path=str(setup["student"]), dtype="float32"),
        BackendConfig(name="vllm", max_model_len=256, kv_cache_gb=0.25),
    )
    try:
        assert _gap(learner, backend) > 1e-2
        backend.update_weights(learner.export_weights(False))
        assert backend.policy_version == 1
        assert _gap(learner, backend) < 1e-4
    finally:
        backend.close()


def test_teacher_loads_tensors_as_it_loads_a_directory(tiny_model_dir, tmp_path):
    """Teacher sync / EMA from the learner's tensors (weight_sync=memory) = from its safetensors directory."""
    from safetensors.torch import save_file

    from self_distillation.losses import Divergence
    from self_distillation.teacher import Teacher

    model = ModelConfig(path=str(tiny_model_dir), dtype="float32")
    by_dir, by_tensors = (
        Teacher(model, Divergence(), device="cpu"),
        Teacher(model, Divergence(), device="cpu"),
    )
    state = {k: (v.detach() + 1e-3).contiguous() for k, v in by_dir.model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    for decay in (0.9, 0.0):
        by_dir.load_weights(str(tmp_path), decay)
        by_tensors.load_weights(state, decay)
        own = by_tensors.model.state_dict()
        assert all(torch.equal(v, own[k]) for k, v in by_dir.model.state_dict().items())


def run(setup, out: Path, *extra: str) -> list[dict]:
    from self_distillation.train import main

    main(["--config", TINY_CFG, f"student.path={setup['student']}", f"teacher.path={setup['teacher']}",
          f"train_data.path={setup['data']}", f"output_dir={out}", *extra])  # fmt: skip
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_loop_on_in_memory_sync_writes_no_weights_and_trains_as_the_file_path(setup, tmp_path):
    """ray.enabled=false, HF engine: the same losses and post-sync gap with either path (the engine gets the
    same weights), no weights/ directory in memory mode; the teacher's sync takes the tensors too."""
    sync = ["teacher_mode=sync", "teacher_sync_every=1", "max_num_steps=3"]
    memory = run(setup, tmp_path / "memory", *LOCAL, *sync, "ray.weight_sync=memory")
    file = run(setup, tmp_path / "file", *LOCAL, *sync, "ray.weight_sync=file")
    assert [r["train/loss"] for r in memory] == [r["train/loss"] for r in file]
    for r in memory[1:]:  # sampled after an in-memory sync
        assert r["policy_version"] >= 1 and r["train/rollout_minus_learner_logprob_abs_max"] < 1e-4
    assert not list((tmp_path / "memory" / "weights").glob("*"))
    assert [p.name for p in (tmp_path / "file" / "weights").iterdir()] == ["step_000003"]


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_ray_vllm_two_learners_sync_through_the_object_store(setup, tmp_path):
    """Ray actors: learner rank 0 puts the weights once into the object store, the vLLM engine reads the ref."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        rows = run(setup, tmp_path, "max_num_steps=3", "ray.weight_sync=memory")
    finally:
        ray.shutdown()
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train[1:]:
        assert r["policy_version"] >= 1 and r["train/rollout_minus_learner_logprob_abs_max"] < 1e-4
    assert not list((tmp_path / "weights").glob("*"))


def test_shared_weights_round_trip_exactly():
    """`share_weights` (numpy views for Ray's zero-copy store; bf16 as its int16 bits) -> `resolve_weights`."""
    from self_distillation.teacher import resolve_weights, share_weights

    gen = torch.Generator().manual_seed(0)
    state = {
        "a.weight": torch.randn(4, 3, generator=gen),
        "b.weight": torch.randn(5, generator=gen).to(torch.bfloat16),
        "c.weight": torch.randn(2, 2, generator=gen).to(torch.float16),
    }
    back = resolve_weights(share_weights(state))
    assert back.keys() == state.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in state.items())
    assert resolve_weights(state) is state  # plain tensors pass through
