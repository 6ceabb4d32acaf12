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
3. a Tune search over search_space() (ALPHA_RANGE, BETA_RANGE, SIGMA_CHOICES) with Optuna's TPE (OptunaSearch), seeded
with the task's Table 9 weights
   (points_to_evaluate), ASHA on "select_score" (mode max) reported at every student checkpoint; each trial is
   a Tune function trainable (0.25 CPU, TRIAL_DRIVER_CPUS) that runs a TorchTrainer (ractd_ray.train) distilling one
   student;
4. the results under the run folder (default ractd.paths.sweep_dir(task, scale)): trials.parquet (one row per
   trial, read from storage), best_config.json, best/checkpoint.pt (the best student, fetched from storage),
   search.json (the search's config, for --resume), trials/<trial_id>/ (each trial's run folder, on the node that
   ran it), ray/ (Tune's and Train's state and the trials' persisted files; on a cluster under
   $RACTD_STORAGE_PATH/sweeps/<folder>-<digest>: SweepFolder.state, with a copy of search.json, trials.parquet
   and best_config.json in its records/, so that --resume and the evaluation work from a new head); a table at
   the end.

Nothing is read from another node's disk: the dataset and the shared models reach every trial through the object
store (from the driver); each trial's best.pt, metrics.jsonl and summary go to storage (ractd_ray.train).

The objective is the paper's online model selection: the mean normalized return of the one-step student on
select_seeds short rollouts (seeds 10000, ... disjoint from evaluation seeds), computed by the library at every
checkpoint; a trial's score is its best checkpoint's, whose weights are its student/best.pt.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import time
from pathlib import Path

from ractd import RactdError, storage
from ractd.config import from_dict, to_dict
from ractd.tasks import Task, get_task
from ractd.train import TrainConfig
from ractd_repro.records import (
    METRIC,
    SweepFolder,
    TrialRecord,
    checkpoint_metrics,
    trial_record,
    trial_times,
    write_results,
)
from ractd_repro.sweep import (  # noqa: F401
    ALPHA_RANGE,
    BETA_RANGE,
    MODE,
    QUICK,
    QUICK_MAZE,
    SCORE_FLOOR,
    SEARCH_METRIC,
    SIGMA_CHOICES,
    SearchConfig,
    best_so_far,
    ensure_dataset,
    evaluation_command,
    finite_score,
    grid_points,
    print_summary,
    quick_settings,
    searcher_report,
    shared_key,
    startup_trials,
    sweep_storage,
    table9_point,
)

log = logging.getLogger(__name__)

# What does not call Ray (the space's bounds and grid points, SearchConfig and --quick, the dataset, the shared
# models' key and the summary) is ractd_repro.sweep's, re-exported here for the command's users; the records the
# search writes (trials.parquet, best_config.json) are ractd_repro.records'.


def search_space(task: Task) -> dict:
    """Tune's param_space for a task (see ALPHA_RANGE, BETA_RANGE, SIGMA_CHOICES)."""
    from ray import tune

    space = {"alpha": tune.loguniform(*ALPHA_RANGE), "beta": tune.loguniform(*BETA_RANGE)}
    space["sigma"] = tune.choice(list(SIGMA_CHOICES)) if task.kind == "locomotion" else 0.0
    return space


# ------------------------------------------------------------------------------------------------ shared models

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
    from ractd_ray.train import RayTrainConfig, fit_stages

    *shared, _ = scfg.stage_configs()
    shared = [dataclasses.replace(c, source=dataset["source"]) for c in shared]
    key = shared_key(shared, dataset["fingerprint"])
    folder = shared_models_dir(scfg.task, key)
    folder.mkdir(parents=True, exist_ok=True)
    shared = [dataclasses.replace(c, run_dir=str(folder)) for c in shared]
    train_storage = storage.location(f"shared/{folder.name}", folder / "ray")
    stored = storage.run_files(train_storage, "shared")
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
        out = fit_stages(shared, RayTrainConfig(num_workers=scfg.workers, use_gpu=gpu, max_failures=scfg.max_failures,
                                                storage_path=train_storage, name="shared", cpus_per_worker=cpus,
                                                fetch=True), data=data)
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
    gpus_per_worker: float = 1.0


