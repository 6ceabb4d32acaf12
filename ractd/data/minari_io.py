"""Minari datasets (checked against minari 0.5.4): load one into our flat D4RL dict, export ours to Minari.

Mapping between a Minari episode of T steps and D4RL rows:
    observations (T + 1, D)      → observations = obs[:T], next_observations = obs[1:]
    actions, rewards (T, ...)    → actions, rewards
    terminations / truncations   → terminals / timeouts
    infos[key] (T or T + 1, ...) → infos/<key> = infos[key][:T] (numeric leaves only)
Minari's PointMaze datasets (D4RL/pointmaze/*) have dict observations {observation (x, y, vx, vy),
achieved_goal, desired_goal} in PointMaze coordinates: they are converted to D4RL maze2d coordinates with
ractd.maze.pointmaze_to_d4rl, giving observations (N, 4) and infos/goal, infos/qpos, infos/qvel.

Export writes our arrays unchanged (flat Box observations; maze data stays in D4RL coordinates, recorded in
the description) with `minari.create_dataset_from_buffers` and one `EpisodeBuffer` per episode (no jax
needed). An episode's final observation is next_observations[e - 1] when present, else observations[e - 1]
repeated; next_observations that differ from the shifted observations inside an episode are kept verbatim
in infos. Round trip ours → Minari → ours returns every original array unchanged (plus next_observations).
Datasets live under $MINARI_DATASETS_PATH (default ~/.minari/datasets).
"""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np

from ractd import RactdError
from ractd.data.windows import episode_bounds
from ractd.maze import maze_map, pointmaze_to_d4rl

log = logging.getLogger(__name__)

EXPORT_TAG = "ractd-export"


def _minari():
    try:
        import minari
    except ImportError as e:  # pragma: no cover - minari is a dependency
        raise RactdError(f"minari is not installed ({e}); pip install minari") from None
    return minari


def _open_minari(dataset_id: str, download: bool):
    minari = _minari()
    try:
        return minari.load_dataset(dataset_id, download=False)
    except FileNotFoundError:
        if not download:
            raise RactdError(f"Minari dataset {dataset_id} is not in the local store ($MINARI_DATASETS_PATH)") from None
    except Exception as e:  # minari raises ValueError / KeyError for malformed ids or metadata
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RactdError(f"cannot open Minari dataset {dataset_id}: {reason}") from None
    try:
        minari.download_dataset(dataset_id)
        return minari.load_dataset(dataset_id, download=False)
    except Exception as e:  # network errors surface as many exception types (requests, google-cloud, OSError)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RactdError(
            f"cannot download Minari dataset {dataset_id} ({reason}); copy it into $MINARI_DATASETS_PATH, or use "
            f"the D4RL file or a local dataset (python -m ractd.data generate TASK)") from None


def load_minari(dataset_id: str, task=None, download: bool = True) -> dict:
    """Load a Minari dataset by id as the flat D4RL dict (see module doc); downloads it if missing and allowed.

    task: needed for dict (PointMaze) observations, to convert coordinates. Returns observations (N, D),
    next_observations (N, D), actions (N, A), rewards (N,), terminals (N,) bool, timeouts (N,) bool,
    infos/* (N, ...), metadata/* (minari_id, and our exported metadata when the dataset came from us).
    """
    ds = _open_minari(dataset_id, download)
    cols: dict[str, list] = {}
    extra_infos: dict[str, list] = {}
    maze_shape = None
    for ep in ds.iterate_episodes():
        t = len(ep.rewards)
        obs = ep.observations
        if isinstance(obs, dict):
            if not {"observation", "desired_goal"} <= set(obs):
                raise RactdError(f"Minari dataset {dataset_id}: unsupported dict observations {sorted(obs)}")
            if task is None or task.kind != "maze":
                raise RactdError(f"Minari dataset {dataset_id} has PointMaze observations; pass its maze task")
            if maze_shape is None:
                maze_shape = maze_map(task).shape
            obs, goal = _pointmaze_to_d4rl_obs(obs, maze_shape)
            extra_infos.setdefault("infos/goal", []).append(goal[:t])
            extra_infos.setdefault("infos/qpos", []).append(obs[:t, :2])
            extra_infos.setdefault("infos/qvel", []).append(obs[:t, 2:])
        obs = np.asarray(obs)
        if obs.ndim != 2 or len(obs) != t + 1:
            raise RactdError(f"Minari dataset {dataset_id}: episode {ep.id} has observations {obs.shape} for {t} steps")
        cols.setdefault("observations", []).append(obs[:t])
        cols.setdefault("next_observations", []).append(obs[1:])
        cols.setdefault("actions", []).append(np.asarray(ep.actions))
        cols.setdefault("rewards", []).append(np.asarray(ep.rewards))
        cols.setdefault("terminals", []).append(np.asarray(ep.terminations, bool))
        cols.setdefault("timeouts", []).append(np.asarray(ep.truncations, bool))
        for key, value in (ep.infos or {}).items():
            value = np.asarray(value) if not isinstance(value, dict) else None
            if value is None or value.dtype.kind not in "biuf" or len(value) < t:
                continue
            cols.setdefault(f"infos/{key}", []).append(value[:t])
    if not cols:
        raise RactdError(f"Minari dataset {dataset_id} has no episodes")
    data = {k: np.concatenate(v) for k, v in cols.items() if len(v) == len(cols["rewards"])}
    if "infos/next_observations" in data:  # written by export_minari when they are not the shifted observations
        data["next_observations"] = data.pop("infos/next_observations")
    data.update({k: np.concatenate(v) for k, v in extra_infos.items()})
    meta = {"minari_id": dataset_id}
    description = ds.storage.metadata.get("description") or ""
    if description.startswith(EXPORT_TAG):
        try:
            meta.update(json.loads(description.split("\n", 1)[1]))
        except (IndexError, ValueError):
            log.warning("Minari dataset %s: unreadable ractd metadata in its description", dataset_id)
    data.update({f"metadata/{k}": v for k, v in meta.items()})
    log.info("loaded Minari %s: %d transitions", dataset_id, len(data["rewards"]))
    return data


