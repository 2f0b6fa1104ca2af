"""Evaluate a model on a math (or code) benchmark: n samples per problem, avg@k, pass@k and maj@k.

    python -m self_distillation.evaluate --config configs/eval.yaml model.path=RUN/distill/final \\
        dataset.path=HuggingFaceH4/MATH-500 output_dir=RUN/eval/math500 sampling.n=4 ks=[1,4]

Prompts are the training template (`prompts.build_generation_prompt`); with `prompt_source=auto` the
model directory's sdzero_prompt.json (written by SFT and Phase 2) is used when present, else `prompt.*`.
Samples come from `generation.create_backend` (vLLM, or `backend.name=hf`), grades from
`rewards.build_reward_source(reward, dataset.mode, grading)` (math-verify in worker processes). Each sample is
budgeted min(max_tokens, max_model_len - prompt length) new tokens; a prompt that leaves no room is
skipped and counted. Metrics are defined in evaluation.py (reference notes Sec. 6: the original code has
no benchmark evaluation; its in-training check was avg@8 on AIME-2024 at temperature 1.0, top-p 1.0).
Outputs in output_dir: samples.jsonl (one line per sample), summary.json (metrics, decoding settings,
the resolved prompt, the full config and the git SHA), config.yaml and sdzero_prompt.json.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from self_distillation.evaluation import summarize
from self_revision_training.shared.config import (
    BackendConfig,
    ConfigError,
    DatasetConfig,
    GradingConfig,
    ModelConfig,
    PromptConfig,
    SamplingConfig,
    parse_cli,
    to_dict,
)
from self_revision_training.shared.problems import Problem, load_problems
from self_revision_training.shared.prompts import (
    PROMPT_SPEC_FILE,
    build_generation_prompt,
    check_prompt_spec,
    load_prompt_spec,
    save_prompt_spec,
)
from self_revision_training.shared.run_config import git_sha, save_run_config
from self_revision_training.shared.run_lock import lock_directory
from self_revision_training.shared.storage import atomic_write_json, atomic_write_text

log = logging.getLogger("sdzero.evaluate")

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)  # used when prompt_source=config
    prompt_source: Literal["auto", "config"] = "auto"  # auto: model dir's sdzero_prompt.json, else prompt.*
    sampling: SamplingConfig = field(  # n = samples per problem; T/top-p: the reference's validation
        # decoding; max_tokens >= Phase 2's rollout budget (8192), so a model is not cut below its training length
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=8192, n=4)
    )
    grading: GradingConfig = field(default_factory=GradingConfig)
    dataset: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="test"))
    ks: list[int] = field(default_factory=lambda: [1])  # pass@k / maj@k budgets (those <= sampling.n)
    max_problems: int | None = None  # evaluate only the first N problems of the range; None = all
    batch_size: int = 64  # problems per generate call (the progress bar moves per batch)
    output_dir: str = ""  # required: samples.jsonl, summary.json, config.yaml, sdzero_prompt.json
    label: str = ""  # row name in report tables; "" = the model directory's name
    reuse: bool = False  # return an existing summary.json written with this exact config, no generation
    progress: bool = True  # tqdm progress bar on stderr

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir is required")
        if not self.model.path:
            raise ValueError("model.path is required")
        if not self.dataset.path:
            raise ValueError("dataset.path is required")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be a non-empty list of integers >= 1, got {self.ks}")
        if self.max_problems is not None and self.max_problems < 1:
            raise ValueError(f"max_problems must be >= 1 or null, got {self.max_problems}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def resolve_prompt(cfg: EvalConfig, tokenizer) -> tuple[PromptConfig, str]:
    """The prompt config to evaluate with and where it came from (a spec file path or "config")."""
    spec_path = Path(cfg.model.path) / PROMPT_SPEC_FILE
    if cfg.prompt_source == "auto" and spec_path.is_file():
        prompt_cfg, spec = load_prompt_spec(cfg.model.path)
        if cfg.prompt != PromptConfig() and cfg.prompt != prompt_cfg:
            raise ConfigError(
                f"prompt.* is set in the config but {spec_path} differs; "
                "set prompt_source=config to evaluate with the config's prompt"
            )
        check_prompt_spec(spec, tokenizer, prompt_cfg)
        return prompt_cfg, str(spec_path)
    return cfg.prompt, "config"


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("progress", "reuse")}


def evaluate_batch(
    problems: list[Problem], prompts: list[list[int]], limits: list[int], cfg: EvalConfig, backend, reward
) -> list[dict[str, Any]]:
    """Sample n responses per prompt, grade them, and return one record per sample."""
    samples = backend.generate(prompts, cfg.sampling, max_tokens=limits)
    graded = reward.score(problems, [[s.text for s in row] for row in samples])
    flat = [
        (p, k, s, v)
        for p, row, verdicts in zip(problems, samples, graded, strict=True)
        for k, (s, v) in enumerate(zip(row, verdicts, strict=True))
    ]
    return [
        {
            "problem_index": problem.index,
            "sample_index": k,
            "ground_truth": problem.answer,
            "response": sample.text,
            "num_tokens": len(sample.token_ids),  # generated tokens, the EOS token included
            "finish_reason": sample.finish_reason,
            "extracted": verdict.extracted,
            "correct": verdict.correct,
            "reason": verdict.reason,
        }
        for problem, k, sample, verdict in flat
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_cli(EvalConfig, argv, description=__doc__.splitlines()[0])
    out = Path(cfg.output_dir)
    if cfg.reuse and (out / SUMMARY_FILE).is_file():
        old = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
        if _comparable(old.get("config", {})) == _comparable(to_dict(cfg)):
            log.info("reusing %s (same config)", out / SUMMARY_FILE)
            return old
    with lock_directory(out, "evaluation", "evaluate"):
        return _evaluate(cfg, out)


def _evaluate(cfg: EvalConfig, out: Path) -> dict[str, Any]:
    problems, report = load_problems(cfg.dataset)
    if cfg.max_problems is not None:
        problems = problems[: cfg.max_problems]
    omitted = [k for k in cfg.ks if k > cfg.sampling.n]
    if omitted:
        log.warning(
            "ks %s exceed sampling.n=%d: pass@k/maj@k are not reported for them", omitted, cfg.sampling.n
        )

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from self_revision_training.shared.generation import create_backend
    from self_revision_training.shared.rewards import build_reward_source

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    prompt_cfg, prompt_source = resolve_prompt(cfg, tokenizer)
    backend = create_backend(cfg.model, cfg.backend)
    save_run_config(cfg, out)  # the run's identity, once the model has loaded
    save_prompt_spec(out, tokenizer, prompt_cfg)
    max_len = backend.max_model_len
    records: list[dict[str, Any]] = []
    skipped: list[int] = []  # problem indices whose prompt leaves no room to generate
    started = time.time()
    progress = tqdm(
        total=len(problems),
        desc=f"eval {cfg.label or Path(cfg.model.path).name}",
        unit="problem",
        disable=not cfg.progress,
    )
    try:
        with build_reward_source("ground_truth", cfg.dataset.mode, cfg.grading) as reward:
            for start in range(0, len(problems), cfg.batch_size):
                batch, prompts, limits = [], [], []
                for problem in problems[start : start + cfg.batch_size]:
                    ids = build_generation_prompt(tokenizer, problem.problem, prompt_cfg).ids
                    room = (
                        cfg.sampling.max_tokens
                        if max_len is None
                        else min(cfg.sampling.max_tokens, max_len - len(ids))
                    )
                    if room < 1:
                        skipped.append(problem.index)
                        continue
                    batch.append(problem)
                    prompts.append(ids)
                    limits.append(room)
                if batch:
                    records += evaluate_batch(batch, prompts, limits, cfg, backend, reward)
                progress.update(len(problems[start : start + cfg.batch_size]))
                if records:
                    accuracy = sum(r["correct"] for r in records) / len(records)
                    progress.set_postfix(acc=f"{accuracy:.3f}", refresh=False)
    finally:
        progress.close()
        backend.close()
    if not records:
        raise RuntimeError(
            f"no problem could be evaluated: all {len(skipped)} prompts exceed max_model_len={max_len}"
        )
    atomic_write_text(out / SAMPLES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    from self_revision_training.shared.rewards.equivalence import AnswerEquivalence

    with AnswerEquivalence(cfg.grading) as equivalent:  # maj@k: "0.5", "1/2", "\\frac{1}{2}" vote together
        metrics = summarize(records, cfg.ks, majority=cfg.dataset.mode == "math", equivalent=equivalent)
    summary = {
        "label": cfg.label or Path(cfg.model.path).name,
        **metrics,
        "skipped_prompts": len(skipped),  # no room under max_model_len; not in any metric
        "skipped_problem_indices": skipped[:100],
        "model": cfg.model.path,
        "dataset": {
            "path": cfg.dataset.path,
            "subset": cfg.dataset.subset,
            "split": cfg.dataset.split,
            "mode": cfg.dataset.mode,
            "problems_loaded": report.loaded,
            "rows_skipped": report.skipped,
            "duplicate_problems": report.duplicates,
            "problems_evaluated": len(problems),
        },
        "decoding": {
            "temperature": cfg.sampling.temperature,
            "top_p": cfg.sampling.top_p,
            "top_k": cfg.sampling.top_k,
            "max_tokens": cfg.sampling.max_tokens,
            "n": cfg.sampling.n,
            "max_model_len": max_len,
            "backend": cfg.backend.name,
            "seed": cfg.backend.seed,
        },
        "grading": to_dict(cfg.grading),
        "prompt_source": prompt_source,
        "prompt": to_dict(prompt_cfg),
        "seconds": round(time.time() - started, 1),
        "git_sha": git_sha(),
        "config": to_dict(cfg),
        "files": {"samples": SAMPLES_FILE},
    }
    atomic_write_json(out / SUMMARY_FILE, summary)
    avg = summary["avg@k"]
    ci = "" if avg["ci_low"] is None else f" (95% CI {avg['ci_low']:.3f}-{avg['ci_high']:.3f})"
    log.info(
        "%s: avg@%d %.3f%s over %d problems; pass@k %s; maj@k %s; %d prompts skipped; wrote %s",
        summary["label"], avg["k"], avg["mean"], ci, summary["num_problems"],
        summary["pass@k"], summary["maj@k"], len(skipped), out / SUMMARY_FILE,
    )  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
