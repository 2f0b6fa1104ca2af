"""Phase-2 placement (`self_distillation.placement`): the pure layout, then real Ray actors on LOGICAL GPUs.

`ray.init(num_gpus=N)` on a CPU machine creates N logical GPUs; `ray.get_gpu_ids()` inside an actor returns
the ids Ray assigned, so these tests check Ray's actual assignment without a GPU.

The bug this replaces (audit_turn2.md finding 1), reproduced with the old fractional requests on 4 logical
GPUs, in creation order rollout 0.25, teacher 0.25, then learners 0.5 each:

    ray.init(num_gpus=4); [ray.remote(num_gpus=g)(Probe).remote() for g in (0.25, 0.25, 0.5, 0.5, 0.5, 0.5)]
    -> rollout [0], teacher [0], learner[0] [0], learner[1] [1], learner[2] [1], learner[3] [2]

Ray's best-fit gives a 0.5 request to the GPU with the least room that still fits, so learners 1 and 2
share GPU 1 (NCCL: "Duplicate GPU detected") and GPU 3 idles.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest -q -s -p no:cacheprovider -m ray tests/integration/test_placement.py
(-s shows the rank -> GPU tables).
"""

from __future__ import annotations

import os

import pytest

from self_distillation.config import RayConfig
from self_distillation.placement import build_placement, plan_bundles, resolve_rollout_tp_size

pytestmark = pytest.mark.ray


# ----------------------------------------------------------------------------------------------
# pure layout (no Ray)


def test_plan_bundles_colocated_one_learner_per_bundle_engines_spread():
    a = plan_bundles(4, 4, num_rollout_engines=2, rollout_tp_size=2)
    assert [a.slot("learner", r).bundles for r in range(4)] == [(0,), (1,), (2,), (3,)]
    assert a.slot("rollout", 0).bundles == (0, 1) and a.slot("rollout", 1).bundles == (2, 3)
    assert a.slot("teacher").bundles == (0,) and a.slot("reward").bundles == ()
    assert a.bundle_load() == [1.0, 0.75, 0.75, 0.75]
    assert plan_bundles(4, 4, teacher_bundle=3).bundle_load() == [0.75, 0.5, 0.5, 0.75]


def test_plan_bundles_split_gives_engines_and_teacher_own_bundles():
    a = plan_bundles(5, 2, num_rollout_engines=1, rollout_tp_size=2, placement="split")
    assert [a.slot("learner", r).bundles for r in range(2)] == [(0,), (1,)]
    assert a.slot("rollout", 0).bundles == (2, 3) and a.slot("teacher").bundles == (4,)
    assert a.bundle_load() == [1.0] * 5
    shared = plan_bundles(3, 2, placement="split", teacher_bundle=2, rollout_gpus=0.5, teacher_gpus=0.5)
    assert shared.slot("rollout", 0).bundles == shared.slot("teacher").bundles == (2,)


def test_plan_bundles_every_layout_keeps_learners_on_distinct_bundles_and_fits():
    for gpus in range(1, 9):
        for learners in range(1, gpus + 1):
            for engines, tp in ((1, 1), (2, 1), (1, 2), (2, 2), (4, 2)):
                for placement in ("colocated", "split"):
                    try:
                        a = plan_bundles(gpus, learners, engines, tp, placement)
                    except ValueError:
                        continue
                    ranks = [a.slot("learner", r).bundles for r in range(learners)]
                    assert ranks == [(r,) for r in range(learners)]
                    assert all(load <= 1.0 + 1e-9 for load in a.bundle_load())
                    assert all(len(a.slot("rollout", e).bundles) == tp for e in range(engines))


def test_plan_bundles_cpu_run_has_no_bundles():
    a = plan_bundles(0, 2, num_rollout_engines=2)
    assert a.num_bundles == 0 and all(s.bundles == () and s.gpu_share == 0 for s in a.slots)
    assert a.count_by_role() == {"learner": 2, "rollout": 2, "teacher": 1, "reward": 1}


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((4, 2, 1, 1, "split"), {"teacher_bundle": None}, None),  # fits exactly: 2 + 1 + 1
        ((4, 3, 1, 1, "split"), {}, "ray.num_rollout_engines .* ray.num_gpus is 4"),
        ((4, 4, 3, 2, "colocated"), {}, r"ray.rollout_tp_size \(2\) = 6 must be <= ray.num_gpus \(4\)"),
        ((2, 3, 1, 1, "colocated"), {}, r"ray.num_learners \(3\) > ray.num_gpus \(2\)"),
        ((4, 2, 1, 1, "split"), {"teacher_bundle": 0}, "bundle 0 is over-full"),
        ((4, 2, 1, 1, "colocated"), {"teacher_bundle": 4}, "ray.teacher_bundle"),
    ],
)
def test_plan_bundles_errors_name_the_knobs(args, kwargs, match):
    if match is None:
        plan_bundles(*args, **kwargs)
        return
    with pytest.raises(ValueError, match=match):
        plan_bundles(*args, **kwargs)


