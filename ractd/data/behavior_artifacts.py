"""Behavior policies as versioned artifacts: rebuild a locomotion dataset without training SAC again.

A fresh machine has no SAC run in its cache; training one takes from half an hour (hopper) to hours (walker2d)
on a few CPUs. The policies themselves are small, so the repository keeps them (package data under
ractd/data/behavior/, `ARTIFACT_DIR`), one folder per env, scale and seed:

    <root>/<env name>/<scale>-seed<seed>/
        behavior.json   recipe (and its key), evals (history, random / medium / expert), library versions,
                        returns, the sha256 of every file below, the replay fingerprint and rebuild check
        random.pt, medium.pt, expert.pt   the SAC actors' state_dicts (the critics play no part in the data)
        replay.npz      what medium-replay cannot be rebuilt without (see below)

medium-replay is every transition SAC saw until the medium snapshot: it comes from a policy that changed at
every step, so no snapshot can record it again. But MuJoCo is deterministic: the observations, rewards,
terminals, timeouts and states follow from each episode's reset state (qpos, qvel: the first transition's
infos/qpos, infos/qvel) and the actions taken. replay.npz therefore keeps exactly those, plus the per-step
infos/action_log_probs of the changing policy: actions (N, act_dim) float32, action_log_probs (N,) float32,
reset_qpos (E, nq) float64, reset_qvel (E, nv) float64, each stored as its bytes split into byte planes (the
float's sign/exponent bytes compress well apart from its mantissa bytes) and deflated. `rebuild_replay`
replays them in the env: reset, then the very sequence env.reset runs (mj_resetData, set_state), then step.
`export_artifacts` rebuilds the buffer from what it wrote and compares it with the SAC run's replay before it
keeps the files (max abs difference per array, recorded in behavior.json); `install_artifacts` rebuilds it on
the machine that needs it and compares the result's sha256 per array with the exporter's (a different CPU or
MuJoCo build may round differently: the rebuild is still a consistent dataset, and a warning says so).

The recipe key in behavior.json must equal the current recipe's (`locomotion_recipes.recipe_for`); otherwise
the artifacts belong to another recipe and generation falls back to SAC.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import platform
from pathlib import Path

import mujoco
import numpy as np
import torch
from tqdm.auto import tqdm

from ractd import RactdError
from ractd.data.locomotion_recipes import Recipe, env_name, library_versions
from ractd.data.locomotion_rollouts import (
    Columns,
    actor_state_dict,
    episode_returns,
    load_npz,
    save_npz,
)
from ractd.io import atomic_torch_save, atomic_write, atomic_write_json
from ractd.tasks import gym_make

log = logging.getLogger(__name__)

ARTIFACT_DIR = Path(__file__).resolve().parent / "behavior"
POLICIES = ("random", "medium", "expert")
FORMAT = 1
REPLAY_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "infos/qpos",
               "infos/qvel", "infos/action_log_probs")
_STORED = {"actions": np.float32, "action_log_probs": np.float32, "reset_qpos": np.float64,
           "reset_qvel": np.float64}


def artifact_folder(env_id: str, scale: str, seed: int, root: Path = ARTIFACT_DIR) -> Path:
    """<root>/<env name>/<scale>-seed<seed> (the folder may not exist)."""
    return Path(root) / env_name(env_id) / f"{scale}-seed{int(seed)}"


def find_artifacts(env_id: str, scale: str, seed: int, recipe: Recipe, root: Path | None = ARTIFACT_DIR):
    """The artifact folder of (env, scale, seed) if it exists and was made with `recipe`; else None (a folder
    made with another recipe is logged and ignored). root None: no artifacts."""
    if root is None:
        return None
    folder = artifact_folder(env_id, scale, seed, root)
    if not (folder / "behavior.json").is_file():
        return None
    meta = read_behavior_json(folder)
    if meta["recipe_key"] != recipe.key():
        log.warning("%s holds behavior policies of recipe %s, not the current %s: training SAC instead", folder,
                    meta["recipe_key"], recipe.key())
        return None
    return folder


def read_behavior_json(folder: Path) -> dict:
    meta = json.loads((Path(folder) / "behavior.json").read_text())
    if meta.get("format") != FORMAT:
        raise RactdError(f"{folder}/behavior.json has format {meta.get('format')}, expected {FORMAT}")
    return meta


# ------------------------------------------------------------------------------------------------ the replay


def replay_inputs(replay: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the medium-replay data is rebuilt from: actions, action_log_probs, and each episode's reset state
    (infos/qpos, infos/qvel of its first transition)."""
    ends = np.flatnonzero(replay["terminals"] | replay["timeouts"]) + 1
    starts = np.concatenate([[0], ends[ends < len(replay["rewards"])]])
    return {"actions": replay["actions"].astype(np.float32), "action_log_probs":
            replay["infos/action_log_probs"].astype(np.float32), "reset_qpos": replay["infos/qpos"][starts],
            "reset_qvel": replay["infos/qvel"][starts]}


