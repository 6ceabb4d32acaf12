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

Behavior artifacts (ractd.data.behavior_artifacts): the repository keeps the SAC actors of each env at scale
"small", seed 0 (random / medium / expert, and the actions, log-probs and reset states that rebuild
medium-replay by re-simulating MuJoCo) under ractd/data/behavior/. When a task's (env, scale, seed) has them
and their recipe key equals the current recipe's, generation installs them into the cache and records rollouts
/ rebuilds the replay from them: no SAC, minutes instead of hours. Otherwise (absent, another recipe, or
`artifacts=None`) it trains SAC. `python -m ractd.data export-behavior ENV --scale S` writes a SAC run's
artifacts (and checks that the replay rebuilt from them equals the run's).

Cache (per env, scale and seed, shared by all tasks of that env): ractd.paths.cache_dir()/"behavior"/<env_id>/
<scale>-seed<seed>-<recipe hash>/ holds random.pt, medium.pt, expert.pt (policy state_dicts), replay.npz (the
medium-replay transitions), rollouts-*.npz (the rollout datasets), evals.json, and train.ckpt, the latest
training checkpoint (model + optimizers + replay buffer + env physics state + all RNG states); a cache filled
from artifacts is the same folder name with "-artifacts" appended, and never trains. Every file is
written to a temporary name and renamed. Training stops as soon as the requested policy exists; asking for the
expert later continues from train.ckpt. An interrupted run resumes from the last checkpoint (every
`eval_every` steps), and because the checkpoint restores every RNG and the exact MuJoCo integration state, a
resumed run is bit-identical to an uninterrupted one (tested). The training lives in ractd.data.sac_training,
the recipes in ractd.data.locomotion_recipes, the rollout recorder in ractd.data.locomotion_rollouts.

Determinism: same seed -> same dataset on the same machine and library versions (one torch thread is used for
training; tested on tiny). Different CPUs / BLAS builds may change float rounding and hence the whole run.

Episode flags follow the env exactly: terminated -> terminals, truncated (the 1000-step TimeLimit) -> timeouts.
The only other timeout is a cut: the last transition of the replay data when medium arrived mid-episode, and the
last transition of a rollout dataset cut to its exact size; metadata "cut_last_episode" says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from ractd import RactdError
from ractd.data.behavior_artifacts import (
    ARTIFACT_DIR,
    find_artifacts,
    install_policies,
    install_replay,
)
from ractd.data.locomotion_recipes import (  # noqa: F401
    D4RL_SINGLE_POLICY_SIZE,
    MEDIUM_FRACTION,
    RECIPE_OVERRIDES,
    RECIPES,
    SPLITS,
    Recipe,
    env_name,
    library_versions,
    medium_threshold,
    recipe_for,
    require_sb3,
    sb3,
)
from ractd.data.locomotion_rollouts import (
    concat,
    episode_returns,
    load_actor,
    load_npz,
    one_torch_thread,
    record_rollouts,
    save_npz,
)
from ractd.data.sac_training import Recorder, Trainer, locked  # noqa: F401  (Recorder: for tests)
from ractd.paths import cache_dir
from ractd.tasks import Task, get_task

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ public API


def generate_locomotion(task: Task, scale: str = "small", seed: int = 0, out: Path | None = None,
                        artifacts: Path | None = ARTIFACT_DIR) -> Path:
    """Generate `task`'s dataset (D4RL HDF5) from behavior artifacts, cached policies or a fresh SAC run.

    task: a locomotion Task; its split (medium / medium-replay / medium-expert, or random / expert from
    `locomotion_task`) picks the recipe. scale: "tiny" | "small" | "full" (see RECIPES). out: default
    ractd.data.d4rl.local_dataset_path(task, scale). artifacts: the root of the behavior artifacts (default the
    package's ractd/data/behavior/; None: train SAC even where artifacts exist). Returns the written path
    (atomic write).

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
    cache = BehaviorCache(task.env_id, scale, seed, artifacts=artifacts)
    if task.split == "medium-replay":
        data = cache.replay()
        source = "SAC replay: every transition seen during training until the medium snapshot"
    elif task.split == "medium-expert":
        n = recipe.rollout_size or task.dataset_size // 2
        data = concat([cache.rollouts("medium", n), cache.rollouts("expert", n)])
        source = f"medium policy rollouts ({n}) followed by expert policy rollouts ({n})"
    else:
        n = recipe.rollout_size or D4RL_SINGLE_POLICY_SIZE
        data = cache.rollouts(task.split, n)
        source = f"{task.split} policy rollouts ({n})"
    meta = _metadata(task, scale, seed, recipe, cache, data, source)
    path = Path(out) if out is not None else local_dataset_path(task, scale)
    write_d4rl_hdf5(path, data, meta)
    log.info("%s (%s, seed %d): %d transitions, %d episodes, return min/median/max %.1f/%.1f/%.1f -> %s",
             task.name, scale, seed, len(data["rewards"]), meta["n_episodes"], meta["return_min"],
             meta["return_median"], meta["return_max"], path)
    return path


def locomotion_task(env: str, split: str) -> Task:
    """The Task for any of SPLITS, including random / expert which the registry does not list.

    random and expert reuse the env's registry facts (reference scores, env id) from its medium task; their
    D4RL size is 1M transitions.
    """
    if split not in SPLITS:
        raise RactdError(f"unknown locomotion split {split!r}; expected one of {', '.join(SPLITS)}")
    if split in ("medium", "medium-replay", "medium-expert"):
        return get_task(f"{env}-{split}")
    base = get_task(f"{env}-medium")
    return dataclasses.replace(base, name=f"{env}-{split}", d4rl_name=f"{env}-{split}-v2",
                               d4rl_url=base.d4rl_url.replace("_medium-", f"_{split}-"), minari_id=None,
                               dataset_size=D4RL_SINGLE_POLICY_SIZE)


# ------------------------------------------------------------------------------------------------ the cache


class BehaviorCache:
    """Behavior policies of one (env_id, scale, seed), shared by tasks: installed from the behavior artifacts
    under `artifacts` when they match the recipe, else trained with SAC on demand (resumable).

    Files in `self.dir` (see module doc). `ensure("medium" | "expert")` trains only as far as needed.
    `self.artifacts`: the artifact folder in use, or None (SAC).
    """

    def __init__(self, env_id: str, scale: str, seed: int, artifacts: Path | None = ARTIFACT_DIR):
        require_sb3()
        self.env_id, self.scale, self.seed = env_id, scale, int(seed)
        self.recipe = recipe_for(env_id, scale)
        self.artifacts = find_artifacts(env_id, scale, self.seed, self.recipe, artifacts)
        suffix = "-artifacts" if self.artifacts is not None else ""
        self.key = f"{env_id}/{scale}-seed{self.seed}-{self.recipe.key()}{suffix}"
        self.dir = cache_dir() / "behavior" / self.key
        self.task = get_task(f"{env_name(env_id)}-medium")

    # -- policies

    def policy_path(self, which: str) -> Path:
        return self.dir / f"{which}.pt"

    def ensure(self, which: str) -> Path:
        """Path of the `which` ("random" | "medium" | "expert") policy snapshot, installing the artifacts or
        training if it is missing."""
        if not self.policy_path(which).is_file():
            with locked(self.dir):  # another process may be training the same policies right now
                if self.policy_path(which).is_file():
                    pass
                elif self.artifacts is not None:
                    install_policies(self.artifacts, self.dir)
                else:
                    Trainer(self).run(until="expert" if which == "expert" else "medium")
        return self.policy_path(which)

    def evals(self) -> dict:
        """evals.json: {"history": [[step, mean_return], ...], "medium": {...}, "expert": {...}, "random": {...}}."""
        path = self.dir / "evals.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    # -- datasets

    def replay(self) -> dict[str, np.ndarray]:
        """The medium-replay transitions (flat D4RL dict, see generate_locomotion)."""
        self.ensure("medium")
        path = self.dir / "replay.npz"
        if self.artifacts is not None and not path.is_file():
            with locked(self.dir):
                if not path.is_file():
                    return install_replay(self.artifacts, self.dir, self.env_id)
        return load_npz(path)

    def rollouts(self, which: str, n: int) -> dict[str, np.ndarray]:
        """n transitions of the `which` policy (flat D4RL dict), cached as rollouts-<which>-<n>.npz."""
        path = self.dir / f"rollouts-{which}-{n}.npz"
        if not path.is_file():
            actor = load_actor(self.ensure(which), self.env_id, self.recipe)
            tag = {"random": 11, "medium": 12, "expert": 13}[which]
            with one_torch_thread():
                data = record_rollouts(actor, self.env_id, n_transitions=n, seed=(self.seed, tag),
                                       n_envs=self.recipe.rollout_envs, desc=f"{self.env_id} {which} rollouts")
            save_npz(path, data)
        return load_npz(path)


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
        "behavior_cache_key": cache.key, "behavior_source": _behavior_source(cache),
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
    check = cache.dir / "replay-check.json"
    if task.split == "medium-replay" and check.is_file():
        meta["replay_rebuild_exact"] = int(json.loads(check.read_text())["exact"])
    return meta


def _behavior_source(cache: BehaviorCache) -> str:
    """Where the behavior policies came from: this machine's SAC run, or the artifacts (and what made them)."""
    if cache.artifacts is None:
        return "SAC run on this machine"
    from ractd.data.behavior_artifacts import read_behavior_json

    v = read_behavior_json(cache.artifacts)["versions"]
    where = "/".join(Path(cache.artifacts).parts[-2:])
    return (f"behavior artifacts {where} (SAC with stable-baselines3 {v['stable_baselines3']}, torch {v['torch']}, "
            f"mujoco {v['mujoco']})")


def _is_cut(data: dict, task: Task) -> bool:
    """Whether the dataset's last episode ends in a timeout that is not the env's time limit."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    start = ends[-2] + 1 if len(ends) > 1 else 0
    return bool(data["timeouts"][-1] and not data["terminals"][-1]
                and len(data["rewards"]) - start != task.max_episode_steps)
