"""The sweep over the Eq. (9) weights (alpha, beta, sigma) of one task: Ray Tune around Ray Train.

    python tune/search.py --task walker2d-medium [--quick] [--num-samples N] [--workers W] [--resume] ...

What a search does, in order (everything before Ray starts fails with one line and exit code 2):
1. the dataset: the D4RL cache file, else the task's Minari dataset in the local store, else the locally
   generated file at --scale, else it is generated now; it is loaded (which validates it) and fingerprinted, and
   the log says which one is used;
2. the teacher and (locomotion) the reward model, trained once per (task, their configs, dataset fingerprint)
   with Ray Train (one worker group trains both), persisted in the run storage (ractd.storage: S3 on a cluster)
   under shared/<task>-<key>/ and found there by key by every later search of the task, whichever node trained
   them (a copy in ractd.paths.shared_models_dir(task, key) on the driver's machine); the paper's decoupled
   training: one teacher, one reward model, many students;
3. a Tune search over search_space() (ALPHA_RANGE, BETA_RANGE, SIGMA_CHOICES) with Optuna's TPE (OptunaSearch), seeded with the task's Table 9 weights
   (points_to_evaluate), ASHA on "select_score" (mode max) reported at every student checkpoint; each trial is
   a Tune function trainable (0.5 CPU) that runs a TorchTrainer (ractd_ray.train) distilling one student;
4. the results under the run folder (default ractd.paths.sweep_dir(task, scale)): trials.parquet (one row per
   trial, read from storage), best_config.json, best/checkpoint.pt (the best student, fetched from storage),
   search.json (the search's config, for --resume), trials/<trial_id>/ (each trial's run folder, on the node that
   ran it), ray/ (Tune's and Train's state and the trials' persisted files; on a cluster under
   $RACTD_STORAGE_PATH/sweeps/<folder>-<digest>: sweep_storage); a table at the end.

Nothing is read from another node's disk: the dataset and the shared models reach every trial through the object
store (from the driver); each trial's best.pt, metrics.jsonl and summary go to storage (ractd_ray.train).

The objective is the paper's online model selection: the mean normalized return of the one-step student on
select_seeds short rollouts (seeds 10000, ... disjoint from evaluation seeds), computed by the library at every
checkpoint; a trial's score is its best checkpoint's, whose weights are its student/best.pt.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Literal

from ractd import RactdError, storage
from ractd.config import from_dict, to_dict
from ractd.results import PAPER_FIG4_SIGMAS
from ractd.tasks import SCALES, Task, get_task
from ractd.train import BUDGETS, DIAG_TERMS, TrainConfig

log = logging.getLogger(__name__)

METRIC, MODE = "select_score", "max"

# The search space of the Eq. (9) weights, the one place it is defined. sigma is a choice so that sigma = 0
# (CTD, no reward term) is a point of the space, and every Table 9 value is on the grid; maze2d tasks have no
# reward model, so their sigma is fixed at 0.
ALPHA_RANGE = (0.25, 4.0)  # log-uniform
BETA_RANGE = (0.25, 4.0)  # log-uniform
# the grid holds every Table 9 sigma and every sigma of the paper's Fig. 4 (ractd.results.PAPER_FIG4_SIGMAS), so
# a --sigmas study of Fig. 4 is a set of points of the space
SIGMA_CHOICES = tuple(sorted({0.0, 0.05, 0.1, 0.2, 0.4, 0.5, 1.0, 2.0, 3.0} | set(PAPER_FIG4_SIGMAS)))


def search_space(task: Task) -> dict:
    """Tune's param_space for a task (see ALPHA_RANGE, BETA_RANGE, SIGMA_CHOICES)."""
    from ray import tune

    space = {"alpha": tune.loguniform(*ALPHA_RANGE), "beta": tune.loguniform(*BETA_RANGE)}
    space["sigma"] = tune.choice(list(SIGMA_CHOICES)) if task.kind == "locomotion" else 0.0
    return space


def table9_point(task: Task) -> dict:
    """The task's paper weights (Table 9) as a point of the space (only the searched keys)."""
    w = task.weights
    point = {"alpha": w.alpha, "beta": w.beta}
    if task.kind == "locomotion":
        if w.sigma not in SIGMA_CHOICES:
            raise RactdError(f"{task.name}: Table 9 sigma {w.sigma} is not on the search grid {SIGMA_CHOICES}")
        point["sigma"] = w.sigma
    return point


