"""Math verifier: the binary reward r of SD-Zero (paper Sec. 3; `grade_math(response, ground_truth)`).

1. Extract the answer: the content of the LAST `\\boxed{...}` / `\\fbox{...}` with brace matching (nested
   braces, escaped braces, the `\\boxed 5` form). With `extraction="boxed_or_last_number"` a response
   with no boxed answer falls back to its last number (an explicit, non-default setting; the original
   Phase-1 grader always did this, which marks unboxed or truncated answers correct).
2. Normalise the ground truth: GSM8K worked solutions keep only what follows the last `####`.
3. Compare with math-verify (symbolic and numeric equivalence: fractions, decimals, LaTeX vs plain,
   intervals, sets, units, percentages written with `\\%`).

Hard timeouts: math-verify's own timeout uses `signal.alarm`, which fails off the main thread. Every
public grading call therefore runs in a `WorkerPool` of processes with a per-item deadline; a
pathological input returns `correct=False, reason="timeout"` within the deadline from any thread.

    grade_math(r"... so the answer is \\boxed{\\frac{1}{2}}", "0.5")          # -> True
    with MathGrader(GradingConfig(num_workers=2)) as grader:
        results = grader.grade_batch(responses, ground_truths)             # -> list[GradeResult]
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from self_revision_training.shared.answers import extract_answer, normalize_ground_truth, strip_thousands
from self_revision_training.shared.config import GradingConfig
from self_revision_training.shared.worker_pool import WorkerPool

REASONS = (
    "correct",
    "wrong",
    "no_answer",
    "unparsable_answer",
    "unparsable_ground_truth",
    "timeout",
    "error",
)


@dataclass(frozen=True)
class GradeResult:
    correct: bool
    extracted: str | None  # the answer taken from the response (None when there is none)
    reason: str  # one of REASONS


def verify_answer(answer: str, ground_truth: str, inner_timeout_s: int | None = None) -> tuple[bool, str]:
    """Compare an extracted answer with the ground truth using math-verify -> (correct, reason).

    Runs in the calling thread. `inner_timeout_s` enables math-verify's signal-based timeouts, which only
    work on a process's main thread: use it inside `WorkerPool` workers, pass None elsewhere.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_text = normalize_ground_truth(ground_truth)
    gold = parse(f"${gold_text}$", extraction_config=configs, parsing_timeout=inner_timeout_s)
    if not gold:
        gold = parse(gold_text, extraction_config=configs, parsing_timeout=inner_timeout_s)
    if not gold:
        return False, "unparsable_ground_truth"
    pred = parse(
        f"$\\boxed{{{strip_thousands(answer)}}}$", extraction_config=configs, parsing_timeout=inner_timeout_s
    )
    if not pred:
        return False, "unparsable_answer"
    ok = verify(gold, pred, timeout_seconds=inner_timeout_s)
    return bool(ok), "correct" if ok else "wrong"


def verify_in_worker(response: str, ground_truth: str, extraction: str, inner_timeout_s: int) -> GradeResult:
    """WorkerPool target: extraction + verification in a worker process (on its main thread)."""
    answer = extract_answer(response, extraction)
    if answer is None:
        return GradeResult(False, None, "no_answer")
    correct, reason = verify_answer(answer, ground_truth, inner_timeout_s)
    return GradeResult(correct, answer, reason)


class MathGrader:
    """Grades responses in parallel worker processes with a hard per-item deadline."""

    def __init__(self, cfg: GradingConfig | None = None):
        self.cfg = cfg or GradingConfig()
        self._pool = WorkerPool(
            "self_revision_training.shared.rewards.math_verify:verify_in_worker",
            num_workers=self.cfg.num_workers,
            timeout_s=self.cfg.timeout_s,
            memory_limit_mb=self.cfg.memory_limit_mb,
        )
        # math-verify's in-worker timeout fires first on most slow inputs, which spares a respawn;
        # the pool's deadline is the hard guarantee.
        self._inner_timeout_s = max(1, int(self.cfg.timeout_s // 3))

    def grade_batch(self, responses: list[str], ground_truths: list[str]) -> list[GradeResult]:
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        for i, (resp, gt) in enumerate(zip(responses, ground_truths, strict=True)):
            if not isinstance(resp, str) or not isinstance(gt, str):
                raise TypeError(
                    f"item {i}: response and ground truth must be str, got "
                    f"{type(resp).__name__}, {type(gt).__name__}"
                )
        items = [
            (r, g, self.cfg.extraction, self._inner_timeout_s)
            for r, g in zip(responses, ground_truths, strict=True)
        ]
        results = []
        for item, outcome in zip(items, self._pool.map(items), strict=True):
            if outcome.status == "ok":
                results.append(outcome.value)
            else:
                reason = "timeout" if outcome.status == "timeout" else "error"
                results.append(GradeResult(False, extract_answer(item[0], item[2]), reason))
        return results

    def grade(self, response: str, ground_truth: str) -> GradeResult:
        return self.grade_batch([response], [ground_truth])[0]

    @property
    def num_respawns(self) -> int:
        return self._pool.num_respawns

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default_grader: MathGrader | None = None
_default_lock = threading.Lock()


def _get_default_grader() -> MathGrader:
    global _default_grader
    with _default_lock:
        if _default_grader is None:
            _default_grader = MathGrader(GradingConfig(num_workers=1))
        return _default_grader


def grade_math_detailed(response: str, ground_truth: str) -> GradeResult:
    """Grade one response with the default settings (strict boxed extraction, 5 s hard deadline)."""
    return _get_default_grader().grade(response, ground_truth)


def grade_math(response: str, ground_truth: str) -> bool:
    """True iff the last boxed answer of `response` equals `ground_truth` (math-verify, 5 s deadline)."""
    return grade_math_detailed(response, ground_truth).correct
