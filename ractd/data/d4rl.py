"""D4RL-format HDF5 datasets: write, validate/load, download into d4rl's own cache.

File layout (D4RL v2): flat datasets at the root -- observations (N, obs_dim), actions (N, act_dim),
rewards (N,), terminals (N,), timeouts (N,), optionally next_observations (N, obs_dim) -- plus groups
infos/* (locomotion: action_log_probs (N,), qpos (N, nq), qvel (N, nv); maze2d: goal (N, 2), qpos (N, 2),
qvel (N, 2)) and metadata/* (scalars, strings, small lists). In memory a dataset is a flat dict whose keys
carry the slashes ("infos/qpos", "metadata/algorithm").
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ractd import RactdError
from ractd.errors import one_line
from ractd.io import atomic_write
from ractd.paths import d4rl_dir, datasets_dir

log = logging.getLogger(__name__)


def write_d4rl_hdf5(path, data: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
    """Write `data` (flat keys with slashes, arrays with a shared first dim N) as D4RL HDF5.

    metadata values (str / int / float / bool / list) go under "metadata/<key>"; keys of `data` that already
    start with "metadata/" are written as they are. Written atomically (ractd.io.atomic_write). Returns the path.
    """
    import h5py

    path = Path(path)
    items = dict(data)
    for k, v in (metadata or {}).items():
        if v is not None:  # HDF5 has no null; an absent key reads back as absent
            items[f"metadata/{k}"] = v

    def write(fileobj):
        with h5py.File(fileobj, "w") as f:
            for key, value in items.items():
                if key.startswith("metadata/"):
                    if isinstance(value, str):
                        f.create_dataset(key, data=value, dtype=h5py.string_dtype())
                    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
                        f.create_dataset(key, data=list(value), dtype=h5py.string_dtype())
                    else:
                        f.create_dataset(key, data=np.asarray(value))
                else:
                    arr = np.asarray(value)
                    kw = {"compression": None} if arr.ndim == 0 else {"chunks": True}
                    f.create_dataset(key, data=arr, **kw)

    atomic_write(path, write)
    log.info("wrote %s (%d keys)", path, len(items))
    return path


# --------------------------------------------------------------------------------------------- reading

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
KIND_KEYS = {"auto": (), "locomotion": (), "maze": ("infos/goal",)}
# Expected rank of the arrays whose rank is fixed by the format.
_RANK = {"observations": 2, "next_observations": 2, "actions": 2, "rewards": 1, "terminals": 1, "timeouts": 1,
         "infos/goal": 2, "infos/qpos": 2, "infos/qvel": 2, "infos/action_log_probs": 1}


def _metadata_value(value):
    """h5py metadata value → str / int / float / bool / list."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open(path: Path):
    import h5py

    if not path.is_file():
        raise RactdError(f"dataset file not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise RactdError(f"{path} is not a readable HDF5 file (truncated or corrupt? {one_line(e)}); "
                         f"delete it and download or generate it again") from None


def read_metadata(path) -> dict:
    """The "metadata/*" entries of a D4RL HDF5 file as {key without prefix: python value}."""
    path = Path(path)
    with _open(path) as f:
        if "metadata" not in f:
            return {}
        try:
            return {k: _metadata_value(v[()]) for k, v in f["metadata"].items() if hasattr(v, "shape")}
        except OSError as e:
            raise RactdError(f"{path}: cannot read metadata (truncated or corrupt? {one_line(e)})") from None


def load_d4rl_hdf5(path, kind: str = "auto") -> dict[str, np.ndarray]:
    """Read and validate a D4RL-format HDF5 file; returns the flat dict (see module doc).

    kind: "locomotion", "maze" (also requires infos/goal) or "auto" (maze checks if infos/goal is present).
    Checks: required keys, equal first dims N, ranks of the known keys, floating observations / actions /
    rewards, terminals / timeouts boolean or 0/1, all floating arrays finite. terminals and timeouts are
    returned as bool (N,), rewards as (N,) float32 ((N, 1) is flattened). Each failure is a one-line
    RactdError naming the file and the problem.
    """
    import h5py

    path = Path(path)
    if kind not in KIND_KEYS:
        raise RactdError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KIND_KEYS)}")
    out: dict = {}
    with _open(path) as f:
        names: list[str] = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        try:
            for name in names:
                out[name] = f[name][()]
        except (OSError, KeyError) as e:
            raise RactdError(f"{path}: cannot read {name!r} (truncated or corrupt file? {one_line(e)})") from None
    for key in REQUIRED_KEYS + KIND_KEYS[kind]:
        if key not in out:
            raise RactdError(f"{path} lacks the key {key!r} required for a D4RL {kind} dataset")
    for key in list(out):
        if key.startswith("metadata/"):
            out[key] = _metadata_value(out[key])
    arrays = [k for k in out if not k.startswith("metadata/")]
    if out["rewards"].ndim == 2 and out["rewards"].shape[1] == 1:
        out["rewards"] = out["rewards"][:, 0]
    n = out["observations"].shape[0] if out["observations"].ndim else -1
    for key in arrays:
        arr = out[key]
        if arr.ndim == 0 or arr.shape[0] != n:
            raise RactdError(f"{path}: {key!r} has shape {arr.shape} but observations has {n} rows")
        if key in _RANK and arr.ndim != _RANK[key]:
            raise RactdError(f"{path}: {key!r} has shape {arr.shape}, expected {_RANK[key]} dimensions")
    for key in ("observations", "actions", "rewards"):
        if out[key].dtype.kind != "f":
            raise RactdError(f"{path}: {key!r} has dtype {out[key].dtype}, expected a float type")
    for key in ("terminals", "timeouts"):
        arr = out[key]
        if arr.dtype != bool:
            if arr.dtype.kind not in "biuf" or not np.isin(arr, (0, 1)).all():
                raise RactdError(f"{path}: {key!r} must hold booleans (0/1), found dtype {arr.dtype}")
            out[key] = arr.astype(bool)
    for key in arrays:
        arr = out[key]
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise RactdError(f"{path}: {key!r} contains {bad} NaN or inf values")
    log.info("loaded %s: %d transitions, %d keys", path, n, len(out))
    return out


