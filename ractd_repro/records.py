"""The sweep's records: the one owner of their formats, read and written only here (no Ray: ractd_ray.search turns
Tune's results into TrialRecords and hands them to `write_results`), and of how what a head writes outlives it
(`Mirror`).

A sweep's folder on the machine that ran its driver (`SweepFolder`, default ractd.paths.sweep_dir(task, scale)):
  trials.parquet                    one row per trial (TrialRecord.row(): weights, scores, losses, diagnostics,
                                    status, checkpoint locations, times)
  best_config.json                  the best trial (BestConfig): weights, score, checkpoints, teacher, reward model,
                                    dataset, scale, budget
  best/checkpoint.pt                the best trial's student (a copy of its best.pt)
  trials/<trial_id>/student/best.pt             a trial's selected student, fetched from the run's storage
  trials/<trial_id>/student/latest/checkpoint.pt  its final checkpoint (the study's "-final" cells)
  search.json                       the sweep's config, dataset and shared models (ractd_ray.search writes it)

On a cluster ($RACTD_STORAGE_PATH set) every record of the folder also lives in storage, so that a new head (the
old one lost, its disk with it) resumes the sweep and evaluates it (`SweepFolder.mirror`):
  <sweep state>/records/search.json, trials.parquet, best_config.json    written beside the local files; a read on
                                    a head that lacks them fetches them first
  best/checkpoint.pt, trials/<id>/student/..., the shared teacher and reward model: fetched from where their
                                    training stored them (BestConfig's *_stored fields) when missing here
where <sweep state> is SweepFolder.state, the folder of the sweep's Tune and Train state. `Mirror` does the same
for any folder a head writes (the evaluation's results store, tables and figures: `mirror_of`).

A trial's files in the run's storage (local folder or s3://, written by ractd_ray.train on whichever node trained it):
  <train storage>/<trial_id>/ractd/<stage>/best.pt, metrics.jsonl    the library's files (`trial_record`)
  <train storage>/<trial_id>/ractd/summary.json                       the trial's times
  <train storage>/<trial_id>/<stage>-<step:09d>/checkpoint.pt         Ray Train's persisted checkpoints
                                                                      (`checkpoint_name`)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Callable, Iterable

from ractd import RactdError, storage

log = logging.getLogger(__name__)

METRIC = "select_score"
LOSS_TERMS = ("loss", "ctm", "dsm", "reward")
STATUSES = ("completed", "stopped", "error", "unfinished")


# ---------------------------------------------------------------------------------------------- mirrors

@dataclasses.dataclass
class Mirror:
    """A folder a head writes and its twin in storage: every file under `root` has a copy at the same relative
    path under `stored` (None: one machine, nothing to mirror). The head writes locally, then `publish`es (one
    file) or `push`es (what storage lacks); a new head `fetch`es (one file) or `pull`s (what it lacks) before it
    reads. Storage writes are atomic (ractd.storage), so a reader sees a whole file or none."""

    root: Path
    stored: str | None
    _pushed: dict = dataclasses.field(default_factory=dict, repr=False)  # relative path -> size already stored

    def location(self, path: str | Path) -> str:
        """The storage twin of `path` (a path under root)."""
        return storage.join(self.stored, *Path(path).resolve().relative_to(Path(self.root).resolve()).parts)

    def publish(self, path: str | Path) -> None:
        """Copy one local file under root to storage."""
        if self.stored is not None and Path(path).is_file():
            storage.upload(path, self.location(path))
            self._pushed[str(Path(path).resolve())] = Path(path).stat().st_size

    def fetch(self, path: str | Path) -> bool:
        """Where `path` is missing here and storage has it: download it. Returns whether it did."""
        path = Path(path)
        if self.stored is None or path.is_file():
            return False
        loc = self.location(path)
        if not storage.exists(loc):
            return False
        storage.download(loc, path)
        log.info("fetched %s from %s", path, loc)
        return True

    def _stored_files(self, loc: str, rel: tuple = ()) -> list[tuple[str, ...]]:
        out = []
        for name in storage.list_dir(loc):
            sub = storage.join(loc, name)
            if storage.size(sub) >= 0:
                out.append((*rel, name))
            else:
                out.extend(self._stored_files(sub, (*rel, name)))
        return out

    def pull(self, sub: str = "") -> list[Path]:
        """Download every stored file under `sub` that is missing here; returns the files fetched."""
        if self.stored is None:
            return []
        got = []
        for rel in self._stored_files(storage.join(self.stored, *Path(sub).parts)):
            path = Path(self.root, sub, *rel)
            if not path.is_file():
                storage.download(storage.join(self.stored, *Path(sub).parts, *rel), path)
                self._pushed[str(path.resolve())] = path.stat().st_size
                got.append(path)
        if got:
            log.info("fetched %d files of %s from %s", len(got), Path(self.root, sub), self.stored)
        return got

    def push(self, sub: str = "") -> list[Path]:
        """Upload every file under `sub` (recursively; temp files of atomic writes skipped) that this mirror has
        not stored yet at its current size; returns the files uploaded."""
        if self.stored is None or not Path(self.root, sub).exists():
            return []
        sent = []
        top = Path(self.root, sub)
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            key = str(path.resolve())
            if self._pushed.get(key) == path.stat().st_size:
                continue
            if key not in self._pushed and storage.size(self.location(path)) == path.stat().st_size:
                self._pushed[key] = path.stat().st_size  # stored by an earlier head: same name, same size
                continue
            self.publish(path)
            sent.append(path)
        return sent


def mirror_of(kind: str, folder: str | Path) -> Mirror:
    """The mirror of a folder a head writes: $RACTD_STORAGE_PATH/<kind>/<its name>-<digest of its path>
    (ractd.storage.folder_location: the same path on a new head gives the same location), none on one
    machine. kind: "results" (an evaluation's store, tables and figures)."""
    folder = Path(folder).expanduser().resolve()
    return Mirror(folder, storage.folder_location(kind, folder) if storage.configured() else None)


# ---------------------------------------------------------------------------------------------- storage layout

def checkpoint_name(stage: str, step: int) -> str:
    """Name of a persisted Ray checkpoint folder: the stage it belongs to and its step."""
    return f"{stage}-{step:09d}"


def stage_of(checkpoint_path: str) -> str:
    """The stage of a persisted Ray checkpoint folder (`checkpoint_name`'s inverse)."""
    return Path(checkpoint_path).name.split("-", 1)[0]


def trial_record(train_storage: str, trial_id: str, name: str) -> str:
    """Storage location of a trial's file `name` (student/best.pt, student/metrics.jsonl, summary.json)."""
    return storage.join(storage.run_files(train_storage, trial_id), name)


def checkpoint_metrics(train_storage: str, trial_id: str, stage: str = "student") -> list[dict]:
    """A run's metrics at each of its checkpoints (the library's <stage>/metrics.jsonl, as persisted to storage;
    one record per step, the last written wins: a run resumed on another node repeats the steps after its
    last persisted checkpoint), [] if absent. trial_id: the run's name (a sweep trial's id)."""
    loc = trial_record(train_storage, trial_id, f"{stage}/metrics.jsonl")
    if not storage.exists(loc):
        return []
    by_step = {}
    for line in storage.read_text(loc).splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec.get("step")] = rec
    return [by_step[k] for k in sorted(by_step, key=lambda k: (k is None, k or 0))]


