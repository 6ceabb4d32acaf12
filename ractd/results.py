"""The results store and everything derived from it: the paper's tables (Markdown and CSV) and figures (PNG).

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

Tables. The paper's published numbers live in one place, `PAPER`, transcribed from the paper's tables
(/work/shared/paper/ractd-paper.txt: Tables 1-5, 10, 11); each table shows them in separate columns headed
"paper ...". Every measured cell names the scale at which it was measured (the study's scale label stored
with each episode, e.g. "quick", "cpu", "paper"). `build_tables` writes <out>/tableN.md and tableN.csv.

Figures (matplotlib Agg): Fig. 3 (the return distribution of CTD's and RACTD's rollouts, from the episodes), a
diagnostic beside it (histograms of R_psi of the first actions sampled by teacher, CTD and RACTD on dataset states,
from the rewards dataset), Fig. 4 (normalized score against the reward weight sigma),
and the distribution of episode scores per method.
"""

from __future__ import annotations

import dataclasses
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


# ---------------------------------------------------------------------------------------------- store

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

    def compact(self) -> None:
        """Rewrite each dataset as one deduplicated part file (the old parts are removed afterwards)."""
        for folder, rows, write in ((self.episodes_dir, self.episodes(), self.write_episodes),
                                    (self.rewards_dir, self.rewards(), self.write_rewards)):
            old = set(folder.glob("part-*.parquet"))
            new = write(rows)
            for p in old - {new}:
                p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- statistics

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


# ---------------------------------------------------------------------------------------------- paper numbers

_T1_TASKS = [f"{env}-{split}" for split in ("medium-expert", "medium", "medium-replay")
             for env in ("halfcheetah", "hopper", "walker2d")]


def _row(values: list) -> dict:
    """Table 1 row in the paper's column order (ME, M, MR; halfcheetah, hopper, walker2d each)."""
    return {t: (v if isinstance(v, tuple) else (v, None)) for t, v in zip(_T1_TASKS, values)}


