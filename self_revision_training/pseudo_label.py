"""Label problems without answers by majority vote (related methods §3: Noisy Student, TTRL), resumably.

    python -m self_revision_training.pseudo_label --config configs/pseudo_label.yaml \\
        model.path=Qwen/Qwen3-4B-Instruct-2507 dataset.path=data/unlabelled.jsonl output_dir=outputs/labels

For each problem x: `num_votes` samples y_1..y_k (vLLM or transformers, `generation.create_backend`);
answers extracted (`grading.extraction`) and clustered by math-verify equivalence in killable worker
processes (`rewards.equivalence`); label = the largest cluster's first-seen answer, vote_ratio = its
size / k (unparsed answers count in k). A tie, a ratio below tau (`vote.threshold`) or no answer at all
skips the problem; skips are counted. Rows may lack an answer; a row that has one (`answer`,
`ground_truth`, `solution`, or `dataset.answer_field`) is an audit row: its gold answer is hidden from the
vote and used only for the audit metrics (`majority_vote.compute_vote_audit`). A row written by this
stage (`label_source: vote`) is relabelled from scratch; its `gold_answer`, if any, stays the gold
(a `label_source: gold` row's answer is gold).

Outputs in output_dir:
    votes.jsonl  the committed batch log (`storage.BatchLog`): one `vote` record per problem with every
                 sample's answer, cluster, gold grade (and text with keep_responses); a rerun resumes
                 after the last committed batch, and labels / stats are rebuilt from it
    labels.jsonl one row per kept problem: problem, answer (= the label), label_source "vote",
                 vote_ratio, num_votes, num_samples, original_index, gold_answer (audit rows only) -
                 a dataset for Phase 1 / Phase 2 (reward ground_truth, or majority_vote for audits)
    stats.json   counts, the audit at vote.threshold and at each of report_thresholds (from the same
                 samples), generated tokens; config.yaml, sdzero_prompt.json
Changing vote.* and rerunning rewrites labels.jsonl and stats.json from the stored votes without sampling.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from self_revision_training.shared.problems import (
    ANSWER_FIELDS,
    PROBLEM_FIELDS,
    LoadReport,
    Problem,
    _parse_row,
    _pick_field,
    _read_rows,
)
from self_revision_training.shared.prompts import build_generation_prompt, save_prompt_spec
from self_revision_training.shared.rewards import Verdict
from self_revision_training.shared.rewards.majority_vote import (
    GOLD_FIELD,
    LABEL_SOURCE,
    GroupEvidence,
    VoteConfig,
    build_vote_verdicts,
    compute_vote_audit,
    gather_evidence,
)
from self_revision_training.shared.run_config import save_run_config
from self_revision_training.shared.storage import (
    BatchLog,
    DataFileError,
    JsonlWriter,
    atomic_write_json,
    atomic_write_text,
)

log = logging.getLogger("sdzero.pseudo_label")

VOTES_FILE = "votes.jsonl"
LABELS_FILE = "labels.jsonl"
STATS_FILE = "stats.json"
RECORD_TYPES = ("vote",)


@dataclass
class PseudoLabelConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the labeller (a frozen snapshot)
    backend: BackendConfig = field(default_factory=BackendConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(  # n is not used: num_votes sets k
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=4096)
    )
    grading: GradingConfig = field(default_factory=GradingConfig)  # extraction + equivalence workers
    vote: VoteConfig = field(default_factory=VoteConfig)  # tau and the tie rule of labels.jsonl
    dataset: DatasetConfig = field(default_factory=DatasetConfig)  # an answer, when present, is hidden gold
    num_votes: int = 8  # k samples per problem
    report_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.75])  # extra tau in stats.json
    batch_size: int = 64  # problems per batch (one commit to votes.jsonl per batch)
    keep_responses: bool = True  # store the k response texts in votes.jsonl
    output_dir: str = ""  # required
    progress: bool = True  # tqdm progress bar on stderr
    check_only: bool = False  # validate the config and load the dataset, then exit

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir is required")
        if not self.model.path:
            raise ValueError("model.path is required")
        if not self.dataset.path:
            raise ValueError("dataset.path is required")
        if self.dataset.mode != "math":
            raise ValueError("the majority vote compares math answers: dataset.mode must be math")
        if self.sampling.n != 1:
            raise ValueError("sampling.n is not used here: set num_votes")
        if self.num_votes < 1 or self.batch_size < 1:
            raise ValueError(
                f"num_votes and batch_size must be >= 1, got {self.num_votes}, {self.batch_size}"
            )
        if self.vote.train_samples is not None:
            raise ValueError("vote.train_samples applies to the online reward source, not to labelling")
        if any(not 0 <= t <= 1 for t in self.report_thresholds):
            raise ValueError(f"report_thresholds must lie in [0, 1], got {self.report_thresholds}")


# Settings a resumed run must share with the run that wrote votes.jsonl (vote.* may change: labels and
# stats are recomputed from the stored clusters).
_RESUME_KEYS = ("model", "prompt", "dataset", "sampling", "num_votes")


def load_label_inputs(cfg: DatasetConfig) -> tuple[list[Problem], LoadReport]:
    """The problems to label; `answer` holds the hidden gold answer of an audit row, "" for none.

    Rows need a problem field only (problems.load_problems requires an answer in math mode). A row from
    this stage (`label_source: vote`) keeps its `gold_answer` as gold, never its pseudo-label.
    """
    # Reuses problems.py's readers and row parser; only the "no answer field" case is handled here.
    rows, source = _read_rows(cfg)
    report = LoadReport(source=source)
    if not rows:
        raise DataFileError(f"dataset {source} is empty")
    end = len(rows) if cfg.end_index is None else min(cfg.end_index, len(rows))
    problems = []
    for index in range(cfg.start_index, end):
        location, row = rows[index]
        report.rows_read += 1
        try:
            problems.append(_parse_input_row(index, location, row, cfg, report))
        except DataFileError as exc:
            if cfg.on_bad_row == "error":
                raise
            reason = str(exc).split(": ", 1)[-1].split(";")[0][:80]
            report.skipped += 1
            report.skip_reasons[reason] = report.skip_reasons.get(reason, 0) + 1
    report.loaded = len(problems)
    if not problems:
        raise DataFileError(f"dataset {source}: no usable rows in [{cfg.start_index}, {end})")
    return problems, report


def _parse_input_row(index: int, location: str, row: Any, cfg: DatasetConfig, report: LoadReport) -> Problem:
    if isinstance(row, dict) and "label_source" in row:  # relabelling: every row is voted on afresh
        gold = row.get(GOLD_FIELD) if row["label_source"] == LABEL_SOURCE else row.get("answer")
        row = {k: v for k, v in row.items() if k not in ("answer", "label_source", GOLD_FIELD, "vote_ratio")}
        if gold is not None:
            row["answer"] = gold
    if isinstance(row, dict) and _pick_field(row, cfg.answer_field, ANSWER_FIELDS) is None:
        name = _pick_field(row, cfg.problem_field, PROBLEM_FIELDS)
        text = row.get(name) if name else None
        if not isinstance(text, str) or not text.strip():
            raise DataFileError(
                f"{location}: no problem field ({cfg.problem_field or ' / '.join(PROBLEM_FIELDS)})"
            )
        report.problem_field = name
        return Problem(
            index=index, problem=text, answer="", extras={k: v for k, v in row.items() if k != name}
        )
    return _parse_row(index, location, row, cfg, report)


def check_resume(cfg: PseudoLabelConfig, out: Path) -> None:
    """Refuse to extend votes.jsonl with other sampling settings (vote.* may change)."""
    import yaml

    saved = out / "config.yaml"
    if not saved.exists():
        return
    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    new = to_dict(cfg)
    for side in (old, new):  # the range may grow or shrink: problems are keyed by row index
        side["dataset"] = {
            k: v for k, v in (side.get("dataset") or {}).items() if k not in ("start_index", "end_index")
        }
    changed = [k for k in _RESUME_KEYS if old.get(k) != new.get(k)]
    if old.get("grading", {}).get("extraction") != new["grading"]["extraction"]:
        changed.append("grading.extraction")
    if changed:
        raise ConfigError(
            f"{out} holds votes sampled with other settings ({', '.join(changed)}); use a new output_dir"
        )


def build_vote_record(problem: Problem, samples: list, evidence: GroupEvidence, batch: int, cfg) -> dict:
    """The `vote` record of one problem: everything the labels and the audit are recomputed from."""
    return {
        "type": "vote",
        "original_index": problem.index,
        "x": problem.problem,
        GOLD_FIELD: problem.answer or None,
        "candidate_correct": evidence.candidate_correct,
        "samples": [
            {
                "extracted": evidence.answers[j],
                "cluster": evidence.cluster_ids[j],
                "empty": evidence.empty[j],
                "gold_correct": None if evidence.gold_correct is None else evidence.gold_correct[j],
                "finish_reason": s.finish_reason,
                "num_tokens": len(s.token_ids),
                **({"response": s.text} if cfg.keep_responses else {}),
            }
            for j, s in enumerate(samples)
        ],
        "batch": batch,
    }


def evidence_of(record: dict) -> GroupEvidence:
    samples = record["samples"]
    gold = [s["gold_correct"] for s in samples]
    return GroupEvidence(
        answers=tuple(s["extracted"] for s in samples),
        empty=tuple(bool(s["empty"]) for s in samples),
        cluster_ids=tuple(s["cluster"] for s in samples),
        gold_correct=None if record[GOLD_FIELD] is None else tuple(bool(g) for g in gold),
        candidate_correct=record["candidate_correct"],
    )


def build_label_row(record: dict, verdicts: list[Verdict]) -> dict | None:
    """The labels.jsonl row of a vote record under the verdicts' vote, or None when it is skipped."""
    first = verdicts[0]
    if first.skip is not None or first.label is None:
        return None
    row = {
        "problem": record["x"],
        "answer": first.label,
        "label_source": LABEL_SOURCE,
        "vote_ratio": first.vote_ratio,
        "num_votes": sum(v.correct for v in verdicts),
        "num_samples": len(verdicts),
        "original_index": record["original_index"],
    }
    if record[GOLD_FIELD] is not None:
        row[GOLD_FIELD] = record[GOLD_FIELD]
    return row


