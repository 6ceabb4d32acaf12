"""D4RL-format HDF5 datasets: write, validate/load, download into d4rl's own cache.

File layout (D4RL v2): flat datasets at the root -- observations (N, obs_dim), actions (N, act_dim),
rewards (N,), terminals (N,), timeouts (N,), optionally next_observations (N, obs_dim) -- plus groups
infos/* (locomotion: action_log_probs (N,), qpos (N, nq), qvel (N, nv); maze2d: goal (N, 2), qpos (N, 2),
qvel (N, 2)) and metadata/* (scalars, strings, small lists). In memory a dataset is a flat dict whose keys
carry the slashes ("infos/qpos", "metadata/algorithm").
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ractd import RactdError

log = logging.getLogger(__name__)


def write_d4rl_hdf5(path, data: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
    """Write `data` (flat keys with slashes, arrays with a shared first dim N) as D4RL HDF5.

    metadata values (str / int / float / bool / list) go under "metadata/<key>"; keys of `data` that already
    start with "metadata/" are written as they are. Atomic: written to a temporary file in the same folder,
    then os.replace'd onto `path`. Returns the path.
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = dict(data)
    for k, v in (metadata or {}).items():
        items[f"metadata/{k}"] = v
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d keys)", path, len(items))
    return path