# The paper's published numbers: {table: {method label: {task: (value, standard error or None)}}}.
# Scores are D4RL normalized; "time" entries are (seconds, NFE) on the paper's V100. Transcribed from the paper's
# Tables 1-5, 10, 11 (OCR artefacts resolved with the rows' published averages, e.g. walker2d-medium-replay
# RACTD 91.5: the nine scores average to the printed 97.6).
PAPER: dict[str, dict[str, dict[str, tuple]]] = {
    "table1": {
        "BC": _row([55.2, 52.5, 107.5, 42.6, 52.9, 75.3, 36.6, 18.1, 26.0]),
        "CQL": _row([91.6, 105.4, 108.8, 44.0, 58.5, 72.5, 45.5, 95.0, 77.2]),
        "IQL": _row([86.7, 91.5, 109.6, 47.4, 66.3, 78.3, 44.2, 94.7, 73.9]),
        "DT": _row([86.8, 107.6, 108.1, 42.6, 67.6, 74.0, 36.6, 82.7, 66.6]),
        "TT": _row([95.0, 110.0, 101.9, 46.9, 61.1, 79.0, 41.9, 91.5, 82.6]),
        "MOPO": _row([63.3, 23.7, 44.6, 42.3, 28.0, 17.8, 53.1, 67.5, 39.0]),
        "MOReL": _row([53.3, 108.7, 95.6, 42.1, 95.4, 77.8, 40.2, 93.6, 49.8]),
        "MBOP": _row([105.9, 55.1, 70.2, 44.6, 48.8, 41.0, 42.3, 12.4, 9.7]),
        "Diffusion QL": _row([(97.2, 0.4), (112.3, 0.8), (111.2, 0.9), (51.5, 0.3), (96.6, 3.4), (87.3, 0.5),
                              (48.3, 0.2), (102.0, 0.4), (98.0, 0.5)]),
        "Consistency AC": _row([(89.2, 3.3), (106.0, 1.3), (111.6, 0.7), (71.9, 0.8), (99.7, 2.3), (84.1, 0.3),
                                (62.7, 0.6), (100.4, 0.6), (83.0, 1.5)]),
        "Consistency BC": _row([(39.6, 3.4), (96.8, 4.6), (111.6, 0.7), (46.2, 0.4), (78.3, 2.6), (84.1, 0.3),
                                (45.4, 0.7), (100.4, 0.6), (80.8, 3.4)]),
        "Diffuser": _row([(88.9, 0.3), (103.3, 1.3), (106.9, 0.2), (42.8, 0.3), (74.3, 1.4), (79.6, 0.55),
                          (37.7, 0.5), (93.6, 0.4), (70.6, 1.6)]),
        "RACTD": _row([(95.9, 1.5), (129.0, 1.3), (119.6, 1.9), (59.3, 0.2), (121.0, 0.5), (98.9, 1.6),
                       (57.9, 1.0), (104.9, 2.1), (91.5, 2.6)]),
    },
    "table2": {
        "MPPI": {"maze2d-umaze": (33.2, None), "maze2d-medium": (10.2, None), "maze2d-large": (5.1, None)},
        "CQL": {"maze2d-umaze": (5.7, None), "maze2d-medium": (5.0, None), "maze2d-large": (12.5, None)},
        "IQL": {"maze2d-umaze": (47.4, None), "maze2d-medium": (34.9, None), "maze2d-large": (58.6, None)},
        "Diffuser": {"maze2d-umaze": (113.9, 3.1), "maze2d-medium": (121.5, 2.7), "maze2d-large": (123.0, 6.4)},
        "CTD": {"maze2d-umaze": (123.4, 1.0), "maze2d-medium": (119.8, 4.1), "maze2d-large": (127.1, 6.4)},
        "RACTD": {"maze2d-umaze": (125.7, 0.6), "maze2d-medium": (130.8, 1.8), "maze2d-large": (143.8, 0.0)},
    },
    "table2_time": {  # (seconds per plan, NFE)
        "Diffuser": {"maze2d-umaze": (1.664, 64), "maze2d-medium": (4.312, 256), "maze2d-large": (5.568, 256)},
        "CTD": {"maze2d-umaze": (0.029, 1), "maze2d-medium": (0.047, 1), "maze2d-large": (0.049, 1)},
        "RACTD": {"maze2d-umaze": (0.029, 1), "maze2d-medium": (0.047, 1), "maze2d-large": (0.049, 1)},
    },
    "table3": {  # hopper-medium-replay: score
        "Diffuser": {"hopper-medium-replay": (93.6, None)},
        "DDPM 15": {"hopper-medium-replay": (24.2, None)},
        "DDIM 15": {"hopper-medium-replay": (60.6, None)},
        "EDM (Teacher) 80": {"hopper-medium-replay": (114.2, None)},
        "RACTD (Student) 1": {"hopper-medium-replay": (104.9, None)},
    },
    "table3_time": {  # (seconds per action, NFE)
        "Diffuser": {"hopper-medium-replay": (0.644, 20)},
        "DDPM 15": {"hopper-medium-replay": (0.236, 15)},
        "DDIM 15": {"hopper-medium-replay": (0.208, 15)},
        "EDM (Teacher) 80": {"hopper-medium-replay": (2.134, 80)},
        "RACTD (Student) 1": {"hopper-medium-replay": (0.015, 1)},
    },
    "table4": {  # Table 4 (hopper-medium-replay) and Table 10 (walker2d-medium)
        "unconditioned teacher / unconditioned student": {"hopper-medium-replay": (50.8, 0.3),
                                                          "walker2d-medium": (93.3, 1.8)},
        "unconditioned teacher / reward-aware student": {"hopper-medium-replay": (104.9, 2.1),
                                                         "walker2d-medium": (98.9, 1.6)},
        "reward-aware teacher / unconditioned student": {"hopper-medium-replay": (96.2, 0.2),
                                                         "walker2d-medium": (97.0, 1.0)},
        "reward-aware teacher / reward-aware student": {"hopper-medium-replay": (96.0, 0.3),
                                                        "walker2d-medium": (94.5, 2.6)},
    },
    "table5": {"1": {"hopper-medium-replay": (104.9, 2.1)}, "2": {"hopper-medium-replay": (109.8, 0.9)},
               "3": {"hopper-medium-replay": (108.7, 0.1)}, "4": {"hopper-medium-replay": (107.9, 1.6)}},
    "table5_time": {"1": {"hopper-medium-replay": (0.0147, 1)}, "2": {"hopper-medium-replay": (0.0241, 2)},
                    "3": {"hopper-medium-replay": (0.0377, 3)}, "4": {"hopper-medium-replay": (0.0517, 4)}},
    "table11": {
        "DDPM 100": {"maze2d-umaze": (126.3, 0.7), "maze2d-medium": (126.8, 3.0), "maze2d-large": (144.8, 4.9)},
        "DDIM 10": {"maze2d-umaze": (121.2, 1.1), "maze2d-medium": (126.2, 2.8), "maze2d-large": (143.1, 4.9)},
        "DDIM 1": {"maze2d-umaze": (3.5, 4.7), "maze2d-medium": (-2.6, 12.5), "maze2d-large": (-1.5, 0.7)},
        "EDM 80": {"maze2d-umaze": (125.4, 0.6), "maze2d-medium": (120.1, 4.2), "maze2d-large": (149.0, 0.5)},
        "CTD 1": {"maze2d-umaze": (123.4, 1.0), "maze2d-medium": (119.8, 4.1), "maze2d-large": (127.1, 6.4)},
        "RACTD 1": {"maze2d-umaze": (125.7, 0.6), "maze2d-medium": (130.8, 1.8), "maze2d-large": (143.8, 0.0)},
    },
}
# Fig. 4 of the paper plots these reward weights (training curves on hopper-medium-replay).
PAPER_FIG4_SIGMAS = (0.3, 0.5, 0.7, 1.5)