def grid_points(task: Task, sigmas: tuple[float, ...]) -> list[dict]:
    """The points a search evaluates before TPE proposes any: the Table 9 point, then one per sigma in `sigmas`
    (locomotion) at the Table 9 alpha and beta -- except sigma = 0, which is CTD's point alpha = beta = 1 (the
    baseline ractd.study takes from the sweep) -- without repeats. Together they are a like-for-like sigma study
    (Fig. 4): one teacher, one reward model, one budget and model selection for every student."""
    points = [table9_point(task)]
    for s in sigmas:
        if task.kind != "locomotion":
            raise RactdError(f"{task.name}: --sigmas needs a locomotion task (maze2d has no reward model)")
        if float(s) not in SIGMA_CHOICES:
            raise RactdError(f"sigma {s:g} is not on the search grid {', '.join(f'{c:g}' for c in SIGMA_CHOICES)}")
        p = {"alpha": 1.0, "beta": 1.0, "sigma": 0.0} if s == 0 else {**table9_point(task), "sigma": float(s)}
        if p not in points:
            points.append(p)
    return points


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """A sweep over the Eq. (9) weights of one task. tune/search.py's flags are generated from these fields.

    task: registry name, e.g. walker2d-medium or maze2d-umaze.
    budget: training budget of every stage: cpu | quick | paper (ractd.train.BUDGETS).
    scale: scale of a locally generated dataset: tiny | small | full.
    source: dataset: auto (D4RL cache, else Minari's local store, else the local file at scale, else generate
        it) | d4rl | minari | local.
    preset: U-Net preset of teacher and student: cpu (the task's CPU preset), paper, or a preset name ("" = the
        budget's: paper for the paper budget, else cpu).
    run_dir: output folder ("" = ractd.paths.sweep_dir(task, scale)).
    num_samples: trials (weight settings); the first is the task's Table 9 setting, then the --sigmas points.
    sigmas: locomotion: sigmas evaluated (each at the Table 9 alpha, beta; 0 = CTD at alpha = beta = 1) before
        TPE proposes points: a like-for-like sigma study; num_samples must cover them.
    max_concurrent: trials running at the same time.
    workers: Ray Train workers per trial (and for training the shared teacher and reward model).
    cpus_per_worker: CPUs reserved per worker, also its torch threads (rounded up); a trial's driver takes 0.5 CPU
        more. 0 = auto (ractd_ray.resources.worker_cpus): 1 per GPU worker; a CPU worker takes its share of the
        largest node's CPUs, so on one machine the shared stages and each trial train on every core.
    gpu: GPUs for the workers: auto (when a node type of the cluster has one: ractd_ray.resources) | yes | no.
    steps: distillation steps per trial (0 = the budget's).
    batch: global distillation batch (0 = the budget's).
    teacher_steps: steps of the shared teacher (0 = the budget's).
    reward_steps: steps of the shared reward model (0 = the budget's).
    ckpt_every: student checkpoint interval, where the objective is measured and ASHA decides (0 = steps / 4).
    select_seeds: objective rollouts at each checkpoint (seeds 10000, ...); default TrainConfig's (10).
    select_max_steps: env steps of each objective rollout; 0 = the task's full episode length (TrainConfig's
        default).
    grace_period: checkpoints every trial runs before ASHA may stop it.
    reduction_factor: ASHA's reduction factor.
    max_failures: Ray Train restarts of a worker group after a worker failure (from its last checkpoint).
    trial_failures: Tune retries of a failed trial.
    seed: training seed of every stage and trial, and the TPE sampler's seed.
    address: Ray cluster to connect to ("" = $RAY_ADDRESS if set, else a local Ray; auto = the running cluster).
    """

    task: str = "walker2d-medium"
    budget: Literal["cpu", "quick", "paper"] = "cpu"
    scale: str = "small"
    source: Literal["auto", "d4rl", "minari", "local"] = "auto"
    preset: str = ""
    run_dir: str = ""
    num_samples: int = 12
    sigmas: tuple[float, ...] = ()
    max_concurrent: int = 1
    workers: int = 1
    cpus_per_worker: float = 0
    gpu: Literal["auto", "yes", "no"] = "auto"
    steps: int = 0
    batch: int = 0
    teacher_steps: int = 0
    reward_steps: int = 0
    ckpt_every: int = 0
    select_seeds: int = TrainConfig.select_seeds          # one source of truth: the training config's defaults
    select_max_steps: int = TrainConfig.select_max_steps
    grace_period: int = 2
    reduction_factor: int = 2
    max_failures: int = 2
    trial_failures: int = 1
    seed: int = 0
    address: str = ""

    def validate(self) -> "SearchConfig":
        """Check every field; a bad value raises RactdError with one line naming it."""
        get_task(self.task)
        if self.budget not in BUDGETS:
            raise RactdError(f"budget={self.budget!r}: expected one of {', '.join(BUDGETS)}")
        if self.scale not in SCALES:
            raise RactdError(f"unknown scale {self.scale!r}; expected one of {', '.join(SCALES)}")
        if self.source not in ("auto", "d4rl", "minari", "local"):
            raise RactdError(f"source={self.source!r}: expected one of auto, d4rl, minari, local")
        for name in ("num_samples", "max_concurrent", "workers", "select_seeds",
                     "grace_period"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise RactdError(f"{name}={v!r}: must be a positive integer")
        for name in ("steps", "batch", "teacher_steps", "reward_steps", "ckpt_every", "max_failures",
                     "trial_failures", "seed", "select_max_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise RactdError(f"{name}={v!r}: must be a non-negative integer")
        if not isinstance(self.cpus_per_worker, (int, float)) or not 0 <= self.cpus_per_worker < math.inf:
            raise RactdError(f"cpus_per_worker={self.cpus_per_worker!r}: must be a non-negative number (0 = auto)")
        if self.reduction_factor < 2:
            raise RactdError(f"reduction_factor={self.reduction_factor!r}: must be at least 2")
        if self.gpu not in ("auto", "yes", "no"):
            raise RactdError(f"gpu={self.gpu!r}: expected one of auto, yes, no")
        n_points = len(grid_points(get_task(self.task), self.sigmas))
        if self.num_samples < n_points:
            raise RactdError(f"num_samples={self.num_samples}: fewer than the {n_points} points the search evaluates "
                             "first (Table 9 and --sigmas)")
        for cfg in self.stage_configs():
            cfg.validate().unet(get_task(self.task))
        return self

    @property
    def use_gpu(self) -> bool | str:
        return {"auto": "auto", "yes": True, "no": False}[self.gpu]

    def stage_config(self, stage: str, **overrides) -> TrainConfig:
        """A stage's TrainConfig: the budget's, then this search's sizes, then `overrides`."""
        kw = dict(task=self.task, scale=self.scale, seed=self.seed)
        if self.preset:
            kw["preset"] = self.preset
        steps = {"student": self.steps, "teacher": self.teacher_steps, "reward": self.reward_steps}[stage]
        if steps:
            kw["steps"] = steps
        if stage == "student":
            if self.batch:
                kw["batch"] = self.batch
            n = steps or BUDGETS[self.budget]["student"].get("steps", TrainConfig.steps)
            kw.update(ckpt_every=self.ckpt_every or max(1, math.ceil(n / 4)), select_seeds=self.select_seeds,
                      select_max_steps=self.select_max_steps)
        return TrainConfig.for_stage(stage, self.budget, **{**kw, **overrides})

    def stage_configs(self, **student_overrides) -> list[TrainConfig]:
        """The shared stages (reward for locomotion, teacher) and the student template."""
        stages = (["reward"] if get_task(self.task).kind == "locomotion" else []) + ["teacher"]
        return [self.stage_config(s) for s in stages] + [self.stage_config("student", **student_overrides)]

    def out_dir(self) -> Path:
        from ractd.paths import sweep_dir

        return Path(self.run_dir).expanduser().resolve() if self.run_dir else sweep_dir(self.task, self.scale)


# `--quick`: the README's first command, within 10 minutes on 2 CPUs: the quick training budget (teacher 1200
# steps at batch 64, students 150 steps) with the 32-64-128 U-Net (preset "small-maze", about a quarter of the
# CPU preset's compute), 2 objective rollouts per checkpoint. maze2d-umaze runs on the small generated dataset
# (100k steps, generated in seconds), where this budget gives a working policy (README: the first command's
# scores), with 2 trials: the Table 9 point (alpha = beta = 1, sigma = 0: CTD) and one TPE point, each distilled
# for 75 steps (measured: select_score 139 at step 38 of 150 already; with 150 steps the whole command took
# 11 min 15 s on a quiet 2-CPU machine). Locomotion stays a smoke run on tiny data (3 trials): its small datasets
# take an hour or more to generate.
# select_max_steps 300: a maze2d-umaze episode's full length; locomotion's quick objective rolls out 300 steps (the
# default, full-length episodes on 10 seeds, is SearchConfig's, from TrainConfig).
QUICK = dict(budget="quick", scale="tiny", preset="small-maze", num_samples=3, select_seeds=2, select_max_steps=300)
QUICK_MAZE = dict(scale="small", num_samples=2, steps=75)


def quick_settings(task: str) -> dict:
    """The SearchConfig fields `--quick` sets for a task."""
    return {**QUICK, **(QUICK_MAZE if get_task(task).kind == "maze" else {})}


# ------------------------------------------------------------------------------------------------ dataset

def _minari_has(dataset_id: str | None) -> bool:
    if dataset_id is None:
        return False
    try:
        import minari
    except ImportError:
        return False
    try:
        return dataset_id in minari.list_local_datasets()
    except Exception as e:  # an unreadable local store is not a reason to fail; the next source is tried
        log.warning("cannot list Minari's local store (%s); skipping Minari", e)
        return False


def _generate(task: Task, scale: str, seed: int) -> Path:
    log.info("generating the %s dataset at scale %s (seed %d) ...", task.name, scale, seed)
    if task.kind == "maze":
        from ractd.data.generate_maze import generate_maze

        return generate_maze(task, scale=scale, seed=seed)
    try:
        from ractd.data.generate_locomotion import generate_locomotion
    except ImportError as e:
        raise RactdError(f"cannot generate {task.name} locally ({e}); install the locomotion extra or put the "
                         f"D4RL file into the d4rl cache") from None
    return generate_locomotion(task, scale=scale, seed=seed)


def ensure_dataset(task: Task, scale: str, source: str = "auto", seed: int = 0, with_data: bool = False):
    """Make sure the task's dataset exists, load it (validating it) and fingerprint it.

    Returns {"source": d4rl | minari | local, "path", "fingerprint", "transitions", "generated"} (with_data:
    (that, the dataset dict), which the search ships to every node through the object store); the sources are
    tried in the order of SearchConfig.source's doc. A dataset that fails validation raises RactdError."""
    from ractd.data.d4rl import d4rl_cache_path, load_dataset, local_dataset_path
    from ractd.train import dataset_fingerprint

    local = local_dataset_path(task, scale)
    generated = False
    if source == "auto":
        if d4rl_cache_path(task).is_file():
            source = "d4rl"
        elif _minari_has(task.minari_id):
            source = "minari"
        else:
            source = "local"
    if source == "local" and not local.is_file():
        _generate(task, scale, seed)
        generated = True
    data = load_dataset(task, source=source, scale=scale)
    path = {"d4rl": str(d4rl_cache_path(task)), "local": str(local), "minari": task.minari_id}[source]
    info = {"source": source, "path": path, "fingerprint": dataset_fingerprint(data),
            "transitions": int(len(data["rewards"])), "generated": generated}
    log.info("dataset: %s (%s%s), %d transitions, fingerprint %s", path, source,
             ", generated now" if generated else "", info["transitions"], info["fingerprint"])
    return (info, data) if with_data else info


# ------------------------------------------------------------------------------------------------ shared models

# Fields that do not change what a teacher / reward model is (the dataset is identified by its fingerprint).
_KEY_EXCLUDE = frozenset({"run_dir", "report_every", "source", "scale", "teacher_ckpt", "reward_ckpt",
                          "select_seeds", "select_max_steps"})


def shared_key(cfgs: list[TrainConfig], fingerprint: str) -> str:
    """12 hex digits identifying (the shared stages' configs, the dataset fingerprint)."""
    body = {"fingerprint": fingerprint,
            "stages": [{k: v for k, v in to_dict(c).items() if k not in _KEY_EXCLUDE} for c in cfgs]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def sweep_storage(out_dir: Path) -> str:
    """Where a sweep's Tune and Train state live (ractd.storage.location): $RACTD_STORAGE_PATH/sweeps/<folder>-<id>
    on a cluster, the id a digest of the run folder's absolute path (two sweeps whose folders share a name do
    not share state), else <run folder>/ray."""
    out_dir = Path(out_dir).expanduser().resolve()
    digest = hashlib.sha256(str(out_dir).encode()).hexdigest()[:8]
    return storage.location(f"sweeps/{out_dir.name}-{digest}", out_dir / "ray")


def ensure_shared_models(scfg: SearchConfig, dataset: dict, data=None, use_gpu: bool | str | None = None) -> dict:
    """Train the teacher (and the reward model) once per key, or reuse them.

    They live in storage (ractd.storage: $RACTD_STORAGE_PATH/shared/<task>-<key>/ on a cluster), found there by
    key by every later search and evaluation, whichever node trained them; this machine keeps a copy in
    ractd.paths.shared_models_dir(task, key), fetched from storage. data: ObjectRef of the dataset (see
    ractd_ray.train.fit_stages). Returns {"dir", "key", "teacher", "reward" (path or ""), "stored" (storage
    location), "trained": stages trained by this call, "train_time_s"}. A lock file serializes concurrent
    searches of the same task and key on this machine."""
    from ractd.io import atomic_write_json
    from ractd.paths import shared_models_dir
    from ractd_ray.train import artifacts_location, fit_stages

    *shared, _ = scfg.stage_configs()
    shared = [dataclasses.replace(c, source=dataset["source"]) for c in shared]
    key = shared_key(shared, dataset["fingerprint"])
    folder = shared_models_dir(scfg.task, key)
    folder.mkdir(parents=True, exist_ok=True)
    shared = [dataclasses.replace(c, run_dir=str(folder)) for c in shared]
    train_storage = storage.location(f"shared/{folder.name}", folder / "ray")
    stored = artifacts_location(train_storage, "shared")
    stored_marker = storage.join(stored, "models.json")
    marker = folder / "models.json"
    paths = {c.stage: folder / c.stage / "best.pt" for c in shared}
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = {"dir": str(folder), "key": key, "stored": stored}
        if marker.is_file() and all(p.is_file() for p in paths.values()):
            log.info("reusing the shared %s from %s (trained %s)", " and ".join(paths), folder,
                     json.loads(marker.read_text())["trained_at"])
            return {**_shared_info(folder, key, paths), "stored": stored, "trained": [], "train_time_s": 0.0}
        if storage.exists(stored_marker):
            for stage, p in paths.items():
                storage.download(storage.join(stored, stage, "best.pt"), p)
            storage.download(stored_marker, marker)
            log.info("fetched the shared %s from %s", " and ".join(paths), stored)
            return {**_shared_info(folder, key, paths), "stored": stored, "trained": [], "train_time_s": 0.0}
        from ractd_ray.resources import decide_gpu, worker_cpus
        from ractd_ray.train import ensure_ray

        ensure_ray()
        gpu = decide_gpu(scfg.gpu if use_gpu is None else use_gpu, "the shared stages' Ray Train workers")
        cpus = worker_cpus(scfg.cpus_per_worker, scfg.workers, gpu)
        log.info("training the shared %s into %s (%d worker%s x %g CPU%s)", " and ".join(paths), stored,
                 scfg.workers, "s" * (scfg.workers > 1), cpus, "" if gpu is False else " + 1 GPU")
        out = fit_stages(shared, num_workers=scfg.workers, use_gpu=gpu, max_failures=scfg.max_failures,
                         storage_path=train_storage, name="shared", cpus_per_worker=cpus, data=data, fetch=True)
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise RactdError(f"training the shared models wrote no {', '.join(missing)} to {stored}")
        trained = [o["stage"] for o in out if not o["skipped"]]
        train_time = sum(o.get("train_time_s", 0.0) for o in out)
        for o in out:
            if not o["skipped"]:
                log.info("trained the %s: %d steps in %.0f s", o["stage"], o["step"], o.get("train_time_s", 0.0))
        record = {"key": key, "task": scfg.task, "dataset": dataset, "configs": [to_dict(c) for c in shared],
                  "trained_at": time.strftime("%F %T"), "train_time_s": train_time, "fit_time_s": out[-1]["fit_time_s"]}
        storage.write_bytes(stored_marker, json.dumps(record, indent=2, sort_keys=True).encode())  # last: complete
        atomic_write_json(marker, record)
    return {**_shared_info(folder, key, paths), **info, "trained": trained, "train_time_s": train_time}


def _shared_info(folder: Path, key: str, paths: dict) -> dict:
    return {"dir": str(folder), "key": key, "teacher": str(paths["teacher"]), "reward": str(paths.get("reward", ""))}


# ------------------------------------------------------------------------------------------------ trials

@dataclasses.dataclass(frozen=True)
class TrialPlan:
    """What every trial needs besides its weights (passed to the trainable with tune.with_parameters)."""

    student: dict  # TrainConfig of the student without run_dir and weights
    out_dir: str
    train_storage: str  # Ray Train's storage_path of the trials (one run per trial, named by the trial id)
    data: object  # ObjectRef of the dataset (every node trains on the driver's copy)
    inputs: dict  # {teacher_ckpt, reward_ckpt: ObjectRef of the file's bytes} (the shared models, from the driver)
    workers: int
    cpus_per_worker: float
    use_gpu: bool | str
    max_failures: int
    env: dict


SCORE_FLOOR = -1e6
"""What Tune sees in place of a non-finite select_score (a diverged student): ASHA multiplies the score, so a NaN
would poison its rungs, and Tune refuses a report without its metric; the floor ranks the trial last, so ASHA
stops it at its next rung and TPE learns the point is bad. trials.parquet keeps the library's own record."""


def finite_score(metrics: dict) -> dict:
    """The report with a non-finite (or missing, None) select_score replaced by SCORE_FLOOR."""
    v = metrics.get(METRIC)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return metrics
    return {**metrics, METRIC: SCORE_FLOOR}


def startup_trials(num_samples: int, n_points: int) -> int:
    """TPE's random start-up trials: the grid points, or a quarter of the budget, at most Optuna's default 10
    (Optuna's own default of 10 made 10 of a 12-trial search random)."""
    return max(1, n_points, min(10, math.ceil(num_samples / 4)))


def _report_callback(fit_started: float):
    """Ray Train -> Tune: forward only checkpoint reports (they carry select_score and the checkpoint), each with
    fit_time_s, the wall time since the trial called fit() (`fit_started`, time.time()): with the worker's
    train_time_s and start-up stamps (ractd_ray.train.Timeline) in every report, a trial stopped by ASHA has them
    in its last result."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class CheckpointReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("at_checkpoint"):
                now = time.time()
                super().after_report(run_context, [{**finite_score(m), "fit_time_s": now - fit_started}
                                                   for m in metrics], checkpoint)

    return CheckpointReports()


def trial_record(train_storage: str, trial_id: str, name: str) -> str:
    """Storage location of a trial's file `name` (student/best.pt, student/metrics.jsonl, summary.json)."""
    from ractd_ray.train import artifacts_location

    return storage.join(artifacts_location(train_storage, trial_id), name)


def run_trial(config: dict, plan: TrialPlan) -> None:
    """Tune function trainable: distill one student with weights `config` via Ray Train (ractd_ray.train).

    Runs on any node: its run folder (trials/<trial_id>/ under the run folder's path) is this node's scratch;
    what the driver reads (best.pt, metrics.jsonl, summary.json) goes to storage."""
    from ray import tune

    from ractd.io import atomic_write_json
    from ractd_ray.train import fit_stage

    started = time.time()
    os.environ.update(plan.env)
    trial_id = tune.get_context().get_trial_id()
    summary_loc = trial_record(plan.train_storage, trial_id, "summary.json")
    if storage.exists(summary_loc):  # it finished under an earlier driver (killed before Tune saved that)
        last = json.loads(storage.read_text(summary_loc)).get("last_report")
        if last:
            tune.report(finite_score(last))
            return
    trial_dir = Path(plan.out_dir) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "driver.log", "a") as f:  # one line per start of this trial's driver (on this node)
        f.write(f"{time.strftime('%F %T')} start {json.dumps(config, sort_keys=True)}\n")
    base = from_dict(TrainConfig, plan.student)
    weights = {k: float(config[k]) for k in ("alpha", "beta", "sigma")}
    cfg = dataclasses.replace(base, run_dir=str(trial_dir), distill=dataclasses.replace(base.distill, **weights))
    fit_started = time.time()
    try:
        out = fit_stage(cfg, num_workers=plan.workers, use_gpu=plan.use_gpu, max_failures=plan.max_failures,
                        storage_path=plan.train_storage, name=trial_id, data=plan.data, inputs=plan.inputs,
                        fetch=False, callbacks=[_report_callback(fit_started)], cpus_per_worker=plan.cpus_per_worker,
                        progress=True, stage_lines=False, started=started)
    except Exception as e:  # the failed trial's times: its fit, and the training its worker recorded
        timing_loc = trial_record(plan.train_storage, trial_id, "timing.json")
        timing = json.loads(storage.read_text(timing_loc)) if storage.exists(timing_loc) else {}
        failed = {"trial_id": trial_id, **weights, "fit_time_s": time.time() - fit_started,
                  "train_time_s": timing.get("train_time_s", 0.0), "error": str(e).strip()[-500:],
                  **{k: v for k, v in timing.items() if k.startswith("startup_")}}
        storage.write_bytes(summary_loc, json.dumps(failed, indent=2, sort_keys=True).encode())
        raise
    summary = {"trial_id": trial_id, **weights, "step": out["step"], "best": out["stored_best"],
               "train_time_s": out["train_time_s"], "fit_time_s": out["fit_time_s"], **out.get("startup", {}),
               "ray_checkpoint": out["ray_checkpoint"], "uploaded_bytes": out.get("uploaded_bytes", 0),
               "last_report": {**out["metrics"], "checkpoint_path": out["ray_checkpoint"], "done": True}}
    storage.write_bytes(summary_loc, json.dumps(summary, indent=2, sort_keys=True).encode())
    atomic_write_json(trial_dir / "summary.json", summary)


# ------------------------------------------------------------------------------------------------ the search

def _trainable(plan: TrialPlan):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"cpu": TRIAL_DRIVER_CPUS})


