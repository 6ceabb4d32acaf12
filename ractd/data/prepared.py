"""A task's training arrays, normalized: `Prepared` (what every training stage samples its batches from) and the
diffusion models' windows (`prepare_windows`). ractd.train.prepare picks the stage's preparation (ractd.bc's
pairs for behavior cloning); `dataset_fingerprint` names the dataset a checkpoint was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch

from ractd.tasks import Task


@dataclasses.dataclass
class Prepared:
    """Normalized training arrays of one task (numpy, float32) and their normalizers.

    locomotion: x (N, c, act_dim) actions, cond (N, h * obs_dim), state (N, obs_dim), action (N, act_dim),
        rtg (N,). maze: x is a LazyWindows (N, H, obs_dim) of normalized states; cond (N, 2 * obs_dim).
    episode (N,) int64: the episode of each row (maze: its segment, ractd.data.windows.maze_segments), the unit
        ractd.holdout splits by (no row reads another episode's transitions); episode_lengths (E,): the
        transitions of every episode, also those with no row. None where not known (a checkpoint's shapes only).
    """

    task: Task
    x: object
    cond: np.ndarray
    normalizers: dict
    state: np.ndarray | None = None
    action: np.ndarray | None = None
    rtg: np.ndarray | None = None
    fingerprint: str = ""
    episode: np.ndarray | None = None
    episode_lengths: np.ndarray | None = None

    @property
    def shape_tail(self) -> tuple[int, int]:
        return tuple(self.x.shape[1:])


def dataset_fingerprint(data: dict) -> str:
    h = hashlib.sha256()
    for key in ("observations", "actions", "rewards"):
        arr = np.ascontiguousarray(data[key])
        h.update(key.encode())
        h.update(str(arr.shape).encode())
        h.update(arr[:: max(1, len(arr) // 4096)].tobytes())
    return h.hexdigest()[:16]


def prepare_windows(task: Task, data: dict, rtg: str = "paper", obs_history: int = 1, norms: dict | None = None,
                    fingerprint: str = "") -> Prepared:
    """Windows of the diffusion models, normalized to [-1, 1] by normalizers fitted on `data` (unless `norms`,
    e.g. a checkpoint's, are given: held-out data in a trained model's coordinates).

    rtg: the return-to-go target, "paper" or "code" (ractd.data.windows.rtg_settings); obs_history: h."""
    from ractd.data.windows import (
        Normalizer,
        episode_ids,
        locomotion_windows,
        maze_segments,
        maze_windows,
        rtg_settings,
    )

    if task.kind == "locomotion":
        gamma, penalty = rtg_settings(task, paper=rtg == "paper")
        w = locomotion_windows(data, horizon=task.horizon, obs_history=obs_history, gamma=gamma,
                               termination_penalty=penalty)
        norm = norms or {"obs": Normalizer.fit(data["observations"]), "action": Normalizer.fit(data["actions"]),
                         "rtg": Normalizer.fit(w["rtg"][:, None])}
        x = norm["action"].normalize(w["actions"]).astype(np.float32)
        obs = norm["obs"].normalize(w["obs"]).astype(np.float32)
        return Prepared(task, x, obs.reshape(len(obs), -1), norm,
                        state=norm["obs"].normalize(w["first_obs"]).astype(np.float32),
                        action=norm["action"].normalize(w["first_action"]).astype(np.float32),
                        rtg=norm["rtg"].normalize(w["rtg"][:, None])[:, 0].astype(np.float32),
                        fingerprint=fingerprint, **episode_ids(data))
    norm = norms or {"obs": Normalizer.fit(data["observations"])}
    observations = norm["obs"].normalize(np.asarray(data["observations"], np.float32)).astype(np.float32)
    # segments cut on the raw positions (the goal radius is in the maze's units), windows of normalized states
    w = maze_windows({**data, "observations": observations}, horizon=task.horizon, segments=maze_segments(data))
    cond = np.concatenate([w["start"], w["goal"]], axis=1)
    return Prepared(task, w["states"], cond, norm, fingerprint=fingerprint, episode=w["segment"],
                    episode_lengths=w["segment_lengths"])


def to_torch(a, idx, device) -> torch.Tensor:
    """Rows `idx` of a Prepared array as a tensor on `device` (a batch)."""
    return torch.from_numpy(np.ascontiguousarray(a[idx])).to(device)
