"""The results store of the evaluation studies and its statistics.

The results store and everything derived from it: the paper's tables (Markdown and CSV) and figures (PNG).

Store. One folder, two Parquet datasets:
  <store>/episodes/part-<digest>.parquet   one row per evaluated episode (EPISODE_SCHEMA)
  <store>/rewards/part-<digest>.parquet    one row per (method, dataset state) for Fig. 3 (REWARD_SCHEMA)
Each completed block of episodes (one actor's block of seeds of one cell) is one part file, written
atomically (ractd.io.atomic_write: temp file, fsync, rename), so a reader never sees half a block and an
interrupted run loses at most the blocks in flight. A part's name is the digest of its rows' keys, so writing
the same block again replaces the same file. Part files were chosen over one rewritten file because appends
are then O(block) rather than O(store), and concurrent writers never overwrite each other's rows.

Exactly once. An episode's key is (task, method, checkpoint, seed), where checkpoint is the short sha256 of
the checkpoint file (`checkpoint_hash`): `done_keys()` lists the keys already stored, and the evaluators run only
the missing ones. Should two runs race and store a key twice (two blocks split differently), reading keeps the
row of the first part file in name order and drops the others (`episodes()`), and `compact()` rewrites the
store as one deduplicated part.

Statistics (`cell_stats`). Every measured cell is the mean +- standard error over episodes (std with ddof 1
over sqrt(n)), as the paper reports, plus the interquartile mean IQM = scipy.stats.trim_mean(x, 0.25) with a
95% percentile bootstrap interval (scipy.stats.bootstrap, BOOTSTRAP_RESAMPLES resamples, fixed seed, so the
same store gives the same table). The percentile method is used rather than BCa because BCa is undefined on
degenerate samples (maze2d scores are often all equal) and returns NaN there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
from pathlib import Path
from typing import Iterable

import numpy as np

from ractd import RactdError, __version__

log = logging.getLogger(__name__)


EPISODE_KEY = ("task", "method", "checkpoint", "seed")


REWARD_KEY = ("task", "method", "checkpoint", "state_index")


BOOTSTRAP_RESAMPLES = 2000


BOOTSTRAP_SEED = 0


def _schemas():
    import pyarrow as pa

    episode = pa.schema([
        ("task", pa.string()), ("method", pa.string()), ("sampler", pa.string()), ("nfe", pa.int64()),
        ("checkpoint", pa.string()), ("checkpoint_path", pa.string()), ("seed", pa.int64()),
        ("return", pa.float64()), ("normalized_score", pa.float64()), ("length", pa.int64()),
        ("time_per_action", pa.float64()), ("wall_s", pa.float64()), ("terminated", pa.bool_()),
        ("truncated", pa.bool_()), ("batch_size", pa.int64()), ("max_steps", pa.int64()),
        ("init_scaled", pa.bool_()), ("sigma", pa.float64()), ("scale", pa.string()), ("preset", pa.string()),
        ("train_steps", pa.int64()), ("device", pa.string()), ("versions", pa.string()), ("created", pa.string()),
    ])
    reward = pa.schema([
        ("task", pa.string()), ("method", pa.string()), ("checkpoint", pa.string()), ("state_index", pa.int64()),
        ("reward", pa.float64()), ("reward_checkpoint", pa.string()), ("scale", pa.string()),
    ])
    return episode, reward


def checkpoint_hash(path, length: int = 16) -> str:
    """sha256 of a checkpoint file's bytes, first `length` hex digits: the checkpoint's identity in the store."""
    path = Path(path)
    if not path.is_file():
        raise RactdError(f"checkpoint not found: {path}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def library_versions() -> dict:
    """Versions of the libraries that produce an episode (stored as JSON with every row)."""
    import gymnasium
    import torch

    out = {"ractd": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "gymnasium": gymnasium.__version__, "python": platform.python_version()}
    try:
        from ractd.tasks import gymnasium_robotics

        out["gymnasium_robotics"] = gymnasium_robotics().__version__
    except Exception:  # optional for locomotion-only installs
        pass
    return out


def episode_rows(records: list[dict], **meta) -> list[dict]:
    """Rollout records (ractd.rollout) plus per-cell metadata -> rows of the episodes dataset.

    meta must give method, sampler, nfe, checkpoint (hash), checkpoint_path, scale, and may give wall_s, max_steps,
    init_scaled, sigma, preset, train_steps, device, versions (dict or JSON), created."""
    import datetime

    missing = {"method", "sampler", "nfe", "checkpoint", "checkpoint_path", "scale"} - set(meta)
    if missing:
        raise ValueError(f"episode_rows needs {sorted(missing)}")
    versions = meta.get("versions") or library_versions()
    base = {
        "wall_s": float("nan"), "max_steps": -1, "init_scaled": True, "sigma": float("nan"), "preset": "",
        "train_steps": -1, "device": "cpu", "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        **meta, "versions": versions if isinstance(versions, str) else json.dumps(versions, sort_keys=True),
    }
    names = _schemas()[0].names
    rows = []
    for r in records:
        merged = {**r, **base}
        rows.append({k: merged[k] for k in names})
    return rows


class ResultsStore:
    """The Parquet results store at `root` (see the module doc)."""

    def __init__(self, root):
        self.root = Path(root)
        self.episodes_dir = self.root / "episodes"
        self.rewards_dir = self.root / "rewards"

    # writing ------------------------------------------------------------------------------------
    def _write(self, folder: Path, rows: list[dict], schema, key: tuple[str, ...]) -> Path | None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ractd.io import atomic_write

        if not rows:
            return None
        absent = [k for k in schema.names if k not in rows[0]]
        if absent:
            raise ValueError(f"rows lack columns {absent}")
        table = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)
        digest = hashlib.sha256(json.dumps(sorted([[r[k] for k in key] for r in rows])).encode()).hexdigest()[:24]
        path = folder / f"part-{digest}.parquet"
        atomic_write(path, lambda f: pq.write_table(table, f))
        log.debug("wrote %d rows to %s", len(rows), path)
        return path

    def write_episodes(self, rows: list[dict]) -> Path | None:
        """Write one block of episode rows (episode_rows output) as one part file, atomically."""
        return self._write(self.episodes_dir, rows, _schemas()[0], EPISODE_KEY)

    def write_rewards(self, rows: list[dict]) -> Path | None:
        """Write Fig. 3 rows (task, method, checkpoint, state_index, reward, reward_checkpoint, scale)."""
        return self._write(self.rewards_dir, rows, _schemas()[1], REWARD_KEY)

    # reading ------------------------------------------------------------------------------------
    @staticmethod
    def _read(folder: Path, key: tuple[str, ...]) -> list[dict]:
        import pyarrow.parquet as pq

        rows, seen = [], set()
        for part in sorted(folder.glob("part-*.parquet")):
            for r in pq.read_table(part).to_pylist():
                k = tuple(r[c] for c in key)
                if k not in seen:  # dedupe: the first part (in name order) wins
                    seen.add(k)
                    rows.append(r)
        return rows

    def episodes(self) -> list[dict]:
        """All episode rows, each key once, sorted by (task, method, checkpoint, seed)."""
        return sorted(self._read(self.episodes_dir, EPISODE_KEY), key=lambda r: tuple(r[c] for c in EPISODE_KEY))

    def rewards(self) -> list[dict]:
        return sorted(self._read(self.rewards_dir, REWARD_KEY), key=lambda r: tuple(r[c] for c in REWARD_KEY))

    def done_keys(self) -> set[tuple]:
        """{(task, method, checkpoint, seed)} of every stored episode: these are never run again."""
        return {tuple(r[c] for c in EPISODE_KEY) for r in self._read(self.episodes_dir, EPISODE_KEY)}

    def done_reward_keys(self) -> set[tuple]:
        return {tuple(r[c] for c in REWARD_KEY) for r in self._read(self.rewards_dir, REWARD_KEY)}

    def n_parts(self) -> int:
        return len(list(self.episodes_dir.glob("part-*.parquet")))

    def drop_tasks(self, tasks, keep_methods=()) -> int:
        """Remove the rows of `tasks` (episodes and Fig. 3 rewards) but those of `keep_methods`, each dataset
        rewritten as one part file as compact() writes it: a task re-run with new models (a longer teacher)
        replaces its cells instead of sitting beside them, and keeps the cells of models it does not retrain (BC,
        the data's level). Returns the number of rows removed."""
        tasks, keep_methods = set(tasks), set(keep_methods)
        removed = 0
        for folder, rows, write in self._datasets():
            keep = [r for r in rows if r["task"] not in tasks or r["method"] in keep_methods]
            if len(keep) < len(rows):
                removed += len(rows) - len(keep)
                self._rewrite(folder, keep, write)
        return removed

    def compact(self) -> None:
        """Rewrite each dataset as one deduplicated part file (the old parts are removed afterwards)."""
        for folder, rows, write in self._datasets():
            self._rewrite(folder, rows, write)

    def _datasets(self):
        """(folder, its rows, its writer) of the episodes and of the Fig. 3 rewards."""
        return ((self.episodes_dir, self.episodes(), self.write_episodes),
                (self.rewards_dir, self.rewards(), self.write_rewards))

    @staticmethod
    def _rewrite(folder: Path, rows: list[dict], write) -> None:
        """`rows` written as one part, then every other part of `folder` removed."""
        old = set(folder.glob("part-*.parquet"))
        new = write(rows)
        for p in old - {new}:
            p.unlink(missing_ok=True)


def cell_stats(x: Iterable[float], seed: int = BOOTSTRAP_SEED, n_resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """{n, mean, se, iqm, iqm_low, iqm_high} of a sample (see the module doc; NaN where undefined)."""
    from scipy import stats

    x = np.asarray(list(x), dtype=np.float64)
    n = len(x)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "se": nan, "iqm": nan, "iqm_low": nan, "iqm_high": nan}
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else nan
    iqm = float(stats.trim_mean(x, 0.25))
    lo = hi = nan
    if n > 1:
        if np.ptp(x) == 0:
            lo = hi = float(x[0])
        else:
            res = stats.bootstrap((x,), lambda a, axis: stats.trim_mean(a, 0.25, axis=axis), confidence_level=0.95,
                                  n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"n": n, "mean": float(x.mean()), "se": se, "iqm": iqm, "iqm_low": lo, "iqm_high": hi}


def _group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Episodes grouped by (task, method). A method evaluated with several checkpoints keeps the newest
    checkpoint's episodes (the latest 'created'), so a retrained model replaces the old cell."""
    by_ckpt: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        by_ckpt.setdefault((r["task"], r["method"], r["checkpoint"]), []).append(r)
    out: dict[tuple[str, str], list[dict]] = {}
    for (task, method, _), eps in sorted(by_ckpt.items(), key=lambda kv: max(r["created"] for r in kv[1])):
        out[(task, method)] = eps
    return out