def test_rollout_tp_size_follows_backend_unless_set_and_config_validates():
    assert resolve_rollout_tp_size(0, 4) == 4 and resolve_rollout_tp_size(2, 1) == 2
    with pytest.raises(ValueError, match="backend.tensor_parallel_size"):
        resolve_rollout_tp_size(2, 4)
    bad = [
        ({"num_rollout_engines": 0}, "ray.num_rollout_engines"),
        ({"rollout_gpus": 2.0}, "ray.rollout_gpus"),
        ({"placement_strategy": "RANDOM"}, "ray.placement_strategy"),
        ({"num_gpus": 2, "num_learners": 4}, "ray.num_learners"),
        ({"num_gpus": 4, "teacher_bundle": 4}, "ray.teacher_bundle"),
        ({"num_gpus": 4, "learner_cpus": 2, "bundle_cpus": 1}, "ray.bundle_cpus"),
    ]
    for kwargs, key in bad:
        with pytest.raises(ValueError, match=key):
            RayConfig(**kwargs)


# ----------------------------------------------------------------------------------------------
# Ray actors on logical GPUs


def probe_classes() -> tuple[type, type]:
    """(Probe, EngineProbe), defined locally so that Ray pickles them by value: the workers cannot import
    this test module (tests/integration is not a package)."""

    class Probe:
        """Stands in for Learner / RolloutWorker (TP=1) / Teacher / RewardWorker: reports where Ray put it."""

        def where(self) -> list[tuple[str, int | None]]:
            import ray

            node = ray.get_runtime_context().get_node_id()
            gpus = [int(g) for g in ray.get_gpu_ids()]
            return [(node, gpus[0] if gpus else None)]

    class EngineProbe:
        """Stands in for a TP>1 vLLM engine: starts its workers as vLLM 0.32.0's Ray executor does
        (`_init_workers_ray`: current placement group, VLLM_RAY_BUNDLE_INDICES, VLLM_RAY_PER_WORKER_GPUS)."""

        def where(self) -> list[tuple[str, int | None]]:
            import ray
            from ray.util.placement_group import get_current_placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            assert ray.get_gpu_ids() == []  # the engine actor itself holds no GPU
            group = get_current_placement_group()
            share = float(os.environ["VLLM_RAY_PER_WORKER_GPUS"])
            self.workers = [
                ray.remote(Probe)
                .options(
                    num_gpus=share,
                    num_cpus=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=group,
                        placement_group_bundle_index=int(b),
                        placement_group_capture_child_tasks=True,
                    ),
                )
                .remote()
                for b in os.environ["VLLM_RAY_BUNDLE_INDICES"].split(",")
            ]
            return [w for ws in ray.get([w.where.remote() for w in self.workers]) for w in ws]

    return Probe, EngineProbe


def launch(plan) -> dict[tuple[str, int], list[tuple[str, int | None]]]:
    """Create every actor of `plan` through `plan.options`; (role, index) -> [(node, gpu id)] per worker."""
    import ray

    Probe, EngineProbe = probe_classes()
    counts = plan.assignment.count_by_role()
    actors = {}
    for role, count in counts.items():
        for i in range(count):
            cls = (
                EngineProbe
                if role == "rollout" and plan.rollout_tp_size > 1 and plan.placement_group
                else Probe
            )
            actors[(role, i)] = ray.remote(**plan.options(role, i))(cls).remote()
    try:
        return dict(
            zip(actors, ray.get([a.where.remote() for a in actors.values()], timeout=120), strict=True)
        )
    finally:
        for actor in actors.values():
            ray.kill(actor)


def rank_table(plan, where) -> str:
    short = {n: f"node{i}" for i, n in enumerate(sorted({n for ws in where.values() for n, _ in ws}))}
    lines = [f"{'actor':<12} {'bundle':>6} {'node':<6} {'gpu':>4} {'share':>6}"]
    for s in plan.assignment.slots:
        for k, (node, gpu) in enumerate(where[(s.role, s.index)]):
            bundle = s.bundles[k] if s.bundles else "-"
            name = f"{s.role}[{s.index}]"
            lines.append(
                f"{name:<12} {bundle:>6} {short[node]:<6} {gpu if gpu is not None else '-':>4} {s.gpu_share:>6g}"
            )
    return "\n".join(lines)


