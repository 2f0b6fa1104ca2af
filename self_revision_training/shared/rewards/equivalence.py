"""Answer-vs-answer equivalence with math-verify, batched, in killable workers with a hard deadline.

The majority vote (`answers.cluster_answer_groups`), the `majority_vote` reward source, the labelling
stage and maj@k compare extracted answers with each other ("0.5", "\\frac{1}{2}" and "1/2" are one
answer). This is the real `answers.Equivalence`: each (reference, candidate) pair is checked exactly as
the ground-truth grader checks a response's answer against its reference (`math_verify.verify_answer`:
the reference is normalised like a ground truth, the candidate parsed as a boxed answer), in a
`WorkerPool` whose per-item deadline is `grading.timeout_s`. A pair that times out or errors is "not
equivalent" (its answers stay in separate clusters) and is counted. Equal texts (whitespace aside) are
equivalent without a call; results are cached per instance, and the pool starts on the first real call.

    with AnswerEquivalence(GradingConfig(num_workers=2)) as equivalent:
        equivalent([("0.5", "\\\\frac{1}{2}"), ("2", "3")])        # -> [True, False]
"""

from __future__ import annotations

from collections.abc import Sequence

from self_revision_training.shared.answers import vote_key
from self_revision_training.shared.config import GradingConfig
from self_revision_training.shared.rewards.math_verify import verify_answer
from self_revision_training.shared.worker_pool import WorkerPool

_TARGET = "self_revision_training.shared.rewards.equivalence:equivalent_in_worker"
_CACHE_LIMIT = 200_000  # cached pairs per instance (a few tens of MB at most); cleared when full


def equivalent_in_worker(reference: str, candidate: str, inner_timeout_s: int) -> bool:
    """WorkerPool target: math-verify equivalence of two extracted answers (on the worker's main thread)."""
    return verify_answer(candidate, reference, inner_timeout_s)[0]


class AnswerEquivalence:
    """Batched `answers.Equivalence` backed by math-verify worker processes."""

    def __init__(self, cfg: GradingConfig | None = None):
        self.cfg = cfg or GradingConfig()
        self._pool: WorkerPool | None = None
        self._cache: dict[tuple[str, str], bool] = {}
        # as in MathGrader: math-verify's own timeout fires first on most slow inputs (no respawn needed);
        # the pool's deadline is the hard guarantee
        self._inner_timeout_s = max(1, int(self.cfg.timeout_s // 3))
        self.num_checked = 0  # pairs sent to math-verify
        self.num_failed = 0  # pairs that timed out, raised or crashed a worker (counted as different)

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        known: dict[tuple[str, str], bool] = {}
        todo: list[tuple[str, str]] = []
        for reference, candidate in pairs:
            if not isinstance(reference, str) or not isinstance(candidate, str):
                raise TypeError(
                    f"answers must be str, got {type(reference).__name__}, {type(candidate).__name__}"
                )
            pair = (reference, candidate)
            if pair in known:
                continue
            if vote_key(reference) == vote_key(candidate):
                known[pair] = True
            elif pair in self._cache:
                known[pair] = self._cache[pair]
            else:
                known[pair] = False  # placeholder until checked below
                todo.append(pair)
        if todo:
            if self._pool is None:
                self._pool = WorkerPool(
                    _TARGET,
                    num_workers=self.cfg.num_workers,
                    timeout_s=self.cfg.timeout_s,
                    memory_limit_mb=self.cfg.memory_limit_mb,
                )
            outcomes = self._pool.map([(r, c, self._inner_timeout_s) for r, c in todo])
            self.num_checked += len(todo)
            if len(self._cache) + len(todo) > _CACHE_LIMIT:
                self._cache.clear()
            for pair, outcome in zip(todo, outcomes, strict=True):
                ok = outcome.status == "ok"
                self.num_failed += not ok
                known[pair] = self._cache[pair] = bool(outcome.value) if ok else False
        return [known[pair] for pair in pairs]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> AnswerEquivalence:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
