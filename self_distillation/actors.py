"""The Ray shells of Phase 2 (adapter layer): where each worker runs, and how it is called.

Workers are plain classes: `RolloutWorker` and `RewardWorker` (here, thin), `teacher.Teacher` and
`learner.Learner`. `ActorHandle` / `LearnerGroup` run them either as Ray actors (`ray.remote(...)(cls)`,
resources applied at construction) or as local objects (`ray.enabled=false`), with the same call
interface; a dead actor raises `ActorFailure` naming the actor, the call and the step.

- `RolloutWorker`: the generation backend (vLLM, or transformers as fallback); weight reload from a
  safetensors directory (`ray.weight_sync=file`) or from the learner's tensors (`memory`: one Ray object,
  put once by learner rank 0, that every engine reads from the shared-memory object store; a direct call
  without Ray). An NCCL/IPC GPU path is not implemented.
- `RewardWorker`: the reward source (`shared.rewards.build_reward_source`: math-verify or the code
  sandbox in worker processes), scoring whole groups.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from self_distillation.config import SelfDistillationConfig
from self_distillation.learner import Learner
from self_distillation.losses import Divergence
from self_distillation.placement import PlacementPlan, build_placement
from self_distillation.teacher import Teacher, resolve_weights
from self_revision_training.shared.config import BackendConfig, GradingConfig, ModelConfig, SamplingConfig


class ActorFailure(RuntimeError):
    """An actor died or raised; the message names the actor, the call and the step."""


# ----------------------------------------------------------------------------------------------
# plain workers


class RolloutWorker:
    """Samples responses; reloads the learner's weights (a directory or the tensors)."""

    def __init__(self, model: ModelConfig, backend: BackendConfig):
        from self_revision_training.shared.generation import create_backend

        self.backend = create_backend(model, backend)

    def info(self) -> dict[str, Any]:
        return {
            "eos_token_ids": sorted(self.backend.eos_token_ids),
            "max_model_len": self.backend.max_model_len,
        }

    def generate(
        self, prompts: list[list[int]], sampling: SamplingConfig, max_tokens: list[int], call_key: int
    ) -> tuple[list[list[tuple[list[int], str, str, list[float] | None]]], int]:
        """-> (per prompt, per sample (token ids, text, finish reason, log-probs)), policy version."""
        # HFBackend derives each call's seed from (engine seed, call counter); setting the counter from
        # the step makes a resumed run replay the uninterrupted run's samples (vLLM: a no-op).
        self.backend.set_call_index(call_key)
        out = self.backend.generate(prompts, sampling, max_tokens=max_tokens, return_logprobs=True)
        rows = [[(s.token_ids, s.text, s.finish_reason, s.logprobs) for s in row] for row in out]
        return rows, self.backend.policy_version

    def update_weights(self, weights: Any) -> int:
        """`weights`: a safetensors directory, {name: tensor}, or `teacher.share_weights` arrays (a Ray
        ObjectRef argument arrives resolved: views of the object store's shared memory)."""
        self.backend.update_weights(weights if isinstance(weights, str) else resolve_weights(weights))
        return self.backend.policy_version

    def close(self) -> None:
        self.backend.close()


class RewardWorker:
    """The reward source, scoring groups of responses (empty responses are r=0 without a verifier call).
    Validation problems are graded against their gold answers whatever the training reward is (a vote needs
    a group and would grade the model with its own consensus); that grader starts at the first validation."""

    def __init__(self, name: str, mode: str, cfg: GradingConfig, vote: Any = None):
        from self_revision_training.shared.rewards import build_reward_source

        self.reward = build_reward_source(name, mode, cfg, vote)
        self.name, self.mode, self.cfg, self.gold = name, mode, cfg, None

    def score(self, problems: list[Any], groups: list[list[str]], split: str = "train") -> list[list[Any]]:
        if split == "train" or self.name == "ground_truth":
            return self.reward.score(problems, groups)
        if self.gold is None:
            from self_revision_training.shared.rewards import build_reward_source

            self.gold = build_reward_source("ground_truth", self.mode, self.cfg)
        return self.gold.score(problems, groups)

    def close(self) -> None:
        self.reward.close()
        if self.gold is not None:
            self.gold.close()


# ----------------------------------------------------------------------------------------------
# shells