TRIAL_DRIVER_CPUS = 0.25
"""CPUs each trial's Tune driver reserves (it waits on its Ray Train run): small, so that on one machine the next
trial's driver fits beside a training trial (prestart)."""

# A prestarted trial waits for the workers of a trial that trains: as long as that trial runs. Ray Train's worker
# group start-up would time out after 60 s (and count a controller failure each time); the resource check has
# made sure the trial fits once a running trial ends, so it waits (7 days: a bound, not a wait anyone meets).
PRESTART_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(7 * 24 * 3600)}


def _check_resources(scfg: SearchConfig, use_gpu: bool) -> tuple[float, bool]:
    """A trial that can never fit what the cluster can scale to (its node types, ractd_ray.resources) is an error;
    CPUs not free now are a warning (trials wait, or the autoscaler adds nodes). Returns the CPUs each trial worker
    reserves (ractd_ray.resources.worker_cpus) and whether the search prestarts a trial.

    Prestart: Tune runs max_concurrent + 1 trials where the cluster (a fixed one) can hold the extra trial's driver
    but not its workers: the extra trial starts its Tune driver and its Ray Train controller while the others
    train, and its workers start the moment a training trial's end frees theirs. So max_concurrent trials train at
    a time and the next one's start-up (the trial's process, its imports, the controller: bench/sweep_overhead.py)
    overlaps their training instead of following it."""
    import ray

    from ractd_ray.resources import capacity, check_fits, worker_cpus

    cap = capacity()
    n = scfg.max_concurrent
    # the drivers of the n training trials and of the prestarted one share the node with the workers
    cpus = worker_cpus(scfg.cpus_per_worker, scfg.workers, use_gpu, concurrent=n,
                       driver_cpus=TRIAL_DRIVER_CPUS * (n + 1) / n, cap=cap)
    per_worker = {"CPU": cpus, **({"GPU": 1.0} if use_gpu else {})}
    check_fits(f"a trial's {scfg.workers} Ray Train workers", per_worker, scfg.workers, cap)
    need = scfg.workers * cpus + TRIAL_DRIVER_CPUS
    if need > cap.cpus:
        raise RactdError(f"a trial needs {need:g} CPUs ({scfg.workers} workers x {cpus:g} + {TRIAL_DRIVER_CPUS:g} "
                         f"for its driver) but the Ray cluster {'can scale to' if cap.autoscaling else 'has'} "
                         f"{cap.cpus:g}; lower --workers")
    free = ray.available_resources().get("CPU", 0)
    if need > free:
        log.warning("only %g CPUs are free now (a trial needs %g; the cluster %s %g): trials wait until they are",
                    free, need, "can scale to" if cap.autoscaling else "has", cap.cpus)
    eps = 1e-9
    extra_driver_fits = n * need + TRIAL_DRIVER_CPUS <= cap.cpus + eps
    extra_workers_fit = (n + 1) * need <= cap.cpus + eps and (not use_gpu or (n + 1) * scfg.workers <= cap.gpus)
    prestart = not cap.autoscaling and extra_driver_fits and not extra_workers_fit
    return cpus, prestart


