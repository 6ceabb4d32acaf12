"""Gym-MuJoCo datasets in D4RL format, generated locally by training and recording an online agent.

D4RL built hopper / walker2d / halfcheetah {random, medium, medium-replay, medium-expert, expert} by training
SAC online and recording it. This module does the same on the Gymnasium v5 envs:

- random        rollouts of the freshly initialised (untrained) SAC policy;
- medium        rollouts of a snapshot taken at the first evaluation whose mean return reaches one third of the
                D4RL expert reference (normalized score >= 33.3; hopper: return >= 1064.6);
- medium-replay every transition the agent saw during training until that snapshot, in the order it saw them;
- expert        rollouts of the final policy (end of the scale's training budget);
- medium-expert medium rollouts followed by expert rollouts (D4RL concatenates the two datasets).
The registry (and so the CLI) lists medium, medium-replay and medium-expert; random and expert are reachable
from Python: generate_locomotion(locomotion_task("hopper", "random"), ...).

Rollouts sample the stochastic policy (D4RL records action_log_probs, so its behavior was stochastic too); the
medium threshold is evaluated with the same stochastic policy, so the snapshot's data has about the return the
threshold asked for.

Algorithm choice: SAC from stable-baselines3. SAC is what D4RL used, and "medium-replay" is by definition the
replay buffer of an off-policy learner; SB3 is maintained, tested and reproducible with a seed. Speed on these
CPUs (one thread): SB3 SAC does ~85 env steps/s with D4RL's 256x256 nets and ~125 steps/s with 128x128. PPO would
step ~10x faster but needs ~10x more env steps for Hopper to reach ~1000 (several 100k), so the wall-clock gain is
small, and its data is not a replay buffer of the D4RL kind. SAC reaches hopper's medium threshold after a few
10k steps: measured, hopper small (seed 0) reached medium (eval 1228) at 65k steps, 15 min on 2 CPUs shared
with ~6 other busy processes; 65k replay transitions, episode returns 3.5 / 41 / 2292 (min / median / max). The
expert is the policy at the 150k-step end.

Scales (ractd.tasks.SCALES, one `RECIPES` entry each): tiny = 1500 SAC steps with 32x32 nets (tests; medium is
forced at a fixed step because no threshold is reachable), small = 150k SAC steps, 100k transitions per rollout
dataset, full = 1M SAC steps with 256x256 nets and D4RL's dataset sizes (task.dataset_size; medium-expert = two
halves of that). The expert of "small" is whatever 150k steps reach; the metadata records the actual returns. The
medium-replay size is what the agent saw until medium (D4RL's sizes for it are not a recipe parameter).
Per-env changes to a scale's recipe live in `RECIPE_OVERRIDES` (recipe_for(env_id, scale) applies them; the cache
key follows the resulting recipe): walker2d at "small" trains 300k steps and takes medium by 250k at the latest,
because with 150k / 100k its medium threshold was never reached (medium_reached = 0). Measured with the override
(seed 0, nice 10 on 2 CPUs shared with ~6 busy processes): stochastic eval returns 60-780 from 15k to 95k steps,
then 838 (100k), 1498 (110k), 1748 at 115k = medium (normalized 38.0; 115k replay transitions), 2168 (120k),
620-2440 from 125k to 265k, 2960-3050 from 275k, 3052 at the 300k expert; medium / expert = 0.57.
walker2d-medium took 37 min (training and 100k rollouts), the expert and walker2d-medium-expert 59 min more.
walker2d-medium data: 133 episodes, return median 2052 (normalized 44.7). A split whose medium policy
missed the threshold says so in `python -m ractd.data info` ("medium NOT REACHED"), which also prints the medium
policy's return against a third of the expert's when the file has an expert.

Cache (per env, scale and seed, shared by all tasks of that env): ractd.paths.cache_dir()/"behavior"/<env_id>/
<scale>-seed<seed>-<recipe hash>/ holds random.pt, medium.pt, expert.pt (policy state_dicts), replay.npz (the
medium-replay transitions), rollouts-*.npz (the rollout datasets), evals.json, and train.ckpt, the latest
training checkpoint (model + optimizers + replay buffer + env physics state + all RNG states). Every file is
written to a temporary name and renamed. Training stops as soon as the requested policy exists; asking for the
expert later continues from train.ckpt. An interrupted run resumes from the last checkpoint (every
`eval_every` steps), and because the checkpoint restores every RNG and the exact MuJoCo integration state, a
resumed run is bit-identical to an uninterrupted one (tested).

Determinism: same seed -> same dataset on the same machine and library versions (one torch thread is used for
training; tested on tiny). Different CPUs / BLAS builds may change float rounding and hence the whole run.

Episode flags follow the env exactly: terminated -> terminals, truncated (the 1000-step TimeLimit) -> timeouts.
The only other timeout is a cut: the last transition of the replay data when medium arrived mid-episode, and the
last transition of a rollout dataset cut to its exact size; metadata "cut_last_episode" says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import pickle
import platform
import random
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

import ractd
from ractd import RactdError
from ractd.paths import cache_dir
from ractd.io import atomic_npz, atomic_torch_save, atomic_write, atomic_write_json
from ractd.tasks import SCALES, Task, get_task

try:  # optional extra "locomotion"
    import stable_baselines3 as sb3
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv
except ImportError:  # pragma: no cover - reported by _require_sb3
    sb3 = None
    BaseCallback = object

log = logging.getLogger(__name__)

SPLITS = ("random", "medium", "medium-replay", "medium-expert", "expert")
MEDIUM_FRACTION = 1.0 / 3.0  # medium = first snapshot at >= 1/3 of the D4RL expert reference (normalized 33.3)
_D4RL_SINGLE_POLICY_SIZE = 1_000_000  # D4RL random / medium / expert datasets (medium-expert = 2 x this)


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
# so walker gets a larger budget: see the module doc for the measured run.
RECIPE_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("walker2d", "small"): {"total_steps": 300_000, "medium_max_steps": 250_000},
}


# ------------------------------------------------------------------------------------------------ public API


def generate_locomotion(task: Task, scale: str = "small", seed: int = 0, out: Path | None = None) -> Path:
    """Generate `task`'s dataset (D4RL HDF5) from cached or freshly trained SAC behavior policies.

    task: a locomotion Task; its split (medium / medium-replay / medium-expert, or random / expert from
    `locomotion_task`) picks the recipe. scale: "tiny" | "small" | "full" (see RECIPES). out: default
    ractd.data.d4rl.local_dataset_path(task, scale). Returns the written path (atomic write).

    File: observations / next_observations (N, obs_dim) float32, actions (N, act_dim) float32, rewards (N,)
    float32, terminals / timeouts (N,) bool, infos/action_log_probs (N,) float32, infos/qpos (N, nq) and
    infos/qvel (N, nv) float64 (state before the action), metadata/* (recipe, seed, returns, versions).
    """
    from ractd.data.d4rl import local_dataset_path, write_d4rl_hdf5

    if task.kind != "locomotion":
        raise RactdError(f"{task.name} is not a locomotion task; use ractd.data.generate_maze")
    if task.split not in SPLITS:
        raise RactdError(f"unknown locomotion split {task.split!r}; expected one of {', '.join(SPLITS)}")
    recipe = recipe_for(task.env_id, scale)
    cache = BehaviorCache(task.env_id, scale, seed)
    if task.split == "medium-replay":
        data = cache.replay()
        source = "SAC replay: every transition seen during training until the medium snapshot"
    elif task.split == "medium-expert":
        n = recipe.rollout_size or task.dataset_size // 2
        data = _concat([cache.rollouts("medium", n), cache.rollouts("expert", n)])
        source = f"medium policy rollouts ({n}) followed by expert policy rollouts ({n})"
    else:
        n = recipe.rollout_size or _D4RL_SINGLE_POLICY_SIZE
        data = cache.rollouts(task.split, n)
        source = f"{task.split} policy rollouts ({n})"
    meta = _metadata(task, scale, seed, recipe, cache, data, source)
    path = Path(out) if out is not None else local_dataset_path(task, scale)
    write_d4rl_hdf5(path, data, meta)
    log.info("%s (%s, seed %d): %d transitions, %d episodes, return min/median/max %.1f/%.1f/%.1f -> %s",
             task.name, scale, seed, len(data["rewards"]), meta["n_episodes"], meta["return_min"],
             meta["return_median"], meta["return_max"], path)
    return path


def locomotion_task(env_name: str, split: str) -> Task:
    """The Task for any of SPLITS, including random / expert which the registry does not list.

    random and expert reuse the env's registry facts (reference scores, env id) from its medium task; their
    D4RL size is 1M transitions.
    """
    if split not in SPLITS:
        raise RactdError(f"unknown locomotion split {split!r}; expected one of {', '.join(SPLITS)}")
    if split in ("medium", "medium-replay", "medium-expert"):
        return get_task(f"{env_name}-{split}")
    base = get_task(f"{env_name}-medium")
    return dataclasses.replace(base, name=f"{env_name}-{split}", d4rl_name=f"{env_name}-{split}-v2",
                               d4rl_url=base.d4rl_url.replace("_medium-", f"_{split}-"), minari_id=None,
                               dataset_size=_D4RL_SINGLE_POLICY_SIZE)


def medium_threshold(task: Task) -> float:
    """Raw return at normalized score 100 * MEDIUM_FRACTION (hopper: 1064.6)."""
    return task.ref_min_score + MEDIUM_FRACTION * (task.ref_max_score - task.ref_min_score)


def library_versions() -> dict[str, str]:
    """Versions of everything that shapes a generated dataset."""
    import mujoco

    return {"ractd": ractd.__version__, "stable_baselines3": sb3.__version__ if sb3 else "missing",
            "torch": torch.__version__, "gymnasium": gym.__version__, "mujoco": mujoco.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------ the cache


class BehaviorCache:
    """SAC behavior policies of one (env_id, scale, seed), trained on demand, resumable, shared by tasks.

    Files in `self.dir` (see module doc). `ensure("medium" | "expert")` trains only as far as needed.
    """

    def __init__(self, env_id: str, scale: str, seed: int):
        _require_sb3()
        self.env_id, self.scale, self.seed = env_id, scale, int(seed)
        self.recipe = recipe_for(env_id, scale)
        self.key = f"{env_id}/{scale}-seed{self.seed}-{self.recipe.key()}"
        self.dir = cache_dir() / "behavior" / self.key
        self.task = get_task(f"{_env_name(env_id)}-medium")

    # -- policies

    def policy_path(self, which: str) -> Path:
        return self.dir / f"{which}.pt"

    def ensure(self, which: str) -> Path:
        """Path of the `which` ("random" | "medium" | "expert") policy snapshot, training if it is missing."""
        if not self.policy_path(which).is_file():
            with _locked(self.dir):  # another process may be training the same policies right now
                if not self.policy_path(which).is_file():
                    _Trainer(self).run(until="expert" if which == "expert" else "medium")
        return self.policy_path(which)

    def evals(self) -> dict:
        """evals.json: {"history": [[step, mean_return], ...], "medium": {...}, "expert": {...}, "random": {...}}."""
        path = self.dir / "evals.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    # -- datasets

    def replay(self) -> dict[str, np.ndarray]:
        """The medium-replay transitions (flat D4RL dict, see generate_locomotion)."""
        self.ensure("medium")
        with np.load(self.dir / "replay.npz") as z:
            return {k.replace("__", "/"): z[k] for k in z.files}

    def rollouts(self, which: str, n: int) -> dict[str, np.ndarray]:
        """n transitions of the `which` policy (flat D4RL dict), cached as rollouts-<which>-<n>.npz."""
        path = self.dir / f"rollouts-{which}-{n}.npz"
        if not path.is_file():
            actor = load_actor(self.ensure(which), self.env_id, self.recipe)
            tag = {"random": 11, "medium": 12, "expert": 13}[which]
            with _one_torch_thread():
                data = record_rollouts(actor, self.env_id, n_transitions=n, seed=(self.seed, tag),
                                       n_envs=self.recipe.rollout_envs, desc=f"{self.env_id} {which} rollouts")
            _npz(path, data)
        with np.load(path) as z:
            return {k.replace("__", "/"): z[k] for k in z.files}


@contextlib.contextmanager
def _one_torch_thread():
    """SAC's small nets gain nothing from threads, and one thread keeps float rounding reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive advisory lock on `folder` (flock on folder/.lock), held for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process training in %s", folder)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ training


class _StateInInfo(gym.Wrapper):
    """Puts the MuJoCo state *before* each step (qpos (nq,), qvel (nv,)) and the env's own terminated /
    truncated flags into info, so that SB3's VecEnv bookkeeping cannot blur them."""

    def step(self, action):
        qpos = self.env.unwrapped.data.qpos.copy()
        qvel = self.env.unwrapped.data.qvel.copy()
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = dict(info, qpos_before=qpos, qvel_before=qvel, env_terminated=bool(terminated),
                    env_truncated=bool(truncated))
        return obs, reward, terminated, truncated, info


class _Recorder(BaseCallback):
    """Records every transition SAC sees (the medium-replay data) and drives the progress bar.

    Runs after env.step and before SB3 stores the transition, so model._last_obs is still the state the action
    was taken in and the policy is still the one that chose it (its log-prob is recorded; uniform warm-up
    actions get the uniform density's log-prob).
    """

    def __init__(self, bar):
        super().__init__(verbose=0)
        self.bar = bar
        self.recording = True
        self.rows = _Columns()

    def _on_step(self) -> bool:
        self.bar.update(1)
        if not self.recording:
            return True
        model, loc = self.model, self.locals
        info = loc["infos"][0]
        done = bool(loc["dones"][0])
        obs = np.array(model._last_obs[0], dtype=np.float32)  # copies: SB3 reuses its buffers
        if (model.num_timesteps - 1) < model.learning_starts:  # SB3 sampled this action uniformly
            low, high = model.action_space.low, model.action_space.high
            logp = -float(np.sum(np.log(high - low)))
        else:
            with torch.no_grad():
                logp = float(_log_prob(model.actor, obs[None], loc["buffer_actions"][:1])[0])
        nxt = info["terminal_observation"] if done else loc["new_obs"][0]
        row = (obs, np.array(loc["actions"][0], np.float32), np.float32(loc["rewards"][0]),
               np.array(nxt, np.float32), info["env_terminated"], info["env_truncated"], info["qpos_before"],
               info["qvel_before"], np.float32(logp))
        self.rows.append(row)
        return True

    def arrays(self) -> dict[str, np.ndarray]:
        return self.rows.arrays()


_ROW_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "infos/qpos",
             "infos/qvel", "infos/action_log_probs")


_DTYPES = {"terminals": bool, "timeouts": bool, "infos/qpos": np.float64, "infos/qvel": np.float64}


class _Columns:
    """Rows (tuples in _ROW_KEYS order) appended into preallocated, doubling numpy columns.

    Keeping each training step's row as small long-lived numpy objects fragmented the heap between torch's
    ~100 KB temporaries (RSS grew ~100 KB per SAC step); a few large column arrays do not.
    """

    def __init__(self, arrays: dict[str, np.ndarray] | None = None):
        self.n = len(arrays["rewards"]) if arrays else 0
        self.cols = dict(arrays) if self.n else None

    def append(self, row: tuple) -> None:
        if self.cols is None:
            self.cols = {k: np.empty((4096,) + np.shape(v), _DTYPES.get(k, np.float32))
                         for k, v in zip(_ROW_KEYS, row)}
        cap = len(self.cols["rewards"])
        if self.n == cap:
            for k, col in self.cols.items():
                grown = np.empty((2 * cap,) + col.shape[1:], col.dtype)
                grown[:cap] = col
                self.cols[k] = grown
        for k, v in zip(_ROW_KEYS, row):
            self.cols[k][self.n] = v
        self.n += 1

    def arrays(self) -> dict[str, np.ndarray]:
        if self.cols is None:
            return {k: np.empty((0,), _DTYPES.get(k, np.float32)) for k in _ROW_KEYS}
        return {k: col[: self.n].copy() for k, col in self.cols.items()}


class _Trainer:
    """One SAC run of a BehaviorCache: fresh or resumed from train.ckpt, stopping once `until` exists."""

    def __init__(self, cache: BehaviorCache):
        self.cache, self.recipe = cache, cache.recipe

    def run(self, until: str) -> None:
        self.cache.dir.mkdir(parents=True, exist_ok=True)
        with _one_torch_thread():
            self._run(until)

    def _run(self, until: str) -> None:
        c, r = self.cache, self.recipe
        threshold = medium_threshold(c.task)
        venv = _make_train_env(c.env_id)
        ckpt_path = c.dir / "train.ckpt"
        if ckpt_path.is_file():
            model, state = _load_checkpoint(ckpt_path, venv)
            log.info("%s: resuming SAC from step %d (%s)", c.key, model.num_timesteps, ckpt_path)
        else:
            model = SAC("MlpPolicy", venv, learning_rate=r.learning_rate, buffer_size=r.total_steps,
                        learning_starts=r.learning_starts, batch_size=r.batch_size, tau=r.tau, gamma=r.gamma,
                        train_freq=1, gradient_steps=1, policy_kwargs={"net_arch": list(r.net_arch)},
                        seed=c.seed, device="cpu", verbose=0)
            atomic_torch_save(c.policy_path("random"), model.policy.state_dict())
            ret = self._evaluate(model)
            state = {"history": [[0, ret]], "medium": None, "random": {"step": 0, "eval_return": ret},
                     "rows": None}
            log.info("%s: training SAC for %d steps (medium threshold %.1f)", c.key, r.total_steps, threshold)
        bar = tqdm(total=r.total_steps, initial=model.num_timesteps, desc=f"SAC {c.env_id} ({c.scale})",
                   unit="step", mininterval=2.0)
        recorder = _Recorder(bar)
        if state["rows"] is not None:
            recorder.rows = _Columns(state["rows"])
        recorder.recording = state["medium"] is None
        try:
            while model.num_timesteps < r.total_steps:
                if until == "medium" and state["medium"] is not None:
                    return
                target = min(r.total_steps, (model.num_timesteps // r.eval_every + 1) * r.eval_every)
                model.learn(total_timesteps=target - model.num_timesteps, callback=recorder,
                            reset_num_timesteps=False, progress_bar=False)
                step = model.num_timesteps
                ret = self._evaluate(model)
                state["history"].append([step, ret])
                bar.set_postfix(eval_return=f"{ret:.0f}")
                log.info("%s: step %d, eval return %.1f", c.key, step, ret)
                if state["medium"] is None and (ret >= threshold or step >= r.medium_max_steps):
                    reached = ret >= threshold
                    if not reached:
                        log.warning("%s: medium threshold %.1f not reached by step %d (return %.1f); taking "
                                    "medium here", c.key, threshold, step, ret)
                    state["medium"] = {"step": step, "eval_return": ret, "reached": reached,
                                       "threshold": threshold}
                    self._save_medium(model, recorder, state)
                state["rows"] = recorder.arrays() if recorder.recording else None
                _save_checkpoint(ckpt_path, model, venv, state)
                atomic_write_json(c.dir / "evals.json", _public_evals(state), indent=1)
            if state["medium"] is not None and not c.policy_path("expert").is_file():
                state["expert"] = {"step": model.num_timesteps, "eval_return": state["history"][-1][1]}
                atomic_write_json(c.dir / "evals.json", _public_evals(state), indent=1)
                atomic_torch_save(c.policy_path("expert"), model.policy.state_dict())
                log.info("%s: expert saved (step %d, eval return %.1f)", c.key, model.num_timesteps,
                         state["expert"]["eval_return"])
        finally:
            bar.close()
            venv.close()

    def _save_medium(self, model, recorder: _Recorder, state: dict) -> None:
        c = self.cache
        data = recorder.arrays()
        cut = bool(len(data["rewards"]) and not (data["terminals"][-1] or data["timeouts"][-1]))
        if cut:  # medium arrived mid-episode: the replay data ends with a cut episode
            data["timeouts"][-1] = True
        state["medium"]["replay_cut_last_episode"] = cut
        _npz(c.dir / "replay.npz", data)
        atomic_torch_save(c.policy_path("medium"), model.policy.state_dict())
        recorder.recording = False
        recorder.rows = _Columns()
        log.info("%s: medium saved (step %d, eval return %.1f, %d replay transitions)", c.key,
                 state["medium"]["step"], state["medium"]["eval_return"], len(data["rewards"]))

    def _evaluate(self, model) -> float:
        """Mean return of `eval_episodes` stochastic episodes; leaves the training RNG streams untouched."""
        r = self.recipe
        step = int(model.num_timesteps)
        data = record_rollouts(model.actor, self.cache.env_id, n_episodes=r.eval_episodes,
                               seed=(self.cache.seed, 1, step), n_envs=r.eval_episodes, desc=None)
        return float(np.mean(episode_returns(data)))


def _public_evals(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "rows"}


def _make_train_env(env_id: str):
    return DummyVecEnv([lambda: Monitor(_StateInInfo(gym.make(env_id)))])


def _require_sb3() -> None:
    if sb3 is None:
        raise RactdError("locomotion data generation needs stable-baselines3: pip install 'ractd[locomotion]'")


def recipe_for(env_id: str, scale: str) -> Recipe:
    """The recipe of `env_id` ("Walker2d-v5" or "walker2d") at `scale`: RECIPES[scale] with the env's
    RECIPE_OVERRIDES applied."""
    try:
        base = RECIPES[scale]
    except KeyError:
        raise RactdError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}") from None
    return dataclasses.replace(base, **RECIPE_OVERRIDES.get((_env_name(env_id), scale), {}))


def _env_name(env_id: str) -> str:
    """"Walker2d-v5" / "walker2d" -> "walker2d" (the task-name prefix)."""
    return env_id.split("-")[0].lower()


# ------------------------------------------------------------------------------------------------ checkpoints


def _wrappers(venv) -> dict[str, Any]:
    """The pieces of the single training env whose state a checkpoint must carry."""
    out, env = {}, venv.envs[0]
    while True:
        if isinstance(env, Monitor):
            out["monitor"] = env
        if isinstance(env, gym.wrappers.TimeLimit):
            out["time_limit"] = env
        if not hasattr(env, "env"):
            break
        env = env.env
    out["mujoco"] = env.unwrapped
    return out


def _env_state(venv) -> dict:
    import mujoco

    w = _wrappers(venv)
    u = w["mujoco"]
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    physics = np.empty(mujoco.mj_stateSize(u.model, spec))
    mujoco.mj_getState(u.model, u.data, physics, spec)
    return {"physics": physics, "elapsed_steps": w["time_limit"]._elapsed_steps,
            "np_random": u.np_random.bit_generator.state, "monitor_rewards": list(w["monitor"].rewards)}


def _set_env_state(venv, s: dict) -> None:
    import mujoco

    venv.reset()  # satisfies the wrappers' reset-before-step checks; everything it changed is overwritten below
    w = _wrappers(venv)
    u = w["mujoco"]
    mujoco.mj_setState(u.model, u.data, s["physics"], mujoco.mjtState.mjSTATE_INTEGRATION)
    w["time_limit"]._elapsed_steps = s["elapsed_steps"]
    u.np_random.bit_generator.state = s["np_random"]
    w["monitor"].rewards = list(s["monitor_rewards"])


def _rng_state(model) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "action_space": model.action_space.np_random.bit_generator.state}


def _set_rng_state(model, s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    model.action_space.np_random.bit_generator.state = s["action_space"]


def _save_checkpoint(path: Path, model, venv, state: dict) -> None:
    """Everything needed to continue the run bit-identically, in one atomically written pickle."""
    buf = io.BytesIO()
    model.save(buf)
    blob = {"model": buf.getvalue(), "replay_buffer": model.replay_buffer, "env": _env_state(venv),
            "rng": _rng_state(model), "state": state}
    atomic_write(path, pickle.dumps(blob, protocol=pickle.HIGHEST_PROTOCOL))


def _load_checkpoint(path: Path, venv):
    try:
        blob = pickle.loads(path.read_bytes())
        model = SAC.load(io.BytesIO(blob["model"]), env=venv, device="cpu", force_reset=False)
    except Exception as e:  # a checkpoint from another library version, or a damaged file
        raise RactdError(f"cannot resume from {path} ({type(e).__name__}: {e}); delete it to restart") from None
    model.replay_buffer = blob["replay_buffer"]
    _set_env_state(venv, blob["env"])
    _set_rng_state(model, blob["rng"])
    return model, blob["state"]


# ------------------------------------------------------------------------------------------------ rollouts


def _log_prob(actor, obs: np.ndarray, squashed_actions: np.ndarray) -> np.ndarray:
    """log pi(a|s) of tanh-squashed actions in [-1, 1]: obs (B, obs_dim), actions (B, act_dim) -> (B,)."""
    mean, log_std, _ = actor.get_action_dist_params(torch.as_tensor(obs, dtype=torch.float32))
    dist = actor.action_dist.proba_distribution(mean, log_std)
    return dist.log_prob(torch.as_tensor(squashed_actions, dtype=torch.float32)).numpy()


def load_actor(path: Path, env_id: str, recipe: Recipe):
    """The SB3 SAC actor (torch module) of a saved policy state_dict."""
    _require_sb3()
    env = gym.make(env_id)
    with torch.random.fork_rng(devices=[]):
        model = SAC("MlpPolicy", env, buffer_size=1, policy_kwargs={"net_arch": list(recipe.net_arch)},
                    device="cpu", verbose=0)
    model.policy.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    env.close()
    model.policy.set_training_mode(False)
    return model.actor


def record_rollouts(actor, env_id: str, *, n_transitions: int | None = None, n_episodes: int | None = None,
                    seed: tuple[int, ...], n_envs: int = 8, desc: str | None = None) -> dict[str, np.ndarray]:
    """Roll out a stochastic SAC actor; returns the flat D4RL dict (shapes in generate_locomotion).

    n_episodes: exactly that many episodes (one per env, n_envs is ignored). n_transitions: envs run in
    lockstep and start new episodes until the started episodes hold n_transitions; every started episode is
    finished, episodes are ordered by (start step, env index), and the concatenation is cut to exactly
    n_transitions (a cut last episode gets timeouts = True). seed: entropy for the env seeds and the torch
    sampling stream (a forked RNG: global RNG states are left untouched).
    """
    if (n_transitions is None) == (n_episodes is None):
        raise ValueError("give exactly one of n_transitions and n_episodes")
    if n_episodes is not None:
        n_envs = n_episodes
    ss = np.random.SeedSequence(list(seed))
    env_seeds = ss.generate_state(n_envs).tolist()
    torch_seed = int(ss.generate_state(1, dtype=np.uint64)[0] % (2**63))
    envs = [gym.make(env_id) for _ in range(n_envs)]
    obs = np.stack([e.reset(seed=s)[0] for e, s in zip(envs, env_seeds)])
    low, high = envs[0].action_space.low, envs[0].action_space.high
    active = np.ones(n_envs, bool)
    episodes: list[tuple[tuple[int, int], dict[str, np.ndarray]]] = []
    current = [_Columns() for _ in range(n_envs)]
    starts = [(0, i) for i in range(n_envs)]
    started_len = 0  # transitions in finished + running episodes
    step = 0
    bar = tqdm(total=n_transitions, desc=desc, unit="step", mininterval=2.0, disable=desc is None)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(torch_seed)
            while active.any():
                mean, log_std, _ = actor.get_action_dist_params(torch.as_tensor(obs, dtype=torch.float32))
                squashed, logp = actor.action_dist.log_prob_from_params(mean, log_std)
                squashed, logp = squashed.numpy(), logp.numpy()
                for i in np.flatnonzero(active):
                    env, u = envs[i], envs[i].unwrapped
                    action = (low + 0.5 * (squashed[i] + 1.0) * (high - low)).astype(np.float32)
                    qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
                    nxt, rew, term, trunc, _ = env.step(action)
                    current[i].append((obs[i], action, rew, nxt, term, trunc, qpos, qvel, logp[i]))
                    started_len += 1
                    bar.update(1)
                    obs[i] = nxt
                    if term or trunc:
                        episodes.append((starts[i], current[i].arrays()))
                        current[i] = _Columns()
                        if n_episodes is not None or started_len >= n_transitions:
                            active[i] = False
                        else:
                            obs[i] = env.reset()[0]
                            starts[i] = (step + 1, i)
                step += 1
    finally:
        bar.close()
        for e in envs:
            e.close()
    episodes.sort(key=lambda item: item[0])
    data = _concat([arrays for _, arrays in episodes])
    if n_transitions is not None:
        data = {k: v[:n_transitions] for k, v in data.items()}
        if not (data["terminals"][-1] or data["timeouts"][-1]):
            data["timeouts"][-1] = True  # the last episode was cut to make the size exact
    return data


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def episode_returns(data: dict[str, np.ndarray]) -> np.ndarray:
    """Undiscounted return of every episode (split on terminals | timeouts; a trailing open episode counts)."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    if len(ends) == 0 or ends[-1] != len(data["rewards"]):
        ends = np.append(ends, len(data["rewards"]))
    csum = np.concatenate([[0.0], np.cumsum(data["rewards"], dtype=np.float64)])
    return csum[ends] - csum[np.concatenate([[0], ends[:-1]])]


# ------------------------------------------------------------------------------------------------ metadata


def _metadata(task: Task, scale: str, seed: int, recipe: Recipe, cache: BehaviorCache, data: dict,
              source: str) -> dict:
    rets = episode_returns(data)
    norm = task.normalized_score(rets)
    ev = cache.evals()
    # Only the policies this split uses, and the evaluations up to the last of them: the metadata of a
    # medium-replay file must not depend on whether the expert was trained before it was generated.
    used = {"random": ("random",), "medium": ("random", "medium"), "medium-replay": ("random", "medium"),
            "expert": ("random", "medium", "expert"), "medium-expert": ("random", "medium", "expert")}[task.split]
    last_step = max(ev[w]["step"] for w in used if ev.get(w))
    history = [h for h in ev.get("history", []) if h[0] <= last_step]
    meta = {
        "task": task.name, "env_id": task.env_id, "split": task.split, "scale": scale, "seed": int(seed),
        "source": source, "algorithm": f"SAC (stable-baselines3 {sb3.__version__})",
        "recipe_json": json.dumps(dataclasses.asdict(recipe), sort_keys=True),
        "behavior_cache_key": cache.key,
        "medium_threshold_return": float(medium_threshold(task)),
        "n_transitions": int(len(data["rewards"])), "n_episodes": int(len(rets)),
        "n_terminals": int(data["terminals"].sum()), "n_timeouts": int(data["timeouts"].sum()),
        "cut_last_episode": int(_is_cut(data, task)),
        "return_min": float(rets.min()), "return_median": float(np.median(rets)), "return_mean": float(rets.mean()),
        "return_max": float(rets.max()), "normalized_min": float(norm.min()),
        "normalized_median": float(np.median(norm)), "normalized_max": float(norm.max()),
        "eval_history_json": json.dumps(history),
        "versions_json": json.dumps(library_versions(), sort_keys=True),
    }
    for which in used:
        info = ev.get(which) or {}
        if info:
            meta[f"{which}_policy_step"] = int(info["step"])
            meta[f"{which}_policy_eval_return"] = float(info["eval_return"])
            meta[f"{which}_policy_eval_normalized"] = float(task.normalized_score(info["eval_return"]))
    if ev.get("medium"):
        meta["medium_reached"] = int(bool(ev["medium"]["reached"]))
    return meta


def _is_cut(data: dict, task: Task) -> bool:
    """Whether the dataset's last episode ends in a timeout that is not the env's time limit."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    start = ends[-2] + 1 if len(ends) > 1 else 0
    return bool(data["timeouts"][-1] and not data["terminals"][-1]
                and len(data["rewards"]) - start != task.max_episode_steps)


# ------------------------------------------------------------------------------------------------ files


def _npz(path: Path, data: dict[str, np.ndarray]) -> None:
    """A flat D4RL dict as .npz, atomically; "/" in keys becomes "__" (read back with the reverse)."""
    atomic_npz(path, {k.replace("/", "__"): v for k, v in data.items()})
