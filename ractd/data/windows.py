"""Training windows, return-to-go targets and the [-1, 1] normalizer.

Episodes: a transition with `terminals` or `timeouts` set closes its episode; the last transition of the dataset
closes one too. Windows never cross an episode boundary.

MuJoCo (closed-loop action chunks, paper Sec. 3 / Chi et al.): one window per dataset step i of an episode
[s, e): past states obs[i - h + 1 .. i] (h = obs_history) and future actions act[i .. i + c - 1] (c = horizon).
At episode edges the window is padded, as Chi et al. do: past states before s repeat the first state obs[s],
actions after e - 1 repeat the episode's last action act[e - 1]; `action_mask` marks the real ones.

Maze (open-loop state sequences, Diffuser): contiguous state windows of length H with (start, goal) = (first,
last) state of the window, no padding (Diffuser's use_padding=False): windows that would run past the segment
end are not made. Segments follow Diffuser's maze2d preprocessing: the (never reset) trajectory is cut where it
leaves the fixed evaluation goal (at goal at t, not at t + 1, threshold ractd.maze.REWARD_RADIUS = 0.5), plus
terminals.

Return-to-go (paper Sec. B.2): q_i = sum_k gamma^k r_{i+k} to the end of i's episode, with the early-termination
penalty added to the last reward of episodes that end by `terminals` (not timeouts). Paper: gamma per task
(task.gamma), penalty -100; the released code: gamma 0.99, no penalty (`rtg_settings(task, paper=False)`).
"""

from __future__ import annotations

import logging

import numpy as np

from ractd import RactdError
from ractd.maze import REWARD_RADIUS

log = logging.getLogger(__name__)


def episode_bounds(terminals, timeouts) -> list[tuple[int, int]]:
    """Half-open episode ranges [start, end) from terminals (N,) and timeouts (N,); the last transition closes
    an episode even if neither flag is set."""
    starts, ends = _bounds_arrays(np.asarray(terminals, bool) | np.asarray(timeouts, bool))
    return list(zip(starts.tolist(), ends.tolist()))


def _bounds_arrays(done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) int64 arrays of the episodes closed by `done` (N,) bool (and by the last step)."""
    n = len(done)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ends = np.flatnonzero(done) + 1
    if len(ends) == 0 or ends[-1] != n:
        ends = np.append(ends, n)
    starts = np.concatenate([[0], ends[:-1]])
    return starts.astype(np.int64), ends.astype(np.int64)


def rtg_settings(task, paper: bool = True) -> tuple[float, float]:
    """(gamma, termination_penalty) of the return-to-go target: the paper's (task.gamma, -100 for
    locomotion) or the released code's (0.99, 0)."""
    return (task.gamma, task.termination_penalty) if paper else (0.99, 0.0)


def return_to_go(rewards, terminals, timeouts, gamma: float, termination_penalty: float = 0.0) -> np.ndarray:
    """q_i = sum_{k=0}^{e-1-i} gamma^k r_{i+k} within i's episode [s, e); rewards, terminals, timeouts (N,).

    The penalty is added to r_{e-1} of episodes whose last transition has `terminals` set. Computed in float64
    by a reverse discounted cumulative sum per episode; returns float32 (N,).
    """
    from scipy.signal import lfilter

    r = np.asarray(rewards, dtype=np.float64).reshape(-1).copy()
    term = np.asarray(terminals, bool)
    starts, ends = _bounds_arrays(term | np.asarray(timeouts, bool))
    if termination_penalty:
        last = ends - 1
        r[last[term[last]]] += termination_penalty
    q = np.empty_like(r)
    for s, e in zip(starts, ends):
        # q_i = r_i + gamma q_{i+1}: a first-order IIR filter over the reversed episode.
        q[s:e] = lfilter([1.0], [1.0, -gamma], r[s:e][::-1])[::-1]
    return q.astype(np.float32)