def run_search(scfg: SearchConfig, resume: bool = False) -> dict:
    """Run (or, with resume, continue) a search; see the module doc. Returns {"out_dir", "trials" (rows),
    "best", "shared", "dataset", "complete", "wall_s", "startup_s"}."""
    from ray import tune

    from ractd.io import atomic_write_json
    from ractd_ray.train import ensure_ray, file_ref, forwarded_env

    t_start = time.perf_counter()
    scfg = scfg.validate()
    out_dir = scfg.out_dir()
    tune_storage = sweep_storage(out_dir)
    tune_path = storage.join(tune_storage, "tune")
    train_storage = storage.join(tune_storage, "train")
    saved = out_dir / "search.json"
    if resume:
        if not (saved.is_file() and tune.Tuner.can_restore(tune_path)):
            raise RactdError(f"nothing to resume in {out_dir} (no search was started there)")
        stored = from_dict(SearchConfig, json.loads(saved.read_text())["config"])
        scfg = dataclasses.replace(stored, address=scfg.address or stored.address).validate()
        log.info("resuming the search in %s with its saved configuration (%s)", out_dir, saved)
    elif tune.Tuner.can_restore(tune_path):
        raise RactdError(f"{out_dir} already holds a search; pass --resume to continue it, or --run-dir to start "
                         f"another")
    task = get_task(scfg.task)
    # before Ray: bad data fails fast
    dataset, data = ensure_dataset(task, scfg.scale, scfg.source, scfg.seed, with_data=True)

    started = ensure_ray(scfg.address or None)
    try:
        import ray

        from ractd_ray.resources import decide_gpu

        use_gpu = decide_gpu(scfg.gpu, "the trials' Ray Train workers")  # once, for the whole search
        trial_cpus, prestart = _check_resources(scfg, use_gpu)
        startup = time.perf_counter() - t_start
        data_ref = ray.put(data)  # every node trains on this copy (object store), none reads its own disk
        del data
        shared = ensure_shared_models(scfg, dataset, data_ref, use_gpu=use_gpu)
        student = scfg.stage_config("student", source=dataset["source"], teacher_ckpt=shared["teacher"],
                                    reward_ckpt=shared["reward"])
        inputs = {f"{k}_ckpt": file_ref(shared[k]) for k in ("teacher", "reward") if shared[k]}
        plan = TrialPlan(student=to_dict(student), out_dir=str(out_dir), train_storage=train_storage,
                         data=data_ref, inputs=inputs, workers=scfg.workers,
                         cpus_per_worker=trial_cpus, use_gpu=use_gpu, max_failures=scfg.max_failures,
                         env={**forwarded_env(), **(PRESTART_ENV if prestart else {})})
        if not resume:
            atomic_write_json(saved, {"config": to_dict(scfg), "dataset": dataset, "shared": shared})
        t_tune = time.perf_counter()
        log.info("searching alpha, beta%s: %d trials of %d distillation steps, select_score at every %d steps%s",
                 ", sigma" if task.kind == "locomotion" else " (maze2d: sigma = 0, no reward model)",
                 scfg.num_samples, student.steps, student.ckpt_every,
                 "; the next trial starts up while one trains" if prestart else "")
        if resume:
            tuner = tune.Tuner.restore(tune_path, trainable=_trainable(plan), resume_errored=True)
        else:
            tuner = tune.Tuner(_trainable(plan), param_space=search_space(task),
                               tune_config=_tune_config(scfg, task, student, prestart),
                               run_config=tune.RunConfig(name="tune", storage_path=tune_storage,
                                                         failure_config=tune.FailureConfig(
                                                             max_failures=scfg.trial_failures),
                                                         **_console_options(student.steps)))
        grid = tuner.fit()
        tune_wall = time.perf_counter() - t_tune
    finally:
        if started:
            import ray

            ray.shutdown()
    rows = collect_trials(grid, out_dir, student.steps, train_storage)
    complete = len(rows) == scfg.num_samples and all(r["status"] in ("completed", "stopped", "error") for r in rows)
    best = write_results(rows, out_dir, scfg, dataset, shared)
    _print_summary(rows, best, out_dir, complete, scfg)
    return {"out_dir": str(out_dir), "trials": rows, "best": best, "shared": shared, "dataset": dataset,
            "complete": complete, "wall_s": time.perf_counter() - t_start, "startup_s": startup,
            "tune_wall_s": tune_wall}


