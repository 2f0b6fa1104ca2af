"""Splitting a step's prompts between data-parallel rollout engines (`actors.split_by_cost`,
`RolloutGroup.submit/collect`) and the expected-length tracker the driver feeds it (`step.ResponseLengths`)."""

from __future__ import annotations

from self_distillation.actors import ActorHandle, RolloutGroup, split_by_cost
from self_distillation.step import ResponseLengths, RolloutBatch
from self_revision_training.shared.config import SamplingConfig
from self_revision_training.shared.problems import Problem


def test_longest_first_to_the_least_loaded_engine():
    # by cost: 5 (i0) -> e0, 4 (i2) -> e1, 3 (i3) -> e1 (7), 2 (i4) -> e0 (7), 2 (i5) -> e0 (tie 7/7: the
    # lower engine, 9), 1 (i1) -> e1 (8)
    assert split_by_cost([5, 1, 4, 3, 2, 2], 2) == [[0, 4, 5], [1, 2, 3]]
    assert split_by_cost([5, 1, 4], 1) == [[0, 1, 2]]  # one engine: input order, nothing moves
    assert split_by_cost([1.0, 1.0], 3) == [[0], [1], []]
    parts = split_by_cost([float(x % 7) for x in range(50)], 4)
    assert sorted(i for p in parts for i in p) == list(range(50))
    loads = [sum(float(i % 7) for i in p) for p in parts]
    assert max(loads) - min(loads) <= 6  # LPT: within the largest single cost


class EchoEngine:
    """Rows that name their prompt, so a wrong reassembly shows."""

    calls: list[list[list[int]]] = []

    def __init__(self, name: str):
        self.name = name

    def generate(self, prompts, sampling, limits, call_key):
        EchoEngine.calls.append(prompts)
        return [[(list(p), f"{self.name}:{p[0]}", "stop", None)] for p in prompts], 3


def test_rows_come_back_in_prompt_order_from_the_engine_each_was_sent_to():
    EchoEngine.calls = []
    group = RolloutGroup([ActorHandle(f"e{e}", EchoEngine, (f"e{e}",), remote=False) for e in range(2)])
    prompts = [[10] * 5, [11], [12] * 4, [13] * 3]
    rows, version = group.generate(prompts, SamplingConfig(), [0, 0, 0, 0], 7, "at test")
    assert version == 3
    # costs 5, 1, 4, 3: 5 -> e0, 4 -> e1, 3 -> e1 (4 < 5), 1 -> e0 (5 < 7)
    assert [row[0][1] for row in rows] == ["e0:10", "e0:11", "e1:12", "e1:13"]
    assert EchoEngine.calls == [[prompts[0], prompts[1]], [prompts[2], prompts[3]]]
    # the expected response length counts: a long expected answer moves prompt 1 first
    EchoEngine.calls = []
    rows, _ = group.generate(prompts, SamplingConfig(), [0, 0, 0, 0], 7, "at test", expected=[0, 50, 0, 0])
    assert [row[0][1] for row in rows] == ["e1:10", "e0:11", "e1:12", "e1:13"]


def test_expected_lengths_default_to_the_seen_mean_and_survive_a_state_round_trip():
    problems = [Problem(index=i, problem=f"p{i}", answer="1") for i in range(3)]
    lengths = ResponseLengths()
    assert lengths.expected(problems, [16, 16, 8]) == [16.0, 16.0, 8.0]  # nothing seen: the limits
    samples = [[([1] * 4, "", "stop", None), ([1] * 6, "", "stop", None)], [([1] * 2, "", "stop", None)]]
    lengths.update(RolloutBatch(problems[:2], [[], []], samples, [[], []], 0, 0))
    assert lengths.expected(problems, [16, 16, 8]) == [5.0, 2.0, 3.5]
    restored = ResponseLengths(lengths.state_dict())
    assert restored.expected(problems, [16, 16, 8]) == [5.0, 2.0, 3.5]
