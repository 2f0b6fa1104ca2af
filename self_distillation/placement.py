"""Phase-2 GPU placement: one Ray placement-group bundle per GPU, learner rank r in bundle r (adapter layer).

Why a placement group: asking Ray for bare fractional GPUs (rollout 0.25, teacher 0.25, learner 0.5 each, the
old `build_workers`) lets Ray's best-fit allocator (`resource_instance_set.cc`, `TryAllocate`) put a 0.5
learner on the GPU already half-used by the previous learner. With 4 GPUs, created in that order, the ranks
landed on GPUs [0, 1, 1, 2] with GPU 3 idle, and NCCL refuses two ranks of one communicator on one device
(audit_turn2.md finding 1). Here every GPU is one bundle `{"GPU": 1, "CPU": bundle_cpus}` and every actor
names its bundle, so rank r owns bundle r's GPU whatever the creation order.

Layout (`plan_bundles`, pure; G = ray.num_gpus bundles, L learners, E engines of TP GPUs each):
- colocated: learner r -> bundle r (0.5 GPU); rollout engine e, TP worker k -> bundle e*TP + k (0.25);
  teacher -> bundle `ray.teacher_bundle` (default 0; 0.25). Needs L <= G and E*TP <= G.
- split: learner r -> bundle r (1.0); engine e, worker k -> bundle L + e*TP + k (`ray.rollout_gpus`);
  teacher -> bundle L + E*TP (`ray.teacher_gpus`), or `ray.teacher_bundle` to share one. Needs L + E*TP + 1 <= G.
- CPU runs (`ray.num_gpus=0`) and `ray.enabled=false`: no placement group; every actor gets num_gpus=0.
Bundles go on nodes by `ray.placement_strategy` (PACK default); multi-node runs join an existing cluster
(`ray.address` / RAY_ADDRESS) and `ray.num_gpus` counts the GPUs of all nodes.

Driver usage (after `ray.init(address=cfg.ray.address)`; every actor is created from `plan.options`):

    plan = build_placement(cfg.ray, cfg.backend.tensor_parallel_size)
    backend = dataclasses.replace(cfg.backend, tensor_parallel_size=plan.rollout_tp_size)
    engines = [ray.remote(**plan.options("rollout", e))(RolloutWorker).remote(cfg.student, backend)
               for e in range(plan.num_rollout_engines)]
    teacher = ray.remote(**plan.options("teacher", 0, env_vars=threads))(Teacher).remote(...)
    reward = ray.remote(**plan.options("reward", 0))(RewardWorker).remote(...)
    learners = [ray.remote(**plan.options("learner", r, env_vars=threads))(Learner).remote(cfg, r, n) ...]
    print(plan.format_table())
    ...; kill the actors; plan.remove()

Rollout engines with TP > 1 (vLLM 0.32.0, `vllm/v1/executor/ray_executor.py:_init_workers_ray`): the engine
actor itself takes no GPU; it is scheduled in its first bundle with `placement_group_capture_child_tasks`,
and vLLM's Ray executor, finding `ray.util.get_current_placement_group()`, starts one worker per entry of
VLLM_RAY_BUNDLE_INDICES, each taking VLLM_RAY_PER_WORKER_GPUS of that bundle's GPU. `options` sets both in
the actor's runtime_env. vLLM must then be given `distributed_executor_backend="ray"`
(`plan.rollout_executor_backend`): otherwise it counts the engine actor's own (zero) visible GPUs and fails.
With TP = 1 the engine runs in-process on the GPU share its actor holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from self_distillation.config import RayConfig

Role = Literal["learner", "rollout", "teacher", "reward"]
ROLES: tuple[Role, ...] = ("learner", "rollout", "teacher", "reward")
# colocated: GPU fractions inside one bundle (Ray bookkeeping only; memory is shared by sleep/offload)
COLOCATED_GPU_SHARES = {"learner": 0.5, "rollout": 0.25, "teacher": 0.25}
_EPS = 1e-9  # float slack when summing GPU shares of a bundle
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    """Where one actor goes: its GPU bundles (one per TP worker for a rollout engine) and the share of each."""

    role: Role
    index: int  # learner rank / rollout engine / 0 for teacher and verifier
    bundles: tuple[int, ...]  # GPU bundle indices; () = no GPU (CPU run, verifier)
    gpu_share: float  # GPU fraction taken in each bundle of `bundles` (0 = none)


@dataclass(frozen=True)
class Assignment:
    """The pure result of `plan_bundles`: `num_bundles` one-GPU bundles and every actor's slot."""

    num_bundles: int
    slots: tuple[Slot, ...]

    def slot(self, role: Role, index: int = 0) -> Slot:
        for s in self.slots:
            if s.role == role and s.index == index:
                return s
        raise KeyError(f"no {role}[{index}] in this placement (roles: {self.count_by_role()})")

    def count_by_role(self) -> dict[str, int]:
        return {role: sum(s.role == role for s in self.slots) for role in ROLES}

    def bundle_load(self) -> list[float]:
        """GPU share in use per bundle (<= 1 by construction)."""
        load = [0.0] * self.num_bundles
        for s in self.slots:
            for b in s.bundles:
                load[b] += s.gpu_share
        return load