def paper_value(table: str, label: str, task: str) -> tuple | None:
    return PAPER.get(table, {}).get(label, {}).get(task)


def fmt_paper(v: tuple | None) -> str:
    if v is None:
        return "—"
    value, se = v  # as printed in the paper (123.4 ± 1.0, 79.6 ± 0.55)
    return f"{value}" if se is None else f"{value} ± {se}"


# ---------------------------------------------------------------------------------------------- tables

@dataclasses.dataclass
class Table:
    """One rebuilt table: `rows` (dicts of plain values, for CSV) and `markdown` (tabulate, GitHub pipes)."""

    name: str
    title: str
    rows: list[dict]
    markdown: str

    def write(self, out: Path) -> tuple[Path, Path]:
        import csv
        import io

        from ractd.io import atomic_write

        md = atomic_write(Path(out) / f"{self.name}.md", f"### {self.title}\n\n{self.markdown}\n".encode())
        buf = io.StringIO()
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows(self.rows)
        csv_path = atomic_write(Path(out) / f"{self.name}.csv", buf.getvalue().encode())
        return md, csv_path


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


def network_calls(sampler: str, nfe: int) -> int:
    """Network calls per policy call of a stored (sampler, nfe): Heun over nfe Karras bins takes nfe - 1 steps of 2
    calls (edm.sample_heun; the schedule ends at sigma_min > 0, so no step is Euler): Heun-80 = 158; Euler over
    nfe bins takes nfe - 1; DDPM/DDIM and the student take nfe (their steps)."""
    if sampler == "heun":
        return 2 * (int(nfe) - 1)
    if sampler == "euler":
        return int(nfe) - 1
    return int(nfe)


def sampler_name(sampler: str, nfe: int) -> str:
    """How the document names a sampler's cost: 'Heun-80 (158 network calls)', 'Euler-80 (79 network calls)'."""
    if sampler in ("heun", "euler"):
        return f"{sampler.capitalize()}-{nfe} ({network_calls(sampler, nfe)} network calls)"
    return f"{sampler} {nfe}"


def _nfe_cell(eps: list[dict]) -> str | int:
    """The NFE column: network calls per policy call, with the sampler's name where they differ from the bins."""
    r = eps[0]
    return sampler_name(r["sampler"], r["nfe"]) if r["sampler"] in ("heun", "euler") else r["nfe"]


def _nfe_numbers(eps: list[dict] | None, mid: str) -> dict:
    if not eps or mid == "data":
        return {"nfe": None, "network_calls": None}
    return {"nfe": eps[0]["nfe"], "network_calls": network_calls(eps[0]["sampler"], eps[0]["nfe"])}


def is_ctd(eps: list[dict] | None) -> bool:
    """A RACTD cell whose reward weight is 0 (the sweep picked sigma = 0, or the task has no reward model): its
    student is CTD's. Read from the episodes' sigma, never from the task's name."""
    return bool(eps) and eps[0]["method"].startswith("ractd") and all(
        r["sigma"] is not None and float(r["sigma"]) == 0.0 for r in eps)


CTD_NOTE = "σ = 0, i.e. CTD"


def _score_cell(eps: list[dict] | None, absent: str = "missing") -> tuple[str, dict]:
    """('mean ± se · IQM x [lo, hi] · n=N · scale', numbers) of a cell's episodes; (absent, {}) if none. A RACTD
    cell at sigma = 0 (is_ctd) says so."""
    if not eps:
        return absent, {}
    s = cell_stats([r["normalized_score"] for r in eps])
    scale = "/".join(sorted({r["scale"] for r in eps}))
    se = "" if math.isnan(s["se"]) else f" ± {s['se']:.1f}"
    ci = "" if math.isnan(s["iqm_low"]) else f" [{s['iqm_low']:.1f}, {s['iqm_high']:.1f}]"
    text = f"{s['mean']:.1f}{se} · IQM {s['iqm']:.1f}{ci} · n={s['n']} · {scale}"
    if is_ctd(eps):
        text += f" · RACTD ({CTD_NOTE})"
    return text, {**s, "scale": scale}