def _report_callback(fit_started: float, best: float = -math.inf):
    """Ray Train -> Tune: forward every report -- the library's report_every reports of the loss terms, for Tune's
    TensorBoard files and the tracking callbacks, and the checkpoint reports, which carry select_score and the
    checkpoint -- each with SEARCH_METRIC (the best select_score so far, starting from `best`: a restarted trial's
    stored checkpoints; searcher_report), checkpoint_path (the latest persisted checkpoint) and fit_time_s, the
    wall time since the trial called fit() (`fit_started`, time.time()): with the worker's train_time_s and
    start-up stamps (ractd_ray.train.Timeline) in every report, a trial stopped by ASHA has them in its last
    result."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

    class Reports(TuneReportCallback):
        best_so_far = best
        checkpoint_path = None

        def after_report(self, run_context, metrics, checkpoint):
            if not metrics:
                return
            if checkpoint is not None:
                self.checkpoint_path = checkpoint.path
            now = time.time()
            reports = []
            for m in metrics:  # one per worker, the same step
                report, self.best_so_far = searcher_report(m, self.best_so_far)
                reports.append({**report, "fit_time_s": now - fit_started,
                                **({CHECKPOINT_PATH_KEY: self.checkpoint_path} if self.checkpoint_path else {})})
            super().after_report(run_context, reports, checkpoint)

    return Reports()


def run_trial(config: dict, plan: TrialPlan) -> None:
    """Tune function trainable: distill one student with weights `config` via Ray Train (ractd_ray.train).

    Runs on any node: its run folder (trials/<trial_id>/ under the run folder's path) is this node's scratch;
    what the driver reads (best.pt, metrics.jsonl, summary.json) goes to storage."""
    from ray import tune

    from ractd.io import atomic_write_json
    from ractd_ray import console
    from ractd_ray.train import RayTrainConfig, fit_stage

    started = time.time()
    console.quiet_teardown()
    os.environ.update(plan.env)
    trial_id = tune.get_context().get_trial_id()
    summary_loc = trial_record(plan.train_storage, trial_id, "summary.json")
    best = best_so_far(checkpoint_metrics(plan.train_storage, trial_id))  # a restarted trial's stored checkpoints
    if storage.exists(summary_loc):  # it finished under an earlier driver (killed before Tune saved that)
        last = json.loads(storage.read_text(summary_loc)).get("last_report")
        if last:
            tune.report(searcher_report(last, best)[0])
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
        ray_cfg = RayTrainConfig(num_workers=plan.workers, use_gpu=plan.use_gpu, max_failures=plan.max_failures,
                                 storage_path=plan.train_storage, name=trial_id, fetch=False,
                                 cpus_per_worker=plan.cpus_per_worker, gpus_per_worker=plan.gpus_per_worker,
                                 progress=True, stage_lines=False)
        out = fit_stage(cfg, ray_cfg, data=plan.data, inputs=plan.inputs,
                        callbacks=[_report_callback(fit_started, best)],
                        started=started)
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


@dataclasses.dataclass(frozen=True)
class TrialLayout:
    """What each trial reserves and how many train at a time (_check_resources): concurrent trials training at a
    time, cpus / gpus per Ray Train worker, prestart (more trials start up while they train: `ahead` of them), env
    (for the trial's Ray Train run: the worker group's start timeout)."""

    concurrent: int
    cpus: float
    gpus: float
    prestart: bool
    env: dict
    ahead: int = 0


def _check_resources(scfg: SearchConfig, use_gpu: bool, student: TrainConfig) -> TrialLayout:
    """A trial that can never fit what the cluster can scale to (its node types, ractd_ray.resources) is an error;
    CPUs not free now are a warning (trials wait, or the autoscaler adds nodes). Decides the trials' layout:

    - GPUs per worker: --gpus-per-worker, else a share of a GPU for a small student net (resources.gpus_per_worker);
    - concurrent trials: --max-concurrent, else as many as the cluster can scale to hold
      (resources.concurrent_trials);
    - CPUs per worker (resources.worker_cpus): on CPU, each trial's share of a node beside the drivers;
    - prestart: Tune runs more trials where the cluster (a fixed one) can hold the extra trials' drivers but not
      their workers: an extra trial starts its Tune driver and its Ray Train controller while the others train, and
      its workers start the moment a training trial's end frees theirs. So `concurrent` trials train at a time and
      the next ones' start-up (the trial's process, its imports, the controller: bench/sweep_overhead.py) overlaps
      their training instead of following it. `ahead` of them: one for CPU trials; for GPU trials one per
      training trial (as the drivers' CPUs and the trials left allow), so that a worker group waits for every GPU
      freed even when trials end together (bench/gpu_occupancy.py: with one, GPUs stood free for a start-up);
    - env: on an autoscaling cluster the worker group waits for nodes to launch (resources.start_env); a prestarted
      trial waits for a running one (PRESTART_ENV)."""
    import ray

    from ractd_ray.resources import (
        capacity,
        check_fits,
        concurrent_trials,
        gpus_per_worker,
        start_env,
        worker_cpus,
    )

    cap = capacity()
    widest = max(student.unet(get_task(scfg.task)).down_dims)
    gpus = gpus_per_worker(scfg.gpus_per_worker, widest, scfg.workers) if use_gpu else 0.0
    nodes = max(1, math.floor(cap.cpus / cap.node_cpus + 1e-9)) if cap.node_cpus > 0 else 1
    if scfg.max_concurrent:
        n = scfg.max_concurrent
    else:
        n = concurrent_trials(cap, scfg.workers, use_gpu, gpus, 1.0, TRIAL_DRIVER_CPUS, scfg.num_samples)
    per_node = math.ceil(n / nodes)  # CPU trials spread over the nodes; on one machine all n share it
    # the drivers of the training trials and of the prestarted one share a node with the workers
    cpus = worker_cpus(scfg.cpus_per_worker, scfg.workers, use_gpu, concurrent=per_node,
                       driver_cpus=TRIAL_DRIVER_CPUS * (per_node + 1) / per_node, cap=cap)
    per_worker = {"CPU": cpus, **({"GPU": gpus} if use_gpu else {})}
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
    extra_workers_fit = (n + 1) * need <= cap.cpus + eps and (not use_gpu or (n + 1) * scfg.workers * gpus
                                                                <= cap.gpus + eps)
    prestart = not cap.autoscaling and extra_driver_fits and not extra_workers_fit and n < scfg.num_samples
    ahead = int(prestart)
    if prestart and use_gpu:
        room = math.floor((cap.cpus - n * need) / TRIAL_DRIVER_CPUS + eps)  # drivers beside the training trials
        ahead = max(1, min(n, room, scfg.num_samples - n))
    log.info("%d trial%s at a time%s, each %d worker%s x (%g CPU%s)", n, "s" * (n > 1),
             "" if scfg.max_concurrent else " (what the cluster can hold; --max-concurrent sets it)", scfg.workers,
             "s" * (scfg.workers > 1), cpus, f" + {gpus:g} GPU" if use_gpu else "")
    return TrialLayout(concurrent=n, cpus=cpus, gpus=gpus, prestart=prestart, ahead=ahead,
                       env={**start_env(cap), **(PRESTART_ENV if prestart else {})})


def _saved_or_new(scfg: SearchConfig, resume: bool) -> tuple[SearchConfig, str]:
    """(the config to run, the dataset fingerprint it must train on or ""): with resume, the saved config
    (search.json, fetched from storage on a new head: ractd_repro.records.SweepFolder.mirror) and its dataset's
    fingerprint; without, scfg -- unless its folder already holds a search."""
    from ray import tune

    folder = SweepFolder(scfg.out_dir())
    tune_path = storage.join(folder.state, "tune")
    if not resume:
        if tune.Tuner.can_restore(tune_path):
            raise RactdError(f"{folder.root} already holds a search; pass --resume to continue it, or --run-dir to "
                             f"start another")
        return scfg, ""
    saved = folder.read_search()
    if saved is None or not tune.Tuner.can_restore(tune_path):
        raise RactdError(f"nothing to resume in {folder.root} (no search was started there"
                         + (f", nor is one stored in {folder.mirror.stored}" if folder.mirror.stored else "") + ")")
    stored = from_dict(SearchConfig, saved["config"])
    log.info("resuming the search in %s with its saved configuration (%s)", folder.root, folder.search_file)
    return (dataclasses.replace(stored, address=scfg.address or stored.address).validate(),
            saved.get("dataset", {}).get("fingerprint", ""))


def run_search(scfg: SearchConfig, resume: bool = False) -> dict:
    """Run (or, with resume, continue) a search; see the module doc. Returns {"out_dir", "trials" (rows),
    "best", "shared", "dataset", "complete", "wall_s", "startup_s", "tune_wall_s", "result_grid"} -- the last
    Tune's ResultGrid, for Python users: each Result's .config (the weights), .metrics (the last report, with
    SEARCH_METRIC and "checkpoint_path", the trial's latest persisted Ray Train checkpoint: a folder holding its
    student's checkpoint.pt, in storage), .metrics_dataframe (every checkpoint's report) and .path. Result.checkpoint
    is None: Ray Train persisted the checkpoints, and Tune only hears their paths (TuneReportCallback)."""
    from ray import tune

    from ractd_ray.train import ensure_ray, file_ref, forwarded_env

    t_start = time.perf_counter()
    out_dir = scfg.validate().out_dir()  # the folder named on the command line (a resumed config saved the same)
    scfg, expect = _saved_or_new(scfg, resume)
    folder = SweepFolder(out_dir)
    tune_storage = folder.state
    tune_path = storage.join(tune_storage, "tune")
    train_storage = storage.join(tune_storage, "train")
    task = get_task(scfg.task)
    # before Ray: bad data fails fast
    dataset, data = ensure_dataset(task, scfg.scale, scfg.data_source(), scfg.seed, with_data=True, expect=expect)

    started = ensure_ray(scfg.address or None)
    try:
        import ray

        from ractd_ray.resources import decide_gpu

        use_gpu = decide_gpu(scfg.gpu, "the trials' Ray Train workers")  # once, for the whole search
        layout = _check_resources(scfg, use_gpu, scfg.stage_config("student"))
        ahead = layout.ahead
        startup = time.perf_counter() - t_start
        data_ref = ray.put(data)  # every node trains on this copy (object store), none reads its own disk
        del data
        shared = ensure_shared_models(scfg, dataset, data_ref, use_gpu=use_gpu)
        student = scfg.stage_config("student", source=dataset["source"], teacher_ckpt=shared["teacher"],
                                    reward_ckpt=shared["reward"])
        inputs = {f"{k}_ckpt": file_ref(shared[k]) for k in ("teacher", "reward") if shared[k]}
        plan = TrialPlan(student=to_dict(student), out_dir=str(out_dir), train_storage=train_storage,
                         data=data_ref, inputs=inputs, workers=scfg.workers,
                         cpus_per_worker=layout.cpus, use_gpu=use_gpu, max_failures=scfg.max_failures,
                         env={**forwarded_env(), **layout.env}, gpus_per_worker=layout.gpus)
        if not resume:
            folder.write_search(to_dict(scfg), dataset, shared)
        t_tune = time.perf_counter()
        log.info("searching alpha, beta%s: %d trials of %d distillation steps, select_score at every %d steps%s",
                 ", sigma" if task.kind == "locomotion" else " (maze2d: sigma = 0, no reward model)",
                 scfg.num_samples, student.steps, student.ckpt_every,
                 "" if not ahead else "; the next trial starts up while one trains" if ahead == 1 else
                 f"; the next {ahead} trials start up while {layout.concurrent} train")
        if resume:
            tuner = tune.Tuner.restore(tune_path, trainable=_trainable(plan), resume_errored=True)
        else:
            tuner = tune.Tuner(_trainable(plan), param_space=search_space(task),
                               tune_config=_tune_config(scfg, task, student, layout.concurrent + ahead),
                               run_config=tune.RunConfig(name="tune", storage_path=tune_storage,
                                                         failure_config=tune.FailureConfig(
                                                             max_failures=scfg.trial_failures),
                                                         **_console_options(student.steps, scfg.log_to,
                                                                            scfg.task)))
        grid = tuner.fit()
        tune_wall = time.perf_counter() - t_tune
    finally:
        if started:
            import ray

            ray.shutdown()
    records = collect_trials(grid, student.steps, train_storage)
    complete = len(records) == scfg.num_samples and all(r.status in ("completed", "stopped", "error")
                                                        for r in records)
    best = write_results(records, folder, task=scfg.task, scale=scfg.scale, budget=scfg.budget,
                         dataset=dataset, shared=shared)
    print_summary(records, best, out_dir, complete, scfg)
    return {"out_dir": str(out_dir), "trials": [r.row() for r in records],
            "best": best.to_json() if best else None, "shared": shared, "dataset": dataset,
            "complete": complete, "wall_s": time.perf_counter() - t_start, "startup_s": startup,
            "tune_wall_s": tune_wall, "result_grid": grid}


def collect_trials(grid, steps: int, train_storage: str) -> list[TrialRecord]:
    """One TrialRecord per trial of Tune's ResultGrid (each result with .path, .config, .metrics,
    .metrics_dataframe, .error) and the trial's records in storage, whichever node ran it: the scores and
    diagnostics from the library's metrics.jsonl (Tune's reports where that file is not stored), the times from its
    summary.json (from its last report when ASHA stopped it), the start-up stamps of ractd_ray.train's workers."""
    from ractd_ray.train import STARTUP_STAMPS

    return sorted((_trial_record(result, steps, train_storage, STARTUP_STAMPS) for result in grid),
                  key=lambda r: r.trial_id)


