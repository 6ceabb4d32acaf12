"""Where files live. Nothing is ever written into the repository or the working directory by default.

- cache_dir(): $RACTD_CACHE_DIR, else $XDG_CACHE_HOME/ractd, else ~/.cache/ractd (generated datasets,
  behavior policies, runs).
- d4rl_dir(): d4rl's own cache layout, $D4RL_DATASET_DIR else ~/.d4rl/datasets, so an existing d4rl
  cache is reused.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("RACTD_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ractd"


def d4rl_dir() -> Path:
    return Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()


def datasets_dir() -> Path:
    """Locally generated datasets (D4RL HDF5 format)."""
    return cache_dir() / "datasets"


def runs_dir() -> Path:
    """Default root for training runs (checkpoints, configs, results)."""
    return cache_dir() / "runs"


def sweep_dir(task: str, scale: str) -> Path:
    """Default directory of `tune/search.py --task T --scale S`: trials.parquet, best_config.json, best/checkpoint.pt."""
    return runs_dir() / "sweeps" / f"{task}-{scale}"


def shared_models_dir(task: str, key: str) -> Path:
    """Teacher and reward model trained once per (task, their config, dataset fingerprint) = key, shared by every
    later search and evaluation of the task: <dir>/teacher/best.pt, <dir>/reward/best.pt."""
    return runs_dir() / "shared" / f"{task}-{key}"
