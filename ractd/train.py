"""The three decoupled trainings of RACTD as plain loops: reward model, teacher (EDM; or the DDPM baseline),
and reward-aware distillation of the CTM student; and the behavior cloning baseline (stage "bc", ractd.bc).

Each `train(cfg, ctx)` call runs one stage (its config: ractd.train_config.TrainConfig, re-exported here with
BUDGETS), in steps that read top to bottom: `_setup` (data: `prepare`, ractd.data.prepared; upstream models,
model, how its steps run on this machine: ractd.accel, optimizer), `_resume`, `_step` (one optimizer step of the
stage's loss, `_loss_terms`), `_checkpoint` (model selection; the student's ractd.diagnostics; files).
Everything a Ray Train worker needs is in `RunContext`: the device, rank / world size (only rank 0 writes files),
gradient and metric all-reduce hooks, a checkpoint to resume from, and a `report(metrics, checkpoint_dir)`
callback called on every rank every `report_every` steps and at each checkpoint. The library itself never
imports Ray (ractd_ray/ adapts this loop to Ray Train).
A run lives in `run_dir/<stage>/`: latest/checkpoint.pt (for resuming), best.pt (model selection; only ever a
finite, selected model), config.json (resolved config), metrics.jsonl (one JSON object per checkpoint).
Re-running with the same run_dir resumes; a non-finite loss or gradient stops the run and keeps the last good
checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ractd import RactdError, __version__, accel, bc, ctm, ddpm, edm, holdout
from ractd.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint
from ractd.config import from_dict, to_dict
from ractd.data.prepared import Prepared, dataset_fingerprint, prepare_windows
from ractd.data.prepared import to_torch as _to_torch

# ractd.train.distill_diagnostics / term_gradient_norms / DIAG_TERMS are the names the studies and docs use
from ractd.diagnostics import DIAG_TERMS, distill_diagnostics, term_gradient_norms  # noqa: F401
from ractd.nets.mlp import ResidualMLP
from ractd.nets.unet1d import ConditionalUnet1D, load_teacher_into_student
from ractd.tasks import get_task

# ractd.train.TrainConfig and BUDGETS are the names the CLI, the README and the studies use
from ractd.train_config import BUDGETS, RESUMABLE_FIELDS, TrainConfig  # noqa: F401

log = logging.getLogger(__name__)


def ema_decay_at(step: int, max_decay: float, power: float) -> float:
    """EMA decay after `step` optimizer steps (1-based): 0 at step 1, rising as 1 - (1 + step)^-power, capped
    at max_decay (the warm-up schedule of diffusion_policy's EMAModel with inv_gamma = 1)."""
    if step <= 1:
        return 0.0
    return min(max_decay, 1.0 - (1.0 + step) ** -power)


def ema_update(ema: nn.Module, model: nn.Module, decay: float, foreach: bool = True) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters and floating buffers (ractd.accel.ema_update: one
    foreach lerp; foreach=False: the per-tensor loop)."""
    accel.ema_update(ema, model, decay, foreach)


@dataclasses.dataclass
class RunContext:
    """What a caller (CLI, test, Ray Train worker) injects into a training loop.

    report(metrics, checkpoint_dir_or_None): called on EVERY rank the same number of times (every report_every
        steps and at every checkpoint; metrics["at_checkpoint"] says which). checkpoint_dir is given on rank 0 at
        checkpoints only: a folder holding just the latest checkpoint.pt (and its config.json), so persisting it
        does not copy best.pt too. Once a student run with select_seeds > 0 has checkpointed, every metrics dict
        carries the latest "select_score".
    sync_grads(model): called after every backward pass; a distributed caller averages the gradients across
        workers (an all-reduce: DDP-equivalent, and it works for the student, whose loss calls the network several
        times per step, without DDP's forward bookkeeping or a wrapper hiding Student.g / sigma_min).
    all_reduce_sum(tensor) -> tensor: sum over workers, for metrics and the model-selection score (each rank rolls
        out a disjoint slice of the selection seeds). None = one process.
    resume_from: a checkpoint file to resume from (e.g. the one Ray Train hands back after a restart); default
        <run_dir>/<stage>/latest/checkpoint.pt when it exists.
    on_step(step): called after every optimizer step (test hook, e.g. to inject a worker failure).
    stop_at: end the loop after this step (simulates an interruption in tests).
    """

    device: str = "cpu"
    rank: int = 0
    world_size: int = 1
    report: Callable[[dict, Path | None], None] | None = None
    sync_grads: Callable[[nn.Module], None] | None = None
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    resume_from: Path | None = None
    on_step: Callable[[int], None] | None = None
    progress: bool = True
    stop_at: int | None = None


# ------------------------------------------------------------------------------------------------ data

def prepare(cfg: TrainConfig, data: dict | None = None, norms: dict | None = None) -> Prepared:
    """The stage's normalized training arrays: load the dataset (unless given), then behavior cloning's pairs
    (ractd.bc.prepare_bc) or the diffusion models' windows (ractd.data.prepared.prepare_windows: normalizers
    fitted to [-1, 1] unless `norms`, e.g. a checkpoint's, are given: held-out data in a trained model's
    coordinates)."""
    from ractd.data.d4rl import load_dataset

    task = get_task(cfg.task)
    if data is None:
        data = load_dataset(task, source=cfg.source, scale=cfg.scale)
    fp = dataset_fingerprint(data)
    if cfg.stage == "bc":
        return bc.prepare_bc(task, data, fp, top_fraction=cfg.bc_top_fraction, goal=cfg.bc_goal)
    return prepare_windows(task, data, rtg=cfg.rtg, obs_history=cfg.obs_history, norms=norms, fingerprint=fp)


# ------------------------------------------------------------------------------------------------ models

def build_teacher(cfg: TrainConfig, prep: Prepared) -> edm.Denoiser:
    tail = prep.shape_tail
    net = ConditionalUnet1D(tail[1], prep.cond.shape[1], cfg.unet(prep.task))
    return edm.Denoiser(net, scalings=cfg.scalings)


def build_ddpm(cfg: TrainConfig, prep: Prepared) -> ddpm.EpsModel:
    return ddpm.EpsModel(ConditionalUnet1D(prep.shape_tail[1], prep.cond.shape[1], cfg.unet(prep.task)))


def build_student(cfg: TrainConfig, prep: Prepared) -> ctm.Student:
    net = ConditionalUnet1D(prep.shape_tail[1], prep.cond.shape[1], cfg.unet(prep.task), n_times=2)
    return ctm.Student(net, scalings=cfg.scalings)


def build_reward(cfg: TrainConfig, prep: Prepared) -> ResidualMLP:
    if prep.state is None:
        raise RactdError(f"{prep.task.name}: the reward model is for locomotion tasks (maze2d uses sigma = 0)")
    return ResidualMLP(prep.state.shape[1], prep.action.shape[1], cfg.reward_hidden, bounded=cfg.reward_bounded)


BUILDERS = {"reward": build_reward, "teacher": build_teacher, "ddpm": build_ddpm, "student": build_student,
            "bc": bc.build_bc}


def load_stage_model(path: Path, prep: Prepared | None = None, use_ema: bool = True):
    """(model in eval mode with requires_grad False, its TrainConfig, the checkpoint dict) from a checkpoint.

    The checkpoint dict carries "normalizers" (state dicts), "shapes", "meta" and the weights."""
    ck = load_checkpoint(path)
    cfg = from_dict(TrainConfig, ck["config"])
    if prep is None:
        prep = _shape_only(cfg, ck)
    model = BUILDERS[cfg.stage](cfg, prep)
    state = ck["ema"] if use_ema and ck.get("ema") is not None else ck["model"]
    model.load_state_dict(state)
    return model.eval().requires_grad_(False), cfg, ck


def _shape_only(cfg: TrainConfig, ck: dict) -> Prepared:
    """A Prepared with the right shapes but no data, to rebuild a network from its checkpoint."""
    task = get_task(cfg.task)
    shapes = ck["shapes"]
    x = np.zeros((1, *shapes["x"]), np.float32)
    cond = np.zeros((1, shapes["cond"]), np.float32)
    state = np.zeros((1, shapes["state"]), np.float32) if shapes.get("state") else None
    action = np.zeros((1, shapes["action"]), np.float32) if shapes.get("action") else None
    return Prepared(task, x, cond, checkpoint_normalizers(ck), state=state, action=action)


def checkpoint_normalizers(ck: dict) -> dict:
    """The normalizers a checkpoint was trained with (name -> Normalizer), e.g. to prepare other data as it was."""
    from ractd.data.windows import Normalizer

    return {k: Normalizer.from_state_dict(v) for k, v in ck["normalizers"].items()}


def load_upstream(path: Path, stage: str, cfg: TrainConfig, prep: Prepared):
    """A frozen upstream model (teacher or reward) for `cfg`'s run, refused unless it was trained on the same
    task and the same dataset (fingerprint): (model, its TrainConfig)."""
    model, up_cfg, ck = load_stage_model(path, prep)
    if up_cfg.stage != stage:
        raise RactdError(f"{path} is a {up_cfg.stage} checkpoint, expected a {stage} checkpoint")
    if up_cfg.task != cfg.task:
        raise RactdError(f"{path} was trained on task {up_cfg.task}, this run is {cfg.task}")
    fp = ck.get("meta", {}).get("dataset_fingerprint")
    if fp != prep.fingerprint:
        raise RactdError(f"{path} was trained on dataset {fp}, this run's dataset is {prep.fingerprint} "
                         f"(another scale, source or generation seed)")
    return model, up_cfg


# ------------------------------------------------------------------------------------------------ loop

def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _versions() -> dict:
    import gymnasium

    return {"ractd": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "gymnasium": gymnasium.__version__, "python": platform.python_version()}


def _stable_config(d: dict) -> dict:
    """The config fields a resumed run must share. A field a checkpoint predates reads as its default (each was
    added with the default being the behavior before it: term_scale "raw", holdout 0)."""
    out = {k: v for k, v in {**to_dict(TrainConfig()), **d}.items() if k not in RESUMABLE_FIELDS}
    if isinstance(out.get("distill"), dict):
        out["distill"] = {**dataclasses.asdict(ctm.DistillConfig()), **out["distill"]}
    return out


def _finite_json(metrics: dict) -> str:
    """One JSON line; non-finite numbers become null (JSON has no NaN)."""
    clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
    return json.dumps(clean, allow_nan=False)


@dataclasses.dataclass
class _Run:
    """One stage's training state: built by `_setup`, restored by `_resume`, advanced by `_step`, written by
    `_checkpoint`. best: the best selection score so far (lower is better; rank 0's); last_select: the student's
    latest rollout score; heldout: the held-out windows and fixed draws (ractd.holdout) where cfg.holdout > 0."""

    cfg: TrainConfig
    ctx: RunContext
    prep: Prepared
    device: torch.device
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator
    train_idx: np.ndarray
    val_idx: np.ndarray | None
    ema: nn.Module | None
    teacher: nn.Module | None
    reward_model: nn.Module | None
    balance: ctm.TermBalance | None
    plan: accel.Plan
    step: int = 0
    best: float = math.inf
    last_select: float | None = None
    accel_history: list = dataclasses.field(default_factory=list)
    heldout: holdout.HeldOut | None = None

    @property
    def ckpt_path(self) -> Path:
        return self.cfg.stage_dir / "latest" / "checkpoint.pt"

    @property
    def best_path(self) -> Path:
        return self.cfg.stage_dir / "best.pt"


def train(cfg: TrainConfig, ctx: RunContext | None = None, data: dict | None = None,
          prep: Prepared | None = None) -> dict:
    """Run one stage to cfg.steps, resuming from ctx.resume_from or <run_dir>/<stage>/latest/checkpoint.pt.

    Returns {"checkpoint": path of the latest checkpoint, "best": path of best.pt, "metrics": last metrics,
    "step": the step reached}.
    """
    ctx = ctx or RunContext()
    run = _setup(cfg, ctx, data, prep)
    _resume(run)
    cfg = run.cfg
    metrics: dict = {}
    sums: dict[str, float] = {}
    count = 0
    with tqdm(total=cfg.steps, initial=run.step, desc=f"{cfg.task} {cfg.stage}",
              disable=not ctx.progress or ctx.rank != 0) as bar:
        t0 = time.perf_counter()
        while run.step < cfg.steps and (ctx.stop_at is None or run.step < ctx.stop_at):
            terms, grad_norm = _step(run)
            bar.update(1)
            for k, v in {**terms, "grad_norm": grad_norm}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            count += 1
            if ctx.on_step:
                ctx.on_step(run.step)
            at_ckpt = run.step % cfg.ckpt_every == 0 or run.step == cfg.steps
            if not (run.step % cfg.report_every == 0 or at_ckpt):
                continue
            metrics = _metrics(run, {k: v / count for k, v in sums.items()}, count, t0, at_ckpt)
            sums, count = {}, 0
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "ctm", "dsm", "reward")})
            ckpt_dir = _checkpoint(run, metrics) if at_ckpt else None
            if run.last_select is not None:
                metrics["select_score"] = run.last_select
            if at_ckpt and ctx.rank == 0:
                with open(cfg.stage_dir / "metrics.jsonl", "a") as f:
                    f.write(_finite_json(metrics) + "\n")
            if ctx.report:
                ctx.report(dict(metrics), ckpt_dir)
            t0 = time.perf_counter()
    return {"checkpoint": run.ckpt_path, "best": run.best_path, "metrics": metrics, "step": run.step}


def _setup(cfg: TrainConfig, ctx: RunContext, data: dict | None, prep: Prepared | None) -> _Run:
    """Resolve the config, prepare the data, load the upstream models, build the model (the same initial weights
    on every rank), its EMA and optimizer; seed this rank's data stream; split off the held-out rows (the reward
    model's validation; cfg.holdout's episodes and their fixed draws, ractd.holdout)."""
    cfg = cfg.resolved()
    if cfg.batch < ctx.world_size:
        raise RactdError(f"batch={cfg.batch} is smaller than the number of workers ({ctx.world_size})")
    device = torch.device(ctx.device)
    prep = prep or prepare(cfg, data)
    cfg, teacher, reward_model = _upstream(cfg, prep, device)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = BUILDERS[cfg.stage](cfg, prep).to(device)
    if teacher is not None:
        load_teacher_into_student(model.net, teacher.net)  # new s pathway zero-initialised
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.stage in ("teacher", "ddpm") else None
    balance = ctm.TermBalance(cfg.distill.term_decay, cfg.distill.term_every) if cfg.stage == "student" else None
    # how the steps run on this machine (ractd.accel), resolved once; the config records the resolved names
    plan = accel.plan_for(cfg.accel, cfg.autocast, model, teacher, cfg.batch // ctx.world_size,
                          prep.shape_tail[0], device)
    cfg = dataclasses.replace(cfg, accel=plan.accel, autocast=plan.autocast)
    log.info("%s %s: accel %s, autocast %s, %s optimizer, %d GEMM conv layers, layout %s, Mish %s (set up in "
             "%.1f s)", cfg.task, cfg.stage, plan.accel, plan.autocast, plan.optimizer, len(plan.gemm_layers),
             plan.layout, plan.mish, plan.setup_s)
    opt, sched = _optimizer(cfg, model)
    accel.set_optimizer_impl(opt, plan.optimizer)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + ctx.rank)
    torch.manual_seed(cfg.seed * 1000 + ctx.rank)
    train_idx, val_idx = _split(cfg, prep)
    held = holdout.fixed_draws(cfg, prep, val_idx, device) if cfg.holdout > 0 else None
    return _Run(cfg, ctx, prep, device, model, opt, sched, gen, train_idx, val_idx, ema, teacher, reward_model,
                balance, plan, heldout=held)


def _upstream(cfg: TrainConfig, prep: Prepared, device) -> tuple[TrainConfig, nn.Module | None, nn.Module | None]:
    """(cfg, teacher, reward model) of a stage: the student's teacher (whose scalings it takes), and the reward
    model where the loss needs it (student with sigma > 0, reward-aware teacher) or a CTD student reports R_psi of
    its actions (distill_diagnostics) because the model is there; None where not."""
    teacher = reward_model = None
    if cfg.stage == "student":
        teacher, t_cfg = load_upstream(Path(cfg.teacher_ckpt or Path(cfg.run_dir) / "teacher" / "best.pt"),
                                       "teacher", cfg, prep)
        if t_cfg.scalings != cfg.scalings:  # one preconditioning: the student takes its teacher's
            log.info("student uses its teacher's %s scalings", t_cfg.scalings)
            cfg = dataclasses.replace(cfg, scalings=t_cfg.scalings)
        teacher = teacher.to(device)
    reward_path = Path(cfg.reward_ckpt or Path(cfg.run_dir) / "reward" / "best.pt")
    needs_reward = (cfg.stage == "student" and cfg.distill.sigma > 0) or (
        cfg.stage == "teacher" and cfg.reward_aware_teacher > 0)
    if needs_reward or (cfg.stage == "student" and prep.state is not None and reward_path.is_file()):
        reward_model, _ = load_upstream(reward_path, "reward", cfg, prep)
        reward_model = reward_model.to(device)
    return cfg, teacher, reward_model


def _optimizer(cfg: TrainConfig, model: nn.Module):
    """(optimizer, scheduler): AdamW (betas 0.95, 0.999; released code) with warm-up and cosine decay; BC's own
    (ractd.bc.optimizer: Adam at a constant rate)."""
    if cfg.stage == "bc":
        return bc.optimizer(cfg, model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.95, 0.999), weight_decay=1e-6)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps))


def _split(cfg: TrainConfig, prep: Prepared) -> tuple[np.ndarray, np.ndarray | None]:
    """(training rows, held-out rows or None) of the stage's rows: whole episodes held out (cfg.holdout) and a
    share of the others kept (cfg.data_fraction) by ractd.holdout.split; else every row. Without held-out
    episodes the reward model holds out cfg.val_fraction of its training rows for model selection (a permutation
    seeded by cfg.seed, the same on every rank)."""
    train_idx, val_idx = np.arange(len(prep.cond)), None
    if cfg.holdout > 0 or cfg.data_fraction < 1:
        train_idx, val_idx = holdout.split(cfg, prep)
        val_idx = val_idx if cfg.holdout > 0 else None
    if cfg.stage == "reward" and val_idx is None:
        perm = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed)).numpy()
        n_val = max(1, int(cfg.val_fraction * len(train_idx)))
        val_idx, train_idx = train_idx[perm[:n_val]], train_idx[perm[n_val:]]
    if len(train_idx) == 0:
        raise RactdError(f"{cfg.task}: the dataset gives no training windows")
    return train_idx, val_idx


def _resume(run: _Run) -> None:
    """Continue from ctx.resume_from, else the stage's latest checkpoint, if there is one (refused when it was
    written with another config or dataset): weights, EMA, optimizer, schedule, step, model selection state, term
    balance and the random streams (rank 0's were saved; other ranks start fresh streams keyed by the step)."""
    cfg, ctx = run.cfg, run.ctx
    resume = Path(ctx.resume_from) if ctx.resume_from else run.ckpt_path
    if not resume.is_file():
        return
    ck = load_checkpoint(resume)
    if _stable_config(ck["config"]) != _stable_config(to_dict(cfg)):
        old, new = _stable_config(ck["config"]), _stable_config(to_dict(cfg))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise RactdError(f"{resume} was written with a different config ({', '.join(diff)}); "
                         f"use another --run-dir to start anew")
    fp = ck.get("meta", {}).get("dataset_fingerprint")
    if fp != run.prep.fingerprint:
        raise RactdError(f"{resume} was trained on dataset {fp}, the dataset now is {run.prep.fingerprint}; "
                         f"use another --run-dir to start anew")
    run.model.load_state_dict(ck["model"])
    if run.ema is not None:
        run.ema.load_state_dict(ck["ema"])
    run.opt.load_state_dict(ck["optimizer"])
    accel.set_optimizer_impl(run.opt, run.plan.optimizer)  # the saved groups carry the writer's own flags
    run.accel_history = _accel_history(ck, run)
    run.sched.load_state_dict(ck["scheduler"])  # keeps this run's lambda: more steps stretch the cosine
    run.step, run.best, run.last_select = ck["step"], ck["best"], ck.get("select_score")
    if run.balance is not None and ck.get("term_balance"):
        run.balance.load_state_dict(ck["term_balance"])
    if ctx.rank == 0:
        run.gen.set_state(ck["rng"]["data"])
        torch.set_rng_state(ck["rng"]["torch"])
    else:
        run.gen.manual_seed(cfg.seed * 1000 + ctx.rank + 7919 * run.step)
        torch.manual_seed(cfg.seed * 1000 + ctx.rank + 7919 * run.step)
    log.info("resumed %s at step %d", resume, run.step)


def _accel_history(ck: dict, run: _Run) -> list[dict]:
    """How each stretch of a resumed run's steps ran: the checkpoint's record (one written before the accel
    field ran fp32, eager, with torch's for-loop AdamW), and this run's plan from the resumed step if it differs."""
    old = ck.get("meta", {}).get("accel") or {}
    keys = ("accel", "autocast", "optimizer")
    history = list(old.get("history") or [{"from_step": 0, "accel": "eager", "autocast": "fp32",
                                           "optimizer": "for-loop"}])
    entry = {"from_step": int(ck["step"]), **{k: getattr(run.plan, k) for k in keys}}
    if any(history[-1].get(k) != entry[k] for k in keys):
        log.info("resumed run continues with %s (it ran with %s)", entry, history[-1])
        history.append(entry)
    return history


def _step(run: _Run) -> tuple[dict, float]:
    """One optimizer step on cfg.batch / world_size windows of this rank's stream: (the loss terms, the gradient
    norm). The gradients are averaged across workers (ctx.sync_grads); a non-finite loss or gradient stops the
    run (RactdError) before the weights change; the EMA follows."""
    cfg, ctx = run.cfg, run.ctx
    idx = run.train_idx[torch.randint(0, len(run.train_idx), (cfg.batch // ctx.world_size,),
                                      generator=run.gen).numpy()]
    with run.plan.context(run.device):  # autocast bf16 where the plan says so
        terms = _loss_terms(cfg, run.model, run.teacher, run.reward_model, run.prep, idx, run.device, run.balance)
    run.opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if ctx.sync_grads:
        ctx.sync_grads(run.model)
    # the norm of the synchronized gradient is the same on every rank, so every rank stops together
    grad_norm = float(accel.grad_norm(run.model.parameters()))
    loss_value = float(terms["loss"].detach())
    if not math.isfinite(grad_norm) or (ctx.world_size == 1 and not math.isfinite(loss_value)):
        kept = f"the last good checkpoint {run.ckpt_path} (step {run.step}) is kept" if run.ckpt_path.is_file() \
            else "no checkpoint was written"
        raise RactdError(f"{cfg.task} {cfg.stage}: non-finite loss ({loss_value}) or gradient norm "
                         f"({grad_norm}) at step {run.step + 1}; stopped, {kept}; try a lower --lr")
    run.opt.step()
    run.sched.step()
    run.step += 1
    if run.ema is not None:
        ema_update(run.ema, run.model, ema_decay_at(run.step, cfg.ema_decay, cfg.ema_power))
    return terms, grad_norm


def _metrics(run: _Run, means: dict, count: int, t0: float, at_ckpt: bool) -> dict:
    """The report of the last `count` steps (since t0): their mean loss terms over all workers, step, learning
    rate, steps per second, whether it is a checkpoint, the EMA decay."""
    ctx, cfg = run.ctx, run.cfg
    metrics = means
    if ctx.all_reduce_sum is not None and ctx.world_size > 1:
        keys = sorted(means)
        total = ctx.all_reduce_sum(torch.tensor([means[k] for k in keys], dtype=torch.float64))
        metrics = {k: float(v) / ctx.world_size for k, v in zip(keys, total.tolist())}
    metrics.update(step=run.step, lr=run.sched.get_last_lr()[0], steps_per_s=count / (time.perf_counter() - t0),
                   at_checkpoint=at_ckpt)
    if run.ema is not None:
        metrics["ema_decay"] = ema_decay_at(run.step, cfg.ema_decay, cfg.ema_power)
    return metrics


def _checkpoint(run: _Run, metrics: dict) -> Path | None:
    """At a checkpoint: the stage's selection measures into `metrics` (held-out losses, ractd.holdout.val_losses:
    the reward model's validation loss, any stage's with cfg.holdout; student: distill_diagnostics), then on rank 0
    latest/checkpoint.pt with config.json, and best.pt when the selection score is the best so far. Returns the
    folder to report on rank 0, else None."""
    cfg = run.cfg
    with accel.native_convs(run.model):  # the evaluation code (engines, export) takes the network as built
        if run.val_idx is not None:
            metrics.update(holdout.val_losses(cfg, run.model, run.ema, run.teacher, run.prep, run.val_idx,
                                              run.heldout, run.device))
        if cfg.stage == "student":
            metrics.update(distill_diagnostics(cfg, run.model, run.reward_model, run.prep, run.device))
        score = _selection_score(run, metrics)
    if run.ctx.rank != 0:
        return None
    improved = math.isfinite(score) and score <= run.best
    run.best = min(run.best, score) if math.isfinite(score) else run.best
    save_checkpoint(run.ckpt_path, _payload(run))
    copy_checkpoint(run.ckpt_path.parent / "config.json", cfg.stage_dir / "config.json")
    if improved:  # best.pt is the latest checkpoint at its best score; copy, don't re-serialize
        copy_checkpoint(run.ckpt_path, run.best_path)
    return run.ckpt_path.parent


def _selection_score(run: _Run, metrics: dict) -> float:
    """Model selection score of the checkpoint, lower is better: the student's mean rollout score negated (with
    select_seeds; kept in run.last_select), BC's rule (ractd.bc.selection_score: the final policy), else the
    validation loss, else the training loss."""
    cfg = run.cfg
    if cfg.stage == "student" and cfg.select_seeds > 0:
        run.last_select = _quick_eval(cfg, run.model, run.prep, run.ctx)
        return -run.last_select
    if cfg.stage == "bc":
        return bc.selection_score(run.step)
    return metrics.get("val_loss", metrics.get("loss", math.inf))


def _payload(run: _Run) -> dict:
    """The checkpoint of the run as it stands (config, weights, optimizer, schedule, step, selection state,
    normalizers, shapes, random streams, versions and dataset fingerprint)."""
    prep = run.prep
    shapes = {"x": list(prep.shape_tail), "cond": int(prep.cond.shape[1]),
              "state": None if prep.state is None else int(prep.state.shape[1]),
              "action": None if prep.action is None else int(prep.action.shape[1])}
    meta = {"versions": _versions(), "dataset_fingerprint": prep.fingerprint, "world_size": run.ctx.world_size,
            "accel": {**run.plan.record(), "history": run.accel_history or [
                {"from_step": 0, **{k: getattr(run.plan, k) for k in ("accel", "autocast", "optimizer")}}]}}
    return {"config": to_dict(run.cfg), "model": run.model.state_dict(),
            "ema": None if run.ema is None else run.ema.state_dict(), "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict(), "step": run.step, "best": run.best, "select_score": run.last_select,
            "term_balance": None if run.balance is None else run.balance.state_dict(),
            "normalizers": {k: v.state_dict() for k, v in prep.normalizers.items()}, "shapes": shapes,
            "rng": {"data": run.gen.get_state(), "torch": torch.get_rng_state()}, "meta": meta}


def _loss_terms(cfg: TrainConfig, model, teacher, reward_model, prep: Prepared, idx, device,
                balance: ctm.TermBalance | None = None) -> dict:
    if cfg.stage == "reward":
        pred = model(_to_torch(prep.state, idx, device), _to_torch(prep.action, idx, device))
        return {"loss": (pred - _to_torch(prep.rtg, idx, device)).pow(2).mean()}
    if cfg.stage == "bc":
        return bc.loss_terms(model, prep, idx, device)
    cond = _to_torch(prep.cond, idx, device)
    x0 = _to_torch(prep.x, idx, device)
    if cfg.stage == "teacher":
        loss = edm.edm_loss(model, x0, cond, distance=cfg.distance, weighting=cfg.weighting).mean()  # Eq. (4)
        out = {"edm": loss.detach()}
        if cfg.reward_aware_teacher > 0:  # ablation: reward-aware teacher (Tables 4 and 10)
            sigma = torch.full((x0.shape[0],), edm.SIGMA_MAX, device=device)
            a_hat = model(edm.prior_sample(x0.shape, device=device), sigma, cond)[:, 0]
            l_rew = ctm.reward_loss(reward_model, _to_torch(prep.state, idx, device), a_hat).mean()
            loss = loss + cfg.reward_aware_teacher * l_rew
            out["reward"] = l_rew.detach()
        out["loss"] = loss
        return out
    if cfg.stage == "ddpm":
        loss = ddpm.ddpm_loss(model, x0, cond).mean()
        return {"loss": loss, "eps": loss.detach()}
    state = None if prep.state is None else _to_torch(prep.state, idx, device)
    return ctm.ractd_loss(model, teacher, reward_model, x0, cond, state, cfg.distill, balance)  # Eq. (9)


def _quick_eval(cfg: TrainConfig, student: ctm.Student, prep: Prepared, ctx: RunContext | None = None) -> float:
    """Mean normalized score of the one-step student on cfg.select_seeds short rollouts (seeds 10000, ...:
    disjoint from the evaluation seeds). With several workers each rolls out its own slice of the seeds and
    the mean is taken over all of them (every rank gets the same number)."""
    from ractd.policy import LocomotionPolicy, MazePlanner, student_sampler
    from ractd.rollout import rollout_locomotion, rollout_maze

    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    seeds = list(range(10_000, 10_000 + cfg.select_seeds))[rank::world]
    was_training = student.training
    student.eval()
    try:
        scores = []
        if seeds:
            sampler = student_sampler(student, prep.shape_tail, n_steps=1, init_scaled=cfg.distill.init_scaled)
            if prep.task.kind == "locomotion":
                policy = LocomotionPolicy(sampler, prep.normalizers["obs"], prep.normalizers["action"], cfg.obs_history)
                records = rollout_locomotion(prep.task, policy, seeds, max_steps=cfg.select_max_steps or None,
                                             progress=False)
            else:
                planner = MazePlanner(sampler, prep.normalizers["obs"], prep.shape_tail[0])
                records = rollout_maze(prep.task, planner, seeds, max_steps=cfg.select_max_steps or None,
                                       progress=False)
            scores = [r["normalized_score"] for r in records]
    finally:
        student.train(was_training)
    total = torch.tensor([float(np.sum(scores)), float(len(scores))], dtype=torch.float64)
    if ctx is not None and ctx.all_reduce_sum is not None and world > 1:
        total = ctx.all_reduce_sum(total)
    return float(total[0] / total[1])

