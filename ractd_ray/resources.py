"""What the Ray cluster can give a search or a pool: decided once, in the driver, from the cluster's node types.

An autoscaling cluster (cluster.yaml: GPU node types with min_workers 0) has no GPU and few CPUs when a command
starts; what it *can* scale to is in the cluster config its autoscaler reports to the GCS (the node types with
their resources and max_workers: `ray._private.state.state.get_max_resources_from_cluster_config()`, what Ray
Train itself reads). `capacity()` is the larger of that and what the cluster has now; a cluster without an
autoscaler (one machine, `ray start` nodes) is what it has now.

- `decide_gpu(gpu, need)`: --gpu auto asks for GPU workers/actors when the cluster can provide them (a node type
  with a GPU), so the request itself is what makes the autoscaler start the GPU nodes; --gpu yes where nothing can
  ever provide a GPU is a RactdError (one line) instead of a request that waits forever.
- `check_fits(...)`: a trial or an actor that no node type can ever hold is a RactdError before anything starts.
- `worker_cpus(...)`: --cpus-per-worker 0 (auto): a CPU worker takes its share of the largest node's CPUs, so a
  search on one machine trains with every core (a worker reserving 1 CPU runs torch on one thread).
"""

from __future__ import annotations

import dataclasses
import logging
import math

from ractd import RactdError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Capacity:
    """cpus / gpus: the most the cluster can have (its node types' maxima, or what it has now); node_cpus /
    node_gpus: the largest single node's; autoscaling: whether the numbers come from the autoscaler's config."""

    cpus: float
    gpus: float
    node_cpus: float
    node_gpus: float
    autoscaling: bool


def capacity() -> Capacity:
    import ray

    now = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
    node_gpus = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
    cpus, gpus, autoscaling = now.get("CPU", 0.0), now.get("GPU", 0.0), False
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as e:  # an older or a client-mode connection: what the cluster has now
        log.debug("no cluster config from the GCS (%s)", e)
        config = None
    if config is not None and config.node_group_configs:
        autoscaling = True
        total = {"CPU": 0.0, "GPU": 0.0}
        for group in config.node_group_configs:
            count = group.max_count if group.max_count >= 0 else 10**6
            for key in total:
                total[key] += count * float(group.resources.get(key, 0))
            if group.max_count != 0:
                node_cpus = max(node_cpus, float(group.resources.get("CPU", 0)))
                node_gpus = max(node_gpus, float(group.resources.get("GPU", 0)))
        for key in total:
            limit = config.max_resources.get(key, 0)
            if limit:
                total[key] = min(total[key], float(limit))
        cpus, gpus = max(cpus, total["CPU"]), max(gpus, total["GPU"])
    return Capacity(cpus, gpus, node_cpus, node_gpus, autoscaling)


def decide_gpu(gpu: str | bool, what: str, cap: Capacity | None = None) -> bool:
    """--gpu auto|yes|no (or a bool) -> whether `what` (e.g. "the trials' workers") ask for GPUs."""
    if isinstance(gpu, bool):
        return gpu
    if gpu not in ("auto", "yes", "no"):
        raise RactdError(f"gpu={gpu!r}: expected auto, yes or no")
    if gpu == "no":
        return False
    cap = cap or capacity()
    if gpu == "yes" and cap.node_gpus < 1:
        raise RactdError(f"--gpu yes: no node of the Ray cluster has a GPU, and no node type it can start has one "
                         f"({'autoscaler config read' if cap.autoscaling else 'no autoscaler'}); use --gpu auto or no")
    use = cap.node_gpus >= 1
    log.debug("%s: %s (the cluster %s GPUs: %g)", what, "GPU" if use else "CPU",
             "can scale to" if cap.autoscaling else "has", cap.gpus)
    return use


def check_fits(what: str, per_unit: dict[str, float], units: int, cap: Capacity | None = None) -> Capacity:
    """RactdError unless `units` of `per_unit` resources ({"CPU": c, "GPU": g}, each on one node) fit what the
    cluster can scale to. Returns the capacity."""
    cap = cap or capacity()
    for key, each in per_unit.items():
        total, node = (cap.cpus, cap.node_cpus) if key == "CPU" else (cap.gpus, cap.node_gpus)
        if each > node:
            raise RactdError(f"{what} needs {each:g} {key} on one node but the largest node"
                             f"{' type' if cap.autoscaling else ''} of the Ray cluster has {node:g}")
        if each * units > total:
            raise RactdError(f"{what} needs {each * units:g} {key} ({units} x {each:g}) but the Ray cluster "
                             f"{'can scale to' if cap.autoscaling else 'has'} {total:g}")
    return cap