NOT_MEASURED = "not measured"
# Baseline rows beside the methods of every table (ractd.study: "bc" is evaluated like a method; "data" and
# "behavior" are written by ractd.study.baseline_rows from the dataset, ractd.data.level). Absent: "not measured".
BASELINES = [("bc", "BC (CORL recipe)"), ("data", "data (the dataset's episodes)")]
# the final checkpoints of the selected students (ractd.study: ctd-final, ractd-final)
FINALS = [("ractd-final", "RACTD, final checkpoint"), ("ctd-final", "CTD, final checkpoint")]


def _behavior_cell(eps: list[dict] | None) -> tuple[str, dict]:
    """The generator's record of its behavior policies' evaluation (no episodes stored: a mean, no SE)."""
    if not eps:
        return NOT_MEASURED, {}
    parts = [f"{r['normalized_score']:.1f} ({r['sampler'].split(':')[-1]} policy at step {r['train_steps']}: mean of "
             f"{r['batch_size']} episodes, no SE)" for r in sorted(eps, key=lambda r: r["seed"])]
    return "; ".join(parts), {"mean": float(np.mean([r["normalized_score"] for r in eps]))}


def _time_cell(eps: list[dict] | None, kind: str) -> tuple[str, dict]:
    """Policy latency of a cell: seconds per batched policy call (locomotion: per action; maze: the plan and
    its tracking, per episode batch) and the batch size it was measured at."""
    if not eps:
        return "missing", {}
    if kind == "maze":
        t = np.array([r["time_per_action"] * r["length"] for r in eps])
    else:
        t = np.array([r["time_per_action"] for r in eps])
    b = sorted({int(r["batch_size"]) for r in eps})
    dev = "/".join(sorted({r["device"] for r in eps}))
    text = f"{np.mean(t):.4g} s (batch {','.join(map(str, b))}, {dev})"
    return text, {"time_s": float(np.mean(t)), "batch": ",".join(map(str, b)), "device": dev}


def _numbers(prefix: str, d: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in d.items()}


def _kind(task: str) -> str:
    from ractd.tasks import get_task

    return get_task(task).kind


def table1(rows: list[dict]) -> Table:
    """Table 1 (D4RL locomotion): measured RACTD, CTD and teacher per task; the paper's columns beside them."""
    g = _group(rows)
    tasks = [t for t in _T1_TASKS if any(k[0] == t for k in g)]
    tasks += sorted({k[0] for k in g if _kind(k[0]) == "locomotion"} - set(tasks))
    measured = [("ractd", "RACTD, selected checkpoint"), ("ctd", "CTD, selected checkpoint"),
                ("teacher-heun-80", "Teacher Heun-80")] + FINALS + BASELINES
    paper_cols = ["RACTD", "Diffuser", "Consistency AC", "Diffusion QL", "BC"]
    md, csv_rows = [], []
    for task in tasks:
        line, rec = [task], {"task": task}
        for mid, label in measured:
            text, nums = _score_cell(g.get((task, mid)), absent=NOT_MEASURED if mid not in ("ractd", "ctd",
                                                                                          "teacher-heun-80")
                                     else "missing")
            line.append(text)
            rec.update(_numbers(f"{mid}_", nums))
        text, nums = _behavior_cell(g.get((task, "behavior")))
        line.append(text)
        rec.update(_numbers("behavior_", nums))
        for p in paper_cols:
            v = paper_value("table1", p, task)
            line.append(fmt_paper(v))
            rec[f"paper_{p}"] = None if v is None else v[0]
        md.append(line)
        csv_rows.append(rec)
    headers = (["task"] + [f"{label} (measured)" for _, label in measured] + ["behavior policy (generator's record)"]
               + [f"paper {p}" for p in paper_cols])
    return Table("table1", "Table 1: D4RL locomotion, normalized score", csv_rows, _md(md, headers))


# (method id, label, the paper's row it is compared with). The paper infers maze2d actions with an inverse dynamics
# model (Sec. 4.2); "RACTD (PD)" tracks the same plans with Diffuser's PD rule, the project's default tracker.
TABLE2_METHODS = [("ractd", "RACTD (PD tracker), selected checkpoint", "RACTD"),
                  ("ractd-invdyn", "RACTD (inverse dynamics, closed loop)", "RACTD"),
                  ("ractd-invdyn-plan", "RACTD (inverse dynamics on the plan, open loop)", "RACTD"),
                  ("ctd", "CTD (PD tracker), selected checkpoint", "CTD"),
                  ("ractd-final", "RACTD (PD tracker), final checkpoint", None),
                  ("ctd-final", "CTD (PD tracker), final checkpoint", None),
                  ("bc", "BC (goal-conditioned, closed loop)", None),
                  ("data", "data (300-step windows of the dataset at the evaluation goal)", None)]
