"""Ray Train adapter: runs `ractd.train.train(cfg, RunContext(...))` unchanged in `TorchTrainer` workers.

What each worker injects into the library loop (ractd.train.RunContext):
- device: `ray.train.torch.get_device()`; rank and world size from `ray.train.get_context()`.
- sync_grads: `GradAllReduce` (ractd_ray.collectives), the gradients of all parameters copied into one flat
  buffer, averaged with one all-reduce per bucket (one bucket unless the model is larger than `bucket_mb`),
  copied back. Chosen over DDP because the student's loss calls the network several times per step and reads
  Student.g / sigma_min, which a DDP wrapper hides; bench/bench_ray.py measures it against one all-reduce per
  parameter.
- all_reduce_sum: a sum over workers (torch.distributed: gloo on CPU, nccl on GPU, set up by TorchTrainer).
- report: every library report becomes a `ray.train.report` on every rank (the same number of calls on each,
  as Ray Train requires); at checkpoints rank 0 attaches the folder holding only the latest checkpoint.pt,
  persisted by Ray under `<storage_path>/<name>/<stage>-<step>`.
- storage: the driver ships the dataset and the upstream checkpoints (teacher, reward model) through the object
  store, so no worker reads its own disk for them; at every checkpoint rank 0 persists the stage's best.pt (when
  it changed) and metrics.jsonl to `<storage_path>/<name>/ractd/<stage>/` (StageUploader) before reporting, a
  worker restarted on another node fetches them back, and the driver copies them to its own disk (`fetch`). The
  storage is ractd.storage's decision ($RACTD_STORAGE_PATH on a cluster, else a local folder).
- resume_from: after Ray Train restarts a failed worker group (`FailureConfig(max_failures)`), or when a run of
  the same (storage_path, name) is started again, `ray.train.get_checkpoint()` hands back the latest persisted
  checkpoint, and the stage it belongs to resumes from it.

One worker group can train several stages in a row (`fit_stages`: the shared reward model then the teacher,
one group start-up instead of two), set up as a `RayTrainConfig` says; it connects through ractd_ray.connect.
Everything here runs where Ray runs; the library never imports Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

import ractd.train as library
from ractd import RactdError, storage
from ractd.config import from_dict, to_dict
from ractd.errors import one_line
from ractd.train import RunContext, TrainConfig
from ractd_ray import console
from ractd_ray.collectives import DEFAULT_BUCKET_MB, GradAllReduce, all_reduce_sum
from ractd_ray.connect import ensure_ray, resolve_use_gpu
from ractd_repro.records import checkpoint_name, stage_of

log = logging.getLogger(__name__)

# Environment the library reads for its paths; the driver's values travel to the workers (a Ray instance
# started earlier, or another node, does not inherit the driver's environment).
FORWARDED_ENV = ("RACTD_CACHE_DIR", "XDG_CACHE_HOME", "D4RL_DATASET_DIR", "MINARI_DATASETS_PATH")
# Ray Train's controller polls its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): it saw a run's end up to
# 2 s late, and a worker's report waits until the controller has taken the previous one. Every run of the project
# polls every 0.25 s instead (bench/sweep_overhead.py); a value set in the environment wins.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def forwarded_env() -> dict[str, str]:
    """The driver's values of FORWARDED_ENV that are set."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


# ------------------------------------------------------------------------------------------- worker side

def _ray_metrics(metrics: dict, stage: str) -> dict:
    """Metrics Ray can store: finite numbers, bools and strings (a non-finite number becomes None)."""
    out = {"stage": stage}
    for k, v in metrics.items():
        if isinstance(v, bool) or isinstance(v, str):
            out[k] = v
        elif isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1):
            v = float(v) if not isinstance(v, int) else v
            out[k] = v if not isinstance(v, float) or math.isfinite(v) else None
    return out