def compute_label_stats(records: list[dict], cfg: PseudoLabelConfig) -> dict[str, Any]:
    """stats.json's numbers from the vote records: counts, and the audit at every threshold."""
    voted = [r for r in records if r["samples"]]
    evidence = [evidence_of(r) for r in voted]
    audit = {}
    for tau in dict.fromkeys([cfg.vote.threshold, *cfg.report_thresholds]):
        vote = dataclasses.replace(cfg.vote, threshold=tau)
        audit[f"{tau:g}"] = compute_vote_audit([build_vote_verdicts(e, vote) for e in evidence])
    samples = [s for r in voted for s in r["samples"]]
    return {
        "problems": len(records),
        "no_prompt_room": len(records) - len(voted),  # prompt longer than backend.max_model_len
        "audit_rows": sum(r[GOLD_FIELD] is not None for r in voted),
        "threshold": cfg.vote.threshold,
        "tie": cfg.vote.tie,
        "num_votes": cfg.num_votes,
        "audit": audit[f"{cfg.vote.threshold:g}"],
        "audit_by_threshold": audit,
        "samples": len(samples),
        "unparsed_rate": sum(s["extracted"] is None for s in samples) / max(1, len(samples)),
        "truncation_rate": sum(s["finish_reason"] == "length" for s in samples) / max(1, len(samples)),
        "mean_response_tokens": sum(s["num_tokens"] for s in samples) / max(1, len(samples)),
    }