def _pointmaze_to_d4rl_obs(obs: dict, maze_shape) -> tuple[np.ndarray, np.ndarray]:
    """PointMaze dict observations (T+1 rows) → D4RL (x, y, vx, vy) (T+1, 4) and goal (T+1, 2), float32."""
    o = np.asarray(obs["observation"], dtype=np.float64)
    pos = pointmaze_to_d4rl(o[:, :2], maze_shape)
    vel = pointmaze_to_d4rl(o[:, 2:4], maze_shape, vector=True)
    goal = pointmaze_to_d4rl(np.asarray(obs["desired_goal"], dtype=np.float64), maze_shape)
    return np.concatenate([pos, vel], axis=1).astype(np.float32), goal.astype(np.float32)


def export_minari(data: dict, dataset_id: str, task=None, description: str | None = None,
                  overwrite: bool = False):
    """Write our flat D4RL dict (N rows) as a local Minari dataset `dataset_id`; returns the MinariDataset.

    One EpisodeBuffer per episode (ractd.data.windows.episode_bounds); infos/* go to the episode infos,
    metadata/* (and the coordinate convention) into the description as JSON. task (optional) sets the env
    spec and the reference scores.
    """
    import gymnasium as gym

    minari = _minari()
    from minari.data_collector import EpisodeBuffer

    if dataset_id in minari.list_local_datasets():
        if not overwrite:
            raise RactdError(f"Minari dataset {dataset_id} already exists; pass overwrite=True or pick another id")
        minari.delete_dataset(dataset_id)
    obs = np.asarray(data["observations"])
    act = np.asarray(data["actions"])
    nxt = data.get("next_observations")
    infos = {k[len("infos/"):]: np.asarray(v) for k, v in data.items() if k.startswith("infos/")}
    bounds = episode_bounds(data["terminals"], data["timeouts"])
    if nxt is not None:
        nxt = np.asarray(nxt)
        within = np.ones(len(obs), bool)
        within[[e - 1 for _, e in bounds]] = False
        if not np.array_equal(nxt[:-1][within[:-1]], obs[1:][within[:-1]]):
            # next_observations are not the shifted observations (e.g. synthetic data): keep them verbatim.
            infos["next_observations"] = nxt
    buffers = []
    for k, (s, e) in enumerate(bounds):
        last = np.asarray(nxt[e - 1]) if nxt is not None else obs[e - 1]
        buffers.append(EpisodeBuffer(
            id=k,
            observations=np.concatenate([obs[s:e], last[None]]),
            actions=act[s:e],
            rewards=np.asarray(data["rewards"][s:e]),
            terminations=np.asarray(data["terminals"][s:e], bool),
            truncations=np.asarray(data["timeouts"][s:e], bool),
            infos={key: v[s:e] for key, v in infos.items()},
        ))
    meta = {k[len("metadata/"):]: v for k, v in data.items() if k.startswith("metadata/")}
    meta.setdefault("coordinates", "d4rl" if task is not None and task.kind == "maze" else "native")
    text = f"{EXPORT_TAG}: {description or 'exported by ractd'}\n" + json.dumps(meta, default=_jsonable)
    in_range = act.size and act.min() >= -1.0 and act.max() <= 1.0
    kwargs = dict(
        observation_space=gym.spaces.Box(-np.inf, np.inf, shape=obs.shape[1:], dtype=obs.dtype),
        action_space=gym.spaces.Box(-1.0 if in_range else -np.inf, 1.0 if in_range else np.inf,
                                    shape=act.shape[1:], dtype=act.dtype),
        algorithm_name="ractd",
        description=text,
    )
    if task is not None:
        kwargs.update(ref_min_score=task.ref_min_score, ref_max_score=task.ref_max_score)
        if task.kind == "maze":
            from ractd.tasks import gymnasium_robotics

            gymnasium_robotics()
        kwargs["env"] = gym.spec(task.env_id)
    try:
        with warnings.catch_warnings():  # minari warns about every unset optional field (author, permalink, ...)
            warnings.simplefilter("ignore", UserWarning)
            ds = minari.create_dataset_from_buffers(dataset_id, buffers, **kwargs)
    except (ValueError, AssertionError) as e:
        raise RactdError(f"cannot create Minari dataset {dataset_id}: {str(e).splitlines()[0]}") from None
    log.info("exported %d episodes to Minari %s", len(buffers), dataset_id)
    return ds


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return str(v)