def _console_options(steps: int) -> dict:
    """RunConfig options for the console: Tune's status tables with --verbose, else one line per checkpoint."""
    from ractd_ray import console

    if console.verbose():
        return {}
    return {"verbose": 0, "callbacks": [console.trial_lines(steps)]}


def _tune_config(scfg: SearchConfig, task: Task, student: TrainConfig, prestart: bool = False):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    points = grid_points(task, scfg.sigmas)
    searcher = OptunaSearch(points_to_evaluate=points, sampler=optuna.samplers.TPESampler(
        seed=scfg.seed, n_startup_trials=startup_trials(scfg.num_samples, len(points))))
    # rungs at checkpoints; max_t beyond the last step, so a trial that runs to the end finishes by itself
    scheduler = ASHAScheduler(time_attr="step", max_t=student.steps + 1,
                              grace_period=min(scfg.grace_period * student.ckpt_every, student.steps + 1),
                              reduction_factor=scfg.reduction_factor)
    return tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                           num_samples=scfg.num_samples, max_concurrent_trials=scfg.max_concurrent + prestart,
                           trial_dirname_creator=lambda trial: trial.trial_id)


LOSS_TERMS = ("loss", "ctm", "dsm", "reward")


def _checkpoint_metrics(train_storage: str, trial_id: str) -> list[dict]:
    """The student's metrics at each of its checkpoints (the library's metrics.jsonl, as persisted to storage;
    one record per step, the last written wins: a run resumed on another node repeats the steps after its
    last persisted checkpoint), [] if absent."""
    loc = trial_record(train_storage, trial_id, "student/metrics.jsonl")
    if not storage.exists(loc):
        return []
    by_step = {}
    for line in storage.read_text(loc).splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec.get("step")] = rec
    return [by_step[k] for k in sorted(by_step, key=lambda k: (k is None, k or 0))]


