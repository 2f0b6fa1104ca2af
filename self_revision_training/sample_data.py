"""Phase 1 data stage of the plain-SFT methods: sample the model's own responses, keep some, write
prompt/completion SFT data (trained by `sft` with `data.layout=prompt_completion`, one stage).

    strategy=rejection  RFT, rejection-sampling fine-tuning (the SD-Zero paper's baseline; Yuan et al. 2023):
                        `num_samples` responses per problem at `sampling.*`, graded by the reward source;
                        the verified ones are kept (exact duplicates of a kept response dropped, at most
                        `max_per_problem` per problem; 0 = all).
    strategy=ssd        "Embarrassingly Simple Self-Distillation" (arXiv 2604.01193): responses at the
                        training temperature/top-k/top-p, kept whatever their correctness (the verifier
                        only reports the share of correct training samples; reward=none skips it), then
                        `ssd_filter` over the whole run: empty, optionally truncated (`ssd_drop_truncated`),
                        and the shortest `ssd_shortest_percent` per cent by stripped character length
                        (apple/ml-ssd's rule). Responses are stripped as ml-ssd does; a stripped response
                        keeps its sampled ids only when stripping removed nothing. `prompt_format=raw` is
                        ml-ssd's own ablation: it samples from the raw problem text without the chat
                        template (the SFT data still trains chat(x) -> y).

Every sample (text, sampled token ids, finish reason, verdict) is committed batch by batch to
`shard-k-of-N/samples.jsonl` (a `BatchLog`: a kill loses at most the batch in flight, a rerun resumes
after the last committed batch and refuses changed settings outside `RESUME_ALLOWED`); `budget.json` per
shard counts the samples and tokens generated. When every shard has finished, the strategy's filter runs
over all of them and writes `output_dir/sft.jsonl` (sorted by problem and sample) and
`output_dir/summary.json`. `max_samples` caps the samples generated (the sample budget of a comparison;
the last batch is cut to the problems that fit), shared evenly over shards.

    python -m self_revision_training.sample_data --config configs/rft.yaml model.path=M dataset.path=D \\
        output_dir=outputs/rft/data
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from self_revision_training.collect import check_model_and_prompts
from self_revision_training.shards import check_shard_resume, shard_dir, shard_finished, write_shard_summary
from self_revision_training.shared.budget import Budget
from self_revision_training.shared.config import (
    BackendConfig,
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
    save_prompt_spec,
    strip_eos,
)
from self_revision_training.shared.rewards import RewardName
from self_revision_training.shared.run_config import save_run_config
from self_revision_training.shared.run_lock import lock_directory
from self_revision_training.shared.storage import (
    BatchLog,
    atomic_write_json,
    atomic_write_text,
    iter_committed_batches,
)
from self_revision_training.ssd_filter import filter_ssd_samples

log = logging.getLogger("sdzero.sample_data")

SAMPLES_FILE = "samples.jsonl"
SFT_FILE = "sft.jsonl"
SUMMARY_FILE = "summary.json"
Strategy = Literal["rejection", "ssd"]


@dataclass
class SampleDataConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(top_p=0.9, max_tokens=16384))
    grading: GradingConfig = field(default_factory=GradingConfig)
    strategy: Strategy = "rejection"
    reward: RewardName | None = None  # null = ground_truth (ssd: for the report only; none without answers)
    prompt_format: Literal["chat", "raw"] = "chat"  # raw = ml-ssd: sample from the bare problem text
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    num_samples: int = 4  # responses per problem
    max_per_problem: int = 0  # rejection: distinct verified responses kept per problem; 0 = all
    ssd_drop_truncated: bool = False  # ssd: drop responses cut at max_tokens (ml-ssd keeps them)
    ssd_shortest_percent: float = 10.0  # ssd: drop the shortest this-many per cent (ml-ssd: 10)
    max_samples: int = 0  # samples this stage may generate (all shards together); 0 = the whole range
    batch_size: int = 64  # problems per committed batch
    num_shards: int = 1
    shard_index: int = 0
    output_dir: str = ""
    progress: bool = True
    check_only: bool = False  # validate config, dataset, model path and prompt lengths, then exit

    def __post_init__(self) -> None:
        for name in ("output_dir", "model.path", "dataset.path"):
            obj, _, key = name.rpartition(".")
            if not getattr(getattr(self, obj) if obj else self, key):
                raise ValueError(f"{name} is required")
        if self.sampling.n != 1:
            raise ValueError("sampling.n is not used here: set num_samples")
        for name in ("num_samples", "batch_size", "num_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_per_problem < 0 or self.max_samples < 0:
            raise ValueError("max_per_problem and max_samples must be >= 0")
        if not 0 <= self.ssd_shortest_percent < 100:
            raise ValueError(f"ssd_shortest_percent must be in [0, 100), got {self.ssd_shortest_percent}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}")
        if self.reward is None:
            unlabelled = self.strategy == "ssd" and self.dataset.answers == "optional"
            self.reward = "none" if unlabelled else "ground_truth"
        if self.strategy == "rejection" and self.reward == "none":
            raise ValueError("strategy=rejection keeps verified responses: it needs a reward (not none)")


# What a resumed stage may change (the rest decides which samples exist and which are kept).
RESUME_ALLOWED = tuple(
    "dataset.start_index dataset.end_index dataset.on_bad_row batch_size max_samples output_dir progress "
    "check_only grading.num_workers backend.name backend.gpu_memory_utilization backend.kv_cache_gb "
    "backend.tensor_parallel_size backend.distributed_executor_backend backend.enforce_eager "
    "backend.enable_prefix_caching backend.hf_batch_size backend.device".split()
)


def check_resume(cfg: SampleDataConfig, out: Path) -> None:
    check_shard_resume(cfg, out, SAMPLES_FILE, RESUME_ALLOWED, "samples", num_shards=cfg.num_shards)


def sample_batch(cfg, batch_no, problems, backend, tokenizer, reward) -> tuple[list[dict], int]:
    """Sample and grade one batch -> its `sample` records (prompts too long for the context get none)."""
    eos = backend.eos_token_ids
    prompts, limits, fitting = [], [], []
    for problem in problems:
        if cfg.prompt_format == "raw":  # ml-ssd feeds the text to LLM.generate (special tokens added)
            ids = tokenizer(problem.problem, add_special_tokens=True)["input_ids"]
        else:
            ids = build_generation_prompt(tokenizer, problem.problem, cfg.prompt).ids
        limit = min(cfg.sampling.max_tokens, backend.max_model_len - len(ids))
        if limit >= 1:
            prompts.append(ids)
            limits.append(limit)
            fitting.append(problem)
    sampling = dataclasses.replace(cfg.sampling, n=cfg.num_samples)
    rows = backend.generate(prompts, sampling, max_tokens=limits) if prompts else []
    verdicts = reward.score(fitting, [[s.text for s in row] for row in rows]) if fitting else []
    records, generated = [], 0
    for problem, row, row_verdicts in zip(fitting, rows, verdicts, strict=True):
        for k, (sample, verdict) in enumerate(zip(row, row_verdicts, strict=True)):
            generated += len(sample.token_ids)
            records.append(
                {
                    "type": "sample",
                    "original_index": problem.index,
                    "response_idx": k,
                    "x": problem.problem,
                    "ground_truth": problem.answer,
                    "text": sample.text,
                    "token_ids": strip_eos(sample.token_ids, eos),
                    "num_tokens": len(sample.token_ids),
                    "finish_reason": sample.finish_reason,
                    "correct": verdict.correct,
                    "reason": verdict.reason,
                    "extracted": verdict.extracted,
                    "skip": verdict.skip,
                    "batch": batch_no,
                    "policy_version": backend.policy_version,
                }
            )
    return records, generated


def select_rejection(records: list[dict], max_per_problem: int) -> tuple[list[dict], dict]:
    """Verified responses, exact duplicates within a problem dropped, at most max_per_problem each."""
    kept, seen, per_problem = [], set(), {}
    counts = {"input": len(records), "wrong": 0, "no_reward": 0, "duplicate": 0, "over_cap": 0}
    for rec in records:
        key = (rec["original_index"], rec["text"])
        if rec["skip"] is not None:
            counts["no_reward"] += 1
        elif not rec["correct"]:
            counts["wrong"] += 1
        elif key in seen:
            counts["duplicate"] += 1
        elif max_per_problem and per_problem.get(rec["original_index"], 0) >= max_per_problem:
            counts["over_cap"] += 1
        else:
            seen.add(key)
            per_problem[rec["original_index"]] = per_problem.get(rec["original_index"], 0) + 1
            kept.append(rec)
    counts["kept"] = len(kept)
    counts["problems_with_data"] = len(per_problem)
    return kept, counts


def select_ssd(records: list[dict], cfg: SampleDataConfig) -> tuple[list[dict], dict]:
    kept, report = filter_ssd_samples(
        [r["text"] for r in records],
        [r["finish_reason"] for r in records],
        drop_truncated=cfg.ssd_drop_truncated,
        shortest_percent=cfg.ssd_shortest_percent,
    )
    report["problems_with_data"] = len({records[i]["original_index"] for i in kept})
    return [records[i] for i in kept], report


def to_sft_record(rec: dict, strategy: str) -> dict:
    text = rec["text"].strip() if strategy == "ssd" else rec["text"]
    return {
        "prompt": rec["x"],
        "completion": text,
        "completion_ids": rec["token_ids"] if text == rec["text"] else None,  # stripped: re-encoded
        "original_index": rec["original_index"],
        "response_idx": rec["response_idx"],
        "source": strategy,
    }


def finalize(cfg: SampleDataConfig) -> dict | None:
    """Once every shard is done: the strategy's filter over all samples -> sft.jsonl + summary.json."""
    root = Path(cfg.output_dir)
    shards = [shard_dir(root, k, cfg.num_shards) for k in range(cfg.num_shards)]
    pending = [s.name for s in shards if not shard_finished(s)]
    if pending:
        log.info("samples written; sft.jsonl follows when shards %s have finished", pending)
        return None
    records = [
        rec
        for s in shards
        for _, batch in iter_committed_batches(s / SAMPLES_FILE, ("sample",))
        for rec in batch
    ]
    records.sort(key=lambda r: (r["original_index"], r["response_idx"]))
    if cfg.strategy == "rejection":
        kept, report = select_rejection(records, cfg.max_per_problem)
    else:
        kept, report = select_ssd(records, cfg)
    atomic_write_text(
        root / SFT_FILE,
        "".join(json.dumps(to_sft_record(r, cfg.strategy), ensure_ascii=False) + "\n" for r in kept),
    )
    problems = {r["original_index"] for r in records}
    summary = {
        "strategy": cfg.strategy,
        "reward": cfg.reward,
        "model": cfg.model.path,
        "samples": len(records),
        "problems": len(problems),
        "accuracy": sum(r["correct"] for r in records) / len(records) if records else None,
        "filter": report,
        "files": {"sft": SFT_FILE},
        "config": to_dict(cfg),
    }
    atomic_write_json(root / SUMMARY_FILE, summary)
    spec = shards[0] / PROMPT_SPEC_FILE  # so that SFT on sft.jsonl finds the prompt it was sampled with
    if spec.is_file():
        atomic_write_text(root / PROMPT_SPEC_FILE, spec.read_text(encoding="utf-8"))
    log.info("%s: kept %d of %d samples (%s)", root / SFT_FILE, len(kept), len(records), report)
    return summary


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_cli(SampleDataConfig, argv, description=__doc__.splitlines()[0])
    out = shard_dir(cfg.output_dir, cfg.shard_index, cfg.num_shards)
    if cfg.check_only:
        check_resume(cfg, out)
        problems, report = load_problems(cfg.dataset)
        print(f"sample_data: config ok; {report.loaded} problems; {check_model_and_prompts(cfg, problems)}")
        return None
    with lock_directory(out, "sampling", "sample_data"):
        check_resume(cfg, out)
        problems, _ = load_problems(cfg.dataset)
        mine = [p for p in problems if p.index % cfg.num_shards == cfg.shard_index]
        with BatchLog(out / SAMPLES_FILE) as samples:
            _sample(cfg, out, samples, mine)
    return finalize(cfg)