def _trial_status(result, steps: int) -> str:
    reported = result.metrics or {}
    if result.error is not None:
        return "error"
    if int(reported.get("step") or 0) >= steps:
        return "completed"
    return "stopped" if reported.get("done") else "unfinished"


def _trial_record(result, steps: int, train_storage: str, stamps: tuple[str, ...]) -> TrialRecord:
    from ractd.train import DIAG_TERMS
    from ractd_repro.records import LOSS_TERMS

    trial_id = Path(result.path).name
    reported = result.metrics or {}
    history = checkpoint_metrics(train_storage, trial_id)
    if not history and result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict("records")
    scored = [h for h in history if h.get(METRIC) is not None and math.isfinite(h[METRIC])]
    last = history[-1] if history else {}
    at_best = max(scored, key=lambda h: float(h[METRIC])) if scored else {}
    summary_loc = trial_record(train_storage, trial_id, "summary.json")
    summary = json.loads(storage.read_text(summary_loc)) if storage.exists(summary_loc) else {}
    best_pt = trial_record(train_storage, trial_id, "student/best.pt")
    timed = trial_times(summary, reported, failed=result.error is not None)
    return TrialRecord(
        trial_id=trial_id, **{k: float(result.config.get(k, math.nan)) for k in ("alpha", "beta", "sigma")},
        select_score=max(float(h[METRIC]) for h in scored) if scored else math.nan,
        last_score=float(scored[-1][METRIC]) if scored else math.nan, step=int(last.get("step") or 0),
        losses={k: last.get(k) for k in LOSS_TERMS}, best_step=int(at_best.get("step") or 0),
        diagnostics={k: at_best.get(k) for k in DIAG_TERMS}, status=_trial_status(result, steps),
        checkpoint=best_pt if storage.exists(best_pt) else "", ray_checkpoint=reported.get("checkpoint_path") or "",
        train_time_s=timed("train_time_s"), fit_time_s=timed("fit_time_s"),
        startup={k: timed(f"startup_{k}_s") for k in stamps},
        trial_time_s=float(reported.get("time_total_s") or math.nan),
        stored_bytes=int(storage.total_bytes(storage.join(train_storage, trial_id))),
        error="" if result.error is None else str(result.error).strip().splitlines()[-1][:500])