class StageUploader:
    """Rank 0 of a stage: at every checkpoint, copy the stage's best.pt (when it changed) and metrics.jsonl to
    storage, before the checkpoint is reported, so the best student outlives the node that trained it and the
    driver reads the records from storage. `uploaded` counts the bytes written (the measurement of the note)."""

    FILES = ("best.pt", "metrics.jsonl")

    def __init__(self, stage_dir: Path, location: str):
        self.stage_dir, self.location = Path(stage_dir), location
        self._seen: dict[str, tuple] = {}
        self.uploaded = 0

    def __call__(self) -> None:
        for name in self.FILES:
            path = self.stage_dir / name
            if not path.is_file():
                continue
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._seen.get(name) == stamp:
                continue
            storage.upload(path, storage.join(self.location, name))
            self._seen[name] = stamp
            self.uploaded += st.st_size

    def restore(self) -> None:
        """On a node that lacks them (a restart elsewhere), fetch the stage's stored files into the stage folder,
        so the resumed run appends to its whole record and keeps its best.pt."""
        for name in self.FILES:
            path, loc = self.stage_dir / name, storage.join(self.location, name)
            if not path.is_file() and storage.exists(loc):
                storage.download(loc, path)


def process_started() -> float | None:
    """Wall-clock time (time.time()) this process was started (Linux /proc; None elsewhere)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# Start-up stamps of a Ray Train run, in the order they happen (Timeline): the driver called fit(), the worker's
# process started, the train loop entered (Ray has imported the loop and set up torch.distributed), the dataset
# fetched from the object store, the upstream checkpoints written to this node's disk, the library's train()
# entered, its first optimizer step done (data prepared, models built, teacher loaded).
STARTUP_STAMPS = ("fit", "process", "loop", "data", "inputs", "train", "first_step")


class Timeline:
    """Where a Ray Train worker's time goes, from the start of the run (`started`: a Tune trial's start, else the
    driver's fit()) to its first training step, and the training time so far: every report carries it
    (fields()), so a run stopped early (ASHA), or one that fails later, still has its start-up and training time
    recorded. Stamps are wall-clock times (time.time()); `started` and `fit_started` are the driver's (on another
    node the offsets include the clocks' difference)."""

    def __init__(self, started: float | None, fit_started: float | None = None):
        self.started = started if started is not None else time.time()
        self.stamps: dict[str, float] = {"fit": fit_started if fit_started is not None else self.started}
        process = process_started()
        if process is not None and process >= self.stamps["fit"] - 1.0:  # a process Ray started for this run
            self.stamps["process"] = process
        self.mark("loop")

    def mark(self, name: str) -> None:
        """Record `name` (the first time only)."""
        self.stamps.setdefault(name, time.time())

    def start_stage(self) -> None:
        """A stage's train() begins: its training time counts from here (the start-up stamps are the first's)."""
        self.stamps["train"] = time.time()

    def on_step(self, hook: Callable[[int], None] | None) -> Callable[[int], None]:
        """The stage's on_step hook, marking the end of its first step."""
        def on_step(step: int) -> None:
            self.mark("first_step")
            if hook is not None:
                hook(step)
        return on_step

    def fields(self) -> dict:
        """{"train_time_s": seconds in the library's train() so far, "startup_<stamp>_s": each stamp's offset from
        the start of the run} (what every report carries)."""
        now = time.time()
        out = {"train_time_s": now - self.stamps["train"] if "train" in self.stamps else 0.0}
        out.update({f"startup_{k}_s": self.stamps[k] - self.started for k in STARTUP_STAMPS if k in self.stamps})
        return out


def make_reporter(stage: str, line_total: int = 0, uploader: StageUploader | None = None,
                  timeline: Timeline | None = None) -> Callable[[dict, Path | None], None]:
    """report for RunContext: ray.train.report on every rank; rank 0 persists the stage's files (uploader) and
    attaches the checkpoint folder. line_total > 0: also print one console line per checkpoint
    (console.checkpoint_line, out of line_total steps). timeline: its fields (training time so far, start-up
    stamps) ride along in every report."""
    import ray.train

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        m = _ray_metrics({**metrics, **(timeline.fields() if timeline else {})}, stage)
        if checkpoint_dir is not None and line_total:
            print(console.checkpoint_line(stage, m, line_total), flush=True)
        if checkpoint_dir is None:
            ray.train.report(m)
            return
        if uploader is not None:
            uploader()
        ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_dir_name=checkpoint_name(stage, int(metrics["step"])),
                         delete_local_checkpoint_after_upload=False)

    return report