def learner_devices(plan, where) -> list[tuple[str, int]]:
    return [where[("learner", r)][0] for r in range(plan.assignment.count_by_role()["learner"])]


@pytest.fixture(scope="module")
def ray_8_gpus():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, num_gpus=8, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def place(**ray_overrides):
    return build_placement(RayConfig(**ray_overrides))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_colocated_learners_get_distinct_gpus(ray_8_gpus, n):
    plan = place(num_gpus=n, num_learners=n)
    try:
        where = launch(plan)
    finally:
        plan.remove()
    print(f"\ncolocated, ray.num_gpus={n}, ray.num_learners={n}:\n{rank_table(plan, where)}")
    devices = learner_devices(plan, where)
    assert len(set(devices)) == n and all(gpu is not None for _, gpu in devices)
    # rollout engine 0 and the teacher sit in bundle 0, i.e. on learner 0's GPU
    assert where[("rollout", 0)] == where[("teacher", 0)] == [devices[0]]
    assert where[("reward", 0)][0][1] is None


def test_two_rollout_engines_colocated_tp1_and_tp2(ray_8_gpus):
    plan = place(num_gpus=4, num_learners=4, num_rollout_engines=2, teacher_bundle=3)
    try:
        where = launch(plan)
    finally:
        plan.remove()
    devices = learner_devices(plan, where)
    assert where[("rollout", 0)] == [devices[0]] and where[("rollout", 1)] == [devices[1]]
    assert where[("teacher", 0)] == [devices[3]]

    plan = place(num_gpus=4, num_learners=4, num_rollout_engines=2, rollout_tp_size=2)
    assert plan.rollout_executor_backend == "ray"
    assert plan.options("rollout", 1)["runtime_env"]["env_vars"]["VLLM_RAY_BUNDLE_INDICES"] == "2,3"
    try:
        where = launch(plan)
    finally:
        plan.remove()
    print(f"\ncolocated, 2 engines x TP=2 on 4 GPUs:\n{rank_table(plan, where)}")
    devices = learner_devices(plan, where)
    assert where[("rollout", 0)] == devices[0:2] and where[("rollout", 1)] == devices[2:4]


def test_split_gives_rollout_and_teacher_their_own_gpus(ray_8_gpus):
    plan = place(num_gpus=4, num_learners=2, placement="split")
    try:
        where = launch(plan)
    finally:
        plan.remove()
    devices = learner_devices(plan, where) + where[("rollout", 0)] + where[("teacher", 0)]
    assert len(set(devices)) == 4
    assert [r["gpu_share"] for r in plan.table() if r["role"] != "reward"] == [1.0] * 4
    with pytest.raises(ValueError, match="ray.num_gpus is 4"):
        place(num_gpus=4, num_learners=3, placement="split")


def test_cpu_run_and_too_few_cluster_gpus(ray_8_gpus):
    plan = place(num_gpus=0, num_learners=2, learner_cpus=0.5)
    assert plan.placement_group is None
    assert plan.options("learner", 1) == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert plan.options("teacher") == {"num_cpus": 0.0, "num_gpus": 0.0}
    assert plan.options("reward") == {"num_cpus": 0.0}
    where = launch(plan)
    assert all(gpu is None for ws in where.values() for _, gpu in ws)
    with pytest.raises(ValueError, match="ray.num_gpus=16 but the Ray cluster has 8 GPUs"):
        place(num_gpus=16, num_learners=16)


def test_two_nodes_learners_on_distinct_node_gpu_pairs(ray_8_gpus):
    from ray.cluster_utils import Cluster

    ray_8_gpus.shutdown()  # the module's single-node session; this test is last in the file
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1, num_gpus=2)
        ray_8_gpus.init(address=cluster.address, log_to_driver=False)
        for strategy in ("PACK", "SPREAD"):
            plan = place(num_gpus=4, num_learners=4, num_rollout_engines=2, placement_strategy=strategy)
            try:
                where = launch(plan)
            finally:
                plan.remove()
            print(f"\ncolocated, 2 nodes x 2 GPUs, {strategy}:\n{rank_table(plan, where)}")
            devices = learner_devices(plan, where)
            assert len(set(devices)) == 4 and len({node for node, _ in devices}) == 2
            assert where[("rollout", 0)] == [devices[0]] and where[("rollout", 1)] == [devices[1]]
            assert {r["node"] for r in plan.table() if r["role"] == "learner"} == {n[:8] for n, _ in devices}
    finally:
        ray_8_gpus.shutdown()
        cluster.shutdown()
