"""Noisy-Student training mix (scripts/noisy_student.sh): pseudo-labelled rows of a labelling stage plus
gold-labelled problems, sampled and shuffled with a seed, into one training file.

    python -m self_revision_training.training_mix --labels LABELS.jsonl --out MIX.jsonl \
        [--labelled GOLD.jsonl] [--num-pseudo N] [--num-labelled M] [--seed S]
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from self_revision_training.shared.config import DatasetConfig
from self_revision_training.shared.problems import load_problems
from self_revision_training.shared.storage import atomic_write_text, read_jsonl


def build_training_mix(
    labels_path: str | Path,
    out_path: str | Path,
    labelled: DatasetConfig | None = None,
    num_pseudo: int | None = None,
    num_labelled: int | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Write one training file: `num_pseudo` rows of labels.jsonl plus `num_labelled` gold rows, shuffled.

    Gold rows carry `label_source: gold` (the `majority_vote` reward then compares with them as fixed
    labels; `ground_truth` reads `answer` either way). None = all rows; a seeded sample otherwise.
    Returns: {"pseudo": rows, "labelled": rows}.
    """
    rng = random.Random(seed)
    pseudo = read_jsonl(labels_path)
    if num_pseudo is not None and num_pseudo < len(pseudo):
        pseudo = rng.sample(pseudo, num_pseudo)
    gold: list[dict] = []
    if labelled is not None and labelled.path:
        problems, _ = load_problems(labelled)
        gold = [{"problem": p.problem, "answer": p.answer, "label_source": "gold", "original_index": p.index}
                for p in problems]  # fmt: skip
        if num_labelled is not None and num_labelled < len(gold):
            gold = rng.sample(gold, num_labelled)
    rows = pseudo + gold
    rng.shuffle(rows)
    atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"pseudo": len(pseudo), "labelled": len(gold)}


def main(argv: list[str] | None = None) -> dict[str, int]:
    """CLI of `build_training_mix` (scripts/noisy_student.sh); empty counts mean all rows."""
    import argparse

    parser = argparse.ArgumentParser(description=build_training_mix.__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="labels.jsonl of the labelling stage")
    parser.add_argument("--out", required=True, help="the training file to write")
    parser.add_argument("--labelled", default="", help="gold-labelled dataset to mix in; empty = none")
    parser.add_argument("--num-pseudo", default="", help="pseudo-labelled rows; empty = all")
    parser.add_argument("--num-labelled", default="", help="gold rows; empty = all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = build_training_mix(
        args.labels,
        args.out,
        DatasetConfig(path=args.labelled) if args.labelled else None,
        int(args.num_pseudo) if args.num_pseudo else None,
        int(args.num_labelled) if args.num_labelled else None,
        args.seed,
    )
    print(f"mix: {counts['pseudo']} pseudo-labelled + {counts['labelled']} gold rows -> {args.out}")
    return counts


if __name__ == "__main__":
    main()