def worker_cpus(requested: float, workers: int, use_gpu: bool, concurrent: int = 1, driver_cpus: float = 0.0,
                cap: Capacity | None = None) -> float:
    """CPUs each Ray Train worker reserves (and its torch threads, rounded up): `requested` when positive; else 1
    for GPU workers (the GPU does the work); else the largest node's CPUs, less `driver_cpus` for each of the
    `concurrent` runs, shared among the `concurrent` x `workers` workers, in steps of 0.5, at least 1 -- and
    never more than a node keeps beside every driver (node CPUs - driver_cpus x concurrent), since Ray may place
    the drivers on any node: on nodes of 1 CPU a worker of 1 CPU would wait forever beside a driver of 0.25 on
    each node (measured: bench/multinode.py with two 1-CPU workers hung with 0.5 of 2 CPUs used), so it
    reserves what is left (0.5 there) and runs torch on one thread.
    One node of 2 CPUs: the shared stages' worker takes 2; a trial's (its driver holds 0.5) takes 1.5."""
    if requested:
        return float(requested)
    if use_gpu:
        return 1.0
    cap = cap or capacity()
    beside_drivers = cap.node_cpus - driver_cpus * concurrent
    share = beside_drivers / max(1, concurrent * workers)
    cpus = max(1.0, math.floor(share * 2) / 2)
    if cpus > beside_drivers > 0:
        cpus = math.floor(beside_drivers * 4) / 4 or beside_drivers
    return cpus


# A Ray Train worker group on an autoscaling cluster waits for nodes to launch (instance start, image pull, the
# setup commands: minutes), not for a running trial to end; Ray's default of 60 s counted a controller failure per
# minute of that and tore the placement group down and up again. This bounds the wait instead (30 minutes).
AUTOSCALING_START_TIMEOUT_S = 1800


def start_env(cap: Capacity | None = None) -> dict[str, str]:
    """Environment for Ray Train runs on this cluster: on an autoscaling one, the worker group's start timeout
    (AUTOSCALING_START_TIMEOUT_S); {} on a fixed one (Ray's default, or what the caller sets)."""
    cap = cap or capacity()
    return {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(AUTOSCALING_START_TIMEOUT_S)} if cap.autoscaling else {}


# Where the student's U-Net is no wider than this (the CPU presets: small, small-maze, tiny; a few million
# parameters), one trial cannot keep a GPU busy: its worker takes SMALL_NET_GPU_SHARE of a GPU, so that several
# trials share a device. Wider nets (the paper's presets) take a whole GPU per worker, and so do the workers of a
# trial with several (NCCL refuses two ranks of one group on one device, which shares could place together).
SMALL_NET_WIDTH = 256
SMALL_NET_GPU_SHARE = 0.25


def gpus_per_worker(requested: float, widest: int, workers: int = 1) -> float:
    """GPUs each Ray Train worker of a trial asks for: `requested` when positive, else SMALL_NET_GPU_SHARE for a
    one-worker trial of a net no wider than SMALL_NET_WIDTH channels (`widest`: the U-Net's largest down_dims),
    else 1."""
    if requested:
        return float(requested)
    return SMALL_NET_GPU_SHARE if widest <= SMALL_NET_WIDTH and workers == 1 else 1.0


def concurrent_trials(cap: Capacity, workers: int, use_gpu: bool, gpus_each: float, cpus_each: float,
                      driver_cpus: float, limit: int) -> int:
    """How many trials train at a time when --max-concurrent is 0 (auto): as many as the cluster can scale to
    (cap: its node types' maxima on an autoscaling cluster), at most `limit` (the trials of the search), at
    least 1.

    GPU trials: the cluster's GPUs over a trial's (workers x gpus_each), and its CPUs over a trial's (workers x
    cpus_each + driver_cpus). CPU trials: one per node's worth of CPUs (cap.cpus / cap.node_cpus), each trial's
    workers taking their share of a node (worker_cpus): one on a single machine, as before."""
    eps = 1e-9
    if use_gpu:
        by_gpu = math.floor(cap.gpus / (workers * gpus_each) + eps)
        by_cpu = math.floor(cap.cpus / (workers * cpus_each + driver_cpus) + eps)
        n = min(by_gpu, by_cpu)
    else:
        n = math.floor(cap.cpus / cap.node_cpus + eps) if cap.node_cpus > 0 else 1
    return max(1, min(int(n), int(limit)))