# rows that say "not measured" when the store lacks them (the others say "missing": a planned cell not run)
_OPTIONAL = {m for m, _ in FINALS + BASELINES}


def table2(rows: list[dict]) -> Table:
    """Table 2 (maze2d): measured RACTD and CTD score, NFE and policy time; the paper's columns beside them.
    The inverse-dynamics row appears when the store has it."""
    g = _group(rows)
    tasks = sorted({k[0] for k in g if _kind(k[0]) == "maze"})
    md, csv_rows = [], []
    for task in tasks:
        for mid, label, paper_label in TABLE2_METHODS:
            eps = g.get((task, mid))
            if eps is None and mid.startswith("ractd-invdyn"):
                continue
            text, nums = _score_cell(eps, absent=NOT_MEASURED if mid in _OPTIONAL else "missing")
            ttext, tnums = _time_cell(eps, "maze") if eps and mid != "data" else ("—" if mid in _OPTIONAL else
                                                                                  "missing", {})
            nfe = _nfe_cell(eps) if eps and mid != "data" else "—"
            pv = paper_value("table2", paper_label, task) if paper_label else None
            pt = paper_value("table2_time", paper_label, task) if paper_label else None
            md.append([task, label, text, nfe, ttext, fmt_paper(pv), pt[1] if pt else "—", pt[0] if pt else "—"])
            csv_rows.append({"task": task, "method": mid, **nums, **_nfe_numbers(eps, mid), **tnums,
                             "paper_score": pv[0] if pv else None, "paper_se": pv[1] if pv else None,
                             "paper_nfe": pt[1] if pt else None, "paper_time_s": pt[0] if pt else None})
        for label in ("Diffuser",):
            pv, pt = paper_value("table2", label, task), paper_value("table2_time", label, task)
            md.append([task, label, "not evaluated here", "—", "—", fmt_paper(pv), pt[1] if pt else "—",
                       pt[0] if pt else "—"])
    headers = ["task", "method", "score (measured)", "NFE", "policy time per episode batch (measured)",
               "paper score", "paper NFE", "paper time (s, V100)"]
    return Table("table2", "Table 2: maze2d, normalized score, NFE and planning time", csv_rows, _md(md, headers))


TABLE3_METHODS = [("ddpm-15", "DDPM 15"), ("ddim-15", "DDIM 15"), ("teacher-heun-80", "EDM (Teacher) 80"),
                  ("ractd", "RACTD (Student) 1")] + BASELINES


def table3(rows: list[dict]) -> Table:
    """Table 3: policy time per action, NFE and score per sampler, measured on this machine."""
    g = _group(rows)
    tasks = sorted({k[0] for k in g if _kind(k[0]) == "locomotion"})
    md, csv_rows = [], []
    for task in tasks:
        for mid, label in TABLE3_METHODS:
            eps = g.get((task, mid))
            text, nums = _score_cell(eps, absent=NOT_MEASURED if mid in _OPTIONAL else "missing")
            ttext, tnums = _time_cell(eps, "locomotion") if eps and mid != "data" else (
                "—" if mid in _OPTIONAL else "missing", {})
            nfe = _nfe_cell(eps) if eps and mid != "data" else "—"
            pv, pt = paper_value("table3", label, task), paper_value("table3_time", label, task)
            md.append([task, label, ttext, nfe, text, pt[0] if pt else "—", pt[1] if pt else "—", fmt_paper(pv)])
            csv_rows.append({"task": task, "method": mid, **tnums, **_nfe_numbers(eps, mid), **nums,
                             "paper_time_s": pt[0] if pt else None, "paper_nfe": pt[1] if pt else None,
                             "paper_score": pv[0] if pv else None})
    headers = ["task", "method", "time per action (measured)", "NFE", "score (measured)", "paper time (s, V100)",
               "paper NFE", "paper score"]
    return Table("table3", "Table 3: inference time per action and NFE", csv_rows, _md(md, headers))


TABLE4_CELLS = [("ctd", "unconditioned teacher / unconditioned student"),
                ("ractd", "unconditioned teacher / reward-aware student"),
                ("ra-teacher-ctd", "reward-aware teacher / unconditioned student"),
                ("ra-teacher-ractd", "reward-aware teacher / reward-aware student")]