class Normalizer:
    """Per-dimension min/max normalization of the last axis to [-1, 1]: y = 2 (x - min) / (max - min) - 1.

    Constant dimensions (max - min < eps) are only shifted, y = x - min (so they map to 0, no division by
    zero). Works on numpy arrays and torch tensors (same dtype/device out). state_dict() holds torch tensors
    so it saves with torch.save(weights_only=True) beside a model; from_state_dict() restores it.
    """

    def __init__(self, min, max, eps: float = 1e-6):
        self.min = np.asarray(min, dtype=np.float64).reshape(-1)
        self.max = np.asarray(max, dtype=np.float64).reshape(-1)
        if self.min.shape != self.max.shape:
            raise RactdError(f"normalizer min {self.min.shape} and max {self.max.shape} differ in shape")
        self.eps = float(eps)
        span = self.max - self.min
        const = span < eps
        self.scale = np.where(const, 1.0, 2.0 / np.where(const, 1.0, span))
        self.offset = np.where(const, -self.min, -1.0 - self.min * self.scale)
        self._torch_cache: dict = {}

    @classmethod
    def fit(cls, x, eps: float = 1e-6) -> "Normalizer":
        """Fit to data x (..., D): min and max over all leading axes."""
        x = np.asarray(x)
        flat = x.reshape(-1, x.shape[-1])
        return cls(flat.min(axis=0), flat.max(axis=0), eps=eps)

    @property
    def dim(self) -> int:
        return len(self.min)

    def _coeffs(self, x):
        if isinstance(x, np.ndarray) or np.isscalar(x):
            return self.scale, self.offset
        import torch

        if isinstance(x, torch.Tensor):
            key = (x.dtype, x.device)
            if key not in self._torch_cache:
                self._torch_cache[key] = (torch.as_tensor(self.scale, dtype=x.dtype, device=x.device),
                                          torch.as_tensor(self.offset, dtype=x.dtype, device=x.device))
            return self._torch_cache[key]
        raise RactdError(f"normalizer expects a numpy array or torch tensor, got {type(x).__name__}")

    def _check(self, x):
        if x.shape[-1] != self.dim:
            raise RactdError(f"normalizer fitted on {self.dim} dims got an array with last dim {x.shape[-1]}")

    def normalize(self, x):
        """x (..., D) → [-1, 1] (for data inside the fitted range); same type as x (numpy float32 stays)."""
        self._check(x)
        scale, offset = self._coeffs(x)
        y = x * scale + offset
        return y.astype(x.dtype, copy=False) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else y

    def unnormalize(self, y):
        """Inverse of normalize: y (..., D) → data units."""
        self._check(y)
        scale, offset = self._coeffs(y)
        x = (y - offset) / scale
        return x.astype(y.dtype, copy=False) if isinstance(y, np.ndarray) and y.dtype.kind == "f" else x

    def state_dict(self) -> dict:
        import torch

        return {"min": torch.from_numpy(self.min.copy()), "max": torch.from_numpy(self.max.copy()),
                "eps": torch.tensor(self.eps, dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Normalizer":
        def arr(v):
            return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)

        try:
            return cls(arr(state["min"]), arr(state["max"]), eps=float(arr(state.get("eps", 1e-6))))
        except KeyError as e:
            raise RactdError(f"normalizer state lacks {e.args[0]!r}") from None

    def __repr__(self) -> str:
        return f"Normalizer(dim={self.dim})"


def episode_ids(data: dict, rows: np.ndarray | None = None) -> dict:
    """{"episode": (N,) int64 episode of every transition (or of `rows` of them), "episode_lengths": (E,) int64}:
    episodes closed by terminals | timeouts (episode_bounds), the unit a held-out split takes whole."""
    starts, ends = _bounds_arrays(np.asarray(data["terminals"], bool) | np.asarray(data["timeouts"], bool))
    episode = np.repeat(np.arange(len(starts), dtype=np.int64), ends - starts)
    return {"episode": episode if rows is None else episode[rows], "episode_lengths": ends - starts}


def _episode_index(n: int, done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per step: (start, end) of its episode, int64 (N,) each."""
    starts, ends = _bounds_arrays(done)
    lengths = ends - starts
    return np.repeat(starts, lengths), np.repeat(ends, lengths)


def locomotion_windows(data: dict, horizon: int = 16, obs_history: int = 1, gamma: float = 0.99,
                       termination_penalty: float = 0.0, materialize: bool = True) -> dict:
    """One window per dataset step (never crossing episodes; padding as in the module doc).

    data: the flat D4RL dict (observations (N, obs_dim), actions (N, act_dim), rewards, terminals, timeouts).
    Returns numpy arrays:
        obs (N, obs_history, obs_dim) float32   past states, oldest first, obs[:, -1] = current state
        actions (N, horizon, act_dim) float32   a_i .. a_{i+c-1}
        rtg (N,) float32                        return-to-go target at step i (see return_to_go)
        first_obs (N, obs_dim), first_action (N, act_dim)   s_i and a_i (the reward model's input)
        obs_idx (N, obs_history) int32, action_idx (N, horizon) int32   rows of data used by each window
        action_mask (N, horizon) bool           False where the action is end-of-episode padding
    With materialize=False, obs and actions are left out (gather them batch-wise with the index arrays).
    Vectorized: no Python loop over windows.
    """
    if horizon < 1 or obs_history < 1:
        raise RactdError(f"horizon and obs_history must be >= 1, got {horizon}, {obs_history}")
    obs = np.asarray(data["observations"], dtype=np.float32)
    act = np.asarray(data["actions"], dtype=np.float32)
    n = len(obs)
    done = np.asarray(data["terminals"], bool) | np.asarray(data["timeouts"], bool)
    ep_start, ep_end = _episode_index(n, done)
    i = np.arange(n, dtype=np.int64)[:, None]
    obs_idx = np.maximum(i + np.arange(-obs_history + 1, 1), ep_start[:, None]).astype(np.int32)
    raw_act_idx = i + np.arange(horizon)
    action_mask = raw_act_idx < ep_end[:, None]
    action_idx = np.minimum(raw_act_idx, ep_end[:, None] - 1).astype(np.int32)
    del raw_act_idx
    out = {
        "rtg": return_to_go(data["rewards"], data["terminals"], data["timeouts"], gamma, termination_penalty),
        "first_obs": obs,
        "first_action": act,
        "obs_idx": obs_idx,
        "action_idx": action_idx,
        "action_mask": action_mask,
    }
    if materialize:
        out["obs"] = obs[obs_idx]
        out["actions"] = act[action_idx]
    return out


class LazyWindows:
    """A read-only (N, H, D) array of contiguous windows source[starts[k] : starts[k] + H], built on access.

    Indexing (int, slice, integer array) returns numpy arrays; np.asarray(w) materializes all of it
    (N * H * D floats: for maze2d at paper size that is several GB, so index batches instead).
    """

    def __init__(self, source: np.ndarray, starts: np.ndarray, horizon: int):
        self.source, self.starts, self.horizon = source, np.asarray(starts, np.int64), int(horizon)
        self._offsets = np.arange(self.horizon)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.starts), self.horizon, self.source.shape[-1])

    @property
    def dtype(self):
        return self.source.dtype

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, idx):
        s = self.starts[idx]
        return self.source[np.asarray(s)[..., None] + self._offsets]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def maze_segments(data: dict, goal_xy=None, threshold: float = REWARD_RADIUS) -> list[tuple[int, int]]:
    """Maze segments [start, end) (see module doc). goal_xy (2,): D4RL's evaluation goal; default
    data["metadata/eval_goal"]. Without any goal, segments follow terminals and timeouts."""
    obs = np.asarray(data["observations"])
    done = np.asarray(data["terminals"], bool).copy()
    if goal_xy is None and "metadata/eval_goal" in data:
        goal_xy = data["metadata/eval_goal"]
    if goal_xy is None:
        done |= np.asarray(data["timeouts"], bool)
    else:
        at_goal = np.linalg.norm(obs[:, :2] - np.asarray(goal_xy, dtype=np.float64), axis=-1) < threshold
        done[:-1] |= at_goal[:-1] & ~at_goal[1:]  # Diffuser: leaves the goal between t and t + 1
    return episode_bounds(done, np.zeros_like(done))


def maze_windows(data: dict, horizon: int, goal_xy=None, threshold: float = REWARD_RADIUS, stride: int = 1,
                 segments: list[tuple[int, int]] | None = None) -> dict:
    """Maze state windows (Diffuser's GoalDataset), no padding, never crossing a segment (see module doc).

    segments: the segments [start, end) to cut in, default maze_segments(data, goal_xy, threshold). Windows of
    normalized observations take the segments of the raw data (the goal radius is in the maze's units, as
    Diffuser cuts its trajectories before it normalizes them): prepare_windows passes maze_segments(raw data).

    Returns: states (N, horizon, obs_dim) as a LazyWindows (index it with batch indices), start (N, obs_dim)
    and goal (N, obs_dim) float32 = first and last state of each window, starts (N,) int64 row of the first
    state, segment (N,) int64 the segment of each window, segment_lengths (n_segments,), n_segments. Raises
    RactdError if no segment is at least `horizon` long.
    """
    obs = np.asarray(data["observations"], dtype=np.float32)
    if segments is None:
        segments = maze_segments(data, goal_xy=goal_xy, threshold=threshold)
    seg = np.asarray(segments, dtype=np.int64).reshape(-1, 2)
    counts = np.maximum(seg[:, 1] - seg[:, 0] - horizon + 1, 0)
    if counts.sum() == 0:
        longest = int((seg[:, 1] - seg[:, 0]).max()) if len(seg) else 0
        raise RactdError(f"no maze window of length {horizon} fits: the longest segment has {longest} steps")
    # starts = seg_start + 0 .. count-1 for every segment, vectorized.
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    starts = np.repeat(seg[:, 0], counts) + offsets
    starts = starts[::stride]
    segment = np.repeat(np.arange(len(seg), dtype=np.int64), counts)[::stride]
    return {
        "states": LazyWindows(obs, starts, horizon),
        "start": obs[starts],
        "goal": obs[starts + horizon - 1],
        "starts": starts,
        "segment": segment,
        "segment_lengths": seg[:, 1] - seg[:, 0],
        "n_segments": len(segments),
    }
