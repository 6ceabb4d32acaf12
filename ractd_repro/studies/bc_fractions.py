"""Behavior cloning on the best share of a task's trajectories: where imitating the whole dataset stops working.

Where every model trained on a whole dataset sits below the data's own level while BC on its best 10% does not,
the twelve-task document has to say why. This trains BC (CORL's recipe, ractd.bc, the cpu budget) on the best
--fractions of the dataset's trajectories by return (ractd.bc.best_trajectories; 1 = the whole dataset, the tables'
BC; 0.1 = their 10% BC) and evaluates each on seeds 0 .. --seeds - 1, beside what it was trained on:

  trajectories   how many trajectories the fraction keeps (of the dataset's)
  worst_kept     the normalized return of the worst kept trajectory
  random_kept    how many kept trajectories score at most --random-level normalized points (0 is D4RL's random
                 policy): behaviour that goes nowhere

A score that collapses only once the random-level trajectories are kept says what the whole-data imitators learn
from them; a score that rises smoothly with the fraction says the data is a mixture of levels and nothing more.

    python -m ractd_repro.studies.bc_fractions --task halfcheetah-medium-replay [--fractions 0.1 0.25 0.5 0.75 1]
    python -m ractd_repro.studies.bc_fractions --report --out docs/results/twelve/bc_fractions/halfcheetah-medium-replay-small

Writes <out>/scores.parquet (default <cache>/bench/bc_fractions/<task>-<scale>), one row per (fraction, seed) with
the dataset's fingerprint and the BC checkpoint's identity in the results store (ractd_repro.store.checkpoint_hash);
resumable: a fraction stored with every seed asked for is not redone, and a trained BC run is not retrained.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from ractd import RactdError
from ractd.errors import Parser, run_command
from ractd.io import atomic_parquet
from ractd_repro.claims import Z, mean_se
from ractd_repro.studies import add_store_args, task_store

STORE = "bc_fractions"
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
RANDOM_LEVEL = 5.0


def composition(task, data: dict, fraction: float, random_level: float = RANDOM_LEVEL) -> dict:
    """What BC on the best `fraction` of the trajectories is trained on: {"trajectories", "of", "worst_kept",
    "random_kept"} (of: the dataset's trajectories; worst_kept: the lowest normalized return kept; random_kept: the
    kept trajectories at most `random_level` normalized points)."""
    from ractd.bc import best_trajectories, trajectory_returns

    bounds, returns = trajectory_returns(data)
    kept = np.zeros(len(data["rewards"]), bool)
    kept[best_trajectories(data, fraction)] = True
    scores = np.array([task.normalized_score(r) for (s, _), r in zip(bounds, returns) if kept[s]])
    return {"trajectories": len(scores), "of": len(bounds), "worst_kept": float(scores.min()),
            "random_kept": int((scores <= random_level).sum())}


def bc_run(task: str, scale: str, fraction: float, out: Path, steps: int = 0) -> Path:
    """Train (or resume: a finished run returns at once) BC on the best `fraction`; its selected checkpoint."""
    from ractd.train import train
    from ractd.train_config import TrainConfig

    over = {"steps": steps} if steps else {}
    cfg = TrainConfig.for_stage("bc", "cpu", task=task, scale=scale, bc_top_fraction=fraction,
                                run_dir=str(out / "runs" / f"bc-f{fraction:g}"), **over).resolved()
    return Path(train(cfg)["best"])


def measure(args, fraction: float, data: dict, fingerprint: str, out: Path) -> list[dict]:
    """The rows of one fraction: BC trained on it, rolled out on seeds 0 .. args.seeds - 1."""
    import pandas as pd

    from ractd.evaluate import EvalConfig, evaluate_checkpoint
    from ractd.tasks import get_task
    from ractd_repro.store import checkpoint_hash

    task = get_task(args.task)
    ckpt = bc_run(args.task, args.scale, fraction, out, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp) / "eval.parquet"
        evaluate_checkpoint(EvalConfig(task=args.task, sampler="bc", checkpoint=str(ckpt), seeds=args.seeds,
                                       out=str(records)), progress=False)
        df = pd.read_parquet(records)
    comp = composition(task, data, fraction, args.random_level)
    ck = checkpoint_hash(ckpt)
    return [{"task": args.task, "fraction": float(fraction), "seed": int(r.seed),
             "normalized_score": float(r.normalized_score), "return": float(r["return"]),
             "random_level": float(args.random_level), "dataset": fingerprint, "checkpoint": ck, **comp}
            for _, r in df.iterrows()]


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per (task, fraction), fractions ascending: the composition and the score's mean, SE, n."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        for f in sorted({r["fraction"] for r in rows if r["task"] == task}):
            rs = [r for r in rows if r["task"] == task and r["fraction"] == f]
            mean, se = mean_se([r["normalized_score"] for r in rs])
            out.append({"task": task, "fraction": f, "mean": mean, "se": se, "n": len(rs),
                        **{k: rs[0][k] for k in ("trajectories", "of", "worst_kept", "random_kept", "random_level")}})
    return out


def summary_lines(rows: list[dict]) -> list[str]:
    """Markdown per task: BC's score per fraction beside what the fraction keeps."""
    from tabulate import tabulate

    lines = []
    summ = summary_rows(rows)
    for task in sorted({s["task"] for s in summ}):
        ss = [s for s in summ if s["task"] == task]
        table = [[f"{s['fraction']:g}", f"{s['trajectories']} of {s['of']}", f"{s['worst_kept']:.1f}",
                  s["random_kept"], f"{s['mean']:.1f} ± {s['se']:.1f}", s["n"]] for s in ss]
        lines += [f"{task}: BC (CORL's recipe, cpu budget) on the best share of the trajectories by return, rolled "
                  "out on evaluation seeds 0, 1, ... (normalized score, mean ± SE over seeds)", "",
                  tabulate(table, headers=["best share", "trajectories kept", "worst kept (normalized)",
                                           f"kept at most {ss[0]['random_level']:g} points (random level)",
                                           "BC score", "seeds"], tablefmt="github", disable_numparse=True), ""]
    return lines