class ActorHandle:
    """One worker, as a Ray actor (`remote=True`) or a local object, with failures named."""

    def __init__(self, name: str, cls: type, args: tuple, *, remote: bool, options: dict | None = None):
        self.name, self.remote = name, remote
        if remote:
            import ray

            self.actor = ray.remote(**(options or {}))(cls).remote(*args)
        else:
            self.actor = cls(*args)

    def submit(self, method: str, *args: Any) -> Any:
        """A future (Ray) or the result (local); resolve with `resolve`."""
        if self.remote:
            return getattr(self.actor, method).remote(*args)
        try:
            return getattr(self.actor, method)(*args)
        except Exception as exc:
            raise ActorFailure(f"actor '{self.name}' failed in {method}: {exc!r}") from exc

    def call(self, method: str, *args: Any, context: str = "") -> Any:
        return resolve([self.submit(method, *args)], [self], method, context)[0]

    def kill(self) -> None:
        if self.remote:
            import ray

            ray.kill(self.actor)


def resolve(futures: list[Any], handles: list[ActorHandle], method: str, context: str = "") -> list[Any]:
    """Wait for results; a Ray error becomes ActorFailure naming the actor, method and step context."""
    if not any(h.remote for h in handles):
        return futures
    import ray

    results = []
    for future, handle in zip(futures, handles, strict=True):
        try:
            results.append(ray.get(future))
        except (ray.exceptions.RayError, RuntimeError) as exc:
            raise ActorFailure(f"actor '{handle.name}' failed in {method} {context}: {exc}") from exc
    return results


class LearnerGroup:
    """N `Learner` ranks forming one torch.distributed group (rank r in placement bundle r)."""

    def __init__(self, cfg: SelfDistillationConfig, plan: PlacementPlan, env_vars: dict[str, str]):
        remote = cfg.ray.enabled
        if not remote and cfg.ray.num_learners != 1:
            raise ValueError("ray.enabled=false runs one learner rank in the driver; set ray.num_learners=1")
        n = cfg.ray.num_learners
        self.handles = [
            ActorHandle(
                f"learner[{r}]",
                Learner,
                (cfg, r, n),
                remote=remote,
                options=plan.options("learner", r, env_vars),
            )
            for r in range(n)
        ]
        addr, port = self.handles[0].call("address")
        port = cfg.ray.master_port or port
        self.call_all("setup", [(addr, port)] * n)

    def call_all(self, method: str, per_rank_args: list[tuple] | None = None, context: str = "") -> list[Any]:
        args = per_rank_args or [()] * len(self.handles)
        futures = [h.submit(method, *a) for h, a in zip(self.handles, args, strict=True)]
        return resolve(futures, self.handles, method, context)

    def kill(self) -> None:
        for h in self.handles:
            h.kill()