def label_batch(cfg, batch_no, problems, backend, tokenizer, equivalent) -> tuple[list[dict], int]:
    """Sample k responses per problem, cluster and gold-check them; one vote record per problem."""
    prompts = [build_generation_prompt(tokenizer, p.problem, cfg.prompt).ids for p in problems]
    max_len = backend.max_model_len
    limits = [cfg.sampling.max_tokens if max_len is None else min(cfg.sampling.max_tokens, max_len - len(ids))
              for ids in prompts]  # fmt: skip
    keep = [j for j, lim in enumerate(limits) if lim >= 1]
    sampling = dataclasses.replace(cfg.sampling, n=cfg.num_votes)
    rows = (
        backend.generate([prompts[j] for j in keep], sampling, max_tokens=[limits[j] for j in keep])
        if keep
        else []
    )
    kept = [problems[j] for j in keep]
    evidence = gather_evidence(
        kept, [[s.text for s in row] for row in rows], cfg.grading.extraction, equivalent
    )
    by_index = {
        p.index: build_vote_record(p, row, e, batch_no, cfg)
        for p, row, e in zip(kept, rows, evidence, strict=True)
    }
    records = []
    for p in problems:  # a prompt without room is recorded (and counted), with no samples
        records.append(by_index.get(p.index) or {
            "type": "vote", "original_index": p.index, "x": p.problem, GOLD_FIELD: p.answer or None,
            "candidate_correct": None, "samples": [], "batch": batch_no,
        })  # fmt: skip
    generated = sum(len(s.token_ids) for row in rows for s in row)
    return records, generated