def evidence(rows: list[dict], task: str) -> str:
    """One clause for the twelve-task document's teacher causes, "" when the task was not measured."""
    ss = [s for s in summary_rows(rows) if s["task"] == task]
    if not ss:
        return ""
    parts = [f"{s['fraction']:g}: {s['mean']:.1f} ± {s['se']:.1f} ({s['random_kept']} of {s['trajectories']} kept "
             "at the random level)" for s in reversed(ss)]
    text = (f"BC on the best share of its trajectories (n={ss[0]['n']} seeds each; BC on the best share below): "
            + "; ".join(parts))
    falls = [(a["mean"] - b["mean"], a, b) for a, b in zip(ss, ss[1:])]  # neighbouring shares, ascending
    drop, a, b = max(falls, key=lambda x: x[0], default=(0.0, None, None))
    if a is not None and drop > Z * math.hypot(a["se"], b["se"]):
        text += (f". The steepest fall between neighbouring shares: {a['mean']:.1f} at {a['fraction']:g} ("
                 f"{a['random_kept']} of {a['trajectories']} at the random level) to {b['mean']:.1f} at "
                 f"{b['fraction']:g} ({b['random_kept']} of {b['trajectories']})")
    return text


def run(args) -> int:
    from ractd.data.d4rl import load_dataset
    from ractd.data.prepared import dataset_fingerprint
    from ractd.tasks import get_task

    out, store, rows = task_store(args, STORE, "scores.parquet")
    if not args.report:
        if args.seeds < 2 or any(not 0 < f <= 1 for f in args.fractions):
            raise RactdError(f"--seeds must be at least 2 and each fraction in (0, 1], got {args.seeds}, "
                             f"{args.fractions}")
        if get_task(args.task).kind == "maze":
            raise RactdError(f"{args.task}: best trajectories by return are a locomotion baseline (10% BC)")
        import torch

        torch.set_num_threads(args.threads)
        data = load_dataset(get_task(args.task), scale=args.scale)
        fp = dataset_fingerprint(data)
        rows = [r for r in rows if not (r["task"] == args.task and r["dataset"] != fp)]  # a regenerated dataset
        for f in args.fractions:
            have = {r["seed"] for r in rows if r["task"] == args.task and r["fraction"] == f}
            if have >= set(range(args.seeds)):
                continue
            new = measure(args, f, data, fp, out)
            rows = [r for r in rows if not (r["task"] == args.task and r["fraction"] == f)] + new
            out.mkdir(parents=True, exist_ok=True)
            atomic_parquet(store, rows)
            print(f"fraction {f:g}: {mean_se([r['normalized_score'] for r in new])[0]:.1f}", flush=True)
    print("\n".join(summary_lines(rows)))
    print(f"store: {store}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="halfcheetah-medium-replay", help="a locomotion task")
    ap.add_argument("--scale", default="small", help="the dataset scale")
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS),
                    help="best shares of the trajectories (1 = the whole dataset)")
    ap.add_argument("--seeds", type=int, default=20, help="evaluation seeds per fraction")
    ap.add_argument("--steps", type=int, default=0, help="BC training steps (0 = the cpu budget's)")
    ap.add_argument("--random-level", type=float, default=RANDOM_LEVEL,
                    help="a trajectory at most this many normalized points counts as random-level")
    add_store_args(ap, STORE)
    args = ap.parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
