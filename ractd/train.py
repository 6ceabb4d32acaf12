"""The three decoupled trainings of RACTD as plain loops: reward model, teacher (EDM; or the DDPM baseline),
and reward-aware distillation of the CTM student.

Each `train(cfg, ctx)` call runs one stage. Everything a Ray Train worker needs is in `RunContext`: the
device, rank / world size (only rank 0 writes files), an optional gradient all-reduce hook, and a `report(metrics,
checkpoint_path)` callback called every `report_every` steps and at each checkpoint. The library itself never
imports Ray. A run lives in `run_dir/<stage>/`: checkpoint.pt (latest, for resuming), best.pt (model
selection), config.json (resolved config), metrics.jsonl. Re-running with the same run_dir resumes.
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
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ractd import RactdError, __version__, ctm, ddpm, edm
from ractd.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint
from ractd.config import UNetConfig, from_dict, to_dict, unet_preset
from ractd.nets.mlp import ResidualMLP
from ractd.nets.unet1d import ConditionalUnet1D, load_teacher_into_student
from ractd.tasks import Task, get_task

log = logging.getLogger(__name__)

Stage = Literal["reward", "teacher", "ddpm", "student"]
STAGES = ("reward", "teacher", "ddpm", "student")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training stage. Paper-scale values come from the task registry (preset="paper").

    task: registry name. stage: reward | teacher | ddpm | student. run_dir: where the run lives
        ("" = <cache>/runs/<task>). preset: U-Net preset name, "cpu" (task.cpu_preset) or "paper".
    source / scale: dataset source and locally generated scale (ractd.data.d4rl.load_dataset).
    steps, batch, lr, warmup: AdamW (betas 0.95, 0.999) with linear warmup then cosine decay (released code).
    ema_decay: EMA of the teacher / DDPM weights used for evaluation.
    ckpt_every, report_every: in optimizer steps. seed: everything random derives from it (and the rank).
    rtg: "paper" (task gamma, -100 termination penalty) or "code" (gamma 0.99, no penalty).
    reward_hidden, reward_bounded, val_fraction: reward model width, tanh output, validation split.
    scalings, distance: teacher preconditioning and Eq. (4) distance form.
    distill: Eq. (5)-(9) options; alpha/beta/sigma < 0 mean "the task's Table 9 value".
    teacher_ckpt, reward_ckpt: checkpoints the student stage distills from ("" = this run's own).
    reward_aware_teacher: ablation (Tables 4, 10): add sigma * L_Reward of the teacher's one-step denoised
        first action to Eq. (4) while training the teacher.
    select_seeds, select_max_steps: online model selection (student stage), as the paper does: at every
        checkpoint roll the one-step student out on select_seeds seeds (10000, 10001, ..., disjoint from the
        evaluation seeds) for select_max_steps env steps; best.pt keeps the highest mean normalized score.
        0 seeds = select by training loss (reward model: by validation loss).
    """

    task: str = "hopper-medium-replay"
    stage: Stage = "teacher"
    run_dir: str = ""
    preset: str = "cpu"
    source: str = "auto"
    scale: str = "small"
    steps: int = 2000
    batch: int = 256
    lr: float = 1e-4
    warmup: int = 100
    ema_decay: float = 0.999
    ckpt_every: int = 500
    report_every: int = 50
    seed: int = 0
    obs_history: int = 1
    rtg: Literal["paper", "code"] = "paper"
    reward_hidden: tuple[int, ...] = (64, 128, 256)
    reward_bounded: bool = True
    val_fraction: float = 0.05
    scalings: Literal["boundary", "edm"] = "boundary"
    distance: Literal["per_sample", "elementwise"] = "per_sample"
    distill: ctm.DistillConfig = ctm.DistillConfig(alpha=-1.0, beta=-1.0, sigma=-1.0)
    teacher_ckpt: str = ""
    reward_ckpt: str = ""
    reward_aware_teacher: float = 0.0
    select_seeds: int = 0
    select_max_steps: int = 300

    def resolved(self) -> "TrainConfig":
        """Fill task defaults: run_dir, Table 9 weights."""
        task = get_task(self.task)
        if self.stage not in STAGES:
            raise RactdError(f"unknown stage {self.stage!r}; expected one of {', '.join(STAGES)}")
        d = self.distill
        w = task.weights
        distill = dataclasses.replace(
            d, alpha=w.alpha if d.alpha < 0 else d.alpha, beta=w.beta if d.beta < 0 else d.beta,
            sigma=w.sigma if d.sigma < 0 else d.sigma)
        from ractd.paths import runs_dir

        run_dir = self.run_dir or str(runs_dir() / task.name)
        return dataclasses.replace(self, distill=distill, run_dir=run_dir)

    def unet(self, task: Task) -> UNetConfig:
        name = {"cpu": task.cpu_preset, "paper": task.paper_preset}.get(self.preset, self.preset)
        return unet_preset(name)

    @property
    def stage_dir(self) -> Path:
        return Path(self.run_dir) / self.stage


