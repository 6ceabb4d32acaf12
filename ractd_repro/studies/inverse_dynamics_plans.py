"""maze2d: how well each tracker follows a plan, on plans that are dynamically feasible (dataset windows) and on
the models' plans (teacher Heun-80, one-step student), before a verdict on the inverse dynamics model (paper
Sec. 4.2; claim 7 of docs/results.md).

Trackers (ractd.policy.MazePlanner.track and ractd.inverse_dynamics.InverseDynamics):
  pd          Diffuser's PD rule toward waypoint t + 1 from the observed state (the project's default)
  id_closed   the inverse dynamics model a = f(observed s_t, waypoint t + 1) (InverseDynamics.track)
  id_open     the paper's reading, a = f(plan[t], plan[t + 1]) whatever the observed state (track_plan)
  data        (dataset windows only) the dataset's own actions replayed: the floor, how exactly the env
              reproduces the data from a set state

Dataset windows: --windows windows of H + 1 consecutive states of the dataset (H = the task's planning horizon),
the env set to the window's first state (position and velocity), each tracker driving it along the window for H
steps. Model plans: the env reset as the evaluation resets it (seeds 0..--seeds-1), the model plans once, each
tracker follows the plan for H steps. Printed per source and tracker: the mean position error to the planned
state over the H steps and at the last one (mean ± SE over windows or seeds), and for model plans the
normalized score of the full episode (ractd.evaluate.evaluate_checkpoint, same seeds).

    python -m ractd_repro.studies.inverse_dynamics_plans [--task maze2d-umaze] [--teacher T.pt] [--student S.pt]

Defaults: the teacher and the lambda_denoiser student of training seed 0 of ractd_repro.studies.dsm_forms (its cache
folder), the inverse dynamics model of ractd.inverse_dynamics.default_path (trained when missing).
Writes <out>/tracking.parquet (one row per source, tracker, window or seed).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from ractd import RactdError
from ractd.io import atomic_parquet
from ractd.paths import cache_dir

TRACKERS = ("pd", "id_closed", "id_open")


def tracking_error(task, starts: np.ndarray, plans: np.ndarray, act) -> np.ndarray:
    """Drive one env per row from the state `starts[i]` (D4RL frame, (n, 4)) with act(plan, obs, t) -> (n, 2)
    D4RL actions for H = plans.shape[1] - 1 steps; returns (n, H) position errors |pos_{t+1} - plan[t + 1, :2]|."""
    from ractd.maze import d4rl_to_pointmaze, maze_map
    from ractd.rollout import env_obs_to_d4rl, make_env

    shape = maze_map(task).shape
    n, h = plans.shape[0], plans.shape[1] - 1
    envs = [make_env(task, h + 1) for _ in range(n)]
    obs = np.asarray(starts, np.float64).copy()
    err = np.zeros((n, h))
    try:
        for i, env in enumerate(envs):
            env.reset(seed=i)
            env.unwrapped.point_env.set_state(d4rl_to_pointmaze(obs[i, :2], shape),
                                              d4rl_to_pointmaze(obs[i, 2:], shape, vector=True))
        for t in range(h):
            a = d4rl_to_pointmaze(act(plans, obs, t), shape, vector=True)
            for i, env in enumerate(envs):
                o, *_ = env.step(a[i])
                obs[i] = env_obs_to_d4rl(o["observation"], shape)
            err[:, t] = np.linalg.norm(obs[:, :2] - plans[:, t + 1, :2], axis=1)
    finally:
        for env in envs:
            env.close()
    return err


def dataset_windows(data: dict, h: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k windows (k, h + 1, 4) of consecutive states within one episode, and their actions (k, h, 2)."""
    from ractd.data.windows import episode_bounds

    obs, act = np.asarray(data["observations"], np.float64), np.asarray(data["actions"], np.float64)
    starts = [s + j for s, e in episode_bounds(np.asarray(data["terminals"], bool), np.asarray(data["timeouts"], bool))
              for j in range(0, e - s - h - 1)]
    if not starts:
        raise RactdError(f"no dataset window of {h + 1} states")
    pick = np.random.default_rng(seed).choice(starts, size=min(k, len(starts)), replace=False)
    return np.stack([obs[i:i + h + 1] for i in pick]), np.stack([act[i:i + h] for i in pick])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="maze2d-umaze")
    ap.add_argument("--scale", default="small")
    dsm = cache_dir() / "bench" / "dsm" / "maze2d-umaze-small"
    ap.add_argument("--teacher", default=str(cache_dir() / "bench" / "eq4" / "maze2d-umaze-small" / "paper-seed0"
                                             / "teacher" / "best.pt"))
    ap.add_argument("--student", default=str(dsm / "lambda_denoiser-seed0" / "student" / "best.pt"))
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--out", default=str(cache_dir() / "bench" / "inverse_dynamics"))
    args = ap.parse_args(argv)
    from ractd.errors import run_command

    return run_command(lambda: run(args))


