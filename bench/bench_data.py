"""Data benchmark (not a test): write and load a 1M-transition D4RL-format file, build its windows; maze2d.

    python bench/bench_data.py [--transitions 1000000] [--maze-steps 1000000] [--skip-maze]

1. Writes a synthetic hopper-shaped dataset (obs 11, act 3, D4RL v2 keys, episodes ended by terminals and
   timeouts) to a temporary folder with write_d4rl_hdf5 (atomic: temp file object, fsyncs, rename) and, for
   the ratios, with a plain h5py write to the path with and without fsync; then, in a fresh subprocess, times
   load_d4rl_hdf5 + locomotion_windows (c = 16, h = 1, paper gamma / penalty) + Normalizer.fit and reports the
   subprocess' peak RSS.
   Targets: <= 10 s, <= 2 GB.
2. Generates maze2d-umaze with the D4RL recipe (noise on) for --maze-steps steps (paper size 1M by default)
   and reports the time; with fewer steps it extrapolates linearly to 1M and says so. Target: <= 5 min.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_hopper(n: int, seed: int = 0) -> dict:
    """Hopper-shaped D4RL arrays: episodes of 20..1000 steps, a third of them ended by terminals."""
    rng = np.random.default_rng(seed)
    terminals = np.zeros(n, bool)
    timeouts = np.zeros(n, bool)
    t = 0
    while t < n:
        length = int(rng.integers(20, 1001))
        end = min(t + length, n) - 1
        (terminals if rng.random() < 1 / 3 else timeouts)[end] = True
        t = end + 1
    obs = rng.normal(size=(n, 11)).astype(np.float32)
    return {
        "observations": obs,
        "next_observations": np.roll(obs, -1, axis=0),
        "actions": rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
        "rewards": rng.normal(3, 1, size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
        "infos/action_log_probs": rng.normal(size=n).astype(np.float32),
        "infos/qpos": rng.normal(size=(n, 6)).astype(np.float32),
        "infos/qvel": rng.normal(size=(n, 6)).astype(np.float32),
    }


def plain_h5py_write(path: Path, data: dict, fsync: bool = False) -> None:
    """The same datasets written straight to a path (no temp file): the reference for the atomic write."""
    import os

    import h5py

    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=np.asarray(value), chunks=True)
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def measure(path: str) -> None:
    """Runs in a fresh process: load + windows + normalizers; prints JSON."""
    from ractd.data.d4rl import load_d4rl_hdf5
    from ractd.data.windows import Normalizer, locomotion_windows, rtg_settings
    from ractd.tasks import get_task

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    data = load_d4rl_hdf5(path, kind="locomotion")
    t1 = time.perf_counter()
    gamma, penalty = rtg_settings(get_task("hopper-medium"))
    w = locomotion_windows(data, horizon=16, obs_history=1, gamma=gamma, termination_penalty=penalty)
    t2 = time.perf_counter()
    norms = [Normalizer.fit(data["observations"]), Normalizer.fit(data["actions"]), Normalizer.fit(w["rtg"][:, None])]
    t3 = time.perf_counter()
    print(json.dumps({
        "load_s": t1 - t0, "windows_s": t2 - t1, "normalizers_s": t3 - t2, "total_s": t3 - t0,
        "n_windows": len(w["rtg"]), "actions_shape": list(w["actions"].shape), "obs_shape": list(w["obs"].shape),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_imports_mb": rss0 / 1024, "normalizer_dims": [n.dim for n in norms],
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transitions", type=int, default=1_000_000)
    p.add_argument("--maze-steps", type=int, default=1_000_000, help="maze2d-umaze steps (paper size: 1M)")
    p.add_argument("--skip-maze", action="store_true")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(args.measure)
        return

    from ractd.data.d4rl import write_d4rl_hdf5

    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_hopper(args.transitions)
        t_atomic, t_plain, t_synced = [], [], []  # interleaved, best of 3: the machine is shared
        for _ in range(3):
            t0 = time.perf_counter()
            path = write_d4rl_hdf5(Path(tmp) / "hopper-synthetic.hdf5", data)
            t_atomic.append(time.perf_counter() - t0)
            for times, sync in ((t_plain, False), (t_synced, True)):
                t0 = time.perf_counter()
                plain_h5py_write(Path(tmp) / "plain.hdf5", data, fsync=sync)
                times.append(time.perf_counter() - t0)
                (Path(tmp) / "plain.hdf5").unlink()
        del data
        a, p, s = min(t_atomic), min(t_plain), min(t_synced)
        print(f"wrote {args.transitions} synthetic hopper transitions ({path.stat().st_size / 2**20:.0f} MiB), "
              f"best of 3: atomic write_d4rl_hdf5 {a:.2f} s; plain h5py.File(path) {p:.2f} s (ratio {a / p:.2f}); "
              f"plain + fsync {s:.2f} s (ratio {a / s:.2f})")
        out = subprocess.run([sys.executable, __file__, "--measure", str(path)], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"load {r['load_s']:.2f} s + windows {r['windows_s']:.2f} s + normalizers {r['normalizers_s']:.2f} s "
              f"= {r['total_s']:.2f} s (target <= 10 s) for {r['n_windows']} windows, actions {r['actions_shape']}")
        print(f"peak RSS {r['peak_rss_mb']:.0f} MB (after imports {r['rss_after_imports_mb']:.0f} MB; "
              f"target <= 2048 MB)")

    if args.skip_maze:
        return
    from ractd.data.generate_maze import generate_maze_arrays

    t0 = time.perf_counter()
    data, meta = generate_maze_arrays("maze2d-umaze", args.maze_steps, seed=0, noise=True, progress=True)
    dt = time.perf_counter() - t0
    rate = args.maze_steps / dt
    note = "measured" if args.maze_steps >= 1_000_000 else f"extrapolated from {args.maze_steps} steps"
    print(f"maze2d-umaze generation: {args.maze_steps} steps in {dt:.1f} s ({rate:.0f} steps/s); "
          f"1M steps (paper size): {1_000_000 / rate:.0f} s ({note}; target <= 300 s); "
          f"goals reached {meta['goals_reached']}/{meta['goals_attempted']}")


if __name__ == "__main__":
    main()
