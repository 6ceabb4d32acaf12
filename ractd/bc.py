"""The behavior cloning baseline (training stage "bc"), CORL's recipe: an MLP (2 x 256, ReLU) from the normalized
state (maze2d: and goal) to the normalized action, trained with MSE by Adam at a constant learning rate; the final
policy is the one reported (best.pt follows the latest checkpoint).

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


def bc_goals(data: dict) -> np.ndarray:
    """(N, 2) goal of every maze2d transition for goal-conditioned BC: the goal the data's controller was steering
    to (infos/goal, D4RL's maze2d files and ours have it), else in hindsight the position of the episode's last
    state (episodes split on terminals | timeouts, ractd.data.windows)."""
    from ractd.data.windows import episode_bounds

    if "infos/goal" in data:
        return np.asarray(data["infos/goal"], np.float32)[:, :2]
    obs = np.asarray(data["observations"], np.float32)
    goals = np.empty((len(obs), 2), np.float32)
    for s, e in episode_bounds(data["terminals"], data["timeouts"]):
        goals[s:e] = obs[e - 1, :2]
    return goals


def prepare_bc(task: Task, data: dict, fingerprint: str = "") -> Prepared:
    """Behavior cloning pairs, one per dataset transition: x (N, act_dim) normalized actions, cond (N, in_dim).

    locomotion: cond = normalize(s) (obs_dim). maze2d (goal-conditioned, like the planner): cond =
    concat(normalize(s), normalize([gx, gy, 0, 0])) (2 * obs_dim) with g = `bc_goals(data)`; at evaluation g is
    the fixed evaluation goal (ractd.policy.BCGoalPolicy). Normalizers "obs" and "action" are fitted on the whole
    dataset, as ractd.train.prepare fits them for the diffusion models."""
    from ractd.data.windows import Normalizer

    obs = np.asarray(data["observations"], np.float32)
    act = np.asarray(data["actions"], np.float32)
    norm = {"obs": Normalizer.fit(obs), "action": Normalizer.fit(act)}
    cond = norm["obs"].normalize(obs)
    if task.kind == "maze":
        goal = np.zeros_like(obs)
        goal[:, :2] = bc_goals(data)
        cond = np.concatenate([cond, norm["obs"].normalize(goal)], axis=1)
    return Prepared(task, norm["action"].normalize(act).astype(np.float32), cond.astype(np.float32), norm,
                    fingerprint=fingerprint)


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
