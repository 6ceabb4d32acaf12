"""maze2d: what a planner's plans look like, beside the dataset's own paths -- why a maze row scores what it does.

A maze2d planner plans once per episode (ractd.policy.MazePlanner) and a PD rule tracks the plan; a plan through
walls cannot be followed. For one checkpoint (the teacher by default, --sampler heun --nfe 80 as the tables
evaluate it) this plans from the evaluation resets of seeds 0 .. --seeds - 1 toward D4RL's evaluation goal and
measures each plan; --windows windows of the same horizon cut from the dataset (ractd.data.windows.maze_windows) are
measured alike, the reference a trained planner should reach. Per plan or window:

  wall_share   the share of its states whose position lies in a wall cell of the maze (or outside it)
  end_to_goal  the distance of its last position from the evaluation goal (plans; NaN for dataset windows)
  min_to_goal  the smallest distance of any of its positions from the evaluation goal (plans)
  step_mean    the mean distance between consecutive positions (the dataset moves a few hundredths a step)
  step_max     the largest such distance

    python -m ractd_repro.studies.maze_plans --task maze2d-large --checkpoint RUN/teacher/best.pt [--label L]
    python -m ractd_repro.studies.maze_plans --report --out docs/results/twelve/plans/maze2d-large-small

Writes <out>/plans.parquet (default <cache>/bench/plans/<task>-<scale>), one row per (model, source, index) with
the checkpoint's identity in the results store (ractd_repro.store.checkpoint_hash; "" for dataset windows), a
model's rows replaced when it is measured again. The label defaults to the checkpoint's stage with its training
steps and batch ("teacher 3000 x 256"), so plans of teachers trained differently sit side by side.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from ractd import RactdError
from ractd.errors import run_command
from ractd.io import atomic_parquet
from ractd_repro.claims import mean_se
from ractd_repro.studies import add_store_args, task_store

STORE = "plans"
KEY = ("task", "model", "source", "index")
METRICS = ("wall_share", "end_to_goal", "min_to_goal", "step_mean", "step_max")


def plan_metrics(xy: np.ndarray, grid: np.ndarray, goal: np.ndarray | None) -> dict:
    """The measures of one plan or window: xy (H, 2) D4RL positions, grid (L, W) 1 = wall (ractd.maze.maze_map),
    goal (2,) or None (then end_to_goal and min_to_goal are NaN). A position lies in cell round(xy + 0.2)
    (ractd.maze's D4RL geometry); outside the grid counts as wall."""
    from ractd.maze import D4RL_CELL_OFFSET

    xy = np.asarray(xy, np.float64)
    cells = np.rint(xy + D4RL_CELL_OFFSET).astype(np.int64)
    inside = (cells >= 0).all(axis=1) & (cells[:, 0] < grid.shape[0]) & (cells[:, 1] < grid.shape[1])
    wall = np.ones(len(xy), bool)
    wall[inside] = grid[cells[inside, 0], cells[inside, 1]] != 0
    steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    to_goal = np.linalg.norm(xy - np.asarray(goal, np.float64), axis=1) if goal is not None else None
    return {"wall_share": float(wall.mean()),
            "end_to_goal": float(to_goal[-1]) if to_goal is not None else math.nan,
            "min_to_goal": float(to_goal.min()) if to_goal is not None else math.nan,
            "step_mean": float(steps.mean()) if len(steps) else math.nan,
            "step_max": float(steps.max()) if len(steps) else math.nan}


def model_label(config: dict) -> str:
    """"<stage> <steps> x <batch>" of a checkpoint's training config."""
    return f"{config.get('stage', 'model')} {config.get('steps', '?')} x {config.get('batch', '?')}"


def model_plans(checkpoint: str, seeds: int, sampler: str, nfe: int) -> tuple[object, np.ndarray, dict]:
    """(task, plans (seeds, H, obs_dim) unnormalized D4RL states, the checkpoint's config): the planner's one plan
    per evaluation reset of seeds 0 .. seeds - 1 toward the evaluation goal (ractd.rollout.evaluation_plans)."""
    from ractd.checkpoint import load_checkpoint
    from ractd.evaluate import policy_from_checkpoint
    from ractd.rollout import evaluation_plans

    planner, task, _ = policy_from_checkpoint(checkpoint, sampler=sampler, nfe=nfe or None)
    if task.kind != "maze":
        raise RactdError(f"{checkpoint}: a {task.name} checkpoint; maze plans need a maze2d one")
    _, plans = evaluation_plans(task, planner, range(seeds))
    return task, plans, load_checkpoint(Path(checkpoint))["config"]


def window_rows(task, scale: str, n: int, seed: int = 0) -> list[dict]:
    """The measures of n windows of the task's horizon cut at random from its dataset (source "data")."""
    from ractd.data.d4rl import load_dataset
    from ractd.data.windows import maze_windows
    from ractd.maze import maze_map

    data = load_dataset(task, scale=scale)
    windows = maze_windows(data, task.horizon)
    pick = np.random.default_rng(seed).choice(len(windows["starts"]), size=min(n, len(windows["starts"])),
                                              replace=False)
    grid = maze_map(task)
    return [{"task": task.name, "model": "dataset windows", "source": "data", "index": int(i), "checkpoint": "",
             **plan_metrics(w[:, :2], grid, None)} for i, w in zip(pick, windows["states"][pick])]


def teacher_evidence(plans: list[dict], task: str, checkpoint: str) -> str:
    """One clause on the plans of `checkpoint` (a store hash) of a maze task beside the dataset's windows, "" when
    the store of plans has none of them."""
    mine = [r for r in plans if r["task"] == task and r.get("checkpoint") == checkpoint]
    data = [r for r in plans if r["task"] == task and r["source"] == "data"]
    if not mine:
        return ""
    walls = np.mean([r["wall_share"] for r in mine])
    text = (f"its plans (n={len(mine)}, maze2d plans below) put {100 * walls:.1f}% of their states in wall cells, "
            f"{sum(r['wall_share'] > 0 for r in mine)} of {len(mine)} plans at least one")
    if data:
        text += f" (the dataset's windows of the same horizon: {100 * np.mean([r['wall_share'] for r in data]):.1f}%)"
    return text + f", and end {np.mean([r['end_to_goal'] for r in mine]):.2f} from the goal on average"


def summary_lines(rows: list[dict]) -> list[str]:
    """Markdown per task: each model's plans (and the dataset's windows), mean ± SE of every measure over its
    plans, and how many of its plans have any state in a wall."""
    from tabulate import tabulate

    def ms(v):
        v = np.asarray([x for x in v if x == x], np.float64)
        if not len(v):
            return "—"
        mean, se = mean_se(v)
        return f"{mean:.3f} ± {se:.3f}" if se == se else f"{mean:.3f}"

    lines = []
    for task in sorted({r["task"] for r in rows}):
        table = []
        for model in dict.fromkeys(r["model"] for r in rows if r["task"] == task):
            rs = [r for r in rows if r["task"] == task and r["model"] == model]
            table.append([model, rs[0]["source"], len(rs), sum(r["wall_share"] > 0 for r in rs),
                          *[ms([r[m] for r in rs]) for m in METRICS]])
        lines += [f"{task}: plans from the evaluation resets (seeds 0, 1, ...) toward the evaluation goal, and "
                  "windows of the same horizon from the dataset (mean ± SE over plans or windows)", "",
                  tabulate(table, headers=["model", "source", "n", "with a state in a wall", "share of states in "
                                           "walls", "end to goal", "closest to goal", "mean step", "largest step"],
                           tablefmt="github", disable_numparse=True), ""]
    return lines


def run(args) -> int:
    from ractd.tasks import get_task

    out, store, rows = task_store(args, STORE, "plans.parquet")
    if not args.report:
        if args.seeds < 2 or args.windows < 0:
            raise RactdError(f"--seeds must be at least 2 and --windows non-negative, got {args.seeds}, {args.windows}")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        new = []
        if args.checkpoint:
            from ractd.maze import eval_goal, maze_map

            task, plans, config = model_plans(args.checkpoint, args.seeds, args.sampler, args.nfe)
            if task.name != args.task:
                raise RactdError(f"{args.checkpoint} is a {task.name} checkpoint, not {args.task}")
            label = args.label or model_label(config)
            from ractd_repro.store import checkpoint_hash

            grid, goal, ck = maze_map(task), eval_goal(task), checkpoint_hash(args.checkpoint)
            new += [{"task": task.name, "model": label, "source": f"{args.sampler}-{args.nfe}", "index": i,
                     "checkpoint": ck, **plan_metrics(p[:, :2], grid, goal)} for i, p in enumerate(plans)]
        if args.windows:
            new += window_rows(get_task(args.task), args.scale, args.windows)
        if not new:
            raise RactdError("nothing to measure: give --checkpoint, or --windows > 0")
        models = {(r["task"], r["model"], r["source"]) for r in new}
        rows = [r for r in rows if (r["task"], r["model"], r["source"]) not in models] + new
        out.mkdir(parents=True, exist_ok=True)
        atomic_parquet(store, rows)
    print("\n".join(summary_lines(rows)))
    print(f"store: {store}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ractd.evaluate import EvalConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="maze2d-umaze", help="the maze task")
    ap.add_argument("--scale", default="small", help="the dataset scale (for --windows)")
    ap.add_argument("--checkpoint", default="", help="the planner's checkpoint (a teacher's best.pt, or a student's)")
    ap.add_argument("--label", default="", help="its name in the store (default: stage, steps x batch)")
    ap.add_argument("--sampler", default="heun", help="the sampler (ractd.evaluate; the tables' teacher: heun)")
    ap.add_argument("--nfe", type=int, default=80, help="its steps or bins (the tables' teacher: 80)")
    ap.add_argument("--seeds", type=int, default=EvalConfig.seeds, help="evaluation resets planned from")
    ap.add_argument("--windows", type=int, default=100, help="dataset windows measured (0: none)")
    add_store_args(ap, STORE, threads=0)
    args = ap.parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