def _number(v) -> float:
    return float(v) if v is not None else math.nan


def collect_trials(grid, out_dir: Path, steps: int, train_storage: str) -> list[dict]:
    """One row per trial from Tune's results and each trial's records in storage (whichever node ran it).

    select_score: the best checkpoint's score, i.e. the score of the trial's student/best.pt (from the library's
    metrics.jsonl; Tune's reports where that file is not stored); last_score, step and the loss terms: the
    trial's last checkpoint; best_step and the diagnostics (ractd.train.DIAG_TERMS): its best checkpoint, the
    student its best.pt holds. checkpoint: the storage location of that best.pt. status: completed (ran all
    steps), stopped (by ASHA), error, unfinished (the search was interrupted before the trial ended).
    train_time_s: wall time of the library's train() in the trial's worker (to its last report when the trial
    was stopped); fit_time_s: of its TorchTrainer.fit() (to its last report when stopped); trial_time_s: Tune's
    time of the whole trial; startup_<stamp>_s: when each step of the trial's start-up was done, in seconds from
    the start of the trial (ractd_ray.train.STARTUP_STAMPS: fit() called, worker process started, train loop
    entered, dataset fetched, teacher written, train() entered, first step done)."""
    from ractd_ray.train import STARTUP_STAMPS

    rows = []
    for result in grid:
        trial_id = Path(result.path).name
        reported = result.metrics or {}
        history = _checkpoint_metrics(train_storage, trial_id)
        if not history and result.metrics_dataframe is not None:
            history = result.metrics_dataframe.to_dict("records")
        scores = [float(h[METRIC]) for h in history if h.get(METRIC) is not None and math.isfinite(h[METRIC])]
        last = history[-1] if history else {}
        scored = [h for h in history if h.get(METRIC) is not None and math.isfinite(h[METRIC])]
        at_best = max(scored, key=lambda h: float(h[METRIC])) if scored else {}
        summary_loc = trial_record(train_storage, trial_id, "summary.json")
        summary = json.loads(storage.read_text(summary_loc)) if storage.exists(summary_loc) else {}
        if result.error is not None:
            status = "error"
        elif int(reported.get("step") or 0) >= steps:
            status = "completed"
        elif reported.get("done"):
            status = "stopped"
        else:
            status = "unfinished"
        best_pt = trial_record(train_storage, trial_id, "student/best.pt")
        rows.append({
            "trial_id": trial_id, **{k: float(result.config.get(k, math.nan)) for k in ("alpha", "beta", "sigma")},
            METRIC: max(scores) if scores else math.nan, "last_score": scores[-1] if scores else math.nan,
            "step": int(last.get("step") or 0), **{k: _number(last.get(k)) for k in LOSS_TERMS},
            "best_step": int(at_best.get("step") or 0), **{k: _number(at_best.get(k)) for k in DIAG_TERMS},
            "status": status, "checkpoint": best_pt if storage.exists(best_pt) else "",
            "ray_checkpoint": reported.get("checkpoint_path") or "",
            # a trial that ran to its end has them in its summary; one stopped by ASHA in its last report
            **{k: _number(summary.get(k, reported.get(k))) for k in ("train_time_s", "fit_time_s")},
            **{f"startup_{k}_s": _number(summary.get(f"startup_{k}_s", reported.get(f"startup_{k}_s")))
               for k in STARTUP_STAMPS},
            "trial_time_s": _number(reported.get("time_total_s")),
            "stored_bytes": int(storage.total_bytes(storage.join(train_storage, trial_id))),
            "error": "" if result.error is None else str(result.error).strip().splitlines()[-1][:500]})
    return sorted(rows, key=lambda r: r["trial_id"])


