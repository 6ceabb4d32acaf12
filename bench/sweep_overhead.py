"""Ray's overhead in a sweep, from one run of a small sweep (ractd_ray.search.run_search) on a local Ray.

Prints the overhead ratio: sweep wall time / (sum of the trials' training time + one fixed start-up), where the
trials' training is the library's train() in each trial's Ray Train worker (trials.parquet: train_time_s) and the
fixed start-up is everything outside Tune (Ray, dataset, the shared teacher and reward model, the results) plus
the first trial's start-up (from its start to train() in its worker); the per-trial start-up on the critical path
((Tune's wall time - the sum of training) / trials: the trials train one at a time) and where a trial's start-up
goes (trials.parquet's startup_<stamp>_s, from the trial's start: fit() called, Ray Train's worker process
started, train loop entered, dataset fetched, teacher written, train() entered, first step done).

    python bench/sweep_overhead.py [--trials 3] [--trial-steps 400] [--batch 64] [--preset tiny] [--json PATH]

The dataset is a random-action hopper dataset of 3000 steps (ractd.data.generate_random: timing only). Everything
is written into a temporary cache folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

TASK = "hopper-medium-replay"


def run_sweep(root: Path, trials: int, trial_steps: int, batch: int, preset: str, **overrides) -> dict:
    """One sweep on the random hopper data; returns run_search's result plus the measured wall time."""
    from ractd.data.generate_random import random_locomotion_dataset
    from ractd_ray.search import SearchConfig, run_search

    random_locomotion_dataset(TASK, 3000, 0)
    cfg = SearchConfig(task=TASK, budget="quick", scale="tiny", source="local", preset=preset,
                       run_dir=str(root / "sweep"), num_samples=trials, steps=trial_steps, batch=batch,
                       teacher_steps=50, reward_steps=50, select_seeds=1, select_max_steps=50,
                       grace_period=100, **overrides)  # grace 100 checkpoints: no early stopping
    t0 = time.perf_counter()
    res = run_search(cfg)
    res["measured_wall_s"] = time.perf_counter() - t0
    return res


def overhead(res: dict) -> dict:
    """The figures of the module doc from run_search's result."""
    rows = sorted(res["trials"], key=lambda r: r["trial_id"])
    wall, tune_wall = res["measured_wall_s"], res["tune_wall_s"]
    train = [r["train_time_s"] for r in rows]
    outside = wall - tune_wall  # Ray, dataset, shared models, results
    # trials train one at a time: what of Tune's wall time is not training is start-up on the critical path
    per_trial = (tune_wall - sum(train)) / len(rows)
    # the first trial's start-up, from its start to train() in its worker: the shortest (a prestarted trial's
    # includes its wait for the trial that trains before it)
    first = min(r["startup_train_s"] for r in rows)
    fixed = outside + first
    stamps = ("fit", "process", "loop", "data", "inputs", "train", "first_step")
    return {"trials": len(rows), "wall_s": wall, "tune_wall_s": tune_wall, "outside_tune_s": outside,
            "startup_before_tune_s": res["startup_s"], "shared_train_s": res["shared"]["train_time_s"],
            "train_s": train, "trial_s": [r["trial_time_s"] for r in rows], "fit_s": [r["fit_time_s"] for r in rows],
            "per_trial_overhead_s": per_trial, "first_trial_startup_s": first, "fixed_s": fixed,
            "ratio": wall / (sum(train) + fixed), "ratio_every_startup": wall / (sum(train) + outside),
            "stamps": {k: [r.get(f"startup_{k}_s", math.nan) for r in rows] for k in stamps},
            "status": [r["status"] for r in rows]}


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in xs)


def report(o: dict) -> None:
    print(f"sweep of {o['trials']} trials: wall {o['wall_s']:.1f} s = outside Tune {o['outside_tune_s']:.1f} s "
          f"(Ray and dataset {o['startup_before_tune_s']:.1f} s, shared models' training {o['shared_train_s']:.1f} s, "
          f"results) + Tune {o['tune_wall_s']:.1f} s")
    print(f"  trials' training (train_time_s): {_fmt(o['train_s'])} s; fit(): {_fmt(o['fit_s'])} s; Tune time per "
          f"trial: {_fmt(o['trial_s'])} s ({', '.join(o['status'])})")
    print(f"  per-trial start-up on the critical path ((Tune wall - sum of training) / trials): "
          f"{o['per_trial_overhead_s']:.1f} s; the first trial's start-up (to train() in its worker): "
          f"{o['first_trial_startup_s']:.1f} s")
    names = {"fit": "fit() called", "process": "worker process started", "loop": "train loop entered",
             "data": "dataset fetched", "inputs": "teacher written", "train": "train() entered",
             "first_step": "first step done"}
    print("  where a trial's start-up goes (seconds from the trial's start, per trial; a prestarted trial's worker "
          "starts when the previous trial ends):")
    for k, label in names.items():
        print(f"    {label:<24} {_fmt(o['stamps'][k])}")
    print(f"  overhead ratio: wall / (sum of training + one fixed start-up {o['fixed_s']:.1f} s: outside Tune and the "
          f"first trial's) = {o['ratio']:.3f} (goal <= 1.1); wall / (sum of training + outside Tune) = "
          f"{o['ratio_every_startup']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=3, help="trials of the sweep")
    p.add_argument("--trial-steps", type=int, default=400, help="distillation steps per trial")
    p.add_argument("--batch", type=int, default=64, help="distillation batch")
    p.add_argument("--preset", default="tiny", help="U-Net preset of teacher and students")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ractd-sweep-overhead-"))
    os.environ["RACTD_CACHE_DIR"] = str(root / "cache")
    try:
        o = overhead(run_sweep(root, args.trials, args.trial_steps, args.batch, args.preset))
        report(o)
        if args.json:
            Path(args.json).write_text(json.dumps(o, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
