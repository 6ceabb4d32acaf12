"""The rollout actor pool that fills the results store (ractd_repro.store.ResultsStore).

A `ray.util.ActorPool` of `RolloutActor`s. Each actor holds one policy per (checkpoint, sampler, NFE) and runs the
library's batched rollouts (ractd_repro.jobs.run_block -> ractd.rollout) on a block of seeds: one network call per env
step for the whole block, one record per episode. The driver:

  * puts each checkpoint's weights into the object store once (`ray.put` of the model / EMA weights, config,
    normalizers and shapes: optimizer and RNG state are not shipped); actors receive the reference inside a
    list, so Ray does not fetch the weights again for every block, and an actor fetches them only the first
    time it meets the checkpoint;
  * splits every (cell, not-yet-stored seeds) into blocks (default: the seeds of a cell spread evenly over the
    actors), submits them all, and writes each returned block to the store as one atomic part file;
  * on an actor's death (ray.exceptions.ActorDiedError: a killed actor, a lost node) starts a fresh actor in
    its place (a transient error, ActorUnavailableError, keeps the actor); when the queue is drained, whatever
    the store still lacks (exactly the blocks of dead actors) is dispatched again, up to `max_retries` rounds. The store
    is the source of truth, so every seed ends up stored exactly once: a lost block was never written, and a finished
    one is never rerun (`done_keys`).

Resources (actor_layout, decided once in the driver): actor count from --actors, else from what the cluster can
give: on an autoscaling cluster every GPU (or CPU) its node types can scale to, since the actors' requests are what
start the nodes; on a fixed one its free resources (GPUs x actors_per_gpu when a node has GPUs, each actor with
num_gpus = 1 / actors_per_gpu so several share a device; else CPUs // cpus_per_actor). A cell's seeds are spread
over the actors, and a pool never starts more actors than it has blocks. Actors get everything they load from the
driver (checkpoint bytes, inverse-dynamics weights; the normalizers ride in the checkpoint). Each actor sets torch's
intra-op threads to its CPUs (Ray sets OMP_NUM_THREADS=1 for 1-CPU actors; torch needs telling too).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import ray
from ray.util import ActorPool

from ractd import RactdError
from ractd_repro.jobs import EvalJob, blocks, copy_twins, load_policy, policy_key, run_block
from ractd_repro.store import ResultsStore

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """Actor pool settings (eval/reproduce_tables.py derives its flags from these).

    actors: number of rollout actors (0 = from the cluster's resources).
    cpus_per_actor: CPUs each actor reserves; also its torch intra-op threads.
    actors_per_gpu: actors sharing one GPU (num_gpus = 1 / actors_per_gpu each).
    gpu: auto (GPU actors when a node type of the cluster has a GPU: ractd_ray.resources; on an autoscaling
        cluster that starts from zero GPU workers, the request is what brings them up) | yes (the same, and an
        error where no node type has a GPU) | no.
    block_size: seeds per block (0 = a cell's seeds spread evenly over the actors).
    max_retries: rounds of re-dispatching the blocks of dead actors before giving up.
    ping_timeout_s: after a round that lost blocks, an actor that does not answer within this many seconds is
        replaced.
    start_timeout_s: an actor not started within this many seconds (no node can take it: the cluster cannot
        scale that far, or other jobs hold the resources) is an error, not a wait forever.
    """

    actors: int = 0
    cpus_per_actor: float = 1.0
    actors_per_gpu: int = 4
    gpu: str = "auto"
    block_size: int = 0
    max_retries: int = 3
    start_timeout_s: float = 900.0
    ping_timeout_s: float = 60.0


@ray.remote
class RolloutActor:
    """Holds policies (one per checkpoint, sampler, NFE) and rolls out blocks of seeds with them."""

    def __init__(self, threads: int, device: str):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.device = device
        self.policies: dict = {}
        self.episodes = 0

    def run(self, job: EvalJob, seeds: list[int], weights_box: list) -> list[dict]:
        """weights_box: [ref of (checkpoint bytes, inverse-dynamics bytes or None)], all from the driver: the
        actor reads nothing from its node's disk."""
        from ractd_repro.store import library_versions

        key = policy_key(job)
        if key not in self.policies:
            blobs = ray.get(weights_box[0])
            tmps = []
            try:
                for blob in blobs:
                    fd, tmp = tempfile.mkstemp(suffix=".pt")
                    tmps.append(tmp)
                    with os.fdopen(fd, "wb") as f:
                        f.write(blob or b"")
                self.policies[key] = load_policy(job, tmps[0], device=self.device,
                                                 inverse_dynamics_file=tmps[1] if blobs[1] else None)
            finally:
                for tmp in tmps:
                    os.unlink(tmp)
        versions = {**library_versions(), "ray": ray.__version__}
        rows = run_block(job, seeds, self.policies[key], device=self._device_name(), versions=versions)
        self.episodes += len(rows)
        return rows

    def _device_name(self) -> str:
        if self.device.startswith("cuda"):
            import torch

            return torch.cuda.get_device_name(0)
        return "cpu"

    def stats(self) -> dict:
        return {"pid": os.getpid(), "episodes": self.episodes, "policies": len(self.policies)}


def slim_checkpoint_bytes(path) -> bytes:
    """What an actor needs of a checkpoint: config, the weights it evaluates (EMA where present), normalizers,
    shapes and meta, serialized with torch.save (optimizer, scheduler and RNG state dropped)."""
    import torch

    from ractd.checkpoint import load_checkpoint

    ck = load_checkpoint(Path(path))
    slim = {k: ck[k] for k in ("config", "normalizers", "shapes", "meta") if k in ck}
    slim["model"] = ck["ema"] if ck.get("ema") is not None else ck["model"]
    slim["ema"] = None
    buf = io.BytesIO()
    torch.save(slim, buf)
    return buf.getvalue()


def inverse_dynamics_bytes(job: EvalJob) -> bytes:
    """The inverse-dynamics model file a maze2d job's tracker loads (its default path for the checkpoint's task
    and data scale), read on the driver."""
    from ractd.checkpoint import load_checkpoint
    from ractd.inverse_dynamics import default_path

    scale = load_checkpoint(Path(job.checkpoint_path))["config"].get("scale", job.scale)
    path = default_path(job.task, scale)
    if not path.is_file():
        raise RactdError(f"no inverse dynamics model at {path}; train it with python -m ractd.inverse_dynamics "
                         f"{job.task}")
    return path.read_bytes()


def actor_layout(cfg: PoolConfig) -> tuple[int, float, float, str]:
    """(actors, num_cpus, num_gpus, device) for each actor, decided once from the config and what the cluster can
    scale to (ractd_ray.resources: its node types on an autoscaling cluster). An actor no node can hold, or --gpu
    yes where no node type has a GPU: RactdError."""
    from ractd_ray.resources import capacity, check_fits, decide_gpu

    if cfg.actors < 0 or cfg.cpus_per_actor <= 0 or cfg.actors_per_gpu < 1:
        raise RactdError("actors must be >= 0, cpus_per_actor > 0 and actors_per_gpu >= 1")
    cap = capacity()
    free = ray.available_resources()  # what other jobs on the cluster leave free
    if decide_gpu(cfg.gpu, "rollout actors", cap):
        share = 1.0 / cfg.actors_per_gpu
        check_fits("a rollout actor", {"CPU": cfg.cpus_per_actor, "GPU": share}, 1, cap)
        # an autoscaling cluster: every GPU it can scale to (the requests are what start the nodes); a fixed one:
        # the GPUs free now (none free: one node's worth, which waits for them)
        gpus = cap.gpus if cap.autoscaling else (float(free.get("GPU", 0)) or cap.node_gpus)
        by_cpu = int(cap.cpus // cfg.cpus_per_actor) if cap.autoscaling else 10**9
        n = cfg.actors or max(1, min(int(max(1.0, gpus) * cfg.actors_per_gpu), by_cpu))
        return n, cfg.cpus_per_actor, share, "cuda"
    check_fits("a rollout actor", {"CPU": cfg.cpus_per_actor}, 1, cap)
    cpus = cap.cpus if cap.autoscaling else float(free.get("CPU", 1))
    n = cfg.actors or max(1, int(cpus // cfg.cpus_per_actor))
    return n, cfg.cpus_per_actor, 0.0, "cpu"


class RolloutPool:
    """A pool of rollout actors plus the driver loop that keeps the store exactly-once (see the module doc).

    The actors live until `shutdown()` and are reused by later `evaluate` calls (with their loaded policies)."""

    def __init__(self, cfg: PoolConfig = PoolConfig()):
        if not ray.is_initialized():
            raise RactdError("Ray is not initialized; call ray.init() (or ractd_ray.pool.connect) first")
        self.cfg = cfg
        self.n_actors, self.num_cpus, self.num_gpus, self.device = actor_layout(cfg)
        self.actors: list = []
        self.failures = 0
        self._weights: dict[str, ray.ObjectRef] = {}

    def _new_actor(self):
        actor = RolloutActor.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus).remote(
            max(1, int(self.num_cpus)), self.device)
        self.actors.append(actor)
        return actor

    def _wait_started(self) -> None:
        """Until at least one actor runs; none within cfg.start_timeout_s is a RactdError (one line)."""
        ready, _ = ray.wait([a.stats.remote() for a in self.actors], num_returns=1, timeout=self.cfg.start_timeout_s)
        if not ready:
            raise RactdError(f"no rollout actor started within {self.cfg.start_timeout_s:g} s (each asks for "
                             f"{self.num_cpus:g} CPU, {self.num_gpus:g} GPU): the Ray cluster cannot place one")

    def _weights_ref(self, job: EvalJob):
        key = (job.checkpoint, job.tracker != "pd")
        if key not in self._weights:  # once per checkpoint (and tracker model)
            self._weights[key] = ray.put((slim_checkpoint_bytes(job.checkpoint_path),
                                          inverse_dynamics_bytes(job) if job.tracker != "pd" else None))
        return self._weights[key]

    def evaluate(self, jobs: list[EvalJob], seeds: list[int], store: ResultsStore, progress: bool = True,
                 on_block: Callable[["RolloutPool", list[dict]], None] | None = None) -> dict:
        """Every (job, seed) not yet in the store, rolled out by the actors and written block by block.

        Then the twins' episodes, copied from their primaries' (ractd_repro.jobs.copy_twins). Returns
        {"episodes_run", "blocks", "actor_failures", "redispatched_blocks", "actors", "episodes_copied"}.
        on_block(pool, rows) is called after each block is stored (tests use it to kill an actor mid-run)."""
        from tqdm import tqdm

        seeds = [int(s) for s in seeds]
        bs = self.cfg.block_size or max(1, math.ceil(len(seeds) / self.n_actors))
        todo = blocks(jobs, seeds, store.done_keys(), bs)
        total = sum(len(b) for _, b in todo)
        summary = {"episodes_run": 0, "blocks": 0, "actor_failures": 0, "redispatched_blocks": 0, "actors": 0}
        if not todo:
            return {**summary, "episodes_copied": copy_twins(jobs, seeds, store)}
        n = min(self.n_actors, len(todo))
        while len(self.actors) < n:  # actors left from an earlier call are reused (they hold the CPUs)
            self._new_actor()
        self._wait_started()
        summary["actors"] = len(self.actors)
        bar = tqdm(total=total, desc="episodes", unit="ep", disable=not progress)
        rounds = 0
        while todo:
            if rounds:  # a round lost blocks: keep the actors that answer, replace the others
                self._keep_live(n)
            pool = ActorPool(list(self.actors))
            for job, block in todo:
                ref = self._weights_ref(job)
                pool.submit(lambda a, v: a.run.remote(v[0], v[1], [v[2]]), (job, block, ref))
            while pool.has_next():
                try:
                    rows = pool.get_next_unordered()
                except ray.exceptions.RayTaskError as e:  # the rollout itself failed: not worth a retry
                    bar.close()
                    cause = e.cause if isinstance(e.cause, Exception) else e
                    raise RactdError(f"rollout failed: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from None
                except ray.exceptions.ActorDiedError as e:  # dead for good (killed, its node lost): replace it
                    summary["actor_failures"] += 1
                    log.warning("a rollout actor died (%s); starting a fresh one", type(e).__name__)
                    if len(self.actors) - summary["actor_failures"] < n:  # one fresh actor per dead one
                        pool.push(self._new_actor())
                    continue
                except ray.exceptions.RayActorError as e:  # unavailable (ActorUnavailableError: maybe transient,
                    # maybe its node is going): no new actor now; its block is not stored, so the next round
                    # dispatches it again, after _keep_live has pinged the actors
                    log.warning("a rollout actor is unavailable (%s); its block is dispatched again",
                                type(e).__name__)
                    continue
                store.write_episodes(rows)
                summary["episodes_run"] += len(rows)
                summary["blocks"] += 1
                bar.update(len(rows))
                if on_block is not None:
                    on_block(self, rows)
            todo = blocks(jobs, seeds, store.done_keys(), bs)  # what the dead actors never returned
            if todo:
                rounds += 1
                summary["redispatched_blocks"] += len(todo)
                if rounds > self.cfg.max_retries:
                    bar.close()
                    raise RactdError(f"{sum(len(b) for _, b in todo)} episodes still missing after "
                                     f"{self.cfg.max_retries} rounds of re-dispatching; see the Ray logs")
                log.warning("re-dispatching %d blocks lost with dead actors", len(todo))
        bar.close()
        self._keep_live(0)  # drop the actors that died in the last round (the live ones are idle again)
        return {**summary, "episodes_copied": copy_twins(jobs, seeds, store)}

    def _keep_live(self, want: int) -> None:
        """Ping every actor (bounded by cfg.ping_timeout_s); kill the ones that are dead or do not answer (a lost
        node's actor can stay 'unavailable' until its node is declared dead), then start fresh ones up to `want`."""
        actors, alive = list(self.actors), []
        if actors:
            pings = {a.stats.remote(): a for a in actors}
            ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=self.cfg.ping_timeout_s)
            for ref in ready:
                try:
                    ray.get(ref)
                    alive.append(pings[ref])
                except ray.exceptions.RayActorError:
                    pass
        for a in actors:
            if a not in alive:
                try:
                    ray.kill(a)
                except Exception:  # already gone
                    pass
        self.actors = alive
        while len(self.actors) < want:
            self._new_actor()

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []


def evaluate(jobs: list[EvalJob], seeds: list[int], store: ResultsStore, cfg: PoolConfig = PoolConfig(),
             progress: bool = True, on_block=None) -> dict:
    """One pool, all the jobs, then the actors are released."""
    pool = RolloutPool(cfg)
    try:
        return pool.evaluate(jobs, seeds, store, progress=progress, on_block=on_block)
    finally:
        pool.shutdown()


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray through the project's one helper (ractd_ray.train.ensure_ray): a cluster (address, e.g.
    "auto" or "head:6379"; else $RAY_ADDRESS) or a new local instance."""
    from ractd_ray.train import ensure_ray

    kw = {"num_cpus": num_cpus} if num_cpus else {}
    ensure_ray(address, log_to_driver=False, configure_logging=False, **kw)