def _sample(cfg: SampleDataConfig, out: Path, samples: BatchLog, mine: list[Problem]) -> None:
    budget, done, batches = Budget(stage=f"sample_{cfg.strategy}"), set(), 0
    for marker, records in samples.batches(("sample",)):
        done.update(marker["indices"])
        budget.add_generation_batch(cfg.dataset.path, marker, len(records))
        batches += 1
    cap = math.ceil(cfg.max_samples / cfg.num_shards) if cfg.max_samples else 0
    todo = [p for p in mine if p.index not in done]
    if cap:  # the sample budget: only the problems whose samples fit in what is left of it
        todo = todo[: max(0, cap - budget.samples_generated) // cfg.num_samples]
    status = "budget" if cap and len(todo) < len(mine) - len(done) else "done"
    if todo:
        from transformers import AutoTokenizer

        from self_revision_training.shared.generation import create_backend
        from self_revision_training.shared.rewards import build_reward_source

        tokenizer = AutoTokenizer.from_pretrained(
            cfg.model.path, trust_remote_code=cfg.model.trust_remote_code
        )
        backend = create_backend(
            cfg.model, dataclasses.replace(cfg.backend, seed=cfg.backend.seed + cfg.shard_index)
        )
        save_run_config(cfg, out)  # the run's identity, once the model has loaded
        save_prompt_spec(out, tokenizer, cfg.prompt)
        try:
            with build_reward_source(cfg.reward, cfg.dataset.mode, cfg.grading) as reward:
                for start in range(0, len(todo), cfg.batch_size):
                    batch = todo[start : start + cfg.batch_size]
                    t0 = time.time()
                    records, generated = sample_batch(cfg, batches, batch, backend, tokenizer, reward)
                    seen = {r["original_index"] for r in records}
                    marker = samples.commit(
                        records,
                        indices=[p.index for p in batch],
                        prompt_too_long=[p.index for p in batch if p.index not in seen],
                        generated_tokens=generated,
                        seconds=round(time.time() - t0, 3),
                    )
                    budget.add_generation_batch(cfg.dataset.path, marker, len(records))
                    batches += 1
                    write_shard_summary(out, budget, batches, "running")
                    log.info(
                        "%s: %d samples, %d tokens", out, budget.samples_generated, budget.tokens_generated
                    )
        finally:
            backend.close()
    write_shard_summary(out, budget, batches, status)


if __name__ == "__main__":
    main()