def table4(rows: list[dict]) -> Table:
    """Tables 4 and 10: the reward objective in the teacher, the student, both or neither (per task)."""
    g = _group(rows)
    tasks = sorted({k[0] for k in g if k[1].startswith("ra-teacher")})
    md, csv_rows = [], []
    for task in tasks:
        for mid, label in TABLE4_CELLS + BASELINES:
            text, nums = _score_cell(g.get((task, mid)), absent=NOT_MEASURED if mid in _OPTIONAL else "missing")
            pv = paper_value("table4", label, task)
            md.append([task, label, text, fmt_paper(pv)])
            csv_rows.append({"task": task, "method": mid, **nums, "paper_score": pv[0] if pv else None,
                             "paper_se": pv[1] if pv else None})
    headers = ["task", "teacher / student", "score (measured)", "paper (Table 4: hopper-mr, Table 10: walker2d-m)"]
    return Table("table4", "Tables 4 and 10: reward objective in teacher and/or student", csv_rows, _md(md, headers))


def table5(rows: list[dict]) -> Table:
    """Table 5: multi-step sampling of the RACTD student (1-4 steps): time per action and score."""
    g = _group(rows)
    tasks = sorted({k[0] for k in g if k[1].startswith("ractd-nfe")})
    md, csv_rows = [], []
    for task in tasks:
        for k in (1, 2, 3, 4):
            mid = "ractd" if k == 1 else f"ractd-nfe{k}"
            eps = g.get((task, mid))
            text, nums = _score_cell(eps)
            ttext, tnums = _time_cell(eps, _kind(task))
            pv, pt = paper_value("table5", str(k), task), paper_value("table5_time", str(k), task)
            md.append([task, k, ttext, text, pt[0] if pt else "—", fmt_paper(pv)])
            csv_rows.append({"task": task, "method": mid, "nfe": k, **tnums, **nums,
                             "paper_time_s": pt[0] if pt else None, "paper_score": pv[0] if pv else None,
                             "paper_se": pv[1] if pv else None})
        for mid, label in BASELINES:
            eps = g.get((task, mid))
            text, nums = _score_cell(eps, absent=NOT_MEASURED)
            ttext, tnums = _time_cell(eps, _kind(task)) if eps and mid != "data" else ("—", {})
            md.append([task, label, ttext, text, "—", "—"])
            csv_rows.append({"task": task, "method": mid, "nfe": eps[0]["nfe"] if eps and mid != "data" else None,
                             **tnums, **nums})
    headers = ["task", "NFE", "time (measured)", "score (measured)", "paper time (s, V100)", "paper score"]
    return Table("table5", "Table 5: multi-step student sampling", csv_rows, _md(md, headers))


TABLE11_METHODS = [("ddpm-100", "DDPM 100"), ("ddim-10", "DDIM 10"), ("ddim-1", "DDIM 1"),
                   ("teacher-heun-80", "EDM 80"), ("ctd", "CTD 1"), ("ractd", "RACTD 1"),
                   ("ctd-final", "CTD 1, final checkpoint"), ("ractd-final", "RACTD 1, final checkpoint")] + BASELINES


# the teacher's row named by its cost ("EDM 80" is the paper's row, which counts its 80 bins as the NFE)
TABLE11_SHOWN = {"EDM 80": f"EDM {sampler_name('heun', 80)}"}


def table11(rows: list[dict]) -> Table:
    """Table 11 (maze2d): fast samplers (DDPM, DDIM) against the EDM teacher, CTD and RACTD."""
    g = _group(rows)
    tasks = sorted({k[0] for k in g if _kind(k[0]) == "maze"})
    md, csv_rows = [], []
    for mid, label in TABLE11_METHODS:
        line = [TABLE11_SHOWN.get(label, label)]
        for task in tasks:
            eps = g.get((task, mid))
            text, nums = _score_cell(eps, absent=NOT_MEASURED if mid in _OPTIONAL else "missing")
            pv = paper_value("table11", label, task)
            line += [text, fmt_paper(pv)]
            csv_rows.append({"task": task, "method": mid, **nums, "nfe": eps[0]["nfe"] if eps else None,
                             "paper_score": pv[0] if pv else None, "paper_se": pv[1] if pv else None})
        md.append(line)
    headers = ["method (NFE)"] + [h for t in tasks for h in (f"{t} (measured)", f"{t} paper")]
    return Table("table11", "Table 11: maze2d fast samplers", csv_rows, _md(md, headers))


TABLES = {"table1": table1, "table2": table2, "table3": table3, "table4": table4, "table5": table5,
          "table11": table11}


def _md(lines: list[list], headers: list[str]) -> str:
    from tabulate import tabulate

    if not lines:
        return "(no measured cells for this table in the store)"
    return tabulate(lines, headers=headers, tablefmt="github", disable_numparse=True)