def _labels_of(records: list[dict], vote: VoteConfig) -> list[dict]:
    out = []
    for record in records:
        if record["samples"]:
            row = build_label_row(record, build_vote_verdicts(evidence_of(record), vote))
            if row is not None:
                out.append(row)
    return out


def _write_stats(out: Path, cfg: PseudoLabelConfig, records: list[dict], state: dict) -> dict:
    stats = {**state, **compute_label_stats(records, cfg), "model": cfg.model.path,
             "dataset": cfg.dataset.path, "files": {"votes": VOTES_FILE, "labels": LABELS_FILE},
             "config": to_dict(cfg), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    atomic_write_json(out / STATS_FILE, stats)
    return stats


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_cli(PseudoLabelConfig, argv, description=__doc__.splitlines()[0])
    out = Path(cfg.output_dir)
    check_resume(cfg, out)
    problems, report = load_label_inputs(cfg.dataset)
    if cfg.check_only:
        print(f"pseudo_label: config ok; {report.loaded} problems in range ({report.skipped} rows skipped)")
        return {}
    out.mkdir(parents=True, exist_ok=True)
    votes = BatchLog(out / VOTES_FILE)
    try:
        return _label(cfg, out, votes, problems, report)
    finally:
        votes.close()


def _compact(record: dict) -> dict:
    """A vote record without response texts (what stays in memory)."""
    return {**record, "samples": [{k: v for k, v in s.items() if k != "response"} for s in record["samples"]]}


def _label(cfg: PseudoLabelConfig, out: Path, votes: BatchLog, problems: list[Problem], report) -> dict:
    if votes.dropped_on_open:
        log.info("discarded %d lines of an uncommitted batch in %s", votes.dropped_on_open, votes.path)
    records: list[dict] = []
    batches = generated_tokens = 0
    for marker, batch in votes.batches(RECORD_TYPES):
        records += [_compact(r) for r in batch]
        batches += 1
        generated_tokens += int(marker.get("generated_tokens", 0))
    done = {r["original_index"] for r in records}
    atomic_write_text(out / LABELS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                 for r in _labels_of(records, cfg.vote)))  # fmt: skip
    todo = [p for p in problems if p.index not in done]
    state = {
        "status": "running",
        "loaded": report.loaded,
        "skipped_rows": report.skipped,
        "generated_tokens": generated_tokens,  # over every committed batch
    }
    if done:
        log.info("resuming %s: %d problems voted", out, len(done))
    if not todo:
        state["status"] = "done"
        return _write_stats(out, cfg, records, state)

    from transformers import AutoTokenizer

    from self_revision_training.shared.generation import create_backend
    from self_revision_training.shared.rewards.equivalence import AnswerEquivalence

    save_run_config(cfg, out)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    save_prompt_spec(out, tokenizer, cfg.prompt)
    backend = create_backend(cfg.model, cfg.backend)
    progress = None
    if cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=len(problems), initial=len(done), desc=f"label {out.name}", unit="problem")
    started = last_stats = time.time()
    stats: dict = {}
    try:
        with AnswerEquivalence(cfg.grading) as equivalent, JsonlWriter(out / LABELS_FILE) as labels:
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start : start + cfg.batch_size]
                t0 = time.time()
                new, generated = label_batch(cfg, batches, batch, backend, tokenizer, equivalent)
                votes.commit(new, batch=batches, indices=[p.index for p in batch],
                             seconds=round(time.time() - t0, 3), generated_tokens=generated)  # fmt: skip
                batches += 1
                labels.write_batch(_labels_of(new, cfg.vote))
                records += [_compact(r) for r in new]
                state["generated_tokens"] += generated
                state["session_seconds"] = round(time.time() - started, 1)
                state["equivalence"] = {"checked": equivalent.num_checked, "failed": equivalent.num_failed}
                if start + cfg.batch_size >= len(todo):
                    state["status"] = "done"
                # stats are recomputed from every record: at most every 30 s (and at the end) on big runs
                if state["status"] == "done" or not stats or time.time() - last_stats >= 30:
                    stats, last_stats = _write_stats(out, cfg, records, state), time.time()
                if progress is not None:
                    progress.set_postfix(coverage=stats["audit"]["coverage"], refresh=False)
                    progress.update(len(batch))
    finally:
        if progress is not None:
            progress.close()
        backend.close()
    audit = stats["audit"]
    log.info("%s: %d of %d problems labelled (coverage %s, label accuracy %s)", out, audit["num_kept"],
             audit["num_groups"], audit["coverage"], audit["label_accuracy"])  # fmt: skip
    return stats


if __name__ == "__main__":
    main()