def rebuild_replay(env_id: str, inputs: dict[str, np.ndarray], desc: str | None = None) -> dict[str, np.ndarray]:
    """The medium-replay transitions (flat D4RL dict) re-simulated from `replay_inputs`.

    Episode e starts from (reset_qpos[e], reset_qvel[e]) and runs the next actions until the env terminates or
    truncates it; the data ends after the last action (a last episode cut there gets timeouts = True, as the
    SAC run's replay does). Raises if the actions and reset states do not fit together (episodes left over, or
    actions left over after the last episode).
    """
    actions, logp = inputs["actions"], inputs["action_log_probs"]
    qpos0, qvel0 = inputs["reset_qpos"], inputs["reset_qvel"]
    n, n_episodes = len(actions), len(qpos0)
    env = gym_make(env_id)
    u = env.unwrapped
    rows, i = Columns(), 0
    bar = tqdm(total=n, desc=desc, unit="step", mininterval=2.0, disable=desc is None)
    try:
        env.reset(seed=0)  # once, for the wrappers' checks; every episode below resets the env itself
        for e in range(n_episodes):
            if i == n:
                raise RactdError(f"replay rebuild: {n_episodes - e} reset states left after the last action")
            env.reset()
            mujoco.mj_resetData(u.model, u.data)  # what MujocoEnv.reset does before reset_model's set_state
            u.set_state(qpos0[e], qvel0[e])
            obs = u._get_obs()
            while i < n:
                qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
                nxt, rew, term, trunc, _ = env.step(actions[i])
                rows.append((obs, actions[i], rew, nxt, term, trunc, qpos, qvel, logp[i]))
                i += 1
                bar.update(1)
                obs = nxt
                if term or trunc:
                    break
    finally:
        bar.close()
        env.close()
    if i != n:
        raise RactdError(f"replay rebuild: {n - i} actions left after the last of {n_episodes} episodes")
    data = rows.arrays()
    if n and not (data["terminals"][-1] or data["timeouts"][-1]):
        data["timeouts"][-1] = True  # the SAC run's replay ends where medium arrived, mid-episode
    return data


def compare_replays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Max abs difference per REPLAY_KEYS array (inf where shapes differ; flags compared as 0/1)."""
    out = {}
    for k in REPLAY_KEYS:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if x.shape != y.shape:
            out[k] = float("inf")
        else:
            out[k] = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0))
    return out


def fingerprint(data: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 of every REPLAY_KEYS array's bytes (dtype and shape included)."""
    out = {}
    for k in REPLAY_KEYS:
        x = np.ascontiguousarray(data[k])
        out[k] = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode() + x.tobytes()).hexdigest()
    return out


def _write_inputs(path: Path, inputs: dict[str, np.ndarray]) -> None:
    """Each array as uint8 byte planes (itemsize, *shape), deflated (savez_compressed), atomically."""
    planes = {}
    for k, dtype in _STORED.items():
        x = np.ascontiguousarray(inputs[k], dtype=dtype)
        planes[k] = np.moveaxis(x.view(np.uint8).reshape(x.shape + (x.itemsize,)), -1, 0).copy()
    atomic_write(path, lambda f: np.savez_compressed(f, **planes))


def read_replay_inputs(path: Path) -> dict[str, np.ndarray]:
    """The arrays `_write_inputs` wrote, in their own dtypes and shapes."""
    out = {}
    with np.load(path) as z:
        for k, dtype in _STORED.items():
            planes = z[k]
            out[k] = np.ascontiguousarray(np.moveaxis(planes, 0, -1)).view(dtype)[..., 0]
    return out


# ------------------------------------------------------------------------------------------------ export