def write_results(rows: list[dict], out_dir: Path, scfg: SearchConfig, dataset: dict, shared: dict) -> dict | None:
    """trials.parquet, and for the trial with the highest score best_config.json and best/checkpoint.pt (fetched
    from storage). Returns best_config.json's content (None when no trial has a score)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ractd.io import atomic_write, atomic_write_json
    from ractd.study import fetch_final_checkpoint

    table = pa.Table.from_pylist(rows)
    atomic_write(out_dir / "trials.parquet", lambda f: pq.write_table(table, f))
    scored = [r for r in rows if math.isfinite(r[METRIC]) and r["checkpoint"]]
    if not scored:
        return None
    top = max(scored, key=lambda r: r[METRIC])
    ckpt = storage.download(top["checkpoint"], out_dir / "best" / "checkpoint.pt")
    # the winning trial's best.pt and final checkpoint on this machine, in its run folder's layout (ractd-final of
    # the study reads <trial>/student/latest/checkpoint.pt), fetched from storage whichever node trained it
    trial_best = storage.download(top["checkpoint"], out_dir / "trials" / top["trial_id"] / "student" / "best.pt")
    fetch_final_checkpoint(top["checkpoint"], trial_best.parent / "latest" / "checkpoint.pt")
    best = {"task": scfg.task, "alpha": top["alpha"], "beta": top["beta"], "sigma": top["sigma"],
            "score": top[METRIC], "metric": METRIC, "trial_id": top["trial_id"], "checkpoint": str(ckpt),
            "trial_checkpoint": str(trial_best), "trial_checkpoint_stored": top["checkpoint"],
            "teacher": shared["teacher"], "reward": shared["reward"],
            "dataset": dataset, "scale": scfg.scale, "budget": scfg.budget, "trials": len(rows)}
    atomic_write_json(out_dir / "best_config.json", best)
    return best


def evaluation_command(scfg: SearchConfig) -> str:
    """The command that evaluates this sweep's students (eval/reproduce_tables.py reads the sweep)."""
    if scfg.budget == "quick":
        return "python eval/reproduce_tables.py --quick" + ("" if scfg.task == "maze2d-umaze" else
                                                              f" --tasks {scfg.task}")
    return f"python eval/reproduce_tables.py --study claims --tasks {scfg.task}"


