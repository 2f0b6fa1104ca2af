"""Two-stage SFT end to end on the tiny model: loss mask, 2-rank FSDP2 parity, resume, export, sft.sh.

Real FSDP2 (gloo), real torchrun, real transformers / vLLM loading; no mocks. The subprocess tests are
marked `slow` (scripts/test.sh runs them; a bare `pytest` does not).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from self_revision_training.sft_data import IGNORE_INDEX, build_sft_examples
from self_revision_training.sft_loss import compute_completion_ce_sum
from self_revision_training.shared.config import PromptConfig
from self_revision_training.shared.prompts import save_prompt_spec, select_phrase

REPO = Path(__file__).resolve().parents[2]
CFG = PromptConfig()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_records(stage: int, n: int = 12) -> list[dict]:
    records = []
    for i in range(n):
        a, b, correct = i + 3, 2 * i + 1, i % 3 == 0
        answer = a + b if correct else a + b + 1
        x = f"What is {a} + {b}?"
        y_init = f"We get {a} + {b} = {answer}. The answer is \\boxed{{{answer}}}." + " so" * (i % 4) * 5
        y_rev = f"First {a} + {b} = {a + b}. Therefore the answer is \\boxed{{{a + b}}}."
        p_r = select_phrase(correct, CFG)
        if stage == 1:
            prompt, completion = x, f"{y_init}\n\n{p_r}\n\n{y_rev}"
        else:
            prompt, completion = f"{x}\n\n{y_init}\n\n{p_r}", y_rev
        records.append(
            dict(
                prompt=prompt,
                completion=completion,
                x=x,
                y_init=y_init,
                p_r=p_r,
                y_revised=y_rev,
                y_init_correct=correct,
            )
        )
    return records


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("srt_data")
    for stage in (1, 2):
        (out / f"srt_stage{stage}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in make_records(stage))
        )
    save_prompt_spec(out, tiny_tokenizer, CFG)
    return out


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    import tiny

    out = tmp_path_factory.mktemp("tiny_tied")
    tiny.build_tiny_model(out, tiny_tokenizer, tie_word_embeddings=True, seed=1)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_sft(args: list[str], nproc: int | None = None) -> subprocess.CompletedProcess:
    module = ["-m", "self_revision_training.sft", "--config", "configs/tiny/sft.yaml", *args]
    if nproc:
        launch = [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
        ]
        module = launch + module
    proc = subprocess.run(
        [sys.executable, *module], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def common(tiny_model_dir, data_dir, out, **extra) -> list[str]:
    args = {
        "model.path": tiny_model_dir,
        "data.train_file": data_dir / "srt_stage1.jsonl",
        "output_dir": out,
        "micro_batch_size": 1,
        "epochs": 2,
        "save_every": 0,
        **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


def test_loss_mask_gradients_and_chunking(tiny_model_dir, tiny_tokenizer, data_dir):
    """d loss / d hidden is zero where the next token is a prompt token, non-zero before end-of-turn;
    the chunked loss equals full-logits cross-entropy in value and gradient."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    records = [(f"r:{i}", r) for i, r in enumerate(make_records(1, 2))]
    examples, _ = build_sft_examples(tiny_tokenizer, records, stage=1, prompt_cfg=CFG, max_length=512)
    ex = examples[1]
    ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
    hidden = model.model(input_ids=ids).last_hidden_state.detach().requires_grad_(True)  # [1, T, H]
    loss_sum, count = compute_completion_ce_sum(hidden, model.lm_head, labels, chunk_size=7)
    loss_sum.backward()
    grad_norm = hidden.grad[0].norm(dim=-1)  # [T]
    trained_next = labels[0, 1:] != IGNORE_INDEX  # position t predicts t + 1
    assert int(count) == int(trained_next.sum()) == ex.num_trained
    assert torch.all(grad_norm[:-1][~trained_next] == 0) and grad_norm[-1] == 0
    assert torch.all(grad_norm[:-1][trained_next] > 0)
    assert ex.labels[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") and grad_norm[-2] > 0

    ref_hidden = hidden.detach().clone().requires_grad_(True)
    logits = model.lm_head(ref_hidden)[0, :-1]
    ref = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss_sum, ref)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)


