"""A D4RL-format locomotion dataset from uniform random actions: tests, benchmarks and smoke runs need a
real-env dataset in seconds, without training a behavior policy (ractd.data.generate_locomotion)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

KEYS = ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")


def random_locomotion_dataset(task: str = "hopper-medium-replay", n_steps: int = 1500, seed: int = 0,
                              scale: str = "tiny", cut_prob: float = 0.0) -> Path:
    """Step the task's env with U(-1, 1) actions for n_steps and write the transitions where the loaders look for
    `task` at `scale` (ractd.data.d4rl.local_dataset_path). Episodes end on termination, truncation, the last
    step, and, with probability cut_prob per non-terminal step, an extra timeout (more, shorter episodes)."""
    from ractd.data.d4rl import local_dataset_path, write_d4rl_hdf5
    from ractd.tasks import get_task, gym_make

    t = get_task(task)
    env = gym_make(t.env_id)
    act_dim = env.action_space.shape[0]
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in KEYS}
    obs, _ = env.reset(seed=seed)
    for i in range(n_steps):
        a = rng.uniform(-1, 1, act_dim).astype(np.float32)
        nxt, r, term, trunc, _ = env.step(a)
        trunc = trunc or i == n_steps - 1 or (cut_prob > 0 and not term and rng.random() < cut_prob)
        for k, v in zip(KEYS, (obs, nxt, a, r, term, trunc and not term)):
            cols[k].append(v)
        obs = env.reset()[0] if (term or trunc) else nxt
    data = {k: np.asarray(v, dtype=bool if k in ("terminals", "timeouts") else np.float32) for k, v in cols.items()}
    return write_d4rl_hdf5(local_dataset_path(t, scale), data, {"recipe": "random"})