def _print_summary(rows: list[dict], best: dict | None, out_dir: Path, complete: bool,
                   scfg: SearchConfig | None = None) -> None:
    from tabulate import tabulate

    cols = ["trial_id", "alpha", "beta", "sigma", METRIC, "step", "ctm", "dsm", "reward", "status"]
    ordered = sorted(rows, key=lambda r: -r[METRIC] if math.isfinite(r[METRIC]) else math.inf)
    print(tabulate([[r[c] for c in cols] for r in ordered], headers=cols, floatfmt=".4g"))
    if best:
        print(f"best: alpha={best['alpha']:.4g} beta={best['beta']:.4g} sigma={best['sigma']:.4g} "
              f"{METRIC}={best['score']:.4g} -> {best['checkpoint']}")
    print(f"results: {out_dir / 'trials.parquet'}")
    if complete and best and scfg is not None:
        print(f"next: evaluate it on 100 seeds and rebuild the tables: {evaluation_command(scfg)}")
    if not complete:
        print(f"the search did not finish ({sum(r['status'] in ('completed', 'stopped', 'error') for r in rows)} "
              f"trials done); continue it with --resume --run-dir {out_dir}")


# ------------------------------------------------------------------------------------------------ command line

def build_parser():
    import argparse
    import sys

    from ractd.config import add_config_args
    from ractd.tasks import TASKS

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2)

    p = Parser(prog="python tune/search.py", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Search the Eq. (9) weights alpha, beta, sigma of one task with Ray Tune (Optuna TPE + "
                           "ASHA), each trial distilled with Ray Train.",
               epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--task", required=True, help=f"task name, one of: {', '.join(TASKS)}")
    dests = ["task"] + add_config_args(p, SearchConfig, SearchConfig(), skip=("task",))
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke budget on tiny data (sets {', '.join(f'{k}={v}' for k, v in QUICK.items())}; "
                        f"maze2d also {', '.join(f'{k}={v}' for k, v in QUICK_MAZE.items())}; flags given override "
                        f"it)")
    p.add_argument("--resume", action="store_true",
                   help="continue the search in the run folder (Tuner.restore): finished trials are not rerun")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's own console output: Tune's status tables, Ray Train's report lines, INFO logs")
    p.set_defaults(dests=dests)
    return p


def config_from_args(args) -> SearchConfig:
    from ractd.config import replace_from_args

    base = SearchConfig(task=args.task)
    if args.quick:
        base = dataclasses.replace(base, **quick_settings(args.task))
    return replace_from_args(base, args, args.dests)


def main(argv: list[str] | None = None) -> int:
    import sys

    from ractd_ray import console

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    console.set_verbose(args.verbose)
    try:
        result = run_search(config_from_args(args), resume=args.resume)
    except RactdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0 if result["complete"] else 1