@pytest.mark.slow
def test_two_ranks_match_single_process(tiny_model_dir, data_dir, tmp_path):
    """torchrun 2 ranks x grad_accum 1 == 1 process x grad_accum 2 (same global batch): loss, grad norm, weights."""
    run_sft(common(tiny_model_dir, data_dir, tmp_path / "w2", grad_accum=1, max_steps=4), nproc=2)
    run_sft(common(tiny_model_dir, data_dir, tmp_path / "w1", grad_accum=2, max_steps=4))
    two, one = read_metrics(tmp_path / "w2"), read_metrics(tmp_path / "w1")
    assert [r["step"] for r in two] == [1, 2, 3, 4] == [r["step"] for r in one]
    for a, b in zip(two, one, strict=True):
        assert a["num_completion_tokens"] == b["num_completion_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # checks the world-size compensation
    w2, w1 = final_weights(tmp_path / "w2"), final_weights(tmp_path / "w1")
    assert w2.keys() == w1.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resume_gives_the_same_weights(tiny_model_dir, data_dir, tmp_path):
    full = tmp_path / "full"
    run_sft(common(tiny_model_dir, data_dir, full, grad_accum=2, max_steps=5))
    part = tmp_path / "part"
    run_sft(common(tiny_model_dir, data_dir, part, grad_accum=2, max_steps=3, save_every=3))
    assert (part / "checkpoints" / "step_000003" / "trainer_state.json").is_file()
    (part / "checkpoints" / ".tmp_step_000004" / "model_optim").mkdir(parents=True)  # a killed save
    proc = run_sft(common(tiny_model_dir, data_dir, part, grad_accum=2, max_steps=5, save_every=3))
    assert "resumed from" in proc.stdout and "removed partial checkpoint" in proc.stdout
    assert not (part / "checkpoints" / ".tmp_step_000004").exists()
    assert [r["step"] for r in read_metrics(part)] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in read_metrics(part)] == pytest.approx(
        [r["loss"] for r in read_metrics(full)], rel=1e-6
    )
    a, b = final_weights(full), final_weights(part)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    done = run_sft(common(tiny_model_dir, data_dir, part, grad_accum=2, max_steps=5))
    assert "nothing to do" in done.stdout
    # budget.json: what the stage trained on, carried through the resume; health metrics every step
    budgets = [json.loads((d / "budget.json").read_text()) for d in (full, part)]
    for budget in budgets:
        assert budget.pop("wall_seconds") and budget.pop("wall_seconds_total") > 0
    assert budgets[0] == budgets[1]
    assert budgets[0]["optimizer_steps"] == 5
    assert budgets[0]["tokens_trained"] == sum(r["num_completion_tokens"] for r in read_metrics(full))
    for row in read_metrics(part):
        assert 0 < row["frac_weights_changed"] <= 1 and row["update_to_weight_ratio"] > 0
        assert math.isfinite(row["gns_grad_sq_step"])  # grad_accum 2: a small and a big batch