def fetch_finished_stage(train_storage: str, name: str, stage: str, steps: int, local_stage_dir) -> bool:
    """A Ray Train run (ractd_ray.train.fit_stages: storage_path, name) whose stage reached `steps` and stored its
    best.pt: copy best.pt and metrics.jsonl into `local_stage_dir` and return True (a new head does not train
    it again); else False."""
    history = checkpoint_metrics(train_storage, name, stage)
    best = trial_record(train_storage, name, f"{stage}/best.pt")
    if not history or int(history[-1].get("step") or 0) < steps or not storage.exists(best):
        return False
    storage.download(best, Path(local_stage_dir) / "best.pt")
    storage.download(trial_record(train_storage, name, f"{stage}/metrics.jsonl"),
                     Path(local_stage_dir) / "metrics.jsonl")
    log.info("fetched the finished %s from %s", stage, best)
    return True


def fetch_final_checkpoint(best_loc: str, local) -> None:
    """The final checkpoint beside a stored best.pt (<run>/ractd/student/best.pt): the run's latest persisted Ray
    checkpoint (<run>/student-<step>/checkpoint.pt), copied to `local` (ctd-final, ractd-final read it there)."""
    run = best_loc.rsplit("/ractd/", 1)[0]
    steps = [n for n in storage.list_dir(run) if n.startswith("student-")]
    if steps and storage.exists(storage.join(run, max(steps), "checkpoint.pt")):
        storage.download(storage.join(run, max(steps), "checkpoint.pt"), local)