def resolve_rollout_tp_size(ray_tp_size: int, backend_tp_size: int) -> int:
    """GPUs per rollout engine: `ray.rollout_tp_size`, or `backend.tensor_parallel_size` when that is 0.

    The engine must be built with the result (`replace(backend, tensor_parallel_size=plan.rollout_tp_size)`);
    two different values > 1 are an error rather than a silent choice.
    """
    if ray_tp_size == 0:
        return backend_tp_size
    if backend_tp_size not in (1, ray_tp_size):
        raise ValueError(
            f"ray.rollout_tp_size ({ray_tp_size}) and backend.tensor_parallel_size ({backend_tp_size}) disagree; "
            "set one of them (ray.rollout_tp_size=0 follows backend.tensor_parallel_size)"
        )
    return ray_tp_size


def plan_bundles(
    num_gpus: int,
    num_learners: int,
    num_rollout_engines: int = 1,
    rollout_tp_size: int = 1,
    placement: Literal["colocated", "split"] = "colocated",
    *,
    teacher_bundle: int | None = None,
    rollout_gpus: float = 1.0,
    teacher_gpus: float = 1.0,
) -> Assignment:
    """Assign learner ranks, rollout engines and the teacher to one-GPU bundles (see the module docstring).

    Args:
        num_gpus: GPUs of the run = bundles (0 = CPU run: no bundles, every share 0).
        num_learners, num_rollout_engines, rollout_tp_size: actor counts; an engine uses rollout_tp_size bundles.
        placement: "colocated" (engines and teacher inside learner bundles) or "split" (own bundles).
        teacher_bundle: the teacher's bundle; None = 0 (colocated) / the bundle after the engines (split).
        rollout_gpus, teacher_gpus: split only, share of its bundle each rollout worker / the teacher takes.
    Returns:
        Assignment; learner r is always alone (as a learner) in bundle r. Raises ValueError naming the
        ray.* keys when the layout does not fit.
    """
    n_learn, n_eng, tp = num_learners, num_rollout_engines, rollout_tp_size
    if n_learn < 1 or n_eng < 1 or tp < 1 or num_gpus < 0:
        raise ValueError(
            "ray.num_learners, ray.num_rollout_engines and ray.rollout_tp_size must be >= 1, ray.num_gpus >= 0"
        )
    if placement not in ("colocated", "split"):
        raise ValueError(f"ray.placement must be colocated or split, got {placement!r}")
    verifier = Slot("reward", 0, (), 0.0)
    if num_gpus == 0:
        slots = [Slot("learner", r, (), 0.0) for r in range(n_learn)]
        slots += [Slot("rollout", e, (), 0.0) for e in range(n_eng)]
        return Assignment(0, (*slots, Slot("teacher", 0, (), 0.0), verifier))
    if n_learn > num_gpus:
        raise ValueError(
            f"ray.num_learners ({n_learn}) > ray.num_gpus ({num_gpus}): each learner rank needs its own GPU"
        )
    if placement == "colocated":
        shares = COLOCATED_GPU_SHARES
        first_engine_bundle = 0
        if n_eng * tp > num_gpus:
            raise ValueError(
                f"colocated placement spreads the rollout engines over the GPUs: ray.num_rollout_engines ({n_eng}) "
                f"x ray.rollout_tp_size ({tp}) = {n_eng * tp} must be <= ray.num_gpus ({num_gpus})"
            )
        teacher_at = 0 if teacher_bundle is None else teacher_bundle
    else:
        shares = {"learner": 1.0, "rollout": rollout_gpus, "teacher": teacher_gpus}
        first_engine_bundle = n_learn
        need = n_learn + n_eng * tp + (teacher_bundle is None)
        if need > num_gpus:
            raise ValueError(
                f"split placement needs ray.num_learners ({n_learn}) + ray.num_rollout_engines ({n_eng}) x "
                f"ray.rollout_tp_size ({tp})"
                + (" + 1 teacher" if teacher_bundle is None else "")
                + f" = {need} "
                f"GPUs, but ray.num_gpus is {num_gpus}; lower these, set ray.teacher_bundle to share a bundle, "
                "or use ray.placement=colocated"
            )
        teacher_at = n_learn + n_eng * tp if teacher_bundle is None else teacher_bundle
    if not 0 <= teacher_at < num_gpus:
        raise ValueError(f"ray.teacher_bundle must be in [0, ray.num_gpus={num_gpus}), got {teacher_at}")
    slots = [Slot("learner", r, (r,), shares["learner"]) for r in range(n_learn)]
    for e in range(n_eng):
        first = first_engine_bundle + e * tp
        slots.append(Slot("rollout", e, tuple(range(first, first + tp)), shares["rollout"]))
    slots += [Slot("teacher", 0, (teacher_at,), shares["teacher"]), verifier]
    assignment = Assignment(num_gpus, tuple(slots))
    for b, load in enumerate(assignment.bundle_load()):
        if load > 1 + _EPS:
            users = [f"{s.role}[{s.index}]={s.gpu_share}" for s in slots if b in s.bundles]
            raise ValueError(
                f"GPU bundle {b} is over-full ({load:g} GPU: {', '.join(users)}); "
                "change ray.teacher_bundle, ray.rollout_gpus or ray.teacher_gpus"
            )
    return assignment


