"""Evaluate a trained checkpoint: build its sampler and policy, roll out seeds batched, store records.

`evaluate_checkpoint` is what `python -m ractd evaluate` runs; `policy_from_checkpoint` is what a Ray actor
calls once to hold a policy (no global state).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ractd import RactdError
from ractd.tasks import get_task

log = logging.getLogger(__name__)

SAMPLER_STAGE = {"student": "student", "heun": "teacher", "euler": "teacher", "ddpm": "ddpm", "ddim": "ddpm"}
DEFAULT_NFE = {"student": 1, "heun": 80, "euler": 80, "ddpm": 100, "ddim": 10}


def _sampler_opts(sampler: str, nfe: int, init_scaled: bool) -> dict:
    if sampler == "student":
        return {"n_steps": nfe, "init_scaled": init_scaled}
    if sampler in ("heun", "euler"):
        return {"n_bins": nfe, "init_scaled": init_scaled}
    return {"n_steps": nfe}


def policy_from_checkpoint(checkpoint: str | Path, sampler: str = "student", nfe: int | None = None,
                           init_scaled: bool = True, accelerate: str = "none"):
    """(policy or planner, task, its TrainConfig) for a checkpoint of the stage the sampler needs.

    accelerate: "none" or "jit" (ractd.nets.unet1d.accelerate: same numbers up to float rounding;
    bench/bench_core.py measures the speed-up)."""
    from ractd.data.windows import Normalizer
    from ractd.policy import LocomotionPolicy, MazePlanner, make_sampler
    from ractd.train import load_stage_model

    if sampler not in SAMPLER_STAGE:
        raise RactdError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_STAGE)}")
    model, cfg, ck = load_stage_model(Path(checkpoint))
    if cfg.stage != SAMPLER_STAGE[sampler]:
        raise RactdError(f"sampler {sampler!r} needs a {SAMPLER_STAGE[sampler]} checkpoint; {checkpoint} is a {cfg.stage}")
    task = get_task(cfg.task)
    if accelerate != "none":
        from ractd.nets.unet1d import accelerate as accelerate_net

        model.net = accelerate_net(model.net, accelerate, horizon=ck["shapes"]["x"][0])
    norms = {k: Normalizer.from_state_dict(v) for k, v in ck["normalizers"].items()}
    shape_tail = tuple(ck["shapes"]["x"])
    fn = make_sampler(sampler, model, shape_tail, **_sampler_opts(sampler, nfe or DEFAULT_NFE[sampler], init_scaled))
    if task.kind == "locomotion":
        return LocomotionPolicy(fn, norms["obs"], norms["action"], obs_history=cfg.obs_history), task, cfg
    return MazePlanner(fn, norms["obs"], horizon=shape_tail[0]), task, cfg


def evaluate_checkpoint(task: str, run_dir: str = "", sampler: str = "student", checkpoint: str = "",
                        nfe: int | None = None, seeds: list[int] | None = None, max_steps: int | None = None,
                        init_scaled: bool = True, out: str = "", progress: bool = True,
                        accelerate: str = "none") -> dict:
    """Roll out `seeds` (default 0..9) with the checkpoint's policy; write records to Parquet; return a summary."""
    from ractd.paths import runs_dir
    from ractd.rollout import rollout_locomotion, rollout_maze, save_records, summarize

    t = get_task(task)
    run = Path(run_dir) if run_dir else runs_dir() / t.name
    if sampler not in SAMPLER_STAGE:
        raise RactdError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_STAGE)}")
    ckpt = Path(checkpoint) if checkpoint else run / SAMPLER_STAGE[sampler] / "best.pt"
    nfe = nfe or DEFAULT_NFE[sampler]
    policy, t2, cfg = policy_from_checkpoint(ckpt, sampler, nfe, init_scaled, accelerate)
    if t2.name != t.name:
        raise RactdError(f"{ckpt} was trained on {t2.name}, not {t.name}")
    seeds = list(range(10)) if seeds is None else seeds
    start = time.perf_counter()
    roll = rollout_locomotion if t.kind == "locomotion" else rollout_maze
    records = roll(t, policy, seeds, max_steps=max_steps, progress=progress)
    extra = {"sampler": sampler, "nfe": nfe, "init_scaled": init_scaled, "accelerate": accelerate, "checkpoint": str(ckpt),
             "sigma": cfg.distill.sigma if cfg.stage == "student" else 0.0, "train_seed": cfg.seed}
    records = [{**r, **extra} for r in records]
    path = Path(out) if out else run / "eval" / f"{sampler}-{nfe}.parquet"
    save_records(records, path)
    summary = {**summarize(records), "task": t.name, "sampler": sampler, "nfe": nfe, "records": str(path),
               "wall_s": round(time.perf_counter() - start, 2)}
    log.info("evaluated %s: %s", ckpt, summary)
    return summary
