"""The README's two quick commands on a 3-node cluster whose nodes share no disk, against the same commands on one
node: wall times and their ratio, and what each trial writes to the run's storage.

The cluster is the multi-node test suite's (ractd_ray/testcluster.py: a head with no CPUs, worker nodes in their own
mount namespaces with a private tmpfs over the cache directory, storage on a local S3 endpoint, moto's server);
it needs root, as those tests do. One node: a local Ray started by the commands themselves, with this
machine's CPUs (give the workers as many together, --workers x --cpus-per-worker, for a like-for-like ratio),
its run storage a local folder. Each side starts from an empty cache directory of its own, so both generate
the dataset and train the shared teacher.

    python bench/multinode.py [--task maze2d-umaze] [--workers 2] [--cpus-per-worker 1] [--out DIR]

Prints, per side, the wall time of `tune/search.py --task T --quick` and of `eval/reproduce_tables.py --quick`,
the ratio cluster / one node of each, and from the cluster's sweep: the bytes each trial stored in S3
(trials.parquet's stored_bytes) and the bucket's bytes by top-level folder. Writes <out>/multinode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commands(task: str) -> list[tuple[str, list[str]]]:
    return [("search", [sys.executable, str(REPO / "tune" / "search.py"), "--task", task, "--quick"]),
            ("tables", [sys.executable, str(REPO / "eval" / "reproduce_tables.py"), "--quick", "--tasks", task])]


def timed(argv: list[str], env: dict, cwd: Path, log: Path) -> float:
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(argv, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv[1:3])} exited {proc.returncode}; see {log}")
    return took


def trial_bytes(cache: Path, task: str) -> list[int]:
    import pyarrow.parquet as pq

    [trials] = list((cache / "runs" / "sweeps").glob(f"{task}-*/trials.parquet"))
    return [int(r["stored_bytes"]) for r in pq.read_table(trials).to_pylist()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="maze2d-umaze")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    ap.add_argument("--out", default="", help="default: a new temporary folder")
    args = ap.parse_args(argv)
    from ractd_ray.testcluster import MultiNodeCluster, skip_reason

    reason = skip_reason()
    if reason:
        print(f"error: the 3-node cluster cannot run here: {reason}", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="ractd-multinode-"))
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"task": args.task, "workers": args.workers, "cpus_per_worker": args.cpus_per_worker}

    c = MultiNodeCluster(out / "cluster", workers=args.workers, cpus_per_worker=args.cpus_per_worker)
    try:
        c.start()
        for name, argv_ in commands(args.task):
            result[f"cluster_{name}_s"] = timed(argv_, {**os.environ, **c.env}, c.root, out / f"cluster-{name}.log")
            print(f"cluster: {name} {result[f'cluster_{name}_s']:.0f} s", flush=True)
        result["trial_stored_bytes"] = trial_bytes(c.cache, args.task)
        by_folder: dict[str, int] = {}
        for key, o in c.objects().items():
            top = key.removeprefix(f"{c.prefix}/").split("/")[0] or "(prefix itself)"
            by_folder[top] = by_folder.get(top, 0) + o["Size"]
        result["s3_bytes_by_folder"] = by_folder
    finally:
        c.stop()

    one = out / "one-node"
    (one / "cache").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RACTD_STORAGE_PATH")}
    env.update(RACTD_CACHE_DIR=str(one / "cache"), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(REPO))
    result["one_node_cpus"] = os.cpu_count()
    for name, argv_ in commands(args.task):
        result[f"one_{name}_s"] = timed(argv_, env, one, out / f"one-{name}.log")
        print(f"one node: {name} {result[f'one_{name}_s']:.0f} s", flush=True)

    for name in ("search", "tables"):
        result[f"ratio_{name}"] = result[f"cluster_{name}_s"] / result[f"one_{name}_s"]
    (out / "multinode.json").write_text(json.dumps(result, indent=1))
    print(f"\n{args.task}, quick commands: 3 nodes ({args.workers} x {args.cpus_per_worker} CPUs, head 0) vs one "
          f"node ({result['one_node_cpus']} CPUs)")
    for name in ("search", "tables"):
        print(f"  {name}: cluster {result[f'cluster_{name}_s']:.0f} s, one node {result[f'one_{name}_s']:.0f} s, "
              f"ratio {result[f'ratio_{name}']:.2f}")
    b = result["trial_stored_bytes"]
    print(f"  bytes each trial stored in S3: {', '.join(f'{x / 1e6:.2f} MB' for x in b)}")
    print("  bucket by folder: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(by_folder.items())))
    print(f"results: {out / 'multinode.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
