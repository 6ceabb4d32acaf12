"""The SAC recipes behind the locomotion datasets: one `Recipe` per scale, per-env overrides, the medium
threshold, and the library versions a generated file records (see ractd.data.generate_locomotion's module doc).

stable-baselines3 is an optional extra ("locomotion"): this module imports without it; `require_sb3()` says
how to install it where training or loading a policy needs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import ractd
from ractd import RactdError
from ractd.tasks import SCALES, Task

try:  # optional extra "locomotion"
    import stable_baselines3 as sb3
except ImportError:  # pragma: no cover - reported by require_sb3
    sb3 = None

SPLITS = ("random", "medium", "medium-replay", "medium-expert", "expert")
MEDIUM_FRACTION = 1.0 / 3.0  # medium = first snapshot at >= 1/3 of the D4RL expert reference (normalized 33.3)
D4RL_SINGLE_POLICY_SIZE = 1_000_000  # D4RL random / medium / expert datasets (medium-expert = 2 x this)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How behavior policies are trained and recorded at one scale.

    total_steps: SAC env steps of the whole run (the expert is the policy at this step).
    learning_starts: first steps taken with uniform random actions before SAC updates begin.
    batch_size / net_arch / learning_rate / gamma / tau: SAC hyperparameters (one gradient step per env step).
    eval_every: steps between evaluations; also the checkpoint interval.
    eval_episodes: stochastic evaluation episodes per evaluation (their mean decides "medium").
    medium_max_steps: if the medium threshold is not reached by this step, medium is taken here (logged,
        metadata medium_reached = 0).
    rollout_size: transitions per rollout dataset (random / medium / expert, each half of medium-expert);
        None = D4RL's size (task.dataset_size; half of it for medium-expert).
    rollout_envs: envs stepped in lockstep when recording rollouts (one batched policy call per step).
    """

    total_steps: int
    learning_starts: int
    batch_size: int
    net_arch: tuple[int, ...]
    eval_every: int
    eval_episodes: int
    medium_max_steps: int
    rollout_size: int | None
    learning_rate: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    rollout_envs: int = 8

    def key(self) -> str:
        """8 hex digits identifying the recipe (the behavior cache folder name carries it)."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:8]


RECIPES: dict[str, Recipe] = {  # keys: ractd.tasks.SCALES
    "tiny": Recipe(total_steps=1500, learning_starts=500, batch_size=64, net_arch=(32, 32), eval_every=500,
                   eval_episodes=1, medium_max_steps=1000, rollout_size=2000, rollout_envs=2),
    "small": Recipe(total_steps=150_000, learning_starts=10_000, batch_size=256, net_arch=(128, 128),
                    eval_every=5000, eval_episodes=5, medium_max_steps=100_000, rollout_size=100_000),
    "full": Recipe(total_steps=1_000_000, learning_starts=10_000, batch_size=256, net_arch=(256, 256),
                   eval_every=10_000, eval_episodes=10, medium_max_steps=500_000, rollout_size=None),
}

# Per-env changes to a scale's recipe, keyed (env name, scale); recipe_for() applies them. Walker2d at "small":
# the medium threshold (return 1531.9) was not reached by 100k steps (medium_reached = 0). The learner settings
# already equal rl-baselines3-zoo's Walker2d SAC entry (SB3 defaults: lr 3e-4, batch 256, tau 0.005, gamma 0.99,
# train_freq 1, learning_starts 10k; the zoo's nets are 256x256, ours 128x128 for ~2x the steps/s on one core),
# so walker gets a larger budget: see ractd.data.generate_locomotion's module doc for the measured run.
RECIPE_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("walker2d", "small"): {"total_steps": 300_000, "medium_max_steps": 250_000},
}


def recipe_for(env_id: str, scale: str) -> Recipe:
    """The recipe of `env_id` ("Walker2d-v5" or "walker2d") at `scale`: RECIPES[scale] with the env's
    RECIPE_OVERRIDES applied."""
    try:
        base = RECIPES[scale]
    except KeyError:
        raise RactdError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}") from None
    return dataclasses.replace(base, **RECIPE_OVERRIDES.get((env_name(env_id), scale), {}))


def env_name(env_id: str) -> str:
    """"Walker2d-v5" / "walker2d" -> "walker2d" (the task-name prefix)."""
    return env_id.split("-")[0].lower()


def medium_threshold(task: Task) -> float:
    """Raw return at normalized score 100 * MEDIUM_FRACTION (hopper: 1064.6)."""
    return task.ref_min_score + MEDIUM_FRACTION * (task.ref_max_score - task.ref_min_score)


def library_versions() -> dict[str, str]:
    """Versions of everything that shapes a generated dataset."""
    import mujoco

    return {"ractd": ractd.__version__, "stable_baselines3": sb3.__version__ if sb3 else "missing",
            "torch": torch.__version__, "gymnasium": gym.__version__, "mujoco": mujoco.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def require_sb3() -> None:
    if sb3 is None:
        raise RactdError("locomotion data generation needs stable-baselines3: pip install 'ractd[locomotion]'")