def worker_context(cfg: TrainConfig, resume_from: Path | None = None, on_step: Callable[[int], None] | None = None,
                   bucket_mb: float = DEFAULT_BUCKET_MB, progress: bool = True, lines: bool = False,
                   uploader: StageUploader | None = None, timeline: Timeline | None = None) -> RunContext:
    """The RunContext of this Ray Train worker for `cfg`'s stage (call inside a TorchTrainer loop)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    if world > 1 and not distributed:
        raise RactdError(f"{world} Ray Train workers but no torch.distributed process group")
    return RunContext(device=str(device), rank=rank, world_size=world,
                      report=make_reporter(cfg.stage, cfg.steps if lines and rank == 0 else 0,
                                           uploader if rank == 0 else None, timeline),
                      sync_grads=GradAllReduce(world, bucket_mb) if distributed else None,
                      all_reduce_sum=all_reduce_sum(device) if distributed else None,
                      resume_from=resume_from, on_step=on_step, progress=progress and rank == 0)


def _materialize(blobs: dict) -> dict:
    """Input files the driver shipped through the object store ({field: [ref]}) written to this node's disk
    (a temp folder, keyed by content) -> {field: local path}."""
    import hashlib
    import tempfile

    import ray

    from ractd.io import atomic_write

    out = {}
    for field, box in blobs.items():
        blob = ray.get(box[0])
        path = Path(tempfile.gettempdir()) / "ractd-inputs" / f"{hashlib.sha256(blob).hexdigest()[:20]}.pt"
        if not path.is_file():
            atomic_write(path, blob)
        out[field] = str(path)
    return out


def worker_loop(config: dict) -> list[dict]:
    """TorchTrainer's train_loop_per_worker: train config["stages"] (TrainConfig dicts) one after the other.

    config: stages, env (FORWARDED_ENV values), threads (torch's intra-op threads: the CPUs each worker
    reserves), on_step (hook or None), bucket_mb, progress, verbose (Ray Train's report lines, the library's INFO
    logs and its step bar; without it, with stage_lines, one line per checkpoint),
    artifacts (storage location of the run's own files, or None), data ([ref] of the dataset dict, or None: read
    from this node's disk), inputs (per stage {field: [ref]}: upstream checkpoints shipped by the driver),
    started, fit_started (the driver's time.time() at the start of the run and when it called fit(): see
    Timeline).
    Returns (rank 0's is Result.return_value) one dict per stage: stage, step, checkpoint, best, metrics,
    train_time_s (wall time of ractd.train.train), startup (the Timeline's start-up stamps), resumed_from,
    skipped, uploaded_bytes, max_memory_allocated (the worker's peak GPU memory in bytes so far; None on CPU).
    Rank 0 of a run that fails writes its Timeline.fields() to <artifacts>/timing.json.
    """
    import ray.train

    timeline = Timeline(config.get("started"), config.get("fit_started"))
    try:
        return _worker_loop(config, timeline)
    except Exception:
        if config.get("artifacts") and ray.train.get_context().get_world_rank() == 0:
            with contextlib.suppress(Exception):  # the record of a failure must not hide the failure
                storage.write_bytes(storage.join(config["artifacts"], "timing.json"),
                                    json.dumps(timeline.fields()).encode())
        raise


def _worker_loop(config: dict, timeline: Timeline) -> list[dict]:
    import ray
    import ray.train

    os.environ.update(config.get("env", {}))
    if config.get("threads"):  # torch's intra-op threads = the CPUs reserved (Ray sets OMP_NUM_THREADS to 1 for <2)
        torch.set_num_threads(int(config["threads"]))
    verbose = config.get("verbose", True)
    console.quiet_worker(verbose)
    cfgs = [from_dict(TrainConfig, d) for d in config["stages"]]
    inputs = config.get("inputs") or [{} for _ in cfgs]
    data = ray.get(config["data"][0]) if config.get("data") else None
    timeline.mark("data")
    stages = [c.stage for c in cfgs]
    restored = ray.train.get_checkpoint()
    restored_stage = stage_of(restored.path) if restored else None
    # stages before the restored one finished in an earlier attempt (their files are in storage)
    first = stages.index(restored_stage) if restored_stage in stages else 0
    out = [{"stage": c.stage, "skipped": True, "best": str(c.resolved().stage_dir / "best.pt")} for c in cfgs[:first]]
    rank = ray.train.get_context().get_world_rank()
    with restored.as_directory() if restored else contextlib.nullcontext() as restored_dir:
        for cfg, shipped in zip(cfgs[first:], inputs[first:]):
            cfg = dataclasses.replace(cfg, **_materialize(shipped)) if shipped else cfg
            timeline.mark("inputs")
            resume = Path(restored_dir) / "checkpoint.pt" if restored_dir and cfg.stage == restored_stage else None
            uploader = None
            if config.get("artifacts") and rank == 0:
                uploader = StageUploader(cfg.resolved().stage_dir, storage.join(config["artifacts"], cfg.stage))
                if resume is not None:
                    uploader.restore()
            ctx = worker_context(cfg, resume_from=resume, on_step=timeline.on_step(config.get("on_step")),
                                 bucket_mb=config.get("bucket_mb", DEFAULT_BUCKET_MB),
                                 progress=config.get("progress", True) and verbose,
                                 lines=config.get("stage_lines", False) and not verbose, uploader=uploader,
                                 timeline=timeline)
            timeline.start_stage()
            t0 = time.perf_counter()
            result = library.train(cfg, ctx, data=data)
            out.append({"stage": cfg.stage, "step": result["step"], "checkpoint": str(result["checkpoint"]),
                        "best": str(result["best"]), "metrics": _ray_metrics(result["metrics"], cfg.stage),
                        "train_time_s": time.perf_counter() - t0, "resumed_from": str(resume) if resume else None,
                        "skipped": False, "uploaded_bytes": uploader.uploaded if uploader else 0,
                        "startup": {k: v for k, v in timeline.fields().items() if k.startswith("startup_")},
                        "max_memory_allocated": torch.cuda.max_memory_allocated(ctx.device)
                        if torch.device(ctx.device).type == "cuda" else None})
    return out


class StepHook:
    """A RunContext.on_step hook for fault-injection tests and diagnostics (picklable, runs in the workers).

    log: append every step this worker runs to `log` (one line "rank step"), if given.
    fail_at / fail_rank / marker: raise once, in the worker of rank fail_rank, right after step fail_at, unless
        the marker file exists (it is created just before raising, so the restarted run goes on).
    wipe: a folder removed just before the failure, to simulate losing the node that held the run folder (the
        restarted workers can then resume only from the checkpoint Ray Train persisted).
    """

    def __init__(self, log: str | None = None, fail_at: int | None = None, fail_rank: int = 0,
                 marker: str | None = None, wipe: str | None = None):
        if fail_at is not None and marker is None:
            raise ValueError("StepHook: fail_at needs a marker file (fail once)")
        self.log, self.fail_at, self.fail_rank, self.marker, self.wipe = log, fail_at, fail_rank, marker, wipe

    def __call__(self, step: int) -> None:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{rank} {step}\n")
        if self.fail_at == step and rank == self.fail_rank and not Path(self.marker).exists():
            if self.wipe:
                import shutil

                shutil.rmtree(self.wipe, ignore_errors=True)
            Path(self.marker).touch()
            raise RuntimeError(f"injected failure on rank {rank} after step {step}")


# ------------------------------------------------------------------------------------------- driver side

_SHIPPED: dict = {}  # (what, key) -> ObjectRef: each dataset / input file is put into the object store once per job


def _put_once(key: tuple, make: Callable[[], object]):
    import ray

    key = (ray.get_runtime_context().get_job_id(), *key)
    if key not in _SHIPPED:
        _SHIPPED[key] = ray.put(make())
    return _SHIPPED[key]


def dataset_ref(cfg: TrainConfig):
    """The stage's dataset, loaded on the driver (which validates it) and put into the object store once: the
    workers, on any node, train on it without a copy on their own disk."""
    from ractd.data.d4rl import load_dataset
    from ractd.tasks import get_task

    return _put_once(("data", cfg.task, cfg.source, cfg.scale),
                     lambda: load_dataset(get_task(cfg.task), source=cfg.source, scale=cfg.scale))


def file_ref(path: str | os.PathLike):
    """A file of the driver's disk (an upstream checkpoint) in the object store, once per (path, version)."""
    path = Path(path).resolve()
    st = path.stat()
    return _put_once(("file", str(path), st.st_mtime_ns, st.st_size), path.read_bytes)


def upstream_files(cfg: TrainConfig) -> dict[str, Path]:
    """The upstream checkpoints a stage reads ({teacher_ckpt, reward_ckpt: path on this disk}), where they exist:
    the driver ships them to the workers (file_ref) instead of letting a worker look on its own disk."""
    cfg = cfg.resolved()
    run = Path(cfg.run_dir)
    out = {}
    if cfg.stage == "student":
        out["teacher_ckpt"] = Path(cfg.teacher_ckpt or run / "teacher" / "best.pt")
    if cfg.stage == "student" or (cfg.stage == "teacher" and cfg.reward_aware_teacher > 0):
        out["reward_ckpt"] = Path(cfg.reward_ckpt or run / "reward" / "best.pt")
    return {k: p for k, p in out.items() if p.is_file()}


@dataclasses.dataclass(frozen=True)
class RayTrainConfig:
    """How Ray Train runs a group of stages (fit_stages): the Ray-side settings, beside the stages' TrainConfigs.

    num_workers: Ray Train workers in the group (each draws batch / num_workers windows a step).
    use_gpu: auto | yes | no, or a bool (resolve_use_gpu: auto = when a node type of the cluster has a GPU).
    cpus_per_worker: CPUs each worker reserves, and its torch threads (rounded up).
    gpus_per_worker: GPUs each worker reserves when it uses GPUs (a share below 1 lets workers of several runs
        share a device: ractd_ray.resources.gpus_per_worker).
    max_failures: restarts of the worker group after a failure before the run fails.
    controller_failure_limit: worker-group start-ups that may time out (60 s each, e.g. waiting for CPUs) before
        the run fails instead of waiting forever (Ray's default is to wait forever).
    storage_path / name: where Ray persists the run (None: ractd.storage.folder_location("runs", run_dir of the
        first stage) / "-".join(stages)); a later call with the same pair resumes from the latest persisted
        checkpoint. Each stage's best.pt and metrics.jsonl are persisted beside it (ractd.storage.run_files).
    keep_checkpoints: persisted checkpoints kept (the latest ones).
    bucket_mb: the gradient all-reduce's bucket size (GradAllReduce).
    fetch: copy each stage's stored best.pt and metrics.jsonl into its stage folder on this machine (the
        driver's), from storage.
    progress: the library's step bar in rank 0's worker (with --verbose).
    stage_lines: without --verbose, one console line per checkpoint (a Tune trial prints its own from the driver).
    log_level: Ray Train's own console logs (INFO logs every report).
    """

    num_workers: int = 1
    use_gpu: bool | str = "auto"
    cpus_per_worker: float = 1
    gpus_per_worker: float = 1.0
    max_failures: int = 2
    controller_failure_limit: int = 30
    storage_path: str | None = None
    name: str | None = None
    keep_checkpoints: int = 1
    bucket_mb: float = DEFAULT_BUCKET_MB
    fetch: bool = True
    progress: bool = True
    stage_lines: bool = True
    log_level: str = "WARNING"


def fit_stages(cfgs: list[TrainConfig], ray_cfg: RayTrainConfig = RayTrainConfig(), *, data=None,
               inputs: dict | None = None, callbacks: list | None = None, on_step: Callable[[int], None] | None = None,
               started: float | None = None) -> list[dict]:
    """Train the stages `cfgs` in order in one Ray Train worker group set up as `ray_cfg` says.

    What is not a setting: data: an ObjectRef of the dataset (default: dataset_ref). inputs: {field: ObjectRef of
    the file's bytes} for teacher_ckpt / reward_ckpt of every stage (default: the files upstream_files finds on
    this disk). callbacks: Ray Train UserCallbacks (a Tune trial passes its report callback). on_step: a
    RunContext.on_step hook run in the workers (e.g. StepHook). started: time.time() at the start of the
    caller's run (a Tune trial's), the origin of the start-up stamps every report carries (Timeline; default:
    when fit() is called).
    Returns worker_loop's per-stage dicts (rank 0's), each with "ray_checkpoint" (the run's latest persisted
    checkpoint), "ray_path", "fit_time_s", "stored_best" (the storage location of its best.pt) and "stored" (of
    its folder) added. A failed run (after max_failures restarts) raises RactdError naming the error.
    """
    if not cfgs:
        raise RactdError("fit_stages: no stage to train")
    if ray_cfg.num_workers < 1:
        raise RactdError(f"num_workers={ray_cfg.num_workers}: must be at least 1")
    cfgs = [c.resolved() for c in cfgs]
    ensure_ray()
    gpu = resolve_use_gpu(ray_cfg.use_gpu, ray_cfg.num_workers)
    name = ray_cfg.name or "-".join(c.stage for c in cfgs)
    storage_path = str(ray_cfg.storage_path or storage.folder_location("runs", cfgs[0].run_dir))
    if not storage.is_uri(storage_path):  # a local folder (else a URI such as s3://..., for a cluster)
        storage_path = str(Path(storage_path).resolve())
    artifacts = storage.run_files(storage_path, name)
    data = data if data is not None else dataset_ref(cfgs[0])
    shipped = [{f: [file_ref(p)] for f, p in upstream_files(c).items() if f not in (inputs or {})} for c in cfgs]
    shipped = [{**s, **{f: [ref] for f, ref in (inputs or {}).items()}} for s in shipped]
    loop_config = {"stages": [to_dict(c) for c in cfgs], "env": forwarded_env(), "on_step": on_step,
                   "bucket_mb": ray_cfg.bucket_mb, "progress": ray_cfg.progress, "verbose": console.verbose(),
                   "stage_lines": ray_cfg.stage_lines, "artifacts": artifacts, "data": [data], "inputs": shipped,
                   "threads": max(1, math.ceil(ray_cfg.cpus_per_worker - 1e-9)), "fit_started": time.time(),
                   "started": started}
    trainer = _trainer(ray_cfg, gpu, loop_config, name, storage_path, callbacks)
    t0 = time.perf_counter()
    result = trainer.fit()
    fit_time = time.perf_counter() - t0
    if result.error is not None:
        raise RactdError(f"Ray Train run {name} failed: {one_line(result.error, last=True)}")
    out = result.return_value
    if not out:
        raise RactdError(f"Ray Train run {name} returned nothing (was it stopped?)")
    for cfg, item in zip(cfgs, out):
        stored = storage.join(artifacts, cfg.stage)
        item.update(ray_checkpoint=result.checkpoint.path if result.checkpoint else None, ray_path=result.path,
                    fit_time_s=fit_time, stored=stored, stored_best=storage.join(stored, "best.pt"))
        if ray_cfg.fetch:
            for file in StageUploader.FILES:
                if storage.exists(storage.join(stored, file)):
                    storage.download(storage.join(stored, file), cfg.stage_dir / file)
    return out


def _trainer(ray_cfg: RayTrainConfig, gpu: bool, loop_config: dict, name: str, storage_path: str,
             callbacks: list | None):
    """The TorchTrainer of worker_loop(loop_config) with ray_cfg's scaling (gpu: resolved), failure, checkpoint and
    logging settings."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ractd_ray.resources import start_env

    # read by TorchTrainer here and passed on to its controller; on an autoscaling cluster the worker group waits
    # for nodes to launch
    for key, value in {**RAY_TRAIN_ENV, **start_env()}.items():
        os.environ.setdefault(key, value)
    per_worker = {"CPU": ray_cfg.cpus_per_worker, **({"GPU": ray_cfg.gpus_per_worker} if gpu else {})}
    return TorchTrainer(
        worker_loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=ray_cfg.max_failures,
                                                   controller_failure_limit=ray_cfg.controller_failure_limit),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ray_cfg.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level=ray_cfg.log_level)))


def fit_stage(cfg: TrainConfig, ray_cfg: RayTrainConfig = RayTrainConfig(), **kwargs) -> dict:
    """One stage with Ray Train (see fit_stages; kwargs: its data, inputs, callbacks, on_step, started): {"stage",
    "step", "checkpoint", "best", "metrics", "train_time_s", "fit_time_s", "ray_checkpoint", "ray_path",
    "stored_best", ...}."""
    return fit_stages([cfg], ray_cfg, **kwargs)[-1]


__all__ = ["RayTrainConfig", "StageUploader", "StepHook", "dataset_ref", "ensure_ray", "file_ref", "fit_stage",
           "fit_stages", "forwarded_env", "upstream_files", "worker_context", "worker_loop"]
