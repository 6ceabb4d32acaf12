"""GPU occupancy of a sweep on a cluster of one-GPU nodes: do many trials keep (nearly) every GPU busy?

The cluster is the multi-node test suite's (ractd_ray/testcluster.py: a head with no CPUs that runs the driver,
worker nodes in their own mount namespaces with a disk of their own, storage on a local S3 endpoint; needs
root), with each worker node declaring one GPU (`ray start --num-gpus=1`): a logical GPU, which Ray schedules,
reserves and frees exactly as it does a device.

    python bench/gpu_occupancy.py [--nodes 8] [--num-samples 100] [--cpus-per-node 2] [--out DIR] [-- FLAGS]

FLAGS go to tune/search.py after the default budget (the multi-node tests' tiny one: DEFAULT_SEARCH_FLAGS) and
override it.

What is real: the sweep is `tune/search.py --task T --num-samples S --gpus-per-worker 1` (the paper's one whole
GPU per trial) with the search's own capacity-aware defaults: --gpu auto finds the nodes' GPUs, and
ractd_ray.search._check_resources (TrialLayout) decides the concurrent trials, the prestarted one and the
workers' CPUs from what the cluster holds; then Tune with Optuna and ASHA (_tune_config), each trial's Tune
driver on a worker node, its Ray Train controller and its worker group, whose placement group holds {CPU, GPU: 1}
on one node; the dataset, the shared teacher (trained on a GPU worker too), every student's distillation, its
checkpoints, objective rollouts and records in S3.

What is a stand-in: the device. No node has a CUDA device and this torch has no NCCL, so two of Ray Train's
choices for a GPU worker are replaced, in the cluster's Python processes only (a sitecustomize module on their
PYTHONPATH, written to <out>/standin/, active under RACTD_STANDIN_GPU=1; STANDIN): the process group's backend,
nccl (TorchTrainer's choice for use_gpu), becomes gloo where torch.cuda is unavailable, as Ray's worker group
starts it, and the worker's device, cuda:<id>, becomes cpu. So each trial trains on one CPU thread where it would
train on its GPU: the GPU is held exactly as long as the trial's worker group holds it, as on a GPU cluster, but
a trial's training is as slow as one thread of this machine (shared by every node) makes it; the start-up around
it is Ray's and the project's own. Nothing of the project is changed or replaced.

Measured: every --interval seconds, from this process (connected to the cluster, reserving nothing), the GPUs
held (ray.cluster_resources() less ray.available_resources(), "GPU") and the placement groups holding a GPU
(their node, state, when first and last seen). Printed: mean busy GPUs over the whole sweep command, over its
Tune phase and over the steady state (from the first time all N GPUs are busy until the last trial's worker group
is placed), the share of the steady state (and of the Tune phase) with >= N-1 busy, the GPU-time left idle while
a trial's worker group waited for a GPU (placement lag) or while none waited (no trial ready: start-up), the gaps
a node's GPU stood free between two worker groups, the trials, the wall time and the concurrent trials the search
chose. Writes <out>/gpu_occupancy.json with these and the time series; the search's log is <out>/search.log.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ractd.errors import Parser, fail

REPO = Path(__file__).resolve().parents[1]

# the multi-node tests' budget (tests/test_multinode.py TINY): tiny U-Nets, a 20-step teacher, 12-step students
# checkpointed every 4 steps, one 20-step objective rollout per checkpoint
DEFAULT_SEARCH_FLAGS = ["--quick", "--preset", "tiny", "--steps", "12", "--ckpt-every", "4", "--teacher-steps", "20",
                        "--batch", "16", "--select-seeds", "1", "--select-max-steps", "20"]

STANDIN = '''"""Written by bench/gpu_occupancy.py: logical GPUs (ray start --num-gpus) stand in for devices.

Active only under RACTD_STANDIN_GPU=1. When Ray's modules are first imported, two of Ray Train's choices for a
worker holding a GPU are replaced where torch.cuda is unavailable: the process group's backend (nccl -> gloo, as
the worker group starts it) and the worker's device (cuda:<id> -> cpu). Nothing else changes."""
import importlib.abc
import importlib.machinery
import os
import sys