def split_by_cost(costs: list[float], num_parts: int) -> list[list[int]]:
    """Prompt indices per engine so that the engines finish together: longest-processing-time first (each
    prompt, by decreasing expected cost, to the engine with the least cost so far; ties by index), each
    engine's indices in input order. One engine: every index, in order."""
    if num_parts == 1:
        return [list(range(len(costs)))]
    loads, parts = [0.0] * num_parts, [[] for _ in range(num_parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        e = min(range(num_parts), key=lambda e: (loads[e], e))
        loads[e] += costs[i]
        parts[e].append(i)
    return [sorted(p) for p in parts]


@dataclass
class PendingRollouts:
    """A generate call in flight on every engine (`RolloutGroup.submit`), collected by `collect`."""

    futures: list[Any]
    parts: list[list[int]]
    num_prompts: int


class RolloutGroup:
    """Data-parallel rollout engines behind one interface: each step's prompts are split between the
    engines by expected cost (`split_by_cost`: prompt tokens + the expected response length the driver
    passes, so the engines finish together), every engine receives the synced weights."""

    def __init__(self, handles: list[ActorHandle]):
        self.handles = handles
        self.remote = handles[0].remote

    def info(self) -> dict[str, Any]:
        return self.handles[0].call("info")

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        limits: list[int],
        call_key: int,
        context: str,
        expected: list[float] | None = None,
    ) -> tuple[list[Any], int]:
        """-> (per prompt, per sample (ids, text, finish reason, log-probs)), the engines' policy version."""
        return self.collect(self.submit(prompts, sampling, limits, call_key, expected), context)

    def submit(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        limits: list[int],
        call_key: int,
        expected: list[float] | None = None,
    ) -> PendingRollouts:
        """Start a generate call on every engine (with Ray it runs while the driver goes on; without, it
        runs now). `expected`: expected response tokens per prompt (None: its token limit)."""
        engines = len(self.handles)
        lengths = expected if expected is not None else limits
        parts = split_by_cost([len(p) + x for p, x in zip(prompts, lengths, strict=True)], engines)
        futures = [  # one engine keeps the call key: a single-engine run samples exactly as before
            h.submit(
                "generate",
                [prompts[i] for i in part],
                sampling,
                [limits[i] for i in part],
                call_key * engines + e,
            )
            for e, (h, part) in enumerate(zip(self.handles, parts, strict=True))
        ]
        return PendingRollouts(futures, parts, len(prompts))

    def collect(self, pending: PendingRollouts, context: str) -> tuple[list[Any], int]:
        """Wait for a submitted call: (rows in the order of its prompts, the engines' policy version)."""
        results = resolve(pending.futures, self.handles, "generate", context)
        versions = {version for _, version in results}
        if len(versions) != 1:
            raise ActorFailure(
                f"rollout engines hold different weights versions {sorted(versions)} {context}"
            )
        rows: list[Any] = [None] * pending.num_prompts
        for part, (engine_rows, _) in zip(pending.parts, results, strict=True):
            for i, row in zip(part, engine_rows, strict=True):
                rows[i] = row
        return rows, versions.pop()

    def update_weights(self, weights: Any, context: str) -> int:
        """Every engine loads `weights`: a directory, {name: tensor}, or one Ray ObjectRef of that dict
        (passed as is: each engine's actor reads the same object, nothing is copied per engine here).
        A Ray engine runs it after any generate call submitted before it. Returns the engines' version."""
        futures = [h.submit("update_weights", weights) for h in self.handles]
        return max(resolve(futures, self.handles, "update_weights", context))

    def kill(self) -> None:
        for h in self.handles:
            h.kill()


@dataclass
class Workers:
    """Every Phase-2 worker and the placement they run in."""

    rollout: RolloutGroup
    reward: ActorHandle
    teacher: ActorHandle | None  # None: the learner scores the teacher sequences (cfg.teacher_source)
    learners: LearnerGroup
    plan: PlacementPlan

    def shutdown(self) -> None:
        """Kill every actor (best effort: some may be dead already), then release the placement group;
        in local mode, destroy the learner's process group."""
        for group in (self.rollout, self.reward, self.teacher, self.learners):
            if group is None:
                continue
            try:
                group.kill()
            except Exception:  # noqa: BLE001 - best effort at shutdown; the actor may be dead already
                pass
        if not self.rollout.remote:
            self.learners.call_all("close")  # local mode: leave no process group behind
        self.plan.remove()


def _thread_env(cfg: SelfDistillationConfig) -> dict[str, str]:
    """Ray gives an actor with num_cpus=0 one OpenMP thread; rollout, teacher and training run one after
    another, so on a CPU machine the teacher and learners may use more (ray.cpu_threads)."""
    if cfg.ray.cpu_threads <= 0 or not cfg.ray.enabled:
        return {}
    return {"OMP_NUM_THREADS": str(cfg.ray.cpu_threads)}


def build_workers(cfg: SelfDistillationConfig) -> Workers:
    """Create every worker in its placement bundle (`placement.build_placement`; resources at construction)."""
    remote = cfg.ray.enabled
    if remote:
        import ray

        if not ray.is_initialized():
            ray.init(address=cfg.ray.address, include_dashboard=False)
    plan = build_placement(cfg.ray, cfg.backend.tensor_parallel_size)
    if cfg.ray.num_gpus:
        print(f"[distill] placement\n{plan.format_table()}", flush=True)
    threads = _thread_env(cfg)
    backend = dataclasses.replace(
        cfg.backend,
        tensor_parallel_size=plan.rollout_tp_size,
        distributed_executor_backend=plan.rollout_executor_backend,
    )
    engines = [  # distinct engine seeds, or every engine would draw the same random stream
        ActorHandle(
            f"rollout[{e}]",
            RolloutWorker,
            (cfg.student, dataclasses.replace(backend, seed=backend.seed + e)),
            remote=remote,
            options=plan.options("rollout", e),
        )
        for e in range(plan.num_rollout_engines)
    ]
    reward = ActorHandle(
        "reward",
        RewardWorker,
        (cfg.reward, cfg.train_data.mode, cfg.grading, cfg.vote),
        remote=remote,
        options=plan.options("reward"),
    )
    teacher = (
        None
        if cfg.teacher_source != "actor"
        else ActorHandle(
            "teacher",
            Teacher,
            (
                cfg.teacher,
                Divergence.from_config(cfg.loss),
                "cuda" if cfg.ray.num_gpus > 0 else "cpu",
                cfg.teacher_offload and cfg.ray.placement == "colocated",
                4,  # micro-batch of the padded path (teacher_pack_tokens=0)
                cfg.teacher_pack_tokens,
            ),
            remote=remote,
            options=plan.options("teacher", 0, threads),
        )
    )
    learners = LearnerGroup(cfg, plan, threads)
    return Workers(RolloutGroup(engines), reward, teacher, learners, plan)