@dataclasses.dataclass
class RunContext:
    """What a caller (CLI, test, Ray Train worker) injects into a training loop.

    report(metrics, checkpoint_path_or_None) is called on rank 0 every report_every steps and after each
    checkpoint; sync_grads(model) is called after every backward pass, where a distributed caller averages
    the gradients across workers (an all-reduce: DDP-equivalent, and it works for the student, whose loss calls
    the network several times per step, without DDP's forward bookkeeping).
    stop_at: end the loop after this step (simulates an interruption in tests).
    """

    device: str = "cpu"
    rank: int = 0
    world_size: int = 1
    report: Callable[[dict, Path | None], None] | None = None
    sync_grads: Callable[[nn.Module], None] | None = None
    progress: bool = True
    stop_at: int | None = None


# ------------------------------------------------------------------------------------------------ data

@dataclasses.dataclass
class Prepared:
    """Normalized training arrays of one task (numpy, float32) and their normalizers.

    locomotion: x (N, c, act_dim) actions, cond (N, h * obs_dim), state (N, obs_dim), action (N, act_dim),
        rtg (N,). maze: x is a LazyWindows (N, H, obs_dim) of normalized states; cond (N, 2 * obs_dim).
    """

    task: Task
    x: object
    cond: np.ndarray
    normalizers: dict
    state: np.ndarray | None = None
    action: np.ndarray | None = None
    rtg: np.ndarray | None = None
    fingerprint: str = ""

    @property
    def shape_tail(self) -> tuple[int, int]:
        return tuple(self.x.shape[1:])


