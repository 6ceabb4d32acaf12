"""The live check of a running cluster: `python -m ractd_ray.cluster check`, run on the head (a Ray job:
`ray job submit --address http://127.0.0.1:8265 -- python -m ractd_ray.cluster check`).

What the commands need from a cluster, each shown by doing it once, on the nodes that will do it:
- node types: what the autoscaler can start (its cluster config, as ractd_ray.resources reads it), or the nodes of a
  fixed cluster;
- storage: $RACTD_STORAGE_PATH is set (a multi-node cluster needs it), and a task on a worker node (not the head)
  reads a file the head wrote there and writes one the head reads back (S3 with the worker's own instance profile);
- GPU (--gpu auto: when a node type has one): the same task asks for a GPU, so on an autoscaling cluster it starts a
  GPU worker (minutes: --timeout), and reports torch.cuda there: the device, torch's version and its CUDA.
Each check prints one line, "ok ..." or "FAIL ..."; the exit status is 0 when every check passed, else 1 (bad
input, or no cluster to connect to: one line, exit 2).
"""

from __future__ import annotations

import logging
import secrets
import time

from ractd import RactdError, storage

log = logging.getLogger(__name__)


def node_type_lines() -> list[str]:
    """One line per node type the autoscaler can start (or per alive node of a fixed cluster)."""
    import ray

    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 -- an older or client-mode connection: the nodes it has
        config = None
    if config is not None and config.node_group_configs:
        return [f"{g.name}: {g.min_count}..{g.max_count} nodes, resources "
                f"{ {k: v for k, v in g.resources.items() if k in ('CPU', 'GPU')} }"
                for g in config.node_group_configs]
    return [f"node {n['NodeManagerAddress']}: resources "
            f"{ {k: v for k, v in n['Resources'].items() if k in ('CPU', 'GPU')} } (no autoscaler)"
            for n in ray.nodes() if n.get("Alive")]


def probe(stored_by_head: str, reply: str, want_gpu: bool) -> dict:
    """Runs on a worker node: read the head's file, write the reply, look at torch.cuda."""
    import socket

    import torch

    out = {"host": socket.gethostname(), "read": storage.read_text(stored_by_head), "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpu": None}
    storage.write_bytes(reply, f"written on {out['host']}".encode())
    if want_gpu:
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


def _worker_strategy():
    """Keep the probe off the head node where another alive node exists (else it runs where it can)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != head
              and n["Resources"].get("CPU", 0) >= 1]
    return NodeAffinitySchedulingStrategy(others[0], soft=False) if others else "DEFAULT"


def run_checks(gpu: str = "auto", timeout: float = 1200.0) -> list[tuple[bool, str]]:
    """The checks (module doc) as (passed, line)."""
    import ray

    from ractd_ray.resources import capacity, decide_gpu

    results: list[tuple[bool, str]] = []
    cap = capacity()
    kinds = node_type_lines()
    results.append((bool(kinds), "node types: " + ("; ".join(kinds) if kinds else "none")))
    root = storage.configured()
    if root is None:
        multi = sum(1 for n in ray.nodes() if n.get("Alive")) > 1 or cap.autoscaling
        results.append((not multi, f"storage: {storage.STORAGE_ENV} is not set"
                        + (" on a multi-node cluster: results written on a worker would stay on its disk"
                           if multi else " (one machine: run folders)")))
        return results
    want_gpu = decide_gpu(gpu, "the check's probe", cap)
    token = secrets.token_hex(4)
    sent, reply = storage.join(root, "check", token, "head.txt"), storage.join(root, "check", token, "worker.txt")
    storage.write_bytes(sent, token.encode())
    task = ray.remote(probe).options(num_cpus=1, num_gpus=1 if want_gpu else 0,
                                     scheduling_strategy="DEFAULT" if want_gpu else _worker_strategy())
    t0 = time.monotonic()
    ref = task.remote(sent, reply, want_gpu)
    ready, _ = ray.wait([ref], timeout=timeout)
    if not ready:
        what = " and 1 GPU" if want_gpu else ""
        line = f"storage{what and ' and GPU'}: no node took the probe within {timeout:g} s (it asks for 1 CPU{what})"
        results.append((False, line))
        return results
    try:
        out = ray.get(ref)
    except Exception as e:  # noqa: BLE001 -- the probe's own failure is the check's result
        from ractd.errors import one_line

        results.append((False, f"storage: the probe failed on a worker: {one_line(e, last=True)}"))
        return results
    back = storage.read_text(reply) if storage.exists(reply) else ""
    line = (f"storage: {root}: node {out['host']} read the head's file and wrote one the head read back "
            f"({time.monotonic() - t0:.0f} s)")
    results.append((out["read"] == token and back == f"written on {out['host']}", line))
    if want_gpu:
        results.append((out["gpu"] is not None, f"GPU: node {out['host']}: "
                        + (f"{out['gpu']}, torch {out['torch']} (CUDA {out['cuda']})" if out["gpu"] else
                           f"torch {out['torch']} sees no CUDA device (CUDA build: {out['cuda']})")))
    else:
        results.append((True, "GPU: not checked (" + ("--gpu no" if gpu == "no" else "no node type has a GPU")
                        + ")"))
    return results


def main_check(address: str | None, gpu: str, timeout: float) -> int:
    """Connect, run the checks, print one line each; 0 if all passed, else 1."""
    from ractd_ray.connect import ensure_ray

    if gpu not in ("auto", "yes", "no"):
        raise RactdError(f"--gpu {gpu}: expected auto, yes or no")
    import os

    started = ensure_ray(address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    try:
        results = run_checks(gpu, timeout)
    finally:
        if started:
            import ray

            ray.shutdown()
    for ok, line in results:
        print(("ok   " if ok else "FAIL ") + line)
    return 0 if all(ok for ok, _ in results) else 1
