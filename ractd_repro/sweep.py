"""The sweep over the Eq. (9) weights, everything of it that needs no Ray: the search space and its grid points,
the sweep's configuration (SearchConfig, --quick), the dataset it trains on, the key of the shared teacher and
reward model, where its state is stored, and what the command prints at the end (the records it writes are
ractd_repro.records'). ractd_ray.search runs it with Ray Tune and Ray Train; this module imports neither.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Literal

from ractd import RactdError, storage
from ractd.config import to_dict
from ractd.tasks import SCALES, Task, get_task
from ractd.train import BUDGETS, TrainConfig
from ractd_repro.paper import PAPER_FIG4_SIGMAS
from ractd_repro.records import METRIC, BestConfig, SweepFolder, TrialRecord

log = logging.getLogger(__name__)


MODE = "max"  # of METRIC (ractd_repro.records)


# The search space of the Eq. (9) weights, the one place it is defined. sigma is a choice so that sigma = 0
# (CTD, no reward term) is a point of the space, and every Table 9 value is on the grid; maze2d tasks have no
# reward model, so their sigma is fixed at 0.
ALPHA_RANGE = (0.25, 4.0)  # log-uniform


BETA_RANGE = (0.25, 4.0)  # log-uniform


# the grid holds every Table 9 sigma and every sigma of the paper's Fig. 4 (ractd_repro.paper.PAPER_FIG4_SIGMAS), so
# a --sigmas study of Fig. 4 is a set of points of the space
SIGMA_CHOICES = tuple(sorted({0.0, 0.05, 0.1, 0.2, 0.4, 0.5, 1.0, 2.0, 3.0} | set(PAPER_FIG4_SIGMAS)))


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
    baseline ractd_repro.models takes from the sweep) -- without repeats. Together they are a like-for-like sigma study
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
        it; with the paper budget: D4RL's file, downloaded if missing, never a generated stand-in: data_source) |
        d4rl | minari | local.
    preset: U-Net preset of teacher and student: cpu (the task's CPU preset), paper, or a preset name ("" = the
        budget's: paper for the paper budget, else cpu).
    run_dir: output folder ("" = ractd.paths.sweep_dir(task, scale)).
    num_samples: trials (weight settings); the first is the task's Table 9 setting, then the --sigmas points.
    sigmas: locomotion: sigmas evaluated (each at the Table 9 alpha, beta; 0 = CTD at alpha = beta = 1) before
        TPE proposes points: a like-for-like sigma study; num_samples must cover them.
    max_concurrent: trials training at the same time; 0 = auto: as many as the cluster can scale to hold, at most
        num_samples (ractd_ray.resources.concurrent_trials: GPU trials by the GPUs of its node types, CPU trials
        one per node's worth of CPUs, so 1 on one machine). On a fixed cluster that cannot hold one more trial's
        workers, the next trial starts up meanwhile (GPU trials: one per training trial, as the drivers' CPUs and
        the trials left allow; ractd_ray.search._check_resources).
    workers: Ray Train workers per trial (and for training the shared teacher and reward model).
    cpus_per_worker: CPUs reserved per worker, also its torch threads (rounded up); a trial's driver takes 0.25 CPU
        more. 0 = auto (ractd_ray.resources.worker_cpus): 1 per GPU worker; a CPU worker takes its share of the
        largest node's CPUs, so on one machine the shared stages and each trial train on every core.
    gpu: GPUs for the workers: auto (when a node type of the cluster has one: ractd_ray.resources) | yes | no.
    gpus_per_worker: GPUs each GPU worker of a trial asks for; 0 = auto: a share of one GPU for a one-worker trial
        of a small student net (the CPU presets: ractd_ray.resources.gpus_per_worker), so several trials train on
        one device, else 1.
        The shared teacher and reward model take whole GPUs.
    steps: distillation steps per trial (0 = the budget's).
    batch: global distillation batch (0 = the budget's).
    teacher_steps: steps of the shared teacher (0 = the budget's).
    teacher_batch: batch of the shared teacher (0 = the budget's).
    reward_steps: steps of the shared reward model (0 = the budget's).
    ckpt_every: student checkpoint interval, where the objective is measured and ASHA decides (0 = steps / 4).
    report_every: steps between the student's loss reports (Tune's TensorBoard files and the tracking callbacks
        log each; 0 = TrainConfig's).
    select_seeds: objective rollouts at each checkpoint (seeds 10000, ...); default TrainConfig's (10).
    select_max_steps: env steps of each objective rollout; 0 = the task's full episode length (TrainConfig's
        default).
    grace_period: checkpoints every trial runs before ASHA may stop it.
    reduction_factor: ASHA's reduction factor.
    max_failures: Ray Train restarts of a worker group after a worker failure (from its last checkpoint).
    trial_failures: Tune retries of a failed trial.
    seed: training seed of every stage and trial, and the TPE sampler's seed.
    address: Ray cluster to connect to ("" = $RAY_ADDRESS if set, else a local Ray; auto = the running cluster).
    log_to: experiment tracking besides Tune's TensorBoard files (always written, every report): "" (none) |
        mlflow (MLflowLoggerCallback: $MLFLOW_TRACKING_URI, experiment "ractd-<task>") | wandb
        (WandbLoggerCallback: $WANDB_API_KEY, project "ractd"); the package is the user's to install.
    """

    task: str = "walker2d-medium"
    budget: Literal["cpu", "quick", "paper"] = "cpu"
    scale: str = "small"
    source: Literal["auto", "d4rl", "minari", "local"] = "auto"
    preset: str = ""
    run_dir: str = ""
    num_samples: int = 12
    sigmas: tuple[float, ...] = ()
    max_concurrent: int = 0
    workers: int = 1
    cpus_per_worker: float = 0
    gpu: Literal["auto", "yes", "no"] = "auto"
    gpus_per_worker: float = 0
    steps: int = 0
    batch: int = 0
    teacher_steps: int = 0
    teacher_batch: int = 0
    reward_steps: int = 0
    ckpt_every: int = 0
    report_every: int = 0
    select_seeds: int = TrainConfig.select_seeds          # one source of truth: the training config's defaults
    select_max_steps: int = TrainConfig.select_max_steps
    grace_period: int = 2
    reduction_factor: int = 2
    max_failures: int = 2
    trial_failures: int = 1
    seed: int = 0
    address: str = ""
    log_to: Literal["", "mlflow", "wandb"] = ""

    def validate(self) -> "SearchConfig":
        """Check every field; a bad value raises RactdError with one line naming it."""
        get_task(self.task)
        if self.budget not in BUDGETS:
            raise RactdError(f"budget={self.budget!r}: expected one of {', '.join(BUDGETS)}")
        if self.scale not in SCALES:
            raise RactdError(f"unknown scale {self.scale!r}; expected one of {', '.join(SCALES)}")
        if self.source not in ("auto", "d4rl", "minari", "local"):
            raise RactdError(f"source={self.source!r}: expected one of auto, d4rl, minari, local")
        for name in ("num_samples", "workers", "select_seeds", "grace_period"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise RactdError(f"{name}={v!r}: must be a positive integer")
        for name in ("max_concurrent", "steps", "batch", "teacher_steps", "teacher_batch", "reward_steps",
                     "ckpt_every", "report_every", "max_failures", "trial_failures", "seed", "select_max_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise RactdError(f"{name}={v!r}: must be a non-negative integer")
        for name in ("cpus_per_worker", "gpus_per_worker"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise RactdError(f"{name}={v!r}: must be a non-negative number (0 = auto)")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise RactdError(f"gpus_per_worker={self.gpus_per_worker!r}: a share of one GPU (<= 1) or whole GPUs")
        if self.reduction_factor < 2:
            raise RactdError(f"reduction_factor={self.reduction_factor!r}: must be at least 2")
        if self.gpu not in ("auto", "yes", "no"):
            raise RactdError(f"gpu={self.gpu!r}: expected one of auto, yes, no")
        if self.log_to not in ("", "mlflow", "wandb"):
            raise RactdError(f"log_to={self.log_to!r}: expected mlflow or wandb (TensorBoard files are always written)")
        if self.log_to:
            import importlib.util

            if importlib.util.find_spec(self.log_to) is None:
                raise RactdError(f"--log-to {self.log_to}: the {self.log_to} package is not installed (pip install "
                                 f"{self.log_to})")
        n_points = len(grid_points(get_task(self.task), self.sigmas))
        if self.num_samples < n_points:
            raise RactdError(f"num_samples={self.num_samples}: fewer than the {n_points} points the search evaluates "
                             "first (Table 9 and --sigmas)")
        for cfg in self.stage_configs():
            cfg.validate().unet(get_task(self.task))
        return self

    def data_source(self) -> str:
        """The dataset source the search uses: `source`, except that the paper budget's "auto" is D4RL's file (the
        paper's numbers are on D4RL's data; a locally generated stand-in must be asked for, with --source local)."""
        return "d4rl" if self.source == "auto" and self.budget == "paper" else self.source

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
        if stage == "teacher" and self.teacher_batch:
            kw["batch"] = self.teacher_batch
        if stage == "student":
            if self.batch:
                kw["batch"] = self.batch
            if self.report_every:
                kw["report_every"] = self.report_every
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


# `--quick`: the README's first command, meant to take minutes on 2 CPUs: the quick training budget (teacher 1200
# steps at batch 64, students 150 steps) with the 32-64-128 U-Net (preset "small-maze", about a quarter of the
# CPU preset's compute), 2 objective rollouts per checkpoint. maze2d-umaze runs on the small generated dataset
# (generated in seconds), where this budget gives a working policy (docs/results.md), with 2 trials: the Table 9
# point (alpha = beta = 1, sigma = 0: CTD) and one TPE point, each distilled for 75 steps (the selection score is
# already near its best by then). Locomotion stays a smoke run on tiny data (3 trials): its small datasets
# take long to generate without the committed behavior policies.
# select_max_steps 300: a maze2d-umaze episode's full length; locomotion's quick objective rolls out 300 steps (the
# default, full-length episodes on 10 seeds, is SearchConfig's, from TrainConfig).
QUICK = dict(budget="quick", scale="tiny", preset="small-maze", num_samples=3, select_seeds=2, select_max_steps=300)


QUICK_MAZE = dict(scale="small", num_samples=2, steps=75)


def quick_settings(task: str) -> dict:
    """The SearchConfig fields `--quick` sets for a task."""
    return {**QUICK, **(QUICK_MAZE if get_task(task).kind == "maze" else {})}


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


def dataset_mirror(task: Task, source: str, scale: str) -> str | None:
    """The storage twin of a task's dataset file on a cluster: $RACTD_STORAGE_PATH/datasets/<source>/<file name>
    (source d4rl: d4rl's cache file; local: the generated file at `scale`); None on one machine (or Minari, whose
    store is a folder of its own)."""
    from ractd.data.d4rl import d4rl_cache_path, local_dataset_path

    root = storage.configured()
    if root is None or source not in ("d4rl", "local"):
        return None
    path = d4rl_cache_path(task) if source == "d4rl" else local_dataset_path(task, scale)
    return storage.join(root, "datasets", source, path.name)


def _local_file(task: Task, source: str, scale: str) -> Path:
    from ractd.data.d4rl import d4rl_cache_path, local_dataset_path

    return d4rl_cache_path(task) if source == "d4rl" else local_dataset_path(task, scale)


def _fetch_dataset(task: Task, source: str, scale: str) -> str:
    """Where this machine lacks the file of `source` and storage has it (a new head): download it; returns the
    storage location fetched ("" if none)."""
    loc = dataset_mirror(task, source, scale)
    path = _local_file(task, source, scale)
    if loc is None or path.is_file() or not storage.exists(loc):
        return ""
    storage.download(loc, path)
    return loc


def _pick_source(task: Task, scale: str, source: str, use_minari: bool) -> tuple[str, str]:
    """(source, storage location fetched or "") in SearchConfig.source's order, each source's file taken from this
    machine, else from storage."""
    if source != "auto":
        return source, _fetch_dataset(task, source, scale) if source in ("d4rl", "local") else ""
    for candidate in ("d4rl", "minari", "local"):
        if candidate == "minari":
            if use_minari and _minari_has(task.minari_id):
                return "minari", ""
            continue
        if _local_file(task, candidate, scale).is_file():
            return candidate, ""
        fetched = _fetch_dataset(task, candidate, scale)
        if fetched:
            return candidate, fetched
    return "local", ""


# SearchConfig fields that say where and on what a sweep ran, not what it trained (a sweep's study flags leave them
# to the machine): a sweep matches its study's flags when every other field does (`differs_from_flags`)
RESOURCE_FIELDS = frozenset({"address", "cpus_per_worker", "gpu", "gpus_per_worker", "max_concurrent", "max_failures",
                             "trial_failures", "workers", "log_to", "run_dir", "report_every", "source"})


def config_from_flags(task: str, flags: str) -> SearchConfig:
    """The SearchConfig of `python tune/search.py --task task <flags>` (its config flags only)."""
    import argparse
    import shlex

    from ractd.config import add_config_args, replace_from_args

    p = argparse.ArgumentParser(add_help=False)
    dests = add_config_args(p, SearchConfig, SearchConfig(task=task), skip=("task",))
    args, rest = p.parse_known_args(shlex.split(flags))
    if rest:
        raise RactdError(f"{task}: not SearchConfig flags: {' '.join(rest)}")
    return replace_from_args(SearchConfig(task=task), args, dests)


def differs_from_flags(config: dict, task: str, flags: str) -> list[str]:
    """The fields in which a sweep's recorded config (its search.json "config") differs from the sweep that
    `tune/search.py --task task <flags>` runs, resources aside (RESOURCE_FIELDS) and fields the record does not
    have (written before they existed): [] when it is that sweep."""
    want = to_dict(config_from_flags(task, flags))
    norm = (lambda v: [float(x) for x in v] if isinstance(v, (list, tuple)) else v)
    return [f"{k} {config[k]!r} (the study's {v!r})" for k, v in want.items()
            if k not in RESOURCE_FIELDS and k in config and norm(config[k]) != norm(v)]


def ensure_dataset(task: Task, scale: str, source: str = "auto", seed: int = 0, with_data: bool = False,
                   expect: str = "", use_minari: bool = True):
    """Make sure the task's dataset exists, load it (validating it) and fingerprint it.

    The sources are tried in the order of SearchConfig.source's doc; a D4RL or generated file this machine lacks
    is fetched from storage where a cluster stored it (a new head finds the dataset the sweep used), and only
    then generated (ractd.data's generators, seeded by `seed`: the same file for the same library versions).
    On a cluster the file is stored after it is first used (`dataset_mirror`). expect: the fingerprint the
    dataset must have (a resumed search's), "" for any. use_minari: consider Minari's local store (the library's
    own source "auto" does not).

    Returns {"source": d4rl | minari | local, "path", "fingerprint", "transitions", "generated", "fetched"
    (the storage location it came from, or "")} (with_data: (that, the dataset dict), which the search ships to
    every node through the object store). A dataset that fails validation, or has another fingerprint than
    `expect`, raises RactdError."""
    from ractd.data.d4rl import d4rl_cache_path, load_dataset, local_dataset_path
    from ractd.train import dataset_fingerprint

    local = local_dataset_path(task, scale)
    source, fetched = _pick_source(task, scale, source, use_minari)
    generated = False
    if source == "local" and not local.is_file():
        _generate(task, scale, seed)
        generated = True
    downloaded = source == "d4rl" and not d4rl_cache_path(task).is_file()  # load_dataset downloads it
    data = load_dataset(task, source=source, scale=scale)
    path = {"d4rl": str(d4rl_cache_path(task)), "local": str(local), "minari": task.minari_id}[source]
    info = {"source": source, "path": path, "fingerprint": dataset_fingerprint(data),
            "transitions": int(len(data["rewards"])), "generated": generated, "fetched": fetched,
            "downloaded": downloaded}
    if expect and info["fingerprint"] != expect:
        how = f"fetched from {fetched}" if fetched else ("generated now" if generated else "found on this machine")
        raise RactdError(f"dataset {path} ({how}) has fingerprint {info['fingerprint']}, the search was started on "
                         f"{expect}; put that dataset back (or start a new search with --run-dir)")
    mirror = dataset_mirror(task, source, scale)
    if mirror and not fetched and storage.size(mirror) != Path(path).stat().st_size:
        storage.upload(path, mirror)
    log.info("dataset: %s", describe_dataset(info))
    return (info, data) if with_data else info


def describe_dataset(info: dict) -> str:
    """One line saying which data a run used and how it got it (ensure_dataset's record)."""
    how = (f"fetched from {info['fetched']}" if info.get("fetched") else
           "downloaded from D4RL" if info.get("downloaded") else
           "generated now" if info.get("generated") else "found on this machine")
    kind = {"d4rl": "D4RL's file", "minari": "Minari's dataset", "local": "generated with D4RL's recipe"}
    return (f"{info['path']} ({kind.get(info['source'], info['source'])}, {how}), {info['transitions']} transitions, "
            f"fingerprint {info['fingerprint']}")


# Fields that do not change what a teacher / reward model is (the dataset is identified by its fingerprint).
_KEY_EXCLUDE = frozenset({"run_dir", "report_every", "source", "scale", "teacher_ckpt", "reward_ckpt",
                          "select_seeds", "select_max_steps"})


def shared_key(cfgs: list[TrainConfig], fingerprint: str) -> str:
    """12 hex digits identifying (the shared stages' configs, the dataset fingerprint)."""
    body = {"fingerprint": fingerprint,
            "stages": [{k: v for k, v in to_dict(c).items() if k not in _KEY_EXCLUDE} for c in cfgs]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def sweep_storage(out_dir: Path) -> str:
    """Where a sweep's Tune and Train state live: $RACTD_STORAGE_PATH/sweeps/<folder>-<id> on a cluster, else
    <run folder>/ray (ractd_repro.records.SweepFolder.state)."""
    return SweepFolder(Path(out_dir)).state


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


SEARCH_METRIC = "best_select_score"


"""What Tune's scheduler (ASHA) and searcher (TPE) see at each checkpoint: the best select_score of the trial's
checkpoints so far (`searcher_report`). So a trial's final value -- what TPE learns from, at a trial's end or when
ASHA stops it -- is its best checkpoint's score: the number trials.parquet ranks it by and the sweep selects
(its student/best.pt). With the plain select_score TPE learned from a trial's last checkpoint, for a trial stopped
by ASHA the rung value, while the sweep ranked the trials by their best. ASHA compares trials at a rung by their
best so far, the same rule."""


def searcher_report(metrics: dict, best_so_far: float) -> tuple[dict, float]:
    """(the report Tune gets, the new best so far). At a checkpoint (metrics["at_checkpoint"]): finite_score's
    report plus SEARCH_METRIC, the maximum of `best_so_far` (-inf before the first checkpoint) and this
    checkpoint's score. Between checkpoints (the library's report_every reports: the losses Tune's TensorBoard
    and tracking callbacks log) the best so far rides along unchanged (SCORE_FLOOR before the first checkpoint:
    Tune wants its metric in every report), and select_score is left as the library reported it."""
    if not metrics.get("at_checkpoint"):
        best = float(best_so_far)
        return {**metrics, SEARCH_METRIC: best if math.isfinite(best) else SCORE_FLOOR}, best
    report = finite_score(metrics)
    best = max(float(best_so_far), float(report[METRIC]))
    return {**report, SEARCH_METRIC: best}, best


def best_so_far(history: list[dict]) -> float:
    """The best finite select_score of a trial's stored checkpoint metrics (ractd_repro.records.checkpoint_metrics),
    -inf if none: where a restarted trial's driver starts SEARCH_METRIC from."""
    scores = [float(h[METRIC]) for h in history if isinstance(h.get(METRIC), (int, float))
              and math.isfinite(h[METRIC])]
    return max(scores, default=-math.inf)


def startup_trials(num_samples: int, n_points: int) -> int:
    """TPE's random start-up trials: the grid points, or a quarter of the budget, at most Optuna's default 10
    (Optuna's own default of 10 made 10 of a 12-trial search random)."""
    return max(1, n_points, min(10, math.ceil(num_samples / 4)))


def evaluation_command(scfg: SearchConfig) -> str:
    """The command that evaluates this sweep's students (eval/reproduce_tables.py reads the sweep)."""
    if scfg.budget == "quick":
        return "python eval/reproduce_tables.py --quick" + ("" if scfg.task == "maze2d-umaze" else
                                                              f" --tasks {scfg.task}")
    return f"python eval/reproduce_tables.py --study claims --tasks {scfg.task}"


def print_summary(records: list[TrialRecord], best: BestConfig | None, out_dir: Path, complete: bool,
                  scfg: SearchConfig | None = None) -> None:
    """The trials as a table (best score first), the best trial, the data, where the records are and what to run
    next."""
    from tabulate import tabulate

    cols = ["trial_id", "alpha", "beta", "sigma", METRIC, "step", "ctm", "dsm", "reward", "status"]
    rows = sorted((r.row() for r in records), key=lambda r: -r[METRIC] if math.isfinite(r[METRIC]) else math.inf)
    print(tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".4g"))
    if best:
        print(f"best: alpha={best.alpha:.4g} beta={best.beta:.4g} sigma={best.sigma:.4g} "
              f"{METRIC}={best.score:.4g} -> {best.checkpoint}")
    if best and best.dataset:
        print(f"data: {describe_dataset(best.dataset)}")
    print(f"results: {SweepFolder(Path(out_dir)).trials_file}")
    if complete and best and scfg is not None:
        print(f"next: evaluate it on 100 seeds and rebuild the tables: {evaluation_command(scfg)}")
    if not complete:
        print(f"the search did not finish ({sum(r.status in ('completed', 'stopped', 'error') for r in records)} "
              f"trials done); continue it with --resume --run-dir {out_dir}")
