"""SAC training of the behavior policies (one run per env, scale and seed), resumable bit-identically.

`Trainer(cache).run(until)` trains a `BehaviorCache` (ractd.data.generate_locomotion) until its medium or its
expert policy exists, recording every transition the agent sees until medium (the medium-replay data) and
checkpointing every `eval_every` steps: model, optimizers, replay buffer, the env's exact MuJoCo integration
state and every RNG state, so an interrupted run resumes as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import pickle
import random
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from ractd import RactdError
from ractd.data.locomotion_recipes import medium_threshold
from ractd.data.locomotion_rollouts import (
    Columns,
    episode_returns,
    log_prob,
    one_torch_thread,
    record_rollouts,
    save_npz,
)
from ractd.io import atomic_torch_save, atomic_write, atomic_write_json
from ractd.tasks import gym_make

try:  # optional extra "locomotion" (ractd.data.locomotion_recipes.require_sb3 reports it missing)
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv
except ImportError:  # pragma: no cover
    BaseCallback = object

# BehaviorCache (annotations below) is ractd.data.generate_locomotion's, which imports this module: named, not
# imported, so the import graph keeps no cycle (tests/test_layering.py).

log = logging.getLogger(__name__)


@contextlib.contextmanager
def locked(folder: Path):
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


class Recorder(BaseCallback):
    """Records every transition SAC sees (the medium-replay data) and drives the progress bar.

    Runs after env.step and before SB3 stores the transition, so model._last_obs is still the state the action
    was taken in and the policy is still the one that chose it (its log-prob is recorded; uniform warm-up
    actions get the uniform density's log-prob).
    """

    def __init__(self, bar):
        super().__init__(verbose=0)
        self.bar = bar
        self.recording = True
        self.rows = Columns()

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
                logp = float(log_prob(model.actor, obs[None], loc["buffer_actions"][:1])[0])
        nxt = info["terminal_observation"] if done else loc["new_obs"][0]
        row = (obs, np.array(loc["actions"][0], np.float32), np.float32(loc["rewards"][0]),
               np.array(nxt, np.float32), info["env_terminated"], info["env_truncated"], info["qpos_before"],
               info["qvel_before"], np.float32(logp))
        self.rows.append(row)
        return True

    def arrays(self) -> dict[str, np.ndarray]:
        return self.rows.arrays()


class Trainer:
    """One SAC run of a BehaviorCache: fresh or resumed from train.ckpt, stopping once `until` exists."""

    def __init__(self, cache: "BehaviorCache"):  # noqa: F821  (see the note above)
        self.cache, self.recipe = cache, cache.recipe

    def run(self, until: str) -> None:
        self.cache.dir.mkdir(parents=True, exist_ok=True)
        with one_torch_thread():
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
        recorder = Recorder(bar)
        if state["rows"] is not None:
            recorder.rows = Columns(state["rows"])
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
                atomic_write_json(c.dir / "evals.json", public_evals(state), indent=1)
            if state["medium"] is not None and not c.policy_path("expert").is_file():
                state["expert"] = {"step": model.num_timesteps, "eval_return": state["history"][-1][1]}
                atomic_write_json(c.dir / "evals.json", public_evals(state), indent=1)
                atomic_torch_save(c.policy_path("expert"), model.policy.state_dict())
                log.info("%s: expert saved (step %d, eval return %.1f)", c.key, model.num_timesteps,
                         state["expert"]["eval_return"])
        finally:
            bar.close()
            venv.close()

    def _save_medium(self, model, recorder: Recorder, state: dict) -> None:
        c = self.cache
        data = recorder.arrays()
        cut = bool(len(data["rewards"]) and not (data["terminals"][-1] or data["timeouts"][-1]))
        if cut:  # medium arrived mid-episode: the replay data ends with a cut episode
            data["timeouts"][-1] = True
        state["medium"]["replay_cut_last_episode"] = cut
        save_npz(c.dir / "replay.npz", data)
        atomic_torch_save(c.policy_path("medium"), model.policy.state_dict())
        recorder.recording = False
        recorder.rows = Columns()
        log.info("%s: medium saved (step %d, eval return %.1f, %d replay transitions)", c.key,
                 state["medium"]["step"], state["medium"]["eval_return"], len(data["rewards"]))

    def _evaluate(self, model) -> float:
        """Mean return of `eval_episodes` stochastic episodes; leaves the training RNG streams untouched."""
        r = self.recipe
        step = int(model.num_timesteps)
        data = record_rollouts(model.actor, self.cache.env_id, n_episodes=r.eval_episodes,
                               seed=(self.cache.seed, 1, step), n_envs=r.eval_episodes, desc=None)
        return float(np.mean(episode_returns(data)))


def public_evals(state: dict) -> dict:
    """evals.json's content: the training state without the recorded rows."""
    return {k: v for k, v in state.items() if k != "rows"}


def _make_train_env(env_id: str):
    return DummyVecEnv([lambda: Monitor(_StateInInfo(gym_make(env_id)))])


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