def _gloo_without_cuda(module):  # ray.train.torch.config: TorchTrainer(use_gpu) sets nccl, _TorchBackend starts it
    import dataclasses

    import torch

    backend = module._TorchBackend
    on_start = backend.on_start

    def start(self, worker_group, backend_config):
        if backend_config.backend in (None, "nccl") and not torch.cuda.is_available():
            backend_config = dataclasses.replace(backend_config, backend="gloo")
        return on_start(self, worker_group, backend_config)

    backend.on_start = start


def _cpu_without_cuda(module):  # ray.train.torch.get_device() -> CUDATorchDeviceManager.get_devices()
    import torch

    manager = module.CUDATorchDeviceManager
    get_devices = manager.get_devices

    def devices(self):
        return get_devices(self) if torch.cuda.is_available() else [torch.device("cpu")]

    manager.get_devices = devices


PATCHES = {"ray.train.torch.config": _gloo_without_cuda,
           "ray.air._internal.device_manager.nvidia_gpu": _cpu_without_cuda}


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        patch = PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("RACTD_STANDIN_GPU") == "1":
    sys.meta_path.insert(0, _AfterImport())
'''


def write_standin(folder: Path) -> Path:
    """The sitecustomize module (STANDIN) in `folder`, to put on the cluster's PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(STANDIN)
    return folder


# ------------------------------------------------------------------------------------------------ sampling

def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


class Sampler(threading.Thread):
    """Every `interval` s: (time, GPUs held, GPU placement groups pending) into .series, and for each placement
    group holding a GPU its node and the first and last time it was seen created (.groups). Where the machine's
    available memory falls below `min_free_gb`, it interrupts the search (.proc, SIGINT) once: the cluster's
    processes share this machine with whatever else runs on it."""

    def __init__(self, interval: float, min_free_gb: float):
        super().__init__(daemon=True)
        self.interval, self.series, self.groups, self.errors = interval, [], {}, 0
        self.min_free_gb, self.lowest_free_gb, self.proc, self.stopped_low_memory = min_free_gb, math.inf, None, False
        self.stop_event = threading.Event()

    def watch_memory(self) -> None:
        free = mem_available_gb()
        self.lowest_free_gb = min(self.lowest_free_gb, free)
        if free < self.min_free_gb and self.proc is not None and not self.stopped_low_memory:
            self.stopped_low_memory = True
            print(f"error: {free:.1f} GB of memory left (--min-free-gb {self.min_free_gb:g}): interrupting the "
                  f"search", file=sys.stderr, flush=True)
            self.proc.send_signal(signal.SIGINT)

    def run(self) -> None:
        import ray
        from ray.util import placement_group_table

        while not self.stop_event.is_set():
            t0 = time.time()
            self.watch_memory()
            try:
                total = ray.cluster_resources().get("GPU", 0.0)
                held = total - ray.available_resources().get("GPU", 0.0)
                pending = 0
                now = time.time()
                for pg_id, pg in placement_group_table().items():
                    if not any(float(b.get("GPU", 0)) > 0 for b in pg["bundles"].values()):
                        continue
                    if pg["state"] == "CREATED":
                        g = self.groups.setdefault(pg_id, {"node": next(iter(pg["bundles_to_node_id"].values()), ""),
                                                           "first": now, "last": now})
                        g["last"] = now
                    elif pg["state"] in ("PENDING", "PREPARED", "RESCHEDULING"):
                        pending += 1
                self.series.append((now, round(held, 6), pending, total))
            except Exception:  # a slow or restarting GCS: skip this sample
                self.errors += 1
            self.stop_event.wait(max(0.0, self.interval - (time.time() - t0)))


def run_search(argv: list[str], env: dict, cwd: Path, log: Path, timeout: float, sampler: Sampler) -> dict:
    """Run the search, its output to `log` with each line's time; returns {"rc", "start", "end", "tune_start",
    "concurrent", "ahead"} (tune_start: when it logged the start of the Tune phase; concurrent: the trials it
    trains at a time; ahead: those it starts up meanwhile, waiting for a GPU)."""
    out = {"rc": None, "start": time.time(), "end": None, "tune_start": None, "concurrent": None, "ahead": 0}
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    sampler.proc = proc
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer:
        timer.start()
    with open(log, "w", buffering=1) as f:  # line by line: follow it with tail -f
        for line in proc.stdout:
            now = time.time()
            f.write(f"{now - out['start']:9.2f} {line}")
            m = re.search(r"(\d+) trials? at a time", line)
            if m and out["concurrent"] is None:
                out["concurrent"] = int(m.group(1))
            if line.startswith("searching alpha") and out["tune_start"] is None:
                out["tune_start"] = now
                m = re.search(r"the next (\d+ trials|trial) starts? up while", line)
                out["ahead"] = 0 if m is None else 1 if m.group(1) == "trial" else int(m.group(1).split()[0])
    out["rc"] = proc.wait()
    out["end"] = time.time()
    if timer:
        timer.cancel()
    return out


# ------------------------------------------------------------------------------------------------ figures

def weighted(series: list, t0: float, t1: float, value) -> float:
    """Time-weighted mean of value(sample) over [t0, t1], each sample holding until the next."""
    acc = span = 0.0
    for (t, *rest), (t_next, *_) in itertools.pairwise(series):
        a, b = max(t, t0), min(t_next, t1)
        if b > a:
            acc += value((t, *rest)) * (b - a)
            span += b - a
    return acc / span if span else math.nan


def node_gaps(groups: dict, t0: float, t1: float) -> list[float]:
    """Seconds each node's GPU stood free between one placement group and the next, for gaps starting in
    [t0, t1]."""
    by_node: dict[str, list] = {}
    for g in groups.values():
        by_node.setdefault(g["node"], []).append((g["first"], g["last"]))
    gaps = []
    for spans in by_node.values():
        spans.sort()
        gaps += [b[0] - a[1] for a, b in itertools.pairwise(spans) if t0 <= a[1] <= t1 and b[0] > a[1]]
    return gaps


def figures(series: list, groups: dict, run: dict, gpus: int) -> dict:
    """The occupancy figures of one run (see the module doc)."""
    def busy(s):
        return s[1]

    t_start, t_end = run["start"], run["end"]
    tune_start = run["tune_start"] or t_start
    trial_groups = [g for g in groups.values() if g["first"] >= tune_start]
    last_placed = max((g["first"] for g in trial_groups), default=None)
    tune_end = max((g["last"] for g in trial_groups), default=t_end)
    full = next((s[0] for s in series if s[0] >= tune_start and s[1] >= gpus - 1e-6), None)
    steady = (full, last_placed) if full is not None and last_placed is not None and last_placed > full else None
    f = {"gpus": gpus, "wall_s": t_end - t_start, "tune_s": tune_end - tune_start,
         "mean_busy_sweep": weighted(series, t_start, t_end, busy),
         "mean_busy_tune": weighted(series, tune_start, tune_end, busy),
         "share_ge_n_minus_1_tune": weighted(series, tune_start, tune_end, lambda s: float(s[1] >= gpus - 1 - 1e-6)),
         "first_all_busy_s": None if full is None else full - t_start,
         "last_trial_placed_s": None if last_placed is None else last_placed - t_start,
         "tune_start_s": tune_start - t_start, "trial_worker_groups": len(trial_groups)}
    if steady:
        a, b = steady
        f.update(steady_s=b - a, mean_busy_steady=weighted(series, a, b, busy),
                 share_ge_n_minus_1_steady=weighted(series, a, b, lambda s: float(s[1] >= gpus - 1 - 1e-6)),
                 idle_waiting_steady=weighted(series, a, b, lambda s: min(gpus - s[1], s[2])),
                 idle_none_ready_steady=weighted(series, a, b, lambda s: max(0.0, gpus - s[1] - s[2])))
        gaps = node_gaps(groups, a, b)
        f.update(node_gaps_steady=len(gaps), node_gap_mean_s=sum(gaps) / len(gaps) if gaps else 0.0,
                 node_gap_max_s=max(gaps, default=0.0))
    return f


def trial_table(cache: Path, task: str) -> dict:
    """Counts and times from the sweep's trials.parquet (the head's copy)."""
    import pyarrow.parquet as pq

    found = sorted((cache / "runs" / "sweeps").glob(f"{task}-*/trials.parquet"))
    if not found:
        return {"trials": 0}
    rows = pq.read_table(found[-1]).to_pylist()
    status: dict[str, int] = {}
    for r in rows:
        status[r["status"]] = status.get(r["status"], 0) + 1
    train = [float(r["train_time_s"]) for r in rows if r.get("train_time_s") is not None
             and math.isfinite(float(r["train_time_s"]))]
    fit = [float(r["fit_time_s"]) for r in rows if r.get("fit_time_s") is not None
           and math.isfinite(float(r["fit_time_s"]))]
    return {"trials": len(rows), "status": status, "train_time_s_sum": sum(train),
            "fit_time_s_mean": sum(fit) / len(fit) if fit else math.nan, "trials_parquet": str(found[-1])}


def collect(sampler: Sampler, run: dict, gpus: int) -> dict:
    """The run's record: the search's, the figures, the time series and the GPU placement groups (seconds from
    the start of the search command)."""
    t0 = run["start"]
    groups = [{"node": g["node"][:8], "first_s": round(g["first"] - t0, 3), "last_s": round(g["last"] - t0, 3)}
              for g in sorted(sampler.groups.values(), key=lambda g: g["first"])]
    return {"search": run, "figures": figures(sampler.series, sampler.groups, run, gpus),
            "sample_errors": sampler.errors, "groups": groups, "lowest_free_gb": sampler.lowest_free_gb,
            "samples": len(sampler.series), "sample_spacing_s": (sampler.series[-1][0] - sampler.series[0][0])
            / (len(sampler.series) - 1) if len(sampler.series) > 1 else math.nan,
            "stopped_low_memory": sampler.stopped_low_memory,
            "series": [[round(t - t0, 3), b, p] for t, b, p, _ in sampler.series]}


def report(res: dict) -> None:
    f, n = res["figures"], res["nodes"]

    def num(key, fmt="{:.2f}"):
        v = f.get(key)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    t = res["trials"]
    status = ", ".join(f"{k} {v}" for k, v in t.get("status", {}).items())
    print(f"\n{res['task']}: {t.get('trials', 0)} trials ({status}) on {n} one-GPU nodes ({res['cpus_per_node']} CPUs "
          f"each), search exit {res['search']['rc']}")
    print(f"  concurrent trials the search chose: {res['search']['concurrent']}"
          f" (+ {res['search']['ahead']} started up ahead, waiting for a GPU)")
    print(f"  wall time: sweep command {num('wall_s', '{:.0f}')} s, Tune phase {num('tune_s', '{:.0f}')} s "
          f"(from {num('tune_start_s', '{:.0f}')} s); trial worker groups placed: {f['trial_worker_groups']}")
    print(f"  mean busy GPUs of {n}: whole sweep {num('mean_busy_sweep')}, Tune phase {num('mean_busy_tune')}, "
          f"steady state {num('mean_busy_steady')}")
    if f.get("steady_s") is None:
        print(f"  steady state: none (all {n} GPUs were never busy at once before the last trial was placed)")
    else:
        print(f"  steady state: from {num('first_all_busy_s', '{:.0f}')} s (all {n} busy) to "
              f"{num('last_trial_placed_s', '{:.0f}')} s (last trial placed), {num('steady_s', '{:.0f}')} s")
        print(f"  share of time with >= {n - 1} busy: steady state {num('share_ge_n_minus_1_steady')}, Tune phase "
              f"{num('share_ge_n_minus_1_tune')}")
        print(f"  idle GPUs in steady state (mean): {num('idle_waiting_steady')} while a worker group waited for "
              f"one, {num('idle_none_ready_steady')} while none waited; a node's GPU free between two worker "
              f"groups: {f['node_gaps_steady']} times, mean {num('node_gap_mean_s', '{:.1f}')} s, max "
              f"{num('node_gap_max_s', '{:.1f}')} s")
    print(f"  samples: {res['samples']}, one every {res['sample_spacing_s']:.2f} s on average; machine memory "
          f"available at its lowest: {res['lowest_free_gb']:.1f} GB"
          f"{' (the search was interrupted: --min-free-gb)' if res['stopped_low_memory'] else ''}")
    print(f"results: {res['json']}")


# ------------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python bench/gpu_occupancy.py", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=8, help="worker nodes, one GPU each (default 8)")
    ap.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs each node declares (default 2)")
    ap.add_argument("--num-samples", type=int, default=100, help="trials of the sweep (default 100)")
    ap.add_argument("--task", default="maze2d-umaze", help="the sweep's task (default maze2d-umaze)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default 0.5)")
    ap.add_argument("--timeout", type=float, default=0, help="seconds before the search is killed (0: none)")
    ap.add_argument("--min-free-gb", type=float, default=2.0,
                    help="interrupt the search where the machine's available memory falls below this (default 2)")
    ap.add_argument("--out", default="", help="output folder, outside the repository (default: a new temporary "
                                              "folder)")
    return ap


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = build_parser()
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    for name in ("nodes", "cpus_per_node", "num_samples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not args.interval > 0:
        ap.error(f"--interval {args.interval}: must be positive")
    if args.timeout < 0:
        ap.error(f"--timeout {args.timeout}: must be 0 (none) or positive")
    if args.out and Path(args.out).resolve().is_relative_to(REPO):
        ap.error(f"--out {args.out}: inside the repository; give a folder outside it")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    from ractd_ray.testcluster import MultiNodeCluster, skip_reason

    reason = skip_reason()
    if reason:
        return fail(f"the multi-node cluster cannot run here: {reason}")
    out = Path(args.out or tempfile.mkdtemp(prefix="ractd-gpu-occupancy-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    standin = write_standin(out / "standin")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(standin), *filter(None, os.environ.get("PYTHONPATH", "").split(
        os.pathsep))])
    os.environ["RACTD_STANDIN_GPU"] = "1"
    search = [sys.executable, str(REPO / "tune" / "search.py"), "--task", args.task, *DEFAULT_SEARCH_FLAGS,
              "--num-samples", str(args.num_samples), "--gpus-per-worker", "1", *extra]
    res = {"task": args.task, "nodes": args.nodes, "cpus_per_node": args.cpus_per_node,
           "num_samples": args.num_samples, "interval_s": args.interval, "command": search[1:],
           "json": str(out / "gpu_occupancy.json")}
    c = MultiNodeCluster(out / "cluster", workers=args.nodes, cpus_per_worker=args.cpus_per_node, gpus_per_worker=1)
    sampler = None
    try:
        print(f"starting {args.nodes} one-GPU nodes in {out / 'cluster'} ...", flush=True)
        c.start()
        import ray

        os.environ.update(c.env)
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        sampler = Sampler(args.interval, args.min_free_gb)
        sampler.start()
        print(f"running {' '.join(search[1:])} (log: {out / 'search.log'}) ...", flush=True)
        run = run_search(search, {**os.environ, **c.env}, c.root, out / "search.log", args.timeout, sampler)
        time.sleep(2 * args.interval)
        sampler.stop_event.set()
        sampler.join(timeout=30)
        res.update(collect(sampler, run, args.nodes), trials=trial_table(c.cache, args.task))
    finally:
        if sampler is not None:
            sampler.stop_event.set()
        try:
            import ray

            ray.shutdown()
        except Exception:
            pass
        c.stop()
    (out / "gpu_occupancy.json").write_text(json.dumps(res, indent=1))
    report(res)
    return 0 if res["search"]["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