def build_tables(store: ResultsStore, out) -> list[Table]:
    """Every table from the store's episodes, written as <out>/<name>.md and .csv; returns the tables."""
    rows = store.episodes()
    tables = [fn(rows) for fn in TABLES.values()]
    for t in tables:
        t.write(Path(out))
    return tables


# ---------------------------------------------------------------------------------------------- figures

def _savefig(fig, path: Path) -> Path:
    from ractd.io import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FIG3_METHODS = (("teacher-heun-80", "Teacher (Heun-80)"), ("ctd", "CTD"), ("ractd", "RACTD"))


def fig_reward_hist(reward_rows: list[dict], path) -> Path | None:
    """Diagnostic beside Fig. 3: histograms of R_psi(s, a) of the actions each method samples on the same dataset
    states (the paper's Fig. 3 is the return distribution of rollouts: fig_return_dist)."""
    tasks = sorted({r["task"] for r in reward_rows})
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        vals = {m: np.array([r["reward"] for r in reward_rows if r["task"] == task and r["method"] == m])
                for m, _ in FIG3_METHODS}
        allv = np.concatenate([v for v in vals.values() if len(v)])
        bins = np.linspace(allv.min(), allv.max() + 1e-9, 40)
        for m, label in FIG3_METHODS:
            if len(vals[m]):
                ax.hist(vals[m], bins=bins, alpha=0.5, label=f"{label} (mean {vals[m].mean():.3f})")
        scale = "/".join(sorted({r["scale"] for r in reward_rows if r["task"] == task}))
        ax.set(title=f"{task} [{scale}]", xlabel="R_psi(s, a) (normalized return-to-go)", ylabel="actions")
        ax.legend(fontsize=8)
    fig.suptitle("Diagnostic: R_psi of sampled actions on dataset states (not the paper's Fig. 3)")
    return _savefig(fig, Path(path))


FIG3_RETURN_METHODS = (("ctd", "CTD"), ("ractd", "RACTD"))


def fig_return_dist(rows: list[dict], path, tasks: list[str] | None = None) -> Path | None:
    """Fig. 3 as the paper draws it: the distribution (histogram, density-normalized) of the per-episode normalized
    returns of CTD's and RACTD's rollouts, one panel per task, from the stored episodes. A task whose store lacks
    either cell's episodes gets a panel that says so; a RACTD cell at sigma = 0 is named as CTD's student."""
    g = _group(rows)
    tasks = sorted({t for t, _ in g}) if tasks is None else list(tasks)
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        eps = {m: g.get((task, m)) for m, _ in FIG3_RETURN_METHODS}
        missing = [label for m, label in FIG3_RETURN_METHODS if not eps[m]]
        ax.set(title=task, xlabel="normalized return per episode", ylabel="density")
        if missing:
            ax.text(0.5, 0.5, f"no {' or '.join(missing)} episodes\nin this snapshot", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        vals = {m: np.array([r["normalized_score"] for r in eps[m]]) for m, _ in FIG3_RETURN_METHODS}
        allv = np.concatenate(list(vals.values()))
        bins = np.linspace(allv.min(), allv.max() + 1e-9, 30)
        for m, label in FIG3_RETURN_METHODS:
            if m == "ractd" and is_ctd(eps[m]):
                label = f"RACTD ({CTD_NOTE})"
            ax.hist(vals[m], bins=bins, density=True, alpha=0.5,
                    label=f"{label}: mean {vals[m].mean():.1f}, n={len(vals[m])}")
        ax.set_title(f"{task} [{'/'.join(sorted({r['scale'] for m in eps for r in eps[m]}))}]")
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 3: return distribution of CTD and RACTD rollouts")
    fig.tight_layout()
    return _savefig(fig, Path(path))


def sigma_points(rows: list[dict]) -> dict[str, list[tuple[float, dict]]]:
    """{task: [(sigma, cell_stats), ...]} of the one-step students (CTD, RACTD, the sigma sweep) from an
    unconditioned teacher, sorted by sigma; one point per sigma (the first method found at that sigma)."""
    g = _group(rows)
    out: dict[str, dict[float, dict]] = {}
    for (task, mid), eps in g.items():
        if mid in ("ctd", "ractd") or mid.startswith("ractd-sigma-"):
            sigma = float(eps[0]["sigma"])
            out.setdefault(task, {}).setdefault(sigma, cell_stats([r["normalized_score"] for r in eps]))
    return {t: sorted(d.items()) for t, d in out.items()}


def fig_sigma(rows: list[dict], path) -> Path | None:
    """Fig. 4 counterpart: final normalized score (mean ± SE over episodes) against the reward weight sigma."""
    pts = {t: p for t, p in sigma_points(rows).items() if len(p) >= 2}
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for task, p in pts.items():
        s = np.array([x for x, _ in p])
        m = np.array([c["mean"] for _, c in p])
        e = np.array([0.0 if math.isnan(c["se"]) else c["se"] for _, c in p])
        scale = "/".join(sorted({r["scale"] for r in rows if r["task"] == task}))
        ax.errorbar(s, m, yerr=e, marker="o", capsize=3, label=f"{task} [{scale}]")
    ax.set(xlabel="reward weight sigma (Eq. 9)", ylabel="normalized score", title="Fig. 4: score vs sigma")
    ax.legend(fontsize=8)
    return _savefig(fig, Path(path))


def fig_score_distribution(rows: list[dict], path) -> Path | None:
    """Distribution of episode scores per method (one panel per task): box plot with every episode drawn."""
    g = _group(rows)
    tasks = sorted({t for t, _ in g})
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, 3.2 * len(tasks)), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, task in zip(axes[:, 0], tasks):
        methods = sorted(m for t, m in g if t == task)
        data = [np.array([r["normalized_score"] for r in g[(task, m)]]) for m in methods]
        ax.boxplot(data, showfliers=False)
        for i, d in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=5, alpha=0.4)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right", fontsize=8)
        scale = "/".join(sorted({r["scale"] for r in rows if r["task"] == task}))
        ax.set(title=f"{task} [{scale}]", ylabel="normalized score")
    fig.suptitle("Episode scores per method")
    fig.tight_layout()
    return _savefig(fig, Path(path))