@dataclass
class PlacementPlan:
    """An `Assignment` bound to a ready Ray placement group (None on CPU runs); gives ray.remote options."""

    assignment: Assignment
    rollout_tp_size: int  # GPUs per rollout engine; build the engine's BackendConfig with this value
    learner_cpus: float = 0.0  # CPUs per learner actor (taken from its bundle)
    placement_group: Any = None  # ray.util.placement_group.PlacementGroup | None
    bundle_nodes: dict[int, str] = field(default_factory=dict)  # bundle index -> Ray node id (hex)

    @property
    def num_rollout_engines(self) -> int:
        return self.assignment.count_by_role()["rollout"]

    @property
    def rollout_executor_backend(self) -> str | None:
        """vLLM `distributed_executor_backend` for the engines: "ray" for TP > 1 in the group, else None."""
        return "ray" if self.placement_group is not None and self.rollout_tp_size > 1 else None

    def options(self, role: Role, index: int = 0, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
        """`ray.remote(**options)` for actor `role`[`index`]; `env_vars` are merged into its runtime_env."""
        slot = self.assignment.slot(role, index)
        env = dict(env_vars or {})
        cpus = self.learner_cpus if role == "learner" else 0.0
        opts: dict[str, Any] = {"num_cpus": cpus}
        if role != "reward":
            opts["num_gpus"] = 0.0
        if self.placement_group is not None and slot.bundles:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            tp_workers = role == "rollout" and len(slot.bundles) > 1
            if tp_workers:  # vLLM's Ray executor puts the TP workers into these bundles (module docstring)
                env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, slot.bundles))
                env["VLLM_RAY_PER_WORKER_GPUS"] = str(slot.gpu_share)
            else:
                opts["num_gpus"] = slot.gpu_share
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group,
                placement_group_bundle_index=slot.bundles[0],
                placement_group_capture_child_tasks=tp_workers,
            )
        if env:
            opts["runtime_env"] = {"env_vars": env}
        return opts

    def table(self) -> list[dict[str, Any]]:
        """One row per (actor, bundle) for logging: role, index, bundle, node (short id), gpu_share."""
        rows = []
        for s in self.assignment.slots:
            for b in s.bundles or (None,):
                node = self.bundle_nodes.get(b, "") if b is not None else ""
                rows.append(
                    {
                        "role": s.role,
                        "index": s.index,
                        "bundle": b,
                        "node": node[:8],
                        "gpu_share": s.gpu_share,
                    }
                )
        return rows

    def format_table(self) -> str:
        lines = [f"{'role':<9} {'index':>5} {'bundle':>6} {'node':<8} {'gpu_share':>9}"]
        for r in self.table():
            bundle = "-" if r["bundle"] is None else str(r["bundle"])
            lines.append(
                f"{r['role']:<9} {r['index']:>5} {bundle:>6} {r['node'] or '-':<8} {r['gpu_share']:>9g}"
            )
        return "\n".join(lines)

    def remove(self) -> None:
        """Release the placement group (after the actors in it are killed); a no-op on CPU runs."""
        if self.placement_group is not None:
            from ray.util import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None


