"""Phase 1b input: turn verified self-revision tuples into the two SFT stages' prompt/completion JSONL.

Cleaning (trim degenerate repeating tails of y_init and y_revised; strip sycophantic openings of
y_revised), exact de-duplication on (x, y_init, y_revised), then the reference's split (§3):
Stage 2 = up to `stage2_size` tuples, correct-init first; Stage 1 = the remaining incorrect-init tuples.
Shuffles are seeded. The input is a collection directory (every shard's attempts.jsonl, committed
batches only), or a JSON/JSONL file of revision records (the reference's d_revision.json or
*_all_responses.jsonl work too).

    python -m self_revision_training.prepare_data input=outputs/run/collect \\
        output_dir=outputs/run/train_data prefix=srt stage2_size=1000 seed=0 [--no-clean]

Writes <prefix>_stage1.jsonl, <prefix>_stage2.jsonl, <prefix>_stats.json and the collection's
sdzero_prompt.json (read back by the SFT so it builds the same prompts). Stage records carry the sampled
token ids of y_init and y_revised (`y_init_ids`, `y_revised_ids`; null when cleaning changed the text or
the input has none; `stats.token_ids` counts them). The same tuple twice in one shard's attempts file
("duplicate tuples within one shard": two collectors wrote there at once) or in two shards is an error.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from self_revision_training.revision_data import load_verified
from self_revision_training.shared.config import PromptConfig, parse_cli, to_dict
from self_revision_training.shared.prompts import PROMPT_SPEC_FILE, PromptSpecError, load_prompt_spec
from self_revision_training.shared.storage import DataFileError, atomic_write_json, atomic_write_text
from self_revision_training.stage_split import build_stage_records


@dataclass
class PrepareConfig:
    input: str = ""  # collection dir (all shards) or a JSON/JSONL file of revision records
    output_dir: str = ""  # where the stage files go (required)
    prefix: str = "srt"  # file prefix: <prefix>_stage1.jsonl, <prefix>_stage2.jsonl
    stage2_size: int = 1000  # Stage-2 quota (correct-init tuples first)
    seed: int = 0  # shuffle seed
    clean: bool = True  # trim repeating tails and sycophantic openings (--no-clean = false)

    def __post_init__(self) -> None:
        if not self.input or not self.output_dir:
            raise ValueError("input and output_dir are required")
        if self.stage2_size < 1:
            raise ValueError(f"stage2_size must be >= 1, got {self.stage2_size}")
        if not self.prefix or "/" in self.prefix:
            raise ValueError(f"prefix must be a plain file-name prefix, got {self.prefix!r}")


def find_prompt_spec(source: Path) -> Path | None:
    """The collection's sdzero_prompt.json; every shard must agree on it."""
    candidates = (
        sorted(source.rglob(PROMPT_SPEC_FILE)) if source.is_dir() else [source.parent / PROMPT_SPEC_FILE]
    )
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        return None
    specs = {c: json.loads(c.read_text(encoding="utf-8")) for c in candidates}
    first = candidates[0]
    for path, spec in specs.items():
        if spec != specs[first]:
            raise PromptSpecError(
                f"{path} differs from {first}: shards were collected with different prompts"
            )
    return first


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["clean=false" if a == "--no-clean" else a for a in argv]
    cfg = parse_cli(PrepareConfig, argv, description=__doc__.splitlines()[0])
    source, out = Path(cfg.input), Path(cfg.output_dir)
    spec_path = find_prompt_spec(source)
    prompt = load_prompt_spec(spec_path.parent)[0] if spec_path else PromptConfig()
    try:
        records, files = load_verified(source)
    except DataFileError as exc:
        raise SystemExit(f"prepare_data: {exc}") from exc
    try:
        split = build_stage_records(
            records, stage2_size=cfg.stage2_size, seed=cfg.seed, delimiter=prompt.delimiter, clean=cfg.clean
        )
    except ValueError as exc:
        raise SystemExit(f"prepare_data: {exc}") from exc
    for rec in records:  # P_r must be one of the two phrases the SFT and Phase 2 will use
        if rec["p_r"] not in (prompt.correct_phrase, prompt.incorrect_phrase):
            raise SystemExit(
                f"prepare_data: record {rec.get('original_index')} has P_r {rec['p_r']!r}, which is neither "
                f"phrase of the prompt spec ({spec_path or 'defaults'})"
            )
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / f"{cfg.prefix}_stage1.jsonl", split.stage1)
    _write_jsonl(out / f"{cfg.prefix}_stage2.jsonl", split.stage2)
    if spec_path:
        atomic_write_text(out / PROMPT_SPEC_FILE, spec_path.read_text(encoding="utf-8"))
    stats = {**split.stats, "inputs": files, "config": to_dict(cfg), "prompt_spec": str(spec_path)}
    atomic_write_json(out / f"{cfg.prefix}_stats.json", stats)
    if split.stats["stage1"] < split.stats["stage2"]:
        print(
            f"prepare_data: warning: Stage 1 ({split.stats['stage1']}) is smaller than Stage 2",
            file=sys.stderr,
        )
    print("prepare_data:", json.dumps(split.stats))
    return stats


if __name__ == "__main__":
    main()
