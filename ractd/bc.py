"""The behavior cloning baseline (training stage "bc"), CORL's recipe: an MLP (2 x 256, ReLU) from the normalized
state (maze2d: and goal) to the normalized action, trained with MSE by Adam at a constant learning rate; the final
policy is the one reported (best.pt follows the latest checkpoint). "10% BC" (CORL's any-percent BC) is the same on
the trajectories with the top 10% returns (`best_trajectories`), the baseline a return-aware method must beat on
mixed-quality data. maze2d BC is conditioned on the same information as the planner: the hindsight goal of its
training windows (`bc_goals`), not the data controller's target.

ractd.train runs it as one of its stages (`train(TrainConfig(stage="bc", ...))`): the loop, resuming and
checkpoints are the other stages'; this module holds what is BC's own: its data (`prepare_bc`), model
(`build_bc`), optimizer, step (`loss_terms`) and checkpoint rule (`selection_score`). At evaluation
ractd.policy.BCPolicy / BCGoalPolicy act with the model.
"""

from __future__ import annotations

import numpy as np
import torch

from ractd.data.prepared import Prepared, to_torch
from ractd.nets.mlp import BCActor
from ractd.tasks import Task
from ractd.train_config import TrainConfig


BC_GOALS = ("hindsight", "controller")


def bc_goals(data: dict, mode: str = "hindsight", horizon: int = 1) -> np.ndarray:
    """(N, 2) goal of every maze2d transition for goal-conditioned BC.

    hindsight (default): the position `horizon` - 1 steps later in the same segment (its last position where the
    segment ends sooner), segments as the planner's windows are cut (ractd.data.windows.maze_segments): the
    planner is conditioned on its training windows' last state, so BC gets the same information and no more.
    controller: the goal the data's controller was steering to (infos/goal, in D4RL's maze2d files and ours) --
    information the planner never sees; without infos/goal, the episode's last position."""
    from ractd.data.windows import episode_bounds, maze_segments

    if mode not in BC_GOALS:
        raise ValueError(f"bc goal {mode!r}: expected one of {', '.join(BC_GOALS)}")
    obs = np.asarray(data["observations"], np.float32)
    if mode == "controller" and "infos/goal" in data:
        return np.asarray(data["infos/goal"], np.float32)[:, :2]
    goals = np.empty((len(obs), 2), np.float32)
    if mode == "controller":
        for s, e in episode_bounds(data["terminals"], data["timeouts"]):
            goals[s:e] = obs[e - 1, :2]
        return goals
    for s, e in maze_segments(data):
        ahead = np.minimum(np.arange(s, e) + max(1, horizon) - 1, e - 1)
        goals[s:e] = obs[ahead, :2]
    return goals


def trajectory_returns(data: dict) -> tuple[list[tuple[int, int]], np.ndarray]:
    """(the trajectories' row bounds (start, end), their undiscounted returns): trajectories split on terminals |
    timeouts (ractd.data.windows.episode_bounds)."""
    from ractd.data.windows import episode_bounds

    bounds = episode_bounds(data["terminals"], data["timeouts"])
    rewards = np.asarray(data["rewards"], np.float64)
    return bounds, np.array([rewards[s:e].sum() for s, e in bounds])


def best_trajectories(data: dict, fraction: float) -> np.ndarray:
    """Rows of the trajectories whose (undiscounted) return is in the top `fraction` of the dataset's trajectories
    (at least one trajectory), in dataset order: CORL's "10% BC" with fraction 0.1. Trajectories split on
    terminals | timeouts (ractd.data.windows.episode_bounds). fraction 1: every row."""
    n = len(data["rewards"])
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction {fraction}: expected 0 < fraction <= 1")
    if fraction == 1.0:
        return np.arange(n)
    bounds, returns = trajectory_returns(data)
    keep = np.sort(np.argsort(-returns, kind="stable")[:max(1, int(fraction * len(bounds)))])
    return np.concatenate([np.arange(*bounds[k]) for k in keep])


def prepare_bc(task: Task, data: dict, fingerprint: str = "", top_fraction: float = 1.0,
               goal: str = "hindsight") -> Prepared:
    """Behavior cloning pairs, one per kept dataset transition: x (N, act_dim) normalized actions, cond (N, in_dim).

    top_fraction < 1 (locomotion): only the trajectories with the best returns (`best_trajectories`; CORL's
    "10% BC" is 0.1), normalizers fitted on them as CORL does. locomotion: cond = normalize(s) (obs_dim). maze2d
    (goal-conditioned, like the planner): cond = concat(normalize(s), normalize([gx, gy, 0, 0])) (2 * obs_dim) with
    g = `bc_goals(data, goal, task.horizon)`; at evaluation g is the fixed evaluation goal
    (ractd.policy.BCGoalPolicy). Normalizers "obs" and "action" are fitted on the kept transitions. The rows'
    episodes (a held-out split's unit): the dataset's episodes; maze2d: the segments the hindsight goals stay in."""
    from ractd.data.windows import Normalizer, episode_ids, maze_segments

    rows = best_trajectories(data, top_fraction)
    obs = np.asarray(data["observations"], np.float32)[rows]
    act = np.asarray(data["actions"], np.float32)[rows]
    norm = {"obs": Normalizer.fit(obs), "action": Normalizer.fit(act)}
    cond = norm["obs"].normalize(obs)
    if task.kind == "maze":
        g = np.zeros_like(obs)
        g[:, :2] = bc_goals(data, goal, task.horizon)[rows]
        cond = np.concatenate([cond, norm["obs"].normalize(g)], axis=1)
    if task.kind == "maze":  # segments as episodes: each closes where maze_segments ends one
        ends = np.zeros(len(data["rewards"]), bool)
        ends[np.asarray(maze_segments(data), np.int64).reshape(-1, 2)[:, 1] - 1] = True
        episodes = episode_ids({"terminals": ends, "timeouts": np.zeros_like(ends)}, rows)
    else:
        episodes = episode_ids(data, rows)
    return Prepared(task, norm["action"].normalize(act).astype(np.float32), cond.astype(np.float32), norm,
                    fingerprint=fingerprint, **episodes)


def build_bc(cfg: TrainConfig, prep: Prepared) -> BCActor:
    return BCActor(prep.cond.shape[1], prep.shape_tail[0], cfg.bc_hidden)


def _constant_lr(step: int) -> float:
    return 1.0


def optimizer(cfg: TrainConfig, model: BCActor):
    """(optimizer, scheduler): Adam with its default betas at the constant rate cfg.lr (CORL's BC)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _constant_lr)


def loss_terms(model: BCActor, prep: Prepared, idx, device) -> dict:
    """{"loss": MSE of the predicted normalized actions of the batch `idx`} (CORL's BC)."""
    pred = model(to_torch(prep.cond, idx, device))
    return {"loss": (pred - to_torch(prep.x, idx, device)).pow(2).mean()}


def selection_score(step: int) -> float:
    """Model selection score of a BC checkpoint (lower is better): CORL reports BC's final policy, so best.pt
    follows the latest checkpoint (selecting by the training loss picked a policy at 1.1 beside 10.8 final)."""
    return -float(step)