# ---------------------------------------------------------------------------------------------- the records

def trial_times(summary: dict, reported: dict, failed: bool) -> Callable[[str], float]:
    """A trial's time by name (train_time_s, fit_time_s, startup_<stamp>_s; NaN where not recorded), from the
    summary.json its driver wrote (a trial that ran to its end, or whose last attempt failed), else from its last
    report (a trial ASHA stopped). A failure summary of an earlier attempt is not the trial's when a retry (Tune's
    trial_failures) went on without writing its own (ASHA stopped it): its zeros are the failed attempt's, the
    reports the retry's."""
    source = {**reported, **summary} if summary and (failed or "error" not in summary) else reported
    return lambda name: _number(source.get(name))


def _number(v) -> float:
    return float(v) if v is not None else math.nan


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One row of trials.parquet.

    select_score: the score of the trial's best checkpoint (its student/best.pt); last_score, step and the loss
    terms (LOSS_TERMS): its last checkpoint; best_step and `diagnostics` (ractd.train.DIAG_TERMS): its best
    checkpoint. status: one of STATUSES (completed: ran all steps; stopped: by ASHA; unfinished: the search was
    interrupted first). checkpoint: the storage location of its best.pt ("" if none). train_time_s: wall time of
    the library's train() in the trial's worker; fit_time_s: of its TorchTrainer.fit(); trial_time_s: Tune's time
    of the whole trial; `startup`: {stamp: seconds from the trial's start} (ractd_ray.train.STARTUP_STAMPS)."""

    trial_id: str
    alpha: float
    beta: float
    sigma: float
    select_score: float = math.nan
    last_score: float = math.nan
    step: int = 0
    losses: dict = dataclasses.field(default_factory=dict)
    best_step: int = 0
    diagnostics: dict = dataclasses.field(default_factory=dict)
    status: str = "unfinished"
    checkpoint: str = ""
    ray_checkpoint: str = ""
    train_time_s: float = math.nan
    fit_time_s: float = math.nan
    startup: dict = dataclasses.field(default_factory=dict)
    trial_time_s: float = math.nan
    stored_bytes: int = 0
    error: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise RactdError(f"trial {self.trial_id}: status {self.status!r} is not one of {', '.join(STATUSES)}")

    @property
    def weights(self) -> tuple[float, float, float]:
        return (self.alpha, self.beta, self.sigma)

    def row(self) -> dict:
        """The trials.parquet row (flat columns, in the table's order)."""
        from ractd.train import DIAG_TERMS

        return {"trial_id": self.trial_id, "alpha": self.alpha, "beta": self.beta, "sigma": self.sigma,
                METRIC: self.select_score, "last_score": self.last_score, "step": self.step,
                **{k: _number(self.losses.get(k)) for k in LOSS_TERMS}, "best_step": self.best_step,
                **{k: _number(self.diagnostics.get(k)) for k in DIAG_TERMS}, "status": self.status,
                "checkpoint": self.checkpoint, "ray_checkpoint": self.ray_checkpoint,
                "train_time_s": self.train_time_s, "fit_time_s": self.fit_time_s,
                **{f"startup_{k}_s": _number(v) for k, v in self.startup.items()},
                "trial_time_s": self.trial_time_s, "stored_bytes": self.stored_bytes, "error": self.error}

    @classmethod
    def from_row(cls, r: dict) -> "TrialRecord":
        from ractd.train import DIAG_TERMS

        startup = {k[len("startup_"):-len("_s")]: v for k, v in r.items()
                   if k.startswith("startup_") and k.endswith("_s")}
        return cls(trial_id=str(r["trial_id"]), alpha=_number(r.get("alpha")), beta=_number(r.get("beta")),
                   sigma=_number(r.get("sigma")), select_score=_number(r.get(METRIC)),
                   last_score=_number(r.get("last_score")), step=int(r.get("step") or 0),
                   losses={k: _number(r.get(k)) for k in LOSS_TERMS}, best_step=int(r.get("best_step") or 0),
                   diagnostics={k: _number(r.get(k)) for k in DIAG_TERMS if k in r},
                   status=str(r.get("status") or "unfinished"), checkpoint=str(r.get("checkpoint") or ""),
                   ray_checkpoint=str(r.get("ray_checkpoint") or ""), train_time_s=_number(r.get("train_time_s")),
                   fit_time_s=_number(r.get("fit_time_s")), startup=startup,
                   trial_time_s=_number(r.get("trial_time_s")), stored_bytes=int(r.get("stored_bytes") or 0),
                   error=str(r.get("error") or ""))


@dataclasses.dataclass(frozen=True)
class BestConfig:
    """best_config.json: the sweep's best trial. checkpoint: best/checkpoint.pt on the driver's machine;
    trial_checkpoint: the trial's own best.pt there (its final checkpoint is beside it under latest/);
    trial_checkpoint_stored: its location in the run's storage; teacher, reward: the shared models it distilled
    from (on the driver's machine), teacher_stored, reward_stored: their locations in storage (a new head
    fetches them from there); dataset: ractd_repro.sweep.ensure_dataset's record."""

    task: str
    alpha: float
    beta: float
    sigma: float
    score: float
    trial_id: str
    checkpoint: str
    metric: str = METRIC
    trial_checkpoint: str = ""
    trial_checkpoint_stored: str = ""
    teacher: str = ""
    reward: str = ""
    teacher_stored: str = ""
    reward_stored: str = ""
    dataset: dict = dataclasses.field(default_factory=dict)
    scale: str = ""
    budget: str = ""
    trials: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "BestConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        missing = {"alpha", "beta", "sigma"} - set(d)
        if missing:
            raise RactdError(f"best_config.json lacks {', '.join(sorted(missing))}")
        return cls(**{"task": "", "score": math.nan, "trial_id": "", "checkpoint": "",
                      **{k: v for k, v in d.items() if k in known}})


# ---------------------------------------------------------------------------------------------- the folder

@dataclasses.dataclass(frozen=True)
class SweepFolder:
    """A sweep's folder on the driver's machine, and on a cluster its twin in storage (see the module doc)."""

    root: Path

    @classmethod
    def of(cls, task: str, scale: str) -> "SweepFolder":
        from ractd.paths import sweep_dir

        return cls(sweep_dir(task, scale))

    @property
    def state(self) -> str:
        """Where the sweep's Tune and Train state live: $RACTD_STORAGE_PATH/sweeps/<folder>-<digest of its path> on
        a cluster, else <folder>/ray (ractd.storage.folder_location)."""
        return storage.folder_location("sweeps", self.root)

    @property
    def mirror(self) -> Mirror:
        """The records' twin in storage: <state>/records on a cluster; none on one machine."""
        return Mirror(Path(self.root), storage.join(self.state, "records") if storage.configured() else None)

    @property
    def trials_file(self) -> Path:
        return self.root / "trials.parquet"

    @property
    def best_file(self) -> Path:
        return self.root / "best_config.json"

    @property
    def best_checkpoint(self) -> Path:
        return self.root / "best" / "checkpoint.pt"

    @property
    def search_file(self) -> Path:
        return self.root / "search.json"

    def trial_best(self, trial_id: str) -> Path:
        return self.root / "trials" / trial_id / "student" / "best.pt"

    def trial_metrics(self, trial_id: str) -> Path:
        return self.root / "trials" / trial_id / "student" / "metrics.jsonl"

    @staticmethod
    def final_beside(best_pt: Path) -> Path:
        """The final checkpoint of the run whose selected student is `best_pt` (ractd.train's run layout)."""
        return Path(best_pt).parent / "latest" / "checkpoint.pt"

    # search.json ---------------------------------------------------------------------------------
    def write_search(self, config: dict, dataset: dict, shared: dict) -> Path:
        """search.json: the search's config (SearchConfig as a dict), its dataset and shared models, for --resume."""
        from ractd.io import atomic_write_json

        atomic_write_json(self.search_file, {"config": config, "dataset": dataset, "shared": shared})
        self.mirror.publish(self.search_file)
        return self.search_file

    def read_search(self) -> dict | None:
        """search.json ({"config", "dataset", "shared"}), fetched from storage on a head that lacks it; None when
        the sweep has none."""
        self.mirror.fetch(self.search_file)
        if not self.search_file.is_file():
            return None
        try:
            return json.loads(self.search_file.read_text())
        except (OSError, ValueError) as e:
            raise RactdError(f"cannot read {self.search_file}: {e}") from None

    # trials.parquet ------------------------------------------------------------------------------
    def write_trials(self, records: Iterable[TrialRecord]) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ractd.io import atomic_write

        table = pa.Table.from_pylist([r.row() for r in sorted(records, key=lambda r: r.trial_id)])
        atomic_write(self.trials_file, lambda f: pq.write_table(table, f))
        self.mirror.publish(self.trials_file)
        return self.trials_file

    def read_trials(self) -> list[TrialRecord]:
        """The sweep's trials ([] when it has none; fetched from storage on a head that lacks them)."""
        import pyarrow.parquet as pq

        self.mirror.fetch(self.trials_file)
        if not self.trials_file.is_file():
            return []
        try:
            rows = pq.read_table(self.trials_file).to_pylist()
        except (OSError, ValueError) as e:
            raise RactdError(f"cannot read {self.trials_file}: {e}") from None
        return [TrialRecord.from_row(r) for r in rows]

    # best_config.json ----------------------------------------------------------------------------
    def write_best(self, best: BestConfig) -> Path:
        from ractd.io import atomic_write_json

        atomic_write_json(self.best_file, best.to_json())
        self.mirror.publish(self.best_file)
        return self.best_file

    def read_best(self) -> BestConfig | None:
        """best_config.json with an absolute checkpoint path (best/checkpoint.pt where the recorded one is gone),
        or None when the sweep has none. On a head that lacks them, the file and the checkpoints it names are
        fetched from storage first (`restore`)."""
        self.mirror.fetch(self.best_file)
        if not self.best_file.is_file():
            return None
        try:
            best = BestConfig.from_json(json.loads(self.best_file.read_text()))
        except (OSError, ValueError) as e:
            raise RactdError(f"cannot read {self.best_file}: {e}") from None
        self.restore(best)
        ckpt = Path(best.checkpoint or self.best_checkpoint)
        if not ckpt.is_absolute():
            ckpt = self.root / ckpt
        return dataclasses.replace(best, checkpoint=str(ckpt if ckpt.is_file() else self.best_checkpoint))

    def restore(self, best: BestConfig) -> list[Path]:
        """The checkpoints best_config.json names, fetched from where their training stored them when this machine
        lacks them (a new head): best/checkpoint.pt and the trial's best.pt with its final checkpoint (from
        trial_checkpoint_stored), the teacher and the reward model (teacher_stored, reward_stored). Returns the
        files fetched."""
        got = []

        def get(loc: str, local) -> None:
            if loc and local and not Path(local).is_file() and storage.exists(loc):
                storage.download(loc, local)
                got.append(Path(local))

        get(best.trial_checkpoint_stored, self.best_checkpoint)
        if best.trial_id:
            trial_best = self.trial_best(best.trial_id)
            if not trial_best.is_file() and best.trial_checkpoint_stored:
                get(best.trial_checkpoint_stored, trial_best)
                if trial_best.is_file():
                    fetch_final_checkpoint(best.trial_checkpoint_stored, self.final_beside(trial_best))
        get(best.teacher_stored, best.teacher)
        get(best.reward_stored, best.reward)
        if got:
            log.info("fetched %s from storage", ", ".join(map(str, got)))
        return got

    # the trials' students ------------------------------------------------------------------------
    def completed_students(self, wanted: Iterable[tuple[float, float, float]] | None = None
                           ) -> dict[tuple[float, float, float], Path]:
        """{(alpha, beta, sigma): student/best.pt} of the completed trials (the first at each weights), for the
        weights in `wanted` (default: all). A checkpoint in run storage (a sweep on a cluster: s3://..., or the
        run storage of one machine) is fetched into trials/<trial_id>/student/best.pt here, with its final
        checkpoint beside it."""
        wanted = None if wanted is None else {tuple(float(x) for x in w) for w in wanted}
        out: dict[tuple[float, float, float], Path] = {}
        for r in self.read_trials():
            if r.status != "completed" or not r.checkpoint or r.weights in out:
                continue
            if wanted is not None and r.weights not in wanted:
                continue
            ckpt = r.checkpoint
            if storage.is_uri(ckpt) or "/ractd/student/" in ckpt:  # in the run's storage (ractd_ray.train's layout)
                local = self.trial_best(r.trial_id)
                if not local.is_file() and storage.exists(ckpt):
                    storage.download(ckpt, local)
                    fetch_final_checkpoint(ckpt, self.final_beside(local))
                ckpt = str(local)
            if Path(ckpt).is_file():
                out[r.weights] = Path(ckpt)
        return out


def write_results(records: list[TrialRecord], folder: SweepFolder, *, task: str, scale: str, budget: str,
                  dataset: dict, shared: dict) -> BestConfig | None:
    """trials.parquet, and for the trial with the highest score best_config.json and best/checkpoint.pt (fetched
    from storage, with the trial's best.pt and final checkpoint in its trials/ folder, whichever node trained
    it). Returns the BestConfig (None when no trial has a score)."""
    folder.write_trials(records)
    scored = [r for r in records if math.isfinite(r.select_score) and r.checkpoint]
    if not scored:
        return None
    top = max(scored, key=lambda r: r.select_score)
    ckpt = storage.download(top.checkpoint, folder.best_checkpoint)
    trial_best = storage.download(top.checkpoint, folder.trial_best(top.trial_id))
    fetch_final_checkpoint(top.checkpoint, folder.final_beside(trial_best))
    best = BestConfig(task=task, alpha=top.alpha, beta=top.beta, sigma=top.sigma, score=top.select_score,
                      trial_id=top.trial_id, checkpoint=str(ckpt), trial_checkpoint=str(trial_best),
                      trial_checkpoint_stored=top.checkpoint, teacher=shared["teacher"], reward=shared["reward"],
                      teacher_stored=_shared_stored(shared, "teacher"), reward_stored=_shared_stored(shared, "reward"),
                      dataset=dataset, scale=scale, budget=budget, trials=len(records))
    folder.write_best(best)
    return best


def _shared_stored(shared: dict, stage: str) -> str:
    """Storage location of a shared model's best.pt (ractd_ray.search.ensure_shared_models stores them under
    shared["stored"]/<stage>/best.pt), "" when the sweep has none."""
    if not shared.get(stage) or not shared.get("stored"):
        return ""
    return storage.join(shared["stored"], stage, "best.pt")
