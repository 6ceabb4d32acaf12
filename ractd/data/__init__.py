"""Datasets: D4RL HDF5 and Minari sources, local maze2d generation, training windows and normalization.

Everything is a flat dict of numpy arrays in D4RL's layout ("observations", "infos/qpos", "metadata/...").
CLI: python -m ractd.data {generate,info,download,export} --help.
"""

from ractd.data.d4rl import (
    d4rl_cache_path,
    download_d4rl,
    load_d4rl_hdf5,
    load_dataset,
    local_dataset_path,
    read_metadata,
    write_d4rl_hdf5,
)
from ractd.data.windows import (
    LazyWindows,
    Normalizer,
    episode_bounds,
    locomotion_windows,
    maze_windows,
    return_to_go,
    rtg_settings,
)

__all__ = [
    "LazyWindows",
    "Normalizer",
    "d4rl_cache_path",
    "download_d4rl",
    "episode_bounds",
    "load_d4rl_hdf5",
    "load_dataset",
    "local_dataset_path",
    "locomotion_windows",
    "maze_windows",
    "read_metadata",
    "return_to_go",
    "rtg_settings",
    "write_d4rl_hdf5",
]
