"""Evaluation jobs: a study's cells as jobs, a job's seeds in blocks, a block's rollouts as stored episode rows.
No Ray here (ractd_ray.pool runs the blocks in parallel; `evaluate_serial` runs them in this process).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Iterable

from ractd import RactdError
from ractd.tasks import get_task
from ractd_repro.methods import get_method
from ractd_repro.models import inverse_dynamics_path, plan_models
from ractd_repro.spec import Study, expand_methods
from ractd_repro.store import (
    EPISODE_KEY,
    ResultsStore,
    checkpoint_hash,
    episode_rows,
    library_versions,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """One evaluated cell: a method of a task with one checkpoint. `key_method` is the method stored in the
    results (with "@<steps>" when episodes are capped below the task's length, so capped episodes never count
    as the paper's protocol)."""

    task: str
    method: str
    sampler: str
    nfe: int
    checkpoint_path: str
    checkpoint: str          # short sha256 of the file
    scale: str
    sigma: float = float("nan")
    preset: str = ""
    train_steps: int = -1
    init_scaled: bool = True
    max_steps: int = 0       # 0 = the task's episode length
    tracker: str = "pd"      # maze2d: pd | inverse_dynamics
    seed_cap: int = 0        # evaluate only the first seed_cap of the study's seeds (0 = all)
    precision: str = "fp32"  # the store's episodes are fp32: the same numbers whatever the block size or node
    # (bf16 engines change a batched call's rows by ~1e-2 with the batch's composition; ractd_repro.studies.bf16_scores)

    def seeds(self, seeds: list[int]) -> list[int]:
        return list(seeds[:self.seed_cap]) if self.seed_cap else list(seeds)

    @property
    def key_method(self) -> str:
        full = get_task(self.task).max_episode_steps
        return self.method if self.max_steps in (0, full) else f"{self.method}@{self.max_steps}"

    def keys(self, seeds: Iterable[int]) -> list[tuple]:
        return [(self.task, self.key_method, self.checkpoint, int(s)) for s in seeds]


@dataclasses.dataclass(frozen=True)
class Missing:
    task: str
    method: str
    checkpoint: Path
    command: str


def make_job(task: str, method: str, checkpoint, scale: str, max_steps: int = 0, sigma: float | None = None,
             hash_cache: dict | None = None, seed_cap: int = 0) -> EvalJob:
    """The EvalJob of a method (METHODS id) on a checkpoint file (its hash, preset and steps read here)."""
    from ractd.checkpoint import load_checkpoint

    m = get_method(method)
    path = Path(checkpoint)
    cache = hash_cache if hash_cache is not None else {}
    if path not in cache:
        ck = load_checkpoint(path)
        cache[path] = (checkpoint_hash(path), ck["config"], ck.get("meta", {}).get("dataset_fingerprint"))
    digest, cfg, _ = cache[path]
    if sigma is None:
        sigma = float(cfg["distill"]["sigma"]) if cfg.get("stage") == "student" else float("nan")
    return EvalJob(task=task, method=m.id, sampler=m.sampler, nfe=m.nfe, checkpoint_path=str(path),
                   checkpoint=digest, scale=scale, sigma=sigma, preset=str(cfg.get("preset", "")),
                   train_steps=int(cfg.get("steps", -1)), max_steps=int(max_steps), tracker=m.tracker,
                   seed_cap=int(seed_cap))


def one_dataset(task: str, jobs: list[EvalJob], hashes: dict) -> None:
    """A task's cells must all come from one dataset: refuse (RactdError naming the checkpoints) when the models of
    its jobs were trained on datasets with different fingerprints (checkpoint meta "dataset_fingerprint")."""
    by_fp: dict[str, list[str]] = {}
    for j in jobs:
        fp = hashes.get(Path(j.checkpoint_path), (None, None, None))[2]
        if j.task == task and fp:
            by_fp.setdefault(fp, []).append(j.checkpoint_path)
    if len(by_fp) > 1:
        listing = "; ".join(f"{fp}: {', '.join(sorted(set(paths)))}" for fp, paths in sorted(by_fp.items()))
        raise RactdError(f"{task}: the study's checkpoints were trained on different datasets ({listing}); a task's "
                         "cells must share one dataset: retrain or remove the stale checkpoints")


# the stages a task's sweep (tune/search.py) trains: its shared teacher and reward model, and its students; a
# study's DDPM and BC models are trained by `eval/reproduce_tables.py --train-missing` or their own commands
SWEEP_STAGES = ("reward", "teacher", "student")


def study_jobs(study: Study, max_steps: int = 0) -> tuple[list[EvalJob], list[Missing]]:
    """(jobs for every cell whose checkpoint exists, missing cells with the command that trains them). A task whose
    checkpoints come from different datasets is refused (`one_dataset`)."""
    jobs: list[EvalJob] = []
    missing: list[Missing] = []
    hashes: dict = {}
    for task in study.tasks:
        models = plan_models(study, task)
        for mid in expand_methods(study, task):
            method = get_method(mid)
            model = models[method.model]
            costly = get_task(task).kind == "locomotion" and method.nfe > 4 and method.sampler != "student"
            if model.exists and method.tracker != "pd" and not inverse_dynamics_path(study, task).is_file():
                missing.append(Missing(task, mid, inverse_dynamics_path(study, task),
                                       f"python -m ractd.inverse_dynamics {task} --scale {study.data_scale}"))
            elif model.exists:
                job = make_job(task, mid, model.checkpoint, study.name, max_steps, hash_cache=hashes,
                               seed_cap=study.costly_seeds if costly else 0)
                if mid.startswith("ractd-sigma-") and any(j.task == task and j.method == "ractd" and
                                                          j.checkpoint == job.checkpoint for j in jobs):
                    log.info("%s: %s is the RACTD checkpoint; its cell is RACTD's", task, mid)
                    continue  # the same file: Fig. 4 and the tables read it from the RACTD cell
                jobs.append(job)
            elif model.final_of and models[model.final_of].exists:
                missing.append(Missing(task, mid, model.checkpoint,
                                       f"# {models[model.final_of].checkpoint} was kept without its final checkpoint; "
                                       "retrain it to evaluate the final one"))
            elif task in dict(study.sweep_flags) and model.stage in SWEEP_STAGES:
                missing.append(Missing(task, mid, model.checkpoint,
                                       f"python tune/search.py --task {task} {dict(study.sweep_flags)[task]}"))
            elif model.final_of:
                base = models[model.final_of]
                chain = [models[d] for d in base.deps if not models[d].exists] + [base]
                missing.append(Missing(task, mid, model.checkpoint,
                                       " && ".join(dict.fromkeys(m.command(study.budget) for m in chain))))
            else:
                chain = [models[d] for d in model.deps if not models[d].exists] + [model]
                missing.append(Missing(task, mid, model.checkpoint,
                                       " && ".join(dict.fromkeys(m.command(study.budget) for m in chain))))
    for task in study.tasks:
        one_dataset(task, jobs, hashes)
    return jobs, missing


def rollout_key(job: EvalJob) -> tuple:
    """What decides a job's episodes: its task, episode length, seeds' cap and policy (policy_key). Two jobs with
    one key roll out the same episodes seed for seed (the rollouts are seeded and the store's precision is
    fp32), e.g. the study's RACTD and CTD when the sweep picked its alpha = beta = 1, sigma = 0 trial."""
    return (job.task, job.max_steps or get_task(job.task).max_episode_steps, job.seed_cap, *policy_key(job))


def twins(jobs: list[EvalJob]) -> dict[EvalJob, EvalJob]:
    """{twin: primary}: each job whose rollout_key an earlier job of `jobs` has, mapped to that earlier job. A twin
    is never rolled out (`blocks` leaves it out); `copy_twins` stores the primary's episodes under its method."""
    first: dict[tuple, EvalJob] = {}
    out = {}
    for job in jobs:
        primary = first.setdefault(rollout_key(job), job)
        if primary is not job:
            out[job] = primary
    return out


def copy_twins(jobs: list[EvalJob], seeds: list[int], store: ResultsStore) -> int:
    """Store each twin's missing episodes as copies of its primary's stored rows (the same rollouts; the
    primary's timings, since it is the same computation), with the twin's method, sigma, preset, training steps
    and checkpoint path, created now. Returns the number of rows written."""
    import datetime

    pairs = twins(jobs)
    if not pairs:
        return 0
    # "created" is now: a store cell keeps its newest checkpoint's episodes (store._group), and a primary stored
    # long ago must not make the twin's copies older than episodes of the twin's earlier checkpoint
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    stored = {tuple(r[c] for c in EPISODE_KEY): r for r in store.episodes()}  # its keys are the done keys
    rows = []
    for twin, primary in pairs.items():
        mine = twin.seeds(seeds)
        for seed, key in zip(mine, twin.keys(mine)):
            src = stored.get((primary.task, primary.key_method, primary.checkpoint, int(seed)))
            if key in stored or src is None:
                continue
            rows.append({**src, "method": twin.key_method, "sigma": twin.sigma, "preset": twin.preset,
                         "train_steps": twin.train_steps, "checkpoint_path": twin.checkpoint_path, "created": now})
    if rows:
        store.write_episodes(rows)
        log.info("stored %d episodes of %d cells as copies of their twins' (same policy and seeds)", len(rows),
                 len({r["method"] for r in rows}))
    return len(rows)


def blocks(jobs: list[EvalJob], seeds: list[int], done: set[tuple], block_size: int) -> list[tuple[EvalJob, list[int]]]:
    """Split each job's not-yet-stored seeds into blocks of at most block_size seeds; twins (see `twins`) are
    left out: their episodes are their primary's, copied by `copy_twins`."""
    out = []
    skip = twins(jobs)
    for job in jobs:
        if job in skip:
            continue
        mine = job.seeds(seeds)
        todo = [s for s, k in zip(mine, job.keys(mine)) if k not in done]
        for i in range(0, len(todo), max(1, block_size)):
            out.append((job, todo[i:i + block_size]))
    return out


def policy_key(job: EvalJob) -> tuple:
    """What identifies a job's policy object: jobs with equal keys may share one loaded policy (evaluate_serial,
    the pool's actors); everything load_policy reads from the job besides the file is in it."""
    return (job.checkpoint, job.sampler, job.nfe, job.init_scaled, job.tracker, job.precision)


def load_policy(job: EvalJob, checkpoint_file=None, device: str = "cpu", inverse_dynamics_file=None):
    """The job's policy (LocomotionPolicy or MazePlanner), from checkpoint_file (default: job.checkpoint_path),
    its network on `device`; an inverse-dynamics tracker from inverse_dynamics_file (default: its default path,
    ractd.inverse_dynamics.default_path)."""
    import inspect

    from ractd.evaluate import policy_from_checkpoint

    kw = {}
    if device != "cpu":
        if "device" not in inspect.signature(policy_from_checkpoint).parameters:
            raise RactdError("ractd.evaluate.policy_from_checkpoint has no device argument; evaluate on CPU")
        kw["device"] = device
    if job.tracker != "pd":
        kw["tracker"] = job.tracker
        if inverse_dynamics_file:
            kw["inverse_dynamics"] = str(inverse_dynamics_file)
    policy, task, _ = policy_from_checkpoint(checkpoint_file or job.checkpoint_path, job.sampler, job.nfe,
                                             job.init_scaled, precision=job.precision, **kw)
    if task.name != job.task:
        raise RactdError(f"{job.checkpoint_path} was trained on {task.name}, not {job.task}")
    return policy


def run_block(job: EvalJob, seeds: list[int], policy=None, device: str = "cpu", versions: dict | None = None,
              progress: bool = False) -> list[dict]:
    """Roll out one block of seeds of a job (ractd.rollout, batched) -> episode rows for the store."""
    from ractd.rollout import rollout_locomotion, rollout_maze

    policy = policy if policy is not None else load_policy(job)
    task = get_task(job.task)
    roll = rollout_locomotion if task.kind == "locomotion" else rollout_maze
    t0 = time.perf_counter()
    records = roll(task, policy, list(seeds), max_steps=job.max_steps or None, progress=progress)
    wall = time.perf_counter() - t0
    return episode_rows(records, method=job.key_method, sampler=job.sampler, nfe=job.nfe,
                        checkpoint=job.checkpoint, checkpoint_path=job.checkpoint_path, scale=job.scale,
                        wall_s=wall, max_steps=job.max_steps or task.max_episode_steps, init_scaled=job.init_scaled,
                        sigma=job.sigma, preset=job.preset, train_steps=job.train_steps, device=device,
                        versions=versions or library_versions())


def evaluate_serial(jobs: list[EvalJob], seeds: list[int], store: ResultsStore, block_size: int = 100,
                    progress: bool = True) -> dict:
    """Run every missing (job, seed) in this process, one block per call, each block stored as it completes; then
    the twins' copies (copy_twins). Returns {"episodes_run", "blocks", "episodes_copied"}. The Ray counterpart is
    ractd_ray.pool.evaluate."""
    todo = blocks(jobs, seeds, store.done_keys(), block_size)
    policies: dict = {}
    n = 0
    for job, block in todo:
        key = policy_key(job)
        if key not in policies:
            policies[key] = load_policy(job)
        store.write_episodes(run_block(job, block, policies[key], progress=progress))
        n += len(block)
    return {"episodes_run": n, "blocks": len(todo), "episodes_copied": copy_twins(jobs, seeds, store)}


def summary_lines(jobs: list[EvalJob], missing: list[Missing]) -> list[str]:
    """Human-readable plan: what will be evaluated, what is missing and how to train it."""
    lines = [f"evaluate {j.task} {j.method} ({j.sampler}, NFE {j.nfe}) on {Path(j.checkpoint_path)} [{j.checkpoint}]"
             for j in jobs]
    for m in missing:
        lines.append(f"missing {m.task} {m.method}: {m.checkpoint} not found; train it with: {m.command}")
    return lines
