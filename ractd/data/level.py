"""The data's own level: what the dataset's episodes score, as a baseline row beside the learned policies.

Locomotion. Episodes split on terminals | timeouts (ractd.data.windows.episode_bounds). Only complete episodes
count: one ended by `terminals` (the env terminated it) or by a timeout at the task's full episode length
(task.max_episode_steps, the env's TimeLimit) -- the same episodes an evaluation rollout would produce. An episode
ended by a timeout before that length was cut (a replay buffer taken mid-episode, a rollout dataset cut to its
exact size: ractd.data.generate_locomotion), and a trailing unflagged one is unfinished; both are left out and
counted (`n_excluded`), since their return is that of a shorter episode.

maze2d. The dataset is one continuous, never-reset trajectory of a waypoint controller that steers to random
goals (D4RL's recipe); its "episodes" are goal segments of varying length scored against their own goals, which
the evaluation never sees. Its level on the evaluation task is measured instead on consecutive, non-overlapping
windows of task.max_episode_steps steps of that trajectory, each scored as an evaluation episode is: reward 1 at
each step whose next position lies within 0.5 of the fixed evaluation goal (ractd.rollout.maze_sparse_reward),
normalized with the task's D4RL reference scores. The trailing partial window (and the last transition, which
has no next position) are left out. Unlike an evaluation episode, a window starts wherever the trajectory is,
not at a uniformly drawn free cell, and the controller steers to its own goal, not the evaluation goal: this row
is how often the data sits at the goal, not a policy's success rate.

Behavior policy (`behavior_evals`): where ractd.data.generate_locomotion made the file, its metadata records
each SAC policy's evaluation (mean return of the recipe's `eval_episodes` stochastic episodes at the policy's
step; no spread is stored). Listed for the policies the split's data comes from: medium (medium, and the policy
medium-replay's replay ends with), medium and expert (medium-expert), expert.
"""

from __future__ import annotations

import json

import numpy as np

from ractd.tasks import Task


def data_level(task: Task, data: dict) -> dict:
    """The dataset's level (module doc): {"index" (episode or window index in dataset order), "returns",
    "scores" (normalized), "lengths", "terminated" (bool per kept episode), "n_episodes" (all episodes or
    windows), "n_excluded", "rule" (one line saying what was counted)}; the arrays hold the kept episodes."""
    if task.kind == "maze":
        return _maze_level(task, data)
    from ractd.data.windows import episode_bounds

    rew = np.asarray(data["rewards"], np.float64)
    term, tout = np.asarray(data["terminals"], bool), np.asarray(data["timeouts"], bool)
    bounds = episode_bounds(term, tout)
    keep = [(i, s, e) for i, (s, e) in enumerate(bounds)
            if term[e - 1] or (tout[e - 1] and e - s == task.max_episode_steps)]
    returns = np.array([rew[s:e].sum() for _, s, e in keep], np.float64)
    return {"index": np.array([i for i, _, _ in keep], np.int64), "returns": returns,
            "scores": np.asarray(task.normalized_score(returns), np.float64),
            "lengths": np.array([e - s for _, s, e in keep], np.int64),
            "terminated": np.array([bool(term[e - 1]) for _, _, e in keep], bool),
            "n_episodes": len(bounds), "n_excluded": len(bounds) - len(keep),
            "rule": f"complete episodes: ended by terminals or by a timeout at {task.max_episode_steps} steps; "
                    "episodes cut short by a timeout, and an unfinished last one, are left out"}


def _maze_level(task: Task, data: dict) -> dict:
    from ractd.maze import eval_goal
    from ractd.rollout import maze_sparse_reward

    length = int(task.max_episode_steps)
    obs = np.asarray(data["observations"], np.float64)
    # reward of step t: the position after it, obs[t + 1] (the trajectory is never reset)
    r = maze_sparse_reward(obs[1:, :2], eval_goal(task))
    n = len(r) // length
    returns = r[:n * length].reshape(n, length).sum(axis=1)
    return {"index": np.arange(n, dtype=np.int64), "returns": returns,
            "scores": np.asarray(task.normalized_score(returns), np.float64),
            "lengths": np.full(n, length, np.int64), "terminated": np.zeros(n, bool),
            "n_episodes": n + int(len(r) % length > 0), "n_excluded": int(len(r) % length > 0),
            "rule": f"consecutive {length}-step windows of the continuous trajectory scored against the evaluation "
                    "goal; the trailing partial window is left out"}


POLICIES_OF_SPLIT = {"medium": ("medium",), "medium-replay": ("medium",), "medium-expert": ("medium", "expert"),
                     "expert": ("expert",), "random": ("random",)}


def behavior_evals(task: Task, data: dict) -> list[dict]:
    """[{"policy", "step", "eval_return", "normalized", "episodes"}] from a generated file's metadata (module doc);
    [] for files without it (D4RL downloads, maze data)."""
    meta = {k[len("metadata/"):]: v for k, v in data.items() if k.startswith("metadata/")}
    try:
        episodes = int(json.loads(meta.get("recipe_json", "{}")).get("eval_episodes", 0))
    except (TypeError, ValueError):
        episodes = 0
    out = []
    for which in POLICIES_OF_SPLIT.get(getattr(task, "split", "") or "", ()):
        if f"{which}_policy_eval_return" in meta:
            ret = float(meta[f"{which}_policy_eval_return"])
            out.append({"policy": which, "step": int(meta.get(f"{which}_policy_step", -1)), "eval_return": ret,
                        "normalized": float(task.normalized_score(ret)), "episodes": episodes})
    return out