def build_figures(store: ResultsStore, out) -> list[Path]:
    """fig3_returns.png, fig3_reward_hist.png (the R_psi diagnostic), fig4_sigma.png, score_distribution.png under
    `out` (those with data)."""
    out = Path(out)
    rows = store.episodes()
    made = [fig_return_dist(rows, out / "fig3_returns.png"),
            fig_reward_hist(store.rewards(), out / "fig3_reward_hist.png"),
            fig_sigma(rows, out / "fig4_sigma.png"),
            fig_score_distribution(rows, out / "score_distribution.png")]
    return [p for p in made if p is not None]


# ---------------------------------------------------------------------------------------------- the headline

HEADLINE = [("ractd", "RACTD, one-step student", ("RACTD 1", "RACTD")),
            ("teacher-heun-80", "teacher, EDM Heun-80 (158 network calls)", ("EDM 80", None)),
            ("ctd", "CTD (alpha = beta = 1, sigma = 0)", ("CTD 1", None)),
            ("bc", "BC (2 x 256 MLP, CORL recipe)", (None, "BC")),
            ("data", "data (the dataset's own level)", (None, None))]


def headline_lines(rows: list[dict], tasks: list[str]) -> list[str]:
    """What a study found, a few lines per task: each method's normalized score (mean ± SE, IQM, n) beside the
    paper's, and the one-step student's speed-up per policy call over the teacher, measured in the same run."""
    g = _group(rows)
    out = []
    for task in tasks:
        cells = {mid: g.get((task, mid)) for mid, *_ in HEADLINE}
        if not any(cells.values()):
            continue
        scale = "/".join(sorted({r["scale"] for eps in cells.values() if eps for r in eps}))
        out.append(f"{task} ({scale}), normalized score, mean ± SE over episodes:")
        for mid, label, (t11, t1) in HEADLINE:
            eps = cells[mid]
            if not eps:
                continue
            s = cell_stats([r["normalized_score"] for r in eps])
            paper = paper_value("table11", t11, task) if t11 else None
            paper = paper or (paper_value("table1", t1, task) if t1 else None)
            se = "" if math.isnan(s["se"]) else f" ± {s['se']:.1f}"
            out.append(f"  {label:44s} {s['mean']:6.1f}{se:7s} (IQM {s['iqm']:.1f}, n={s['n']})"
                       + (f"   paper: {fmt_paper(paper)}" if paper else ""))
        student, teacher = cells["ractd"], cells["teacher-heun-80"]
        if student and teacher:
            kind = _kind(task)  # maze2d plans once per episode: _time_cell gives the plan's time
            ts, tt = (_time_cell(eps, kind)[1]["time_s"] for eps in (student, teacher))
            what = "per plan" if kind == "maze" else "per action"
            out.append(f"  speed: {ts * 1e3:.3g} ms {what} for the student, {tt * 1e3:.3g} ms for the teacher: "
                       f"{tt / ts:.0f}x faster")
    return out
