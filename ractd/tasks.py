"""The task registry: the one place where per-task facts live.

Everything task-specific (Gymnasium env id, D4RL dataset name and URL, Minari id, reference scores for
normalisation, discount and termination penalty of the return-to-go target, paper loss weights of Table 9,
network presets of Tables 6-7, horizons, episode length) is declared here and nowhere else.

Facts come from the paper (Sec. B.2, Tables 6, 7, 9) and D4RL's published reference scores.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ractd import RactdError

# Dataset generation scales (ractd.data.generate_maze / generate_locomotion, the --scale flags): tiny for tests,
# small for CPU runs, full = the size of D4RL's release.
SCALES = ("tiny", "small", "full")

D4RL_GYM_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{env}_{split}-v2.hdf5"
D4RL_MAZE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/maze2d/maze2d-{size}-sparse-v1.hdf5"


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Eq. (9) weights: L = alpha L_CTM + beta L_DSM + sigma L_Reward (paper Table 9)."""

    alpha: float = 1.0
    beta: float = 1.0
    sigma: float = 0.0


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark task.

    name: the D4RL-style name used everywhere in this project, e.g. "hopper-medium-replay".
    kind: "locomotion" (closed-loop action chunks) or "maze" (open-loop state-sequence planning).
    env_id: Gymnasium id (v5 MuJoCo envs; PointMaze v3 for maze2d).
    d4rl_name: the D4RL dataset name; d4rl_url: where D4RL hosts its HDF5 file.
    minari_id: the closest Minari dataset id, or None where Minari has no counterpart.
    ref_min_score / ref_max_score: D4RL reference returns, normalized score = 100 (R - min) / (max - min).
    gamma: return-to-go discount (paper Sec. B.2); termination_penalty: reward added on early termination.
    weights: Eq. (9) loss weights (paper Table 9).
    paper_preset / cpu_preset: U-Net preset names (ractd.config.UNET_PRESETS) for GPUs and for CPU.
    horizon: length of the generated sequence (MuJoCo: c = 16 future actions; maze: H planned states).
    obs_history: h, number of past states used for conditioning (MuJoCo; maze uses (start, goal)).
    max_episode_steps: evaluation episode length.
    dataset_size: transitions in D4RL's release (the "full" generation scale).
    d4rl_bc: (BC, 10% BC) normalized scores on D4RL's own dataset (CORL's "last" scores, 4 training seeds;
        maze2d: not goal-conditioned): the level D4RL's data supports, printed beside a generated dataset's.
    goal_cell: maze only, the (row, col) cell of D4RL's fixed evaluation goal ('G' in D4RL's maze string);
        in D4RL maze2d coordinates the goal is at exactly (row, col) (see ractd.maze).
    """

    name: str
    kind: Literal["locomotion", "maze"]
    env_id: str
    d4rl_name: str
    d4rl_url: str
    minari_id: str | None
    ref_min_score: float
    ref_max_score: float
    gamma: float
    termination_penalty: float
    weights: LossWeights
    paper_preset: str
    cpu_preset: str
    horizon: int
    obs_history: int
    max_episode_steps: int
    dataset_size: int  # transitions in D4RL's release (the "full" generation scale)
    d4rl_bc: tuple[float, float]
    goal_cell: tuple[int, int] | None = None

    @property
    def env_name(self) -> str:
        """hopper / walker2d / halfcheetah / maze2d."""
        return self.name.split("-")[0]

    @property
    def split(self) -> str:
        """medium / medium-replay / medium-expert / umaze / ..."""
        return self.name.split("-", 1)[1]

    def normalized_score(self, ret):
        """D4RL normalized score 100 (R - min) / (max - min); works on floats and numpy arrays."""
        return 100.0 * (ret - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)


# D4RL reference scores (random / expert returns; maze2d: v1 sparse references).
_REF = {
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "halfcheetah": (-280.178953, 12135.0),
}
_ENV_ID = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}
# Paper Sec. B.2: gamma per environment, early-termination penalty -100.
_GAMMA = {"hopper": 0.997, "walker2d": 0.99, "halfcheetah": 0.9}
# Paper Table 9: reward weight sigma (alpha = beta = 1 everywhere).
_SIGMA = {
    "hopper-medium-replay": 1.0,
    "hopper-medium": 3.0,
    "hopper-medium-expert": 0.0,
    "walker2d-medium-replay": 1.0,
    "walker2d-medium": 0.4,
    "walker2d-medium-expert": 0.2,
    "halfcheetah-medium-replay": 1.0,
    "halfcheetah-medium": 0.5,
    "halfcheetah-medium-expert": 0.0,
}
# D4RL v2 dataset sizes (transitions).
_SIZE = {
    ("hopper", "medium"): 1_000_000,
    ("hopper", "medium-replay"): 402_000,
    ("hopper", "medium-expert"): 2_000_000,
    ("walker2d", "medium"): 1_000_000,
    ("walker2d", "medium-replay"): 302_000,
    ("walker2d", "medium-expert"): 2_000_000,
    ("halfcheetah", "medium"): 1_000_000,
    ("halfcheetah", "medium-replay"): 202_000,
    ("halfcheetah", "medium-expert"): 2_000_000,
}
# CORL (tinkoff-ai/CORL README, "last" scores, normalized): BC / 10% BC on D4RL's datasets.
_D4RL_BC = {
    "halfcheetah-medium": (42.4, 42.5), "halfcheetah-medium-replay": (35.7, 23.6),
    "halfcheetah-medium-expert": (56.0, 90.1), "hopper-medium": (53.5, 55.5), "hopper-medium-replay": (29.8, 70.4),
    "hopper-medium-expert": (52.3, 111.2), "walker2d-medium": (63.2, 67.3), "walker2d-medium-replay": (21.8, 54.4),
    "walker2d-medium-expert": (99.0, 108.7), "maze2d-umaze": (0.4, 12.2), "maze2d-medium": (0.8, 14.3),
    "maze2d-large": (2.3, 11.3),
}
_MINARI_SPLIT = {"medium": "medium", "medium-replay": None, "medium-expert": None}

# maze2d (Diffuser setup, paper Sec. 4.2 and Table 6): horizon 128 / 256 / 384; D4RL sizes 1M / 2M / 4M;
# episode limits 300 / 600 / 800; reference scores of the v1 sparse datasets; D4RL evaluation goal cell.
_MAZE = {
    "umaze": ("PointMaze_UMaze-v3", "D4RL/pointmaze/umaze-v2", (23.85, 161.86), 128, 300, 1_000_000, (1, 1)),
    "medium": ("PointMaze_Medium-v3", "D4RL/pointmaze/medium-v2", (13.13, 277.39), 256, 600, 2_000_000, (6, 6)),
    "large": ("PointMaze_Large-v3", "D4RL/pointmaze/large-v2", (6.7, 273.99), 384, 800, 4_000_000, (7, 9)),
}


def _build() -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    for env, (lo, hi) in _REF.items():
        for split in ("medium", "medium-replay", "medium-expert"):
            name = f"{env}-{split}"
            mid = _MINARI_SPLIT[split]
            tasks[name] = Task(
                name=name,
                kind="locomotion",
                env_id=_ENV_ID[env],
                d4rl_name=f"{name}-v2",
                d4rl_url=D4RL_GYM_URL.format(env=env, split=split.replace("-", "_")),
                minari_id=f"mujoco/{env}/{mid}-v0" if mid else None,
                ref_min_score=lo,
                ref_max_score=hi,
                gamma=_GAMMA[env],
                termination_penalty=-100.0,
                weights=LossWeights(1.0, 1.0, _SIGMA[name]),
                paper_preset="mujoco",
                cpu_preset="small",
                horizon=16,
                obs_history=1,
                max_episode_steps=1000,
                dataset_size=_SIZE[(env, split)],
                d4rl_bc=_D4RL_BC[name],
            )
    for size, (env_id, minari_id, (lo, hi), horizon, ep_len, n, goal) in _MAZE.items():
        name = f"maze2d-{size}"
        tasks[name] = Task(
            name=name,
            kind="maze",
            env_id=env_id,
            d4rl_name=f"maze2d-{size}-v1",
            d4rl_url=D4RL_MAZE_URL.format(size=size),
            minari_id=minari_id,
            ref_min_score=lo,
            ref_max_score=hi,
            gamma=0.99,
            termination_penalty=0.0,
            weights=LossWeights(1.0, 1.0, 0.0),
            paper_preset=f"maze2d-{size}",
            cpu_preset="small-maze",
            horizon=horizon,
            obs_history=1,
            max_episode_steps=ep_len,
            dataset_size=n,
            d4rl_bc=_D4RL_BC[name],
            goal_cell=goal,
        )
    return tasks


TASKS: dict[str, Task] = _build()


def get_task(name: str) -> Task:
    """Look a task up by name; an unknown name raises RactdError listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise RactdError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


