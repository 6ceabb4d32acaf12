"""Benchmark: wall time and peak memory of locomotion dataset generation (ractd.data.generate_locomotion).

Each task runs in its own subprocess (one torch thread), so its peak RSS is its own. Before each task the
script records which behavior policies were already cached (ractd.paths.cache_dir()/"behavior"/...): a run
that reuses cached policies only records rollouts, one that does not trains SAC first. Results print as a table
and, with --json, are written as a list of records.

    python bench/bench_locomotion.py                       # small: hopper-medium-replay, walker2d-medium-expert
    python bench/bench_locomotion.py --tasks hopper-medium-replay --scale tiny --json /tmp/bench.json

Run it from any folder (HalfCheetah writes MUJOCO_LOG.TXT into the cwd); the default cache is the user's cache
($RACTD_CACHE_DIR), so a second run measures the cached path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, logging, resource, sys, time
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from ractd.tasks import get_task
from ractd.data.generate_locomotion import BehaviorCache, generate_locomotion
from ractd.data.d4rl import read_metadata
name, scale, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
task = get_task(name)
cache = BehaviorCache(task.env_id, scale, seed)
cached = {w: cache.policy_path(w).is_file() for w in ("medium", "expert")}
t0 = time.perf_counter()
path = generate_locomotion(task, scale=scale, seed=seed)
wall = time.perf_counter() - t0
meta = read_metadata(path)
keys = ("n_transitions", "n_episodes", "return_min", "return_median", "return_max", "normalized_min",
        "normalized_median", "normalized_max", "medium_policy_step", "medium_policy_eval_return",
        "expert_policy_step", "expert_policy_eval_return")
rec = {"task": name, "scale": scale, "seed": seed, "wall_s": wall, "cached_before": cached,
       "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "path": str(path),
       **{k: meta.get(k) for k in keys}}
print("BENCH " + json.dumps(rec), flush=True)
"""


def run_one(task: str, scale: str, seed: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, task, scale, str(seed)], text=True,
                          stdout=subprocess.PIPE, stderr=None,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{task}: generation failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("BENCH "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["hopper-medium-replay", "walker2d-medium-expert"])
    p.add_argument("--scale", default="small", choices=("tiny", "small", "full"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the records here")
    args = p.parse_args(argv)
    records = [run_one(t, args.scale, args.seed) for t in args.tasks]
    print(f"{'task':28} {'scale':6} {'wall s':>8} {'peak MiB':>9} {'cached':>14} {'N':>8} {'eps':>5} "
          f"{'return min/med/max':>24} {'normalized min/med/max':>24}")
    for r in records:
        cached = ",".join(k for k, v in r["cached_before"].items() if v) or "none"
        print(f"{r['task']:28} {r['scale']:6} {r['wall_s']:8.1f} {r['peak_rss_mib']:9.0f} {cached:>14} "
              f"{r['n_transitions']:8d} {r['n_episodes']:5d} "
              f"{r['return_min']:8.1f}/{r['return_median']:7.1f}/{r['return_max']:7.1f} "
              f"{r['normalized_min']:8.1f}/{r['normalized_median']:7.1f}/{r['normalized_max']:7.1f}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