def build_placement(ray_cfg: RayConfig, backend_tp_size: int = 1) -> PlacementPlan:
    """Plan per `ray_cfg` and, with GPUs, create the placement group and wait until its bundles are placed.

    Ray must already be initialised (the driver calls `ray.init(address=ray_cfg.address)`).
    """
    tp = resolve_rollout_tp_size(ray_cfg.rollout_tp_size, backend_tp_size)
    num_gpus = ray_cfg.num_gpus if ray_cfg.enabled else 0  # enabled=false: local objects, options unused
    assignment = plan_bundles(
        num_gpus,
        ray_cfg.num_learners,
        ray_cfg.num_rollout_engines,
        tp,
        ray_cfg.placement,
        teacher_bundle=ray_cfg.teacher_bundle,
        rollout_gpus=ray_cfg.rollout_gpus,
        teacher_gpus=ray_cfg.teacher_gpus,
    )
    plan = PlacementPlan(assignment, tp, learner_cpus=ray_cfg.learner_cpus)
    if num_gpus == 0:
        return plan
    import ray
    from ray.util import placement_group, placement_group_table, remove_placement_group

    if not ray.is_initialized():
        raise RuntimeError("build_placement needs Ray: call ray.init(address=cfg.ray.address) first")
    have = ray.cluster_resources().get("GPU", 0)
    if have < num_gpus:
        raise ValueError(f"ray.num_gpus={num_gpus} but the Ray cluster has {have:g} GPUs (all nodes)")
    cpus = ray_cfg.learner_cpus if ray_cfg.bundle_cpus is None else ray_cfg.bundle_cpus
    bundle = {"GPU": 1.0, **({"CPU": float(cpus)} if cpus > 0 else {})}
    group = placement_group([dict(bundle) for _ in range(num_gpus)], strategy=ray_cfg.placement_strategy)
    try:
        ray.get(group.ready(), timeout=ray_cfg.placement_timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        remove_placement_group(group)
        raise RuntimeError(
            f"placement group of {num_gpus} x {bundle} ({ray_cfg.placement_strategy}) not placed within "
            f"ray.placement_timeout_s={ray_cfg.placement_timeout_s:g} s; free resources: "
            f"{ray.available_resources()}; check ray.num_gpus, ray.bundle_cpus and ray.placement_strategy"
        ) from exc
    plan.placement_group = group
    plan.bundle_nodes = dict(placement_group_table(group)["bundles_to_node_id"])
    for s in assignment.slots:  # a TP group across nodes works in vLLM but all-reduces over the network
        if s.role == "rollout" and len({plan.bundle_nodes[b] for b in s.bundles}) > 1:
            logger.warning(
                "rollout engine %d spans nodes (bundles %s); make ray.rollout_tp_size divide "
                "the GPUs per node",
                s.index,
                s.bundles,
            )
    return plan