def run(args) -> int:
    import pandas as pd

    from ractd.data.d4rl import load_dataset
    from ractd.evaluate import evaluate_checkpoint, policy_from_checkpoint
    from ractd.inverse_dynamics import (
        InverseDynamics,
        default_path,
        train_inverse_dynamics,
    )
    from ractd.policy import MazePlanner
    from ractd.rollout import evaluation_plans
    from ractd.tasks import get_task

    task = get_task(args.task)
    if task.kind != "maze":
        raise RactdError(f"{task.name} is not a maze task")
    data = load_dataset(task, scale=args.scale)
    id_path = default_path(task.name, args.scale)
    model = InverseDynamics.load(id_path) if id_path.is_file() else train_inverse_dynamics(data, out=id_path)
    trackers = {"pd": MazePlanner.track, "id_closed": model.track, "id_open": model.track_plan}
    h = task.horizon - 1
    rows = []

    def add(source, tracker, err, score=None):
        for i, e in enumerate(err):
            rows.append({"source": source, "tracker": tracker, "index": i, "mean_error": float(e.mean()),
                         "last_error": float(e[-1]), "score": float("nan") if score is None else float(score[i])})

    windows, actions = dataset_windows(data, h, args.windows)
    add("data windows", "data", tracking_error(task, windows[:, 0], windows, lambda p, o, t: actions[:, t]))
    for name, fn in trackers.items():
        add("data windows", name, tracking_error(task, windows[:, 0], windows, fn))
    print(f"data windows done ({len(windows)} of {h + 1} states)", flush=True)

    seeds = list(range(args.seeds))
    for source, sampler, ckpt in (("teacher Heun-80", "heun", args.teacher), ("student", "student", args.student)):
        if not Path(ckpt).is_file():
            print(f"skipped {source}: no checkpoint {ckpt}", flush=True)
            continue
        planner, _, _ = policy_from_checkpoint(ckpt, sampler)
        starts, plans = evaluation_plans(task, planner, seeds)
        plans = np.asarray(plans, np.float64)[:, :h + 1]
        for name, fn in trackers.items():
            tracker = {"pd": "pd", "id_closed": "inverse_dynamics", "id_open": "inverse_dynamics_plan"}[name]
            try:
                score = [r["normalized_score"] for r in _episodes(evaluate_checkpoint, args, sampler, ckpt, tracker,
                                                                  id_path, seeds)]
            except RactdError as e:
                print(f"{source} {name}: no score ({e})", flush=True)
                score = None
            add(source, name, tracking_error(task, starts, plans, fn), score)
        print(f"{source} done", flush=True)

    out = Path(args.out)
    df = pd.DataFrame(rows)
    atomic_parquet(out / "tracking.parquet", df)
    print("\n".join(tracking_report(df)))
    print(f"\nstore: {out / 'tracking.parquet'}")
    return 0


def _episodes(evaluate_checkpoint, args, sampler, ckpt, tracker, id_path, seeds):
    import pyarrow.parquet as pq

    from ractd.evaluate import EvalConfig

    path = Path(args.out) / f"eval-{sampler}-{tracker}.parquet"
    evaluate_checkpoint(EvalConfig(task=args.task, sampler=sampler, checkpoint=str(ckpt), tracker=tracker, inverse_dynamics=str(id_path), out=str(path)), seeds=seeds, progress=False)
    return pq.read_table(path).to_pylist()


# ---------------------------------------------------------------------------------------------- report

STUDY = "ractd_repro.studies.inverse_dynamics_plans"
STORE = "inverse_dynamics"


def section(data: Path) -> list[str]:
    """docs/results.md's part for this study: one block per <data>/inverse_dynamics/<task>-<scale>/tracking.parquet."""
    import pandas as pd

    parts = []
    for f in sorted((Path(data) / STORE).glob("*/tracking.parquet")):
        parts += [f"### maze2d trackers on feasible and on planned paths ({STUDY}): {f.parent.name}", "",
                  "pd: Diffuser's PD rule; id_closed: the inverse dynamics model from the observed state to the next "
                  "waypoint; id_open: from consecutive planned states (the paper's reading); data: the dataset's own "
                  "actions. Dataset windows are feasible paths (the env set to each window's first state); the "
                  "teacher's and the student's plans are followed from the evaluation's start states. Position "
                  "error in maze units (one cell = 1).", "", *tracking_report(pd.read_parquet(f)), ""]
    return parts


def tracking_report(df) -> list[str]:
    """Markdown table of this study's rows: per plan source and tracker, the mean position
    error to the planned state over the plan and at its last step, and the episode score (mean ± SE)."""
    from tabulate import tabulate

    def ms(x, digits):
        x = np.asarray(x, float)
        return f"{x.mean():.{digits}f} ± {x.std(ddof=1) / math.sqrt(len(x)):.{digits}f}" if len(x) > 1 else ""

    table = [[source, tracker, ms(g["mean_error"], 3), ms(g["last_error"], 3), ms(g["score"].dropna(), 1), len(g)]
             for (source, tracker), g in df.groupby(["source", "tracker"], sort=False)]
    return [tabulate(table, headers=["plan", "tracker", "mean position error", "error at the last step", "score",
                                     "n"], tablefmt="github", disable_numparse=True)]


if __name__ == "__main__":
    sys.exit(main())
