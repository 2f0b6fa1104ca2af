"""Phase 1a: collect self-revision tuples (paper Sec. 3.1) with vLLM (or transformers), resumably.

For each problem x with answer a: sample `num_responses` y_init; grade each (r); for r=0 and r=1
(`revise_correct=true`, the default; false = the reference's r=0 only) continue the assistant turn with
y_init + "\\n\\n" + P_r + "\\n\\n" and sample `num_revisions` y_revised; grade them. Every attempt
(with its sampled token ids) is appended to attempts.jsonl batch by batch (see revision_data.py for the
format and the commit marker); verified tuples go to verified.jsonl and summary.json is rewritten after
each batch. A problem whose prompt does not fit the engine's context is skipped and counted
(`problems_skipped.prompt_too_long`). Collection stops at `target_revision_samples` verified tuples (per
shard: ceil(target / num_shards)) or at the end of the problem range.

Rerunning the same command resumes where the last committed batch ended; one process writes a shard
directory at a time (`shared.run_lock`; a second one exits naming the first's pid). A resume refuses
changed settings that alter the data (model, prompt, dataset, sampling, grading, reward, revision
settings; `RESUME_ALLOWED` lists what may change). The run's identity (config.yaml, sdzero_prompt.json)
is written once the model has loaded, so a start that fails (a mistyped model path) leaves nothing that
blocks the corrected rerun. `check_only=true` validates the config, the dataset, the model path (config,
tokenizer, chat template) and reports prompts too long for the context, without loading the model.

Data parallel: `num_shards=N shard_index=k` takes the problems whose row index is k modulo N (so the
assignment does not depend on the range) and writes to output_dir/shard-k-of-N; scripts/run_srt_data.sh starts one process per GPU.

    python -m self_revision_training.collect --config configs/phase1_collect.yaml \\
        model.path=Qwen/Qwen3-4B-Instruct-2507 output_dir=outputs/srt_data/collect
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from self_revision_training.revision_data import (
    ATTEMPTS_FILE,
    RECORD_TYPES,
    SUMMARY_FILE,
    VERIFIED_FILE,
    CollectionStats,
    build_init_record,
    build_revision_record,
)
from self_revision_training.shared.budget import Budget
from self_revision_training.shared.config import (
    BackendConfig,
    ConfigError,
    DatasetConfig,
    GradingConfig,
    ModelConfig,
    PromptConfig,
    SamplingConfig,
    load_yaml,
    parse_cli,
    to_dict,
)
from self_revision_training.shared.problems import Problem, load_problems
from self_revision_training.shared.prompts import (
    build_generation_prompt,
    build_revision_prompt,
    save_prompt_spec,
    select_phrase,
    strip_eos,
)
from self_revision_training.shared.rewards import RewardName
from self_revision_training.shared.rewards.majority_vote import VoteConfig, pin_vote_label
from self_revision_training.shared.run_config import check_resume_config, save_run_config
from self_revision_training.shared.run_lock import RunLockError, check_run_lock, lock_directory
from self_revision_training.shared.storage import BatchLog, JsonlWriter, atomic_write_json, atomic_write_text

log = logging.getLogger("sdzero.collect")


@dataclass
class CollectConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(top_p=0.9, max_tokens=16384))
    grading: GradingConfig = field(default_factory=GradingConfig)
    reward: RewardName = "ground_truth"  # reward source of y_init and y_revised (shared.rewards)
    vote: VoteConfig = field(
        default_factory=VoteConfig
    )  # reward=majority_vote: threshold, ties (online vote)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    num_responses: int = 3  # y_init samples per problem
    num_revisions: int = 3  # y_revised samples per revised y_init
    revision_max_tokens: int | None = None  # new tokens per revision; None = sampling.max_tokens
    batch_size: int = 64  # problems per batch (one commit to attempts.jsonl per batch)
    target_revision_samples: int = 6000  # stop after this many verified tuples; 0 = scan the whole range
    revise_correct: bool = True  # also revise correct y_init with the rephrase cue P_1 (reference: false)
    truncated_init: Literal["drop", "keep"] = "drop"  # revise a y_init cut at max_tokens (keep) or not
    num_shards: int = 1  # data-parallel collectors over the problem range
    shard_index: int = 0  # which shard this process collects
    output_dir: str = ""  # required; shards write to output_dir/shard-k-of-N
    progress: bool = True  # tqdm progress bar on stderr
    check_only: bool = False  # validate config, dataset, model path and prompt lengths, then exit (no engine)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir is required")
        if not self.model.path:
            raise ValueError("model.path is required")
        if not self.dataset.path:
            raise ValueError("dataset.path is required")
        if self.sampling.n != 1:
            raise ValueError("sampling.n is not used here: set num_responses / num_revisions")
        for name in ("num_responses", "num_revisions", "batch_size", "num_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.target_revision_samples < 0:
            raise ValueError(f"target_revision_samples must be >= 0, got {self.target_revision_samples}")
        if self.revision_max_tokens is not None and self.revision_max_tokens < 1:
            raise ValueError(f"revision_max_tokens must be >= 1, got {self.revision_max_tokens}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}")


# Settings a resumed collection may change; every other key must equal the one the shard was started with
# (model, prompt, dataset, sampling, grading, reward, num_responses, num_revisions, revision_max_tokens,
# revise_correct, truncated_init, backend.max_model_len: they decide which samples exist and how they are
# graded). The range may grow or shrink (problems are keyed by row index); a bad row is never collected
# whatever on_bad_row says; the backend's other keys choose the engine and its resources, not the samples.
RESUME_ALLOWED = tuple(
    "dataset.start_index dataset.end_index dataset.on_bad_row batch_size target_revision_samples num_shards "
    "shard_index output_dir progress check_only grading.num_workers backend.name backend.seed "
    "backend.gpu_memory_utilization backend.kv_cache_gb backend.tensor_parallel_size "
    "backend.distributed_executor_backend backend.enforce_eager backend.enable_prefix_caching "
    "backend.hf_batch_size backend.device".split()
)  # num_shards is checked on its own (every shard directory must have the same count)


def shard_dir(cfg: CollectConfig) -> Path:
    return Path(cfg.output_dir) / f"shard-{cfg.shard_index}-of-{cfg.num_shards}"


def _has_committed_data(shard: Path) -> bool:
    attempts = shard / ATTEMPTS_FILE
    return attempts.is_file() and attempts.stat().st_size > 0


def check_resume(cfg: CollectConfig, out: Path) -> None:
    """Refuse to mix runs: a different shard count, or changed settings, in an existing output_dir."""
    for other in Path(cfg.output_dir).glob("shard-*-of-*"):
        match = re.fullmatch(r"shard-\d+-of-(\d+)", other.name)
        if match and int(match.group(1)) != cfg.num_shards and _has_committed_data(other):
            raise ConfigError(
                f"{cfg.output_dir} holds a collection with {match.group(1)} shards ({other.name}); "
                f"num_shards={cfg.num_shards} would process problems twice. Use a new output_dir."
            )
    saved = out / "config.yaml"
    if not saved.exists():
        return
    if not _has_committed_data(out):  # an earlier start that collected nothing: its settings do not bind
        log.info("%s holds no committed batch: starting over with this run's settings", out)
        return
    old = load_yaml(saved.read_text(encoding="utf-8")) or {}
    try:
        check_resume_config(old, to_dict(cfg), allowed=RESUME_ALLOWED, where=f"collection {out}")
    except ConfigError as exc:
        raise ConfigError(f"{out} was collected with other settings: {exc}") from None


def find_too_long_prompts(
    problems: list[Problem], tokenizer, prompt_cfg: PromptConfig, max_model_len: int
) -> list[int]:
    """Indices of problems whose generation prompt leaves no room for one new token in the context.

    Byte-level tokenizers never produce more tokens than bytes, so only prompts whose byte length could
    reach the limit are tokenized (a dataset of 100k problems is checked in seconds).
    """
    template_bytes = len(build_generation_prompt(tokenizer, "", prompt_cfg).text.encode("utf-8"))
    too_long = []
    for problem in problems:
        if template_bytes + len(problem.problem.encode("utf-8")) + 8 < max_model_len:
            continue
        if len(build_generation_prompt(tokenizer, problem.problem, prompt_cfg).ids) >= max_model_len:
            too_long.append(problem.index)
    return too_long


def check_model_and_prompts(cfg: CollectConfig, problems: list[Problem]) -> str:
    """check_only: the model path loads a config and a tokenizer with a chat template; prompt lengths."""
    from transformers import AutoConfig, AutoTokenizer

    remote = cfg.model.trust_remote_code
    try:
        model_config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=remote)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=remote)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"collect: model.path={cfg.model.path!r} cannot be loaded: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(
            f"collect: the tokenizer of model.path={cfg.model.path!r} has no chat template; "
            "SD-Zero prompts need a chat (instruct) model"
        )
    max_len = cfg.backend.max_model_len or getattr(model_config, "max_position_embeddings", None)
    if max_len is None:
        return "prompt lengths not checked (no backend.max_model_len and no max_position_embeddings)"
    too_long = find_too_long_prompts(problems, tokenizer, cfg.prompt, max_len)
    if not too_long:
        return f"every prompt fits max_model_len={max_len}"
    log.warning(
        "%d problems have prompts of >= max_model_len=%d tokens and will be skipped (rows %s%s)",
        len(too_long), max_len, too_long[:20], " ..." if len(too_long) > 20 else "",
    )  # fmt: skip
    return f"{len(too_long)} prompts too long for max_model_len={max_len} (skipped and counted)"


def collect_batch(cfg, batch_no, problems, backend, tokenizer, reward) -> tuple[list[dict], int]:
    """Sample, grade, revise and grade one batch; returns its records and the generated token count.

    A problem whose prompt leaves no room under `backend.max_model_len` gets no record (the caller lists
    it in the batch marker's `prompt_too_long`).
    """
    max_len = backend.max_model_len
    eos = backend.eos_token_ids
    sampling = dataclasses.replace(cfg.sampling, n=cfg.num_responses)
    prompts, limits, fitting = [], [], []
    for problem in problems:
        ids = build_generation_prompt(tokenizer, problem.problem, cfg.prompt).ids
        limit = min(cfg.sampling.max_tokens, max_len - len(ids))
        if limit < 1:  # skipped and counted (the marker's prompt_too_long), never retried on resume
            continue
        prompts.append(ids)
        limits.append(limit)
        fitting.append(problem)
    init_samples = backend.generate(prompts, sampling, max_tokens=limits) if prompts else []
    verdicts = reward.score(fitting, [[s.text for s in row] for row in init_samples]) if fitting else []
    inits, todo = [], []
    for problem, row, row_verdicts in zip(fitting, init_samples, verdicts, strict=True):
        for k, (sample, verdict) in enumerate(zip(row, row_verdicts, strict=True)):
            rec = build_init_record(problem, k, sample, verdict, batch_no, backend.policy_version, eos)
            inits.append(rec)
            if verdict.skip is not None:  # the vote gave no r (tie, below tau): nothing to revise from
                rec["skip_reason"] = verdict.skip
            elif verdict.correct and not cfg.revise_correct:
                rec["skip_reason"] = "correct"
            elif sample.truncated and cfg.truncated_init == "drop":
                rec["skip_reason"] = "truncated"
            else:
                # an online vote's label is pinned: the revisions are graded against the y_init group's
                # label, not by a vote among themselves (offline labels and ground truth are unchanged)
                todo.append((rec, pin_vote_label(problem, verdict), sample, verdict))
    rev_prompts, rev_limits, rev_inits = [], [], []
    rev_budget = cfg.revision_max_tokens or cfg.sampling.max_tokens
    for rec, problem, sample, verdict in todo:
        ids = build_revision_prompt(
            tokenizer,
            problem.problem,
            sample.text,
            verdict.correct,
            cfg.prompt,
            response_ids=strip_eos(sample.token_ids, eos),
        ).ids
        room = min(rev_budget, max_len - len(ids))
        if room < 1:
            rec["skip_reason"] = "no_room"  # y_init filled the context window
            continue
        rec["revised"] = True
        rev_prompts.append(ids)
        rev_limits.append(room)
        rev_inits.append((rec, problem, verdict))
    records = list(inits)
    generated = sum(len(s.token_ids) for row in init_samples for s in row)
    if rev_prompts:
        rev_sampling = dataclasses.replace(cfg.sampling, n=cfg.num_revisions)
        rev_samples = backend.generate(rev_prompts, rev_sampling, max_tokens=rev_limits)
        rev_verdicts = reward.score(
            [problem for _, problem, _ in rev_inits], [[s.text for s in row] for row in rev_samples]
        )
        for (rec, _, init_verdict), row, row_verdicts in zip(
            rev_inits, rev_samples, rev_verdicts, strict=True
        ):
            p_r = select_phrase(init_verdict.correct, cfg.prompt)
            for j, (sample, verdict) in enumerate(zip(row, row_verdicts, strict=True)):
                records.append(build_revision_record(rec, p_r, j, sample, verdict, eos))
                generated += len(sample.token_ids)
    return records, generated


def _write_summary(out: Path, cfg: CollectConfig, stats: CollectionStats, state: dict) -> None:
    atomic_write_json(
        out / SUMMARY_FILE,
        {
            "model": cfg.model.path,
            "dataset": {"path": cfg.dataset.path, "subset": cfg.dataset.subset, "split": cfg.dataset.split},
            "range": [cfg.dataset.start_index, cfg.dataset.end_index],
            "shard": [cfg.shard_index, cfg.num_shards],
            "target": state["target"],
            **state,
            **stats.to_dict(),
            "files": {"attempts": ATTEMPTS_FILE, "verified": VERIFIED_FILE},
            "config": to_dict(cfg),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_cli(CollectConfig, argv, description=__doc__.splitlines()[0])
    out = shard_dir(cfg)
    if cfg.check_only:
        return _check_only(cfg, out)
    with lock_directory(out, "collection", "collect"):
        check_resume(cfg, out)
        problems, report = load_problems(cfg.dataset)
        mine = [p for p in problems if p.index % cfg.num_shards == cfg.shard_index]
        target = math.ceil(cfg.target_revision_samples / cfg.num_shards) if cfg.target_revision_samples else 0
        # Resume: drop a batch cut by a kill, replay the committed ones into the stats and verified.jsonl.
        attempts = BatchLog(out / ATTEMPTS_FILE)
        try:
            return _collect(cfg, out, attempts, mine, target, report)
        finally:
            attempts.close()


def _check_only(cfg: CollectConfig, out: Path) -> dict:
    """Everything that can fail before an engine starts, for every shard of the run; writes nothing."""
    for k in range(cfg.num_shards):
        try:
            check_run_lock(Path(cfg.output_dir) / f"shard-{k}-of-{cfg.num_shards}")
        except RunLockError as exc:
            raise SystemExit(f"collect: {exc}") from None
    check_resume(cfg, out)
    problems, report = load_problems(cfg.dataset)
    prompts = check_model_and_prompts(cfg, problems)
    duplicates = f", {report.duplicates} duplicate problems" if report.duplicates else ""
    print(
        f"collect: config ok; {report.loaded} problems in range ({report.skipped} rows skipped{duplicates}); "
        f"model {cfg.model.path} ok; {prompts}"
    )
    return {}


def _collect(cfg: CollectConfig, out: Path, attempts: BatchLog, mine: list, target: int, report) -> dict:
    if attempts.dropped_on_open:
        log.info("discarded %d lines of an uncommitted batch in %s", attempts.dropped_on_open, attempts.path)
    stats, done, verified_lines = CollectionStats(), set(), []
    budget = Budget(stage="collect")  # every init and revision sample is a generated sample
    for marker, records in attempts.batches(RECORD_TYPES):
        stats.add_batch(marker, records)
        budget.add_generation_batch(cfg.dataset.path, marker, len(records))
        done.update(marker["indices"])
        verified_lines += [json.dumps(r, ensure_ascii=False) + "\n" for r in records if r.get("verified")]
    atomic_write_text(out / VERIFIED_FILE, "".join(verified_lines))
    del verified_lines
    todo = [p for p in mine if p.index not in done]
    state = {
        "status": "running",
        "target": target,
        "loaded": report.loaded,
        "skipped_rows": report.skipped,
        "duplicate_problems": report.duplicates,
        "deduplicated": report.deduplicated,
    }
    if done:
        log.info("resuming %s: %d problems done, %d verified tuples", out, len(done), stats.verified)
    if (target and stats.verified >= target) or not todo:
        state["status"] = "target_reached" if target and stats.verified >= target else "range_done"
        _write_summary(out, cfg, stats, state)
        budget.save(out)
        log.info("nothing to do in %s (%s)", out, state["status"])
        return stats.to_dict()

    from transformers import AutoTokenizer

    from self_revision_training.shared.generation import create_backend
    from self_revision_training.shared.rewards import build_reward_source

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    # distinct engine seeds per shard: identical seeds would give every shard the same random stream
    backend = create_backend(
        cfg.model, dataclasses.replace(cfg.backend, seed=cfg.backend.seed + cfg.shard_index)
    )
    # The run's identity, written only now that the model and data have loaded: a failed start (a
    # mistyped path) leaves nothing that a corrected rerun would be compared against.
    save_run_config(cfg, out)
    save_prompt_spec(out, tokenizer, cfg.prompt)
    progress = None
    if cfg.progress:
        from tqdm import tqdm

        progress = tqdm(
            total=len(mine), initial=len(mine) - len(todo), desc=f"collect {out.name}", unit="problem"
        )
    started = time.time()
    try:
        with (
            build_reward_source(cfg.reward, cfg.dataset.mode, cfg.grading, cfg.vote) as reward,
            JsonlWriter(out / VERIFIED_FILE) as verified,
        ):
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start : start + cfg.batch_size]
                t0 = time.time()
                records, generated = collect_batch(cfg, stats.batches, batch, backend, tokenizer, reward)
                with_records = {r["original_index"] for r in records}
                too_long = [p.index for p in batch if p.index not in with_records]
                if too_long:
                    log.warning("skipped problems %s: prompt longer than the context", too_long)
                marker = attempts.commit(  # committed once the marker is on disk
                    records,
                    batch=stats.batches,
                    indices=[p.index for p in batch],
                    prompt_too_long=too_long,
                    seconds=round(time.time() - t0, 3),
                    generated_tokens=generated,
                )
                verified.write_batch([r for r in records if r.get("verified")])
                stats.add_batch(marker, records)
                budget.add_generation_batch(cfg.dataset.path, marker, len(records))
                state["session_seconds"] = round(time.time() - started, 1)
                if target and stats.verified >= target:
                    state["status"] = "target_reached"
                elif start + cfg.batch_size >= len(todo):
                    state["status"] = "range_done"
                _write_summary(out, cfg, stats, state)
                budget.save(out)
                if progress is not None:
                    rev = stats.to_dict()["revision"]
                    progress.set_postfix(verified=stats.verified, yield_=rev["yield"], refresh=False)
                    progress.update(len(batch))
                if state["status"] == "target_reached":
                    break
    finally:
        if progress is not None:
            progress.close()
        backend.close()
    log.info(
        "%s: %s, %d verified tuples from %d problems", out, state["status"], stats.verified, stats.problems
    )
    return stats.to_dict()


if __name__ == "__main__":
    main()