def export_artifacts(cache, root: Path = ARTIFACT_DIR) -> dict:
    """Write `cache`'s behavior (a SAC-trained ractd.data.generate_locomotion.BehaviorCache: random, medium and
    expert policies, evals, replay; the expert is trained first if missing) into artifact_folder(..., root).

    The replay is rebuilt from the written inputs and compared with the SAC run's before behavior.json is
    written (it is the last file, so a folder without it is never used); a rebuild that differs raises.
    Returns behavior.json's content.
    """
    for which in POLICIES:
        cache.ensure(which)
    folder = artifact_folder(cache.env_id, cache.scale, cache.seed, root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "behavior.json").unlink(missing_ok=True)
    for which in POLICIES:
        state = torch.load(cache.policy_path(which), map_location="cpu", weights_only=True)
        atomic_torch_save(folder / f"{which}.pt", actor_state_dict(state))
    replay = load_npz(cache.dir / "replay.npz")
    _write_inputs(folder / "replay.npz", replay_inputs(replay))
    rebuilt = rebuild_replay(cache.env_id, read_replay_inputs(folder / "replay.npz"),
                             desc=f"{cache.env_id} replay rebuild check")
    diff = compare_replays(rebuilt, replay)
    if any(v != 0.0 for v in diff.values()):
        raise RactdError(f"the replay rebuilt from {folder} differs from {cache.dir}/replay.npz: max abs "
                         f"differences {diff}")
    meta = _behavior_json(cache, folder, replay, diff)
    atomic_write_json(folder / "behavior.json", meta, indent=1)
    log.info("%s: behavior artifacts written to %s (%s bytes)", cache.key, folder, meta["file_bytes"])
    return read_behavior_json(folder)


def _behavior_json(cache, folder: Path, replay: dict[str, np.ndarray], diff: dict[str, float]) -> dict:
    evals = cache.evals()
    files = [f"{w}.pt" for w in POLICIES] + ["replay.npz"]
    returns = {}
    for which in POLICIES:
        info = evals[which]
        returns[which] = {"step": int(info["step"]), "eval_return": float(info["eval_return"]),
                          "eval_normalized": float(cache.task.normalized_score(info["eval_return"]))}
    ep = episode_returns(replay)
    returns["medium-replay"] = {"n_transitions": int(len(replay["rewards"])), "n_episodes": int(len(ep)),
                                "return_min": float(ep.min()), "return_median": float(np.median(ep)),
                                "return_max": float(ep.max())}
    return {
        "format": FORMAT, "env_id": cache.env_id, "scale": cache.scale, "seed": int(cache.seed),
        "recipe_key": cache.recipe.key(), "recipe": dataclasses.asdict(cache.recipe),
        "sac_cache_key": cache.key, "evals": evals, "returns": returns, "versions": library_versions(),
        "replay_fingerprint": fingerprint(replay),
        "rebuild_check": {"max_abs_diff": diff, "machine": platform.machine(), "processor": platform.processor(),
                          "platform": platform.platform()},
        "sha256": {f: _sha256(folder / f) for f in files},
        "file_bytes": {f: (folder / f).stat().st_size for f in files},
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ install


def install_policies(folder: Path, dest: Path) -> None:
    """Copy the artifact policies into the cache folder `dest` (random.pt, medium.pt, expert.pt, evals.json),
    after checking each file's sha256 against behavior.json (a Git LFS pointer or a damaged file raises)."""
    meta = read_behavior_json(folder)
    dest.mkdir(parents=True, exist_ok=True)
    for which in POLICIES:
        blob = _checked_bytes(folder, f"{which}.pt", meta)
        torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)  # readable before it is installed
        atomic_write(dest / f"{which}.pt", blob)
    atomic_write_json(dest / "evals.json", meta["evals"], indent=1)


def install_replay(folder: Path, dest: Path, env_id: str) -> dict[str, np.ndarray]:
    """Rebuild the medium-replay data from `folder` into dest/replay.npz; returns it. A rebuild whose arrays
    differ from the exporter's (another CPU or MuJoCo build) is kept, with a warning naming the arrays; the
    outcome goes to dest/replay-check.json."""
    meta = read_behavior_json(folder)
    _checked_bytes(folder, "replay.npz", meta)
    data = rebuild_replay(env_id, read_replay_inputs(folder / "replay.npz"), desc=f"{env_id} replay rebuild")
    differs = [k for k, h in fingerprint(data).items() if meta["replay_fingerprint"][k] != h]
    if differs:
        log.warning("%s: the rebuilt medium-replay differs from the exporter's in %s (exported on %s; here %s): "
                    "a consistent re-simulation, not bit-identical", folder, ", ".join(differs),
                    meta["rebuild_check"]["platform"], platform.platform())
    save_npz(dest / "replay.npz", data)
    atomic_write_json(dest / "replay-check.json", {"artifacts": str(folder), "exact": not differs,
                                                   "differing_arrays": differs})
    return data


def _checked_bytes(folder: Path, name: str, meta: dict) -> bytes:
    blob = (Path(folder) / name).read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"][name]:
        raise RactdError(f"{folder}/{name} does not match the sha256 in its behavior.json (damaged, or a Git "
                         "LFS pointer: fetch the real file)")
    return blob