def _console_options(steps: int, log_to: str = "", task: str = "") -> dict:
    """RunConfig options for the console (Tune's status tables with --verbose, else one line per checkpoint) and
    the experiment tracking (console.tracking_callbacks); Tune adds its own CSV, JSON and TensorBoard loggers."""
    from ractd_ray import console

    tracking = console.tracking_callbacks(log_to, task)
    if console.verbose():
        return {"callbacks": tracking} if tracking else {}
    return {"verbose": 0, "callbacks": [console.trial_lines(steps), *tracking]}


def _tune_config(scfg: SearchConfig, task: Task, student: TrainConfig, max_concurrent: int):
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
    # the scheduler and the searcher see the best score so far (SEARCH_METRIC): the score the sweep ranks by
    return tune.TuneConfig(metric=SEARCH_METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                           num_samples=scfg.num_samples, max_concurrent_trials=max_concurrent,
                           trial_dirname_creator=lambda trial: trial.trial_id)


# ------------------------------------------------------------------------------------------------ command line

def build_parser():
    import argparse

    from ractd.config import add_config_args
    from ractd.errors import Parser
    from ractd.tasks import TASKS

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
    from ractd.errors import run_command
    from ractd_ray import console

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    console.set_verbose(args.verbose)
    return run_command(lambda: 0 if run_search(config_from_args(args), resume=args.resume)["complete"] else 1,
                       interrupted="interrupted; continue with --resume")