# --------------------------------------------------------------------------------------------- sources


def d4rl_cache_path(task) -> Path:
    """Where d4rl itself caches the task's file: ractd.paths.d4rl_dir() / basename of the D4RL URL."""
    task = _task(task)
    return d4rl_dir() / task.d4rl_url.rsplit("/", 1)[-1]


def local_dataset_path(task, scale: str) -> Path:
    """A locally generated dataset: ractd.paths.datasets_dir() / "{task.name}-{scale}.hdf5"."""
    task = _task(task)
    return datasets_dir() / f"{task.name}-{scale}.hdf5"


def _task(task):
    from ractd.tasks import Task, get_task

    return task if isinstance(task, Task) else get_task(task)


def _kind(task) -> str:
    return "maze" if task.kind == "maze" else "locomotion"


def download_d4rl(task, force: bool = False, timeout: float = 30.0) -> Path:
    """Download the task's D4RL HDF5 file into d4rl's cache (ractd.io.atomic_write); returns its path.

    An existing file is reused unless force. The download is validated before it takes the cache name. On any
    network failure: a RactdError saying where to put the file by hand and how to generate a local dataset
    instead.
    """
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    task = _task(task)
    path = d4rl_cache_path(task)
    if path.is_file() and not force:
        return path
    hint = (f"download {task.d4rl_url} by hand to {path} (d4rl's cache, $D4RL_DATASET_DIR), or generate a local "
            f"dataset: python -m ractd.data generate {task.name}")

    def fetch(out):
        with urllib.request.urlopen(task.d4rl_url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        out.flush()
        load_d4rl_hdf5(out.name, kind=_kind(task))  # validate before it takes the cache name

    try:
        atomic_write(path, fetch)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or one_line(e)
        raise RactdError(f"cannot download {task.name} ({reason}); {hint}") from None
    log.info("downloaded %s", path)
    return path


SOURCES = ("auto", "d4rl", "local", "minari")


def load_dataset(task, source: str = "auto", scale: str = "small") -> dict:
    """Load a task's dataset as the flat D4RL dict (D4RL coordinates for maze tasks).

    source: "auto" = d4rl's cache file if present, else the local generated file of `scale`, else a
    RactdError saying how to get one; "d4rl" = download if missing; "local" = generated file of `scale`;
    "minari" = the task's Minari dataset (downloaded when the network allows). Maze datasets get a
    "metadata/eval_goal" entry (D4RL's fixed evaluation goal) if they lack one; ractd.data.windows uses it.
    """
    task = _task(task)
    if source not in SOURCES:
        raise RactdError(f"unknown dataset source {source!r}; expected one of {', '.join(SOURCES)}")
    local = local_dataset_path(task, scale)
    if source == "auto":
        if d4rl_cache_path(task).is_file():
            source = "d4rl"
        elif local.is_file():
            source = "local"
        else:
            raise RactdError(
                f"no dataset for {task.name}: neither {d4rl_cache_path(task)} nor {local} exists; run "
                f"`python -m ractd.data generate {task.name} --scale {scale}` or use source='d4rl' to download")
    if source == "d4rl":
        data = load_d4rl_hdf5(download_d4rl(task), kind=_kind(task))
    elif source == "local":
        if not local.is_file():
            raise RactdError(f"no local dataset {local}; run `python -m ractd.data generate {task.name} "
                             f"--scale {scale}`")
        data = load_d4rl_hdf5(local, kind=_kind(task))
    else:
        from ractd.data.minari_io import load_minari

        if task.minari_id is None:
            raise RactdError(f"Minari has no dataset for {task.name}; use source='d4rl' or 'local'")
        data = load_minari(task.minari_id, task=task)
    if task.kind == "maze" and "metadata/eval_goal" not in data:
        data["metadata/eval_goal"] = [float(v) for v in task.goal_cell]
    return data