def dataset_fingerprint(data: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in ("observations", "actions", "rewards"):
        arr = np.ascontiguousarray(data[key])
        h.update(key.encode())
        h.update(str(arr.shape).encode())
        h.update(arr[:: max(1, len(arr) // 4096)].tobytes())
    return h.hexdigest()[:16]


def prepare(cfg: TrainConfig, data: dict | None = None) -> Prepared:
    """Load the dataset (unless given), build windows, fit normalizers to [-1, 1], normalize."""
    from ractd.data.d4rl import load_dataset
    from ractd.data.windows import Normalizer, locomotion_windows, maze_windows, rtg_settings

    task = get_task(cfg.task)
    if data is None:
        data = load_dataset(task, source=cfg.source, scale=cfg.scale)
    fp = dataset_fingerprint(data)
    if task.kind == "locomotion":
        gamma, penalty = rtg_settings(task, paper=cfg.rtg == "paper")
        w = locomotion_windows(data, horizon=task.horizon, obs_history=cfg.obs_history, gamma=gamma,
                               termination_penalty=penalty)
        norm = {"obs": Normalizer.fit(data["observations"]), "action": Normalizer.fit(data["actions"]),
                "rtg": Normalizer.fit(w["rtg"][:, None])}
        x = norm["action"].normalize(w["actions"]).astype(np.float32)
        obs = norm["obs"].normalize(w["obs"]).astype(np.float32)
        return Prepared(task, x, obs.reshape(len(obs), -1), norm,
                        state=norm["obs"].normalize(w["first_obs"]).astype(np.float32),
                        action=norm["action"].normalize(w["first_action"]).astype(np.float32),
                        rtg=norm["rtg"].normalize(w["rtg"][:, None])[:, 0].astype(np.float32), fingerprint=fp)
    norm = {"obs": Normalizer.fit(data["observations"])}
    observations = norm["obs"].normalize(np.asarray(data["observations"], np.float32)).astype(np.float32)
    w = maze_windows({**data, "observations": observations}, horizon=task.horizon,
                     goal_xy=_normalized_goal(norm["obs"], data))
    cond = np.concatenate([w["start"], w["goal"]], axis=1)
    return Prepared(task, w["states"], cond, norm, fingerprint=fp)


def _normalized_goal(obs_norm, data):
    """maze_windows segments at the evaluation goal; it compares positions, so normalize the goal's xy."""
    goal = data.get("metadata/eval_goal")
    if goal is None:
        return None
    full = np.zeros((1, obs_norm.dim), np.float32)
    full[0, :2] = np.asarray(goal, np.float32)[:2]
    return obs_norm.normalize(full)[0, :2]


# ------------------------------------------------------------------------------------------------ models

def build_teacher(cfg: TrainConfig, prep: Prepared) -> edm.Denoiser:
    tail = prep.shape_tail
    net = ConditionalUnet1D(tail[1], prep.cond.shape[1], cfg.unet(prep.task))
    return edm.Denoiser(net, scalings=cfg.scalings)


def build_ddpm(cfg: TrainConfig, prep: Prepared) -> ddpm.EpsModel:
    return ddpm.EpsModel(ConditionalUnet1D(prep.shape_tail[1], prep.cond.shape[1], cfg.unet(prep.task)))


def build_student(cfg: TrainConfig, prep: Prepared) -> ctm.Student:
    return ctm.Student(ConditionalUnet1D(prep.shape_tail[1], prep.cond.shape[1], cfg.unet(prep.task), n_times=2))


def build_reward(cfg: TrainConfig, prep: Prepared) -> ResidualMLP:
    if prep.state is None:
        raise RactdError(f"{prep.task.name}: the reward model is for locomotion tasks (maze2d uses sigma = 0)")
    return ResidualMLP(prep.state.shape[1], prep.action.shape[1], cfg.reward_hidden, bounded=cfg.reward_bounded)


BUILDERS = {"reward": build_reward, "teacher": build_teacher, "ddpm": build_ddpm, "student": build_student}


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
    from ractd.data.windows import Normalizer

    norms = {k: Normalizer.from_state_dict(v) for k, v in ck["normalizers"].items()}
    return Prepared(task, x, cond, norms, state=state, action=action)


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


def _to_torch(a, idx, device):
    return torch.from_numpy(np.ascontiguousarray(a[idx])).to(device)


def train(cfg: TrainConfig, ctx: RunContext | None = None, data: dict | None = None,
          prep: Prepared | None = None) -> dict:
    """Run one stage to cfg.steps (resuming from run_dir/<stage>/checkpoint.pt if present).

    Returns {"checkpoint": path of the latest checkpoint, "best": path of best.pt, "metrics": last metrics}.
    """
    ctx = ctx or RunContext()
    cfg = cfg.resolved()
    device = torch.device(ctx.device)
    prep = prep or prepare(cfg, data)
    stage_dir = cfg.stage_dir
    ckpt_path, best_path = stage_dir / "checkpoint.pt", stage_dir / "best.pt"

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = BUILDERS[cfg.stage](cfg, prep).to(device)
    teacher = reward_model = None
    if cfg.stage == "student":
        teacher, _, _ = load_stage_model(Path(cfg.teacher_ckpt or Path(cfg.run_dir) / "teacher" / "best.pt"), prep)
        teacher = teacher.to(device)
        load_teacher_into_student(model.net, teacher.net)  # new s pathway zero-initialised
    if (cfg.stage == "student" and cfg.distill.sigma > 0) or (cfg.stage == "teacher" and cfg.reward_aware_teacher > 0):
        reward_model, _, _ = load_stage_model(Path(cfg.reward_ckpt or Path(cfg.run_dir) / "reward" / "best.pt"), prep)
        reward_model = reward_model.to(device)

    ema = copy.deepcopy(model).requires_grad_(False) if cfg.stage in ("teacher", "ddpm") else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.95, 0.999), weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + ctx.rank)
    torch.manual_seed(cfg.seed * 1000 + ctx.rank)
    n = len(prep.cond)
    if cfg.stage == "reward":  # hold out a validation split for model selection
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).numpy()
        n_val = max(1, int(cfg.val_fraction * n))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
    else:
        train_idx, val_idx = np.arange(n), None

    step, best = 0, math.inf
    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if ck["config"] != to_dict(cfg):
            raise RactdError(f"{ckpt_path} was written with a different config; use another --run-dir to start anew")
        model.load_state_dict(ck["model"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["rng"]["data"])
        torch.set_rng_state(ck["rng"]["torch"])
        step, best = ck["step"], ck["best"]
        log.info("resumed %s at step %d", ckpt_path, step)

    shapes = {"x": list(prep.shape_tail), "cond": int(prep.cond.shape[1]),
              "state": None if prep.state is None else int(prep.state.shape[1]),
              "action": None if prep.action is None else int(prep.action.shape[1])}
    meta = {"versions": _versions(), "dataset_fingerprint": prep.fingerprint}

    def checkpoint_payload():
        return {"config": to_dict(cfg), "model": model.state_dict(), "ema": None if ema is None else ema.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "best": best,
                "normalizers": {k: v.state_dict() for k, v in prep.normalizers.items()}, "shapes": shapes,
                "rng": {"data": gen.get_state(), "torch": torch.get_rng_state()}, "meta": meta}

    metrics: dict = {}
    sums: dict[str, float] = {}
    count = 0
    bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.task} {cfg.stage}", disable=not ctx.progress or ctx.rank != 0)
    t0 = time.perf_counter()
    last_ckpt = None
    while step < cfg.steps and (ctx.stop_at is None or step < ctx.stop_at):
        idx = train_idx[torch.randint(0, len(train_idx), (cfg.batch,), generator=gen).numpy()]
        terms = _loss_terms(cfg, model, teacher, reward_model, prep, idx, device)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if ctx.sync_grads:
            ctx.sync_grads(model)
        opt.step()
        sched.step()
        if ema is not None:
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - cfg.ema_decay)
        step += 1
        bar.update(1)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        count += 1
        at_ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps
        if step % cfg.report_every == 0 or at_ckpt:
            metrics = {k: v / count for k, v in sums.items()}
            metrics.update(step=step, lr=sched.get_last_lr()[0], steps_per_s=count / (time.perf_counter() - t0))
            sums, count, t0 = {}, 0, time.perf_counter()
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "ctm", "dsm", "reward")})
        if at_ckpt:
            if val_idx is not None:
                metrics["val_loss"] = _reward_val_loss(model, prep, val_idx, device)
            if cfg.stage == "student" and cfg.select_seeds > 0 and ctx.rank == 0:
                metrics["select_score"] = _quick_eval(cfg, model, prep)
                score = -metrics["select_score"]
            else:
                score = metrics.get("val_loss", metrics.get("loss", math.inf))
            if ctx.rank == 0:
                improved = score <= best or not best_path.exists()
                best = min(best, score)
                last_ckpt = save_checkpoint(ckpt_path, checkpoint_payload())
                if improved:  # best.pt is the latest checkpoint at its best score; copy, don't re-serialize
                    copy_checkpoint(ckpt_path, best_path)
                with open(stage_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if ctx.report:
                    ctx.report(dict(metrics), last_ckpt)
        elif ctx.report and ctx.rank == 0 and step % cfg.report_every == 0:
            ctx.report(dict(metrics), None)
    bar.close()
    return {"checkpoint": ckpt_path, "best": best_path, "metrics": metrics, "step": step}


def _loss_terms(cfg: TrainConfig, model, teacher, reward_model, prep: Prepared, idx, device) -> dict:
    if cfg.stage == "reward":
        pred = model(_to_torch(prep.state, idx, device), _to_torch(prep.action, idx, device))
        return {"loss": (pred - _to_torch(prep.rtg, idx, device)).pow(2).mean()}
    cond = _to_torch(prep.cond, idx, device)
    x0 = _to_torch(prep.x, idx, device)
    if cfg.stage == "teacher":
        loss = edm.edm_loss(model, x0, cond, distance=cfg.distance).mean()  # Eq. (4)
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
    return ctm.ractd_loss(model, teacher, reward_model, x0, cond, state, cfg.distill)  # Eq. (9)


def _quick_eval(cfg: TrainConfig, student: ctm.Student, prep: Prepared) -> float:
    """Mean normalized score of the one-step student on cfg.select_seeds short rollouts."""
    from ractd.policy import LocomotionPolicy, MazePlanner, student_sampler
    from ractd.rollout import rollout_locomotion, rollout_maze

    was_training = student.training
    student.eval()
    try:
        sampler = student_sampler(student, prep.shape_tail, n_steps=1, init_scaled=cfg.distill.init_scaled)
        seeds = list(range(10_000, 10_000 + cfg.select_seeds))
        if prep.task.kind == "locomotion":
            policy = LocomotionPolicy(sampler, prep.normalizers["obs"], prep.normalizers["action"], cfg.obs_history)
            records = rollout_locomotion(prep.task, policy, seeds, max_steps=cfg.select_max_steps, progress=False)
        else:
            planner = MazePlanner(sampler, prep.normalizers["obs"], prep.shape_tail[0])
            records = rollout_maze(prep.task, planner, seeds, max_steps=cfg.select_max_steps, progress=False)
    finally:
        student.train(was_training)
    return float(np.mean([r["normalized_score"] for r in records]))


@torch.no_grad()
def _reward_val_loss(model, prep: Prepared, val_idx, device, chunk: int = 65536) -> float:
    total = 0.0
    for i in range(0, len(val_idx), chunk):
        idx = val_idx[i:i + chunk]
        pred = model(_to_torch(prep.state, idx, device), _to_torch(prep.action, idx, device))
        total += float((pred - _to_torch(prep.rtg, idx, device)).pow(2).sum())
    return total / len(val_idx)