# MuJoCo compiler warnings about Gymnasium's own model files (HalfCheetah's XML sets the deprecated 'settotalmass'),
# which this project cannot act on: printed for every env made (100 seeds: 100 lines) and appended to a
# MUJOCO_LOG.TXT in the working directory. gym_make drops them; MuJoCo's other warnings go to stderr.
MUJOCO_DROPPED = ("compiler attribute 'settotalmass' is deprecated",)


def _mujoco_warning(message: str) -> None:
    import sys

    if not any(m in message for m in MUJOCO_DROPPED):
        print(f"MuJoCo warning: {message}", file=sys.stderr)


def gym_make(env_id: str, **kwargs):
    """gymnasium.make(env_id, **kwargs) with MuJoCo's warnings routed through `_mujoco_warning` (this process's
    handler, set at the first call): the deprecation notes about Gymnasium's model files dropped, the rest on
    stderr, and no MUJOCO_LOG.TXT written into the working directory."""
    import gymnasium as gym
    import mujoco

    if mujoco.get_mju_user_warning() is not _mujoco_warning:
        mujoco.set_mju_user_warning(_mujoco_warning)
    return gym.make(env_id, **kwargs)


def gymnasium_robotics():
    """Import gymnasium_robotics, register its environments with gymnasium, and return the module.

    Its first import prints a release note to stderr (farama_notifications: the Adroit hand environments'
    reward functions changed in 1.2.1), which concerns none of this project's environments and was printed once
    per process -- three times per Ray trial. That note is dropped here, where it arises; anything else the
    import prints is passed on.
    """
    import contextlib
    import io
    import sys

    import gymnasium as gym

    if "gymnasium_robotics" in sys.modules:
        module = sys.modules["gymnasium_robotics"]
    else:
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            import gymnasium_robotics as module
        kept = [line for line in buf.getvalue().splitlines() if line.strip() and "AdroitHand" not in line]
        if kept:
            print("\n".join(kept), file=sys.stderr)
    gym.register_envs(module)
    return module