@pytest.fixture(scope="module")
def sft_sh_run(tmp_path_factory, tied_model_dir, data_dir) -> Path:
    """scripts/sft.sh, both stages, on the tied-embedding tiny model (like Qwen3-0.6B)."""
    root = tmp_path_factory.mktemp("srt_ckpt")
    env = {
        **ENV,
        "BASE_MODEL": str(tied_model_dir),
        "TRAIN_DATA_DIR": str(data_dir),
        "CKPT_ROOT": str(root),
        "CONFIG_STAGE1": "configs/tiny/sft.yaml",
        "CONFIG_STAGE2": "configs/tiny/sft.yaml",
        "EPOCHS_STAGE1": "1",
        "EPOCHS_STAGE2": "1",
        "MAX_LENGTH": "512",
        "MICRO_BATCH_SIZE": "2",
        "NPROC_PER_NODE": "1",
        "PYTHON": sys.executable,
        "LR_STAGE1": "1e-3",
        "LR_STAGE2": "1e-3",
        "SAVE_EVERY": "2",
    }
    proc = subprocess.run(
        ["bash", "scripts/sft.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "BASE_MODEL" in proc.stdout  # knobs are printed
    again = subprocess.run(
        ["bash", "scripts/sft.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and again.stdout.count("already finished") == 2
    bad = subprocess.run(
        ["bash", "scripts/sft.sh"],
        cwd=REPO,
        env={**env, "GRAD_ACCUM": "two"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "knob GRAD_ACCUM=two must be an integer >= 1" in bad.stderr
    return root


@pytest.mark.slow
def test_sft_sh_two_stages_and_transformers_load(sft_sh_run, tied_model_dir, tiny_tokenizer):
    import yaml
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage2_cfg = yaml.safe_load((sft_sh_run / "stage2" / "config.yaml").read_text())
    assert stage2_cfg["model"]["path"] == str(sft_sh_run / "stage1" / "final") and stage2_cfg["stage"] == 2
    assert stage2_cfg["git_sha"] is None or len(stage2_cfg["git_sha"]) >= 40
    final = sft_sh_run / "stage2" / "final"
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "sdzero_prompt.json",
    ):
        assert (final / name).is_file(), name
    with safe_open(final / "model.safetensors", "pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # tied: stored once
    stage1 = read_metrics(sft_sh_run / "stage1")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in stage1) and stage1[-1]["lr"] > 0
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    base = AutoModelForCausalLM.from_pretrained(tied_model_dir)
    assert not torch.equal(base.model.embed_tokens.weight, model.model.embed_tokens.weight)  # it trained
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


VLLM_SCRIPT = """
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=512, enforce_eager=True,
              kv_cache_memory_bytes=256 << 20, seed=0)
    out = llm.chat([{"role": "user", "content": "What is 3 + 4?"}], SamplingParams(max_tokens=8, temperature=0.0))
    print("VLLM_TOKENS", len(out[0].outputs[0].token_ids))
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_final_loads_in_vllm(sft_sh_run, tmp_path):
    script = tmp_path / "vllm_load.py"
    script.write_text(VLLM_SCRIPT)
    env = {
        **ENV,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_WAIT_POLICY": "PASSIVE",
        "KMP_BLOCKTIME": "0",
        "TORCH_COMPILE_DISABLE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(sft_sh_run / "stage2" / "final")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "VLLM_TOKENS 8" in proc.stdout


# ---------------------------------------------------------------- resuming with changed settings


def fake_checkpoint(out: Path, args: list[str], step: int = 3) -> Path:
    """A complete-looking step dir whose trainer_state records the config of `args` (no weights needed:
    the settings check runs before anything loads)."""
    from self_revision_training.sft import SFTConfig
    from self_revision_training.shared.config import load_config, to_dict

    cfg = load_config(SFTConfig, REPO / "configs" / "tiny" / "sft.yaml", args)
    path = out / "checkpoints" / f"step_{step:06d}"
    (path / "model_optim").mkdir(parents=True)
    (path / "model_optim" / ".metadata").write_bytes(b"")
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "config": to_dict(cfg)}))
    return path


def test_resume_refuses_changed_data_or_objective_and_lists_the_keys(tiny_model_dir, data_dir, tmp_path):
    from self_revision_training import sft

    out = tmp_path / "run"
    args = common(tiny_model_dir, data_dir, out, grad_accum=2, max_steps=5, save_every=3)
    ckpt = fake_checkpoint(out, args)
    changed = [
        f"data.train_file={data_dir / 'srt_stage2.jsonl'}",
        "seed=1",
        "max_length=256",
        "lr_schedule=linear",
        "stage2_layout=user_turn",
    ]
    with pytest.raises(SystemExit) as exc:
        sft.main(["--config", str(REPO / "configs" / "tiny" / "sft.yaml"), *args, *changed])
    message = str(exc.value)
    assert f"cannot resume SFT from {ckpt} with changed settings" in message
    for key in ("data.train_file", "seed: 0 -> 1", "max_length: 512 -> 256", "lr_schedule", "stage2_layout"):
        assert key in message
    # the documented allow-list passes the check and is reported
    cfg = sft.parse_cli(
        sft.SFTConfig,
        [
            "--config",
            str(REPO / "configs/tiny/sft.yaml"),
            *args,
            "max_steps=9",
            "keep_last=3",
            "lr=5e-4",
            "log_every=2",
        ],
    )
    assert set(sft.check_resume_settings(cfg)) == {"max_steps", "keep_last", "lr", "log_every"}
    # an empty step dir (no trainer_state.json) is not resumed from, so nothing to compare with
    shutil.rmtree(ckpt)
    (out / "checkpoints" / "step_000006").mkdir()
    assert sft.check_resume_settings(sft.parse_cli(sft.SFTConfig, [*args, "seed=1"])) == {}


@pytest.mark.slow
def test_resume_applies_a_changed_learning_rate(tiny_model_dir, data_dir, tmp_path):
    from self_revision_training.shared.training import build_lr_lambda

    part = tmp_path / "part"
    run_sft(common(tiny_model_dir, data_dir, part, grad_accum=2, max_steps=3, save_every=3))
    proc = run_sft(common(tiny_model_dir, data_dir, part, grad_accum=2, max_steps=5, save_every=3, lr=5e-4))
    assert "lr 0.001 -> 0.0005: applied" in proc.stdout
    multiplier = build_lr_lambda("cosine", 12, 0)  # 12 examples / global batch 2 x 2 epochs, no warm-up
    lrs = [r["lr"] for r in read_metrics(part)]
    assert lrs == pytest.approx(
        [1e-3 * multiplier(s) for s in range(3)] + [5e-4 * multiplier(s) for s in (3, 4)]
    )
    saved = yaml_load(part / "config.yaml")
    assert saved["lr"] == 5e-4  # config.yaml records what was applied


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_a_second_sft_run_into_one_output_dir_exits_naming_the_first(tiny_model_dir, data_dir, tmp_path):
    from self_revision_training.shared.run_lock import acquire_run_lock

    out = tmp_path / "run"
    with acquire_run_lock(out, "SFT"):  # stands for a running SFT (rank 0 holds the lock)
        proc = subprocess.run(
            [sys.executable, "-m", "self_revision_training.sft", "--config", "configs/tiny/sft.yaml",
             *common(tiny_model_dir, data_dir, out, max_steps=2)],
            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert proc.returncode != 0
    assert f"in use by another run: pid {os.getpid()}" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()
