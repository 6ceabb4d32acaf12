"""The three decoupled trainings of RACTD as plain loops: reward model, teacher (EDM; or the DDPM baseline),
and reward-aware distillation of the CTM student; and the behavior cloning baseline (stage "bc", CORL's recipe:
`build_bc`, `prepare_bc`).

Each `train(cfg, ctx)` call runs one stage. Everything a Ray Train worker needs is in `RunContext`: the
device, rank / world size (only rank 0 writes files), gradient and metric all-reduce hooks, a checkpoint to
resume from, and a `report(metrics, checkpoint_dir)` callback called on every rank every `report_every` steps
and at each checkpoint. The library itself never imports Ray (ractd_ray/ adapts this loop to Ray Train).
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
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ractd import RactdError, __version__, ctm, ddpm, edm
from ractd.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint
from ractd.config import UNetConfig, from_dict, to_dict, unet_preset
from ractd.nets.mlp import BCActor, ResidualMLP
from ractd.nets.unet1d import ConditionalUnet1D, load_teacher_into_student
from ractd.tasks import Task, get_task

log = logging.getLogger(__name__)

Stage = Literal["reward", "teacher", "ddpm", "student", "bc"]
STAGES = ("reward", "teacher", "ddpm", "student", "bc")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training stage. The defaults here are the CPU-scale teacher; `TrainConfig.for_stage(stage, budget)`
    applies a stage's budget (BUDGETS: cpu | quick | paper). The CLI is generated from these fields.

    task: registry name, e.g. hopper-medium-replay or maze2d-umaze.
    stage: reward | teacher | ddpm | student | bc (behavior cloning baseline).
    run_dir: where the run lives ("" = <cache>/runs/<task>); reusing it resumes.
    preset: U-Net preset name, "cpu" (the task's CPU preset) or "paper" (the task's paper preset).
    source: dataset source: auto | d4rl | local | minari.
    scale: scale of a locally generated dataset: tiny | small | full.
    steps: optimizer steps (extending it on resume is allowed).
    batch: global batch size (each of N workers draws batch / N samples).
    lr: AdamW learning rate (betas 0.95, 0.999; released code); bc: Adam at a constant rate (CORL).
    warmup: linear warm-up steps before the cosine decay.
    ema_decay: maximum EMA decay of the teacher / DDPM weights used for evaluation.
    ema_power: EMA warm-up: decay at step k is min(ema_decay, 1 - (1 + k)^-ema_power) (diffusion_policy's
        EMAModel schedule), so the EMA is not dominated by the random initialisation early in training.
    ckpt_every: checkpoint (and model selection) every this many steps.
    report_every: log metrics every this many steps.
    seed: everything random derives from it (and the worker rank).
    obs_history: h, past states in the conditioning (locomotion).
    rtg: return-to-go target: "paper" (task gamma, -100 termination penalty) or "code" (gamma 0.99, no penalty).
    reward_hidden: reward model layer widths.
    reward_bounded: tanh-bounded reward model output.
    val_fraction: reward model validation split (model selection by validation loss).
    scalings: preconditioning, boundary | edm (the student always uses its teacher's).
    distance: Eq. (4) pseudo-Huber form: per_sample (iCT; default) | elementwise (released code).
    weighting: Eq. (4) weight: none (the paper's Eq. (4) as printed; default) | lambda (EDM's lambda(sigma), the
        released code with elementwise) | sqrt_lambda. The default pair (none, per_sample) was chosen by
        measurement (bench/eq4_forms.py; edm.edm_loss gives the numbers).
    distill: Eq. (5)-(9) options; alpha/beta/sigma < 0 mean "the task's Table 9 value".
    teacher_ckpt: teacher checkpoint to distill from ("" = <run_dir>/teacher/best.pt).
    reward_ckpt: reward model checkpoint ("" = <run_dir>/reward/best.pt).
    reward_aware_teacher: ablation (Tables 4, 10): weight of L_Reward of the teacher's one-step denoised first
        action added to Eq. (4) while training the teacher.
    select_seeds: online model selection of the student, as the paper does: at every checkpoint roll the one-step
        student out on this many seeds (10000, 10001, ...: disjoint from the evaluation seeds); best.pt keeps the
        highest mean normalized score. 0 = select by training loss (reward model: by validation loss; BC
        keeps its final checkpoint, CORL's convention). 10 by
        default: fewer seeds rank checkpoints by noise (a one-step student's episode scores spread by tens of
        points), so best.pt would not be the checkpoint the 100-seed table ranks first.
    select_max_steps: env steps of each model-selection rollout; 0 = the task's full episode length, the
        episodes the tables report (a 300-step hopper episode does not rank 1000-step behaviour).
    bc_hidden: behavior cloning MLP widths (CORL: 2 x 256, ReLU).
    """

    task: str = "hopper-medium-replay"
    stage: Stage = "teacher"
    run_dir: str = ""
    preset: str = "cpu"
    source: str = "auto"
    scale: str = "small"
    steps: int = 3000
    batch: int = 256
    lr: float = 3e-4
    warmup: int = 100
    ema_decay: float = 0.999
    ema_power: float = 0.75
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
    weighting: Literal["lambda", "sqrt_lambda", "none"] = "none"
    distill: ctm.DistillConfig = ctm.DistillConfig(alpha=-1.0, beta=-1.0, sigma=-1.0)
    teacher_ckpt: str = ""
    reward_ckpt: str = ""
    reward_aware_teacher: float = 0.0
    select_seeds: int = 10
    select_max_steps: int = 0
    bc_hidden: tuple[int, ...] = (256, 256)

    @classmethod
    def for_stage(cls, stage: str, budget: str = "cpu", **overrides) -> "TrainConfig":
        """The config of one stage at a budget (BUDGETS), then `overrides` (field names of TrainConfig)."""
        if budget not in BUDGETS:
            raise RactdError(f"unknown budget {budget!r}; expected one of {', '.join(BUDGETS)}")
        if stage not in STAGES:
            raise RactdError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        kw = {**BUDGETS[budget][stage], **overrides}
        kw["ckpt_every"] = min(kw.get("ckpt_every", cls.ckpt_every), kw.get("steps", cls.steps))
        return cls(stage=stage, **kw)

    def validate(self) -> "TrainConfig":
        """Check every field up front; a bad value raises RactdError with one line naming it."""
        from ractd.tasks import SCALES

        def bad(name, value, why):
            raise RactdError(f"{name}={value!r}: {why}")

        get_task(self.task)
        if self.stage not in STAGES:
            bad("stage", self.stage, f"expected one of {', '.join(STAGES)}")
        for name in ("steps", "batch", "ckpt_every", "report_every", "obs_history"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, getattr(self, name), "must be a positive integer")
        for name in ("warmup", "select_seeds", "select_max_steps", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, getattr(self, name), "must be a non-negative integer")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", self.lr, "must be a positive finite number")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", self.ema_decay, "must be in [0, 1)")
        if not (math.isfinite(self.ema_power) and self.ema_power > 0):
            bad("ema_power", self.ema_power, "must be positive")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", self.val_fraction, "must be in (0, 1)")
        if self.scale not in SCALES:
            bad("scale", self.scale, f"expected one of {', '.join(SCALES)}")
        if self.source not in ("auto", "d4rl", "local", "minari"):
            bad("source", self.source, "expected one of auto, d4rl, local, minari")
        for name, allowed in (("rtg", ("paper", "code")), ("scalings", ("boundary", "edm")),
                              ("distance", ("per_sample", "elementwise")),
                              ("weighting", ("lambda", "sqrt_lambda", "none"))):
            if getattr(self, name) not in allowed:
                bad(name, getattr(self, name), f"expected one of {', '.join(allowed)}")
        for name in ("reward_hidden", "bc_hidden"):
            v = getattr(self, name)
            if not v or any(not isinstance(h, int) or h < 1 for h in v):
                bad(name, v, "must be positive integers")
        if not (math.isfinite(self.reward_aware_teacher) and self.reward_aware_teacher >= 0):
            bad("reward_aware_teacher", self.reward_aware_teacher, "must be >= 0")
        d = self.distill
        for name in ("alpha", "beta", "sigma", "dsm_top_fraction"):
            v = getattr(d, name)
            if not math.isfinite(v):
                bad(name, v, "must be finite")
        if not 0 <= d.term_decay < 1:
            bad("term_decay", d.term_decay, "must be in [0, 1)")
        if not (isinstance(d.term_every, int) and d.term_every >= 1):
            bad("term_every", d.term_every, "must be a positive integer")
        if not 0 < d.dsm_top_fraction <= 1:
            bad("dsm_top_fraction", d.dsm_top_fraction, "must be in (0, 1]")
        if d.n_bins < 2:
            bad("n_bins", d.n_bins, "must be >= 2")
        for name, allowed in (("reward_variant", ("one_step", "ctm")), ("dsm_form", ("jump", "denoiser")),
                              ("distance", ("per_sample", "elementwise")),
                              ("dsm_weighting", ("lambda", "sqrt_lambda", "none")),
                              ("term_scale", ("raw", "balanced", "gradient"))):
            if getattr(d, name) not in allowed:
                bad(name, getattr(d, name), f"expected one of {', '.join(allowed)}")
        return self

    def resolved(self) -> "TrainConfig":
        """Validate, then fill task defaults: run_dir, Table 9 weights."""
        self.validate()
        task = get_task(self.task)
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


# Training budgets per stage: "cpu" (CPU scale), "quick" (the README's first command: measured on 2 CPUs, see
# README), "paper" (released code: teacher batch 1024, student batch 4800; paper network sizes).
BUDGETS: dict[str, dict[str, dict]] = {
    "cpu": {
        "reward": dict(steps=3000, batch=256, lr=3e-4),
        "teacher": dict(steps=3000, batch=256, lr=3e-4),
        "ddpm": dict(steps=3000, batch=256, lr=3e-4),
        "student": dict(steps=2000, batch=256, lr=1e-4),
        # CORL's BC runs 1M steps (paper budget). On CPU the 2 x 256 MLP takes 2-5 ms a step at batch 256: 20k
        # steps took 2.5 min on the shared 2-CPU machine under load (maze2d-umaze small: 150.7 +- 3.0 normalized on
        # 100 seeds); a known linear policy is learned within 1k steps (tests/test_bc.py)
        "bc": dict(steps=20_000, batch=256, lr=3e-4, warmup=0, ckpt_every=2000),
    },
    "quick": {
        "reward": dict(steps=500, batch=256, lr=3e-4),
        "teacher": dict(steps=1200, batch=64, lr=3e-4),
        "ddpm": dict(steps=1200, batch=64, lr=3e-4),
        # 2 selection seeds: the quick budget is a smoke run (one or two checkpoints), not a ranking
        "student": dict(steps=150, batch=64, lr=1e-4, select_seeds=2),
        "bc": dict(steps=3000, batch=256, lr=3e-4, warmup=0, ckpt_every=1000),
    },
    "paper": {
        "reward": dict(steps=200_000, batch=1024, lr=3e-4, preset="paper"),
        "teacher": dict(steps=400_000, batch=1024, lr=1e-4, warmup=500, preset="paper"),
        "ddpm": dict(steps=400_000, batch=1024, lr=1e-4, warmup=500, preset="paper"),
        "student": dict(steps=200_000, batch=4800, lr=1e-4, warmup=500, preset="paper"),
        "bc": dict(steps=1_000_000, batch=256, lr=3e-4, warmup=0, ckpt_every=50_000),  # CORL's BC defaults
    },
}

# Fields that do not define a run: they may differ when a run resumes (a restored Ray trial in another folder,
# more steps, other selection or checkpoint cadence, the same upstream checkpoints at another path).
RESUMABLE_FIELDS = frozenset({"run_dir", "steps", "ckpt_every", "report_every", "teacher_ckpt", "reward_ckpt",
                              "select_seeds", "select_max_steps", "source"})


def ema_decay_at(step: int, max_decay: float, power: float) -> float:
    """EMA decay after `step` optimizer steps (1-based): 0 at step 1, rising as 1 - (1 + step)^-power, capped
    at max_decay (the warm-up schedule of diffusion_policy's EMAModel with inv_gamma = 1)."""
    if step <= 1:
        return 0.0
    return min(max_decay, 1.0 - (1.0 + step) ** -power)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters and floating buffers."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        if b.is_floating_point():
            b_ema.lerp_(b, 1.0 - decay)


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


def prepare(cfg: TrainConfig, data: dict | None = None, norms: dict | None = None) -> Prepared:
    """Load the dataset (unless given), build windows, fit normalizers to [-1, 1] (unless `norms`, e.g. a
    checkpoint's, are given: held-out data in a trained model's coordinates), normalize."""
    from ractd.data.d4rl import load_dataset
    from ractd.data.windows import Normalizer, locomotion_windows, maze_windows, rtg_settings

    task = get_task(cfg.task)
    if data is None:
        data = load_dataset(task, source=cfg.source, scale=cfg.scale)
    fp = dataset_fingerprint(data)
    if cfg.stage == "bc":
        return prepare_bc(task, data, fp)
    if task.kind == "locomotion":
        gamma, penalty = rtg_settings(task, paper=cfg.rtg == "paper")
        w = locomotion_windows(data, horizon=task.horizon, obs_history=cfg.obs_history, gamma=gamma,
                               termination_penalty=penalty)
        norm = norms or {"obs": Normalizer.fit(data["observations"]), "action": Normalizer.fit(data["actions"]),
                         "rtg": Normalizer.fit(w["rtg"][:, None])}
        x = norm["action"].normalize(w["actions"]).astype(np.float32)
        obs = norm["obs"].normalize(w["obs"]).astype(np.float32)
        return Prepared(task, x, obs.reshape(len(obs), -1), norm,
                        state=norm["obs"].normalize(w["first_obs"]).astype(np.float32),
                        action=norm["action"].normalize(w["first_action"]).astype(np.float32),
                        rtg=norm["rtg"].normalize(w["rtg"][:, None])[:, 0].astype(np.float32), fingerprint=fp)
    norm = norms or {"obs": Normalizer.fit(data["observations"])}
    observations = norm["obs"].normalize(np.asarray(data["observations"], np.float32)).astype(np.float32)
    w = maze_windows({**data, "observations": observations}, horizon=task.horizon,
                     goal_xy=_normalized_goal(norm["obs"], data))
    cond = np.concatenate([w["start"], w["goal"]], axis=1)
    return Prepared(task, w["states"], cond, norm, fingerprint=fp)


def bc_goals(data: dict) -> np.ndarray:
    """(N, 2) goal of every maze2d transition for goal-conditioned BC: the goal the data's controller was steering
    to (infos/goal, D4RL's maze2d files and ours have it), else in hindsight the position of the episode's last
    state (episodes split on terminals | timeouts, ractd.data.windows)."""
    from ractd.data.windows import episode_bounds

    if "infos/goal" in data:
        return np.asarray(data["infos/goal"], np.float32)[:, :2]
    obs = np.asarray(data["observations"], np.float32)
    goals = np.empty((len(obs), 2), np.float32)
    for s, e in episode_bounds(data["terminals"], data["timeouts"]):
        goals[s:e] = obs[e - 1, :2]
    return goals


def prepare_bc(task: Task, data: dict, fingerprint: str = "") -> Prepared:
    """Behavior cloning pairs, one per dataset transition: x (N, act_dim) normalized actions, cond (N, in_dim).

    locomotion: cond = normalize(s) (obs_dim). maze2d (goal-conditioned, like the planner): cond =
    concat(normalize(s), normalize([gx, gy, 0, 0])) (2 * obs_dim) with g = `bc_goals(data)`; at evaluation g is
    the fixed evaluation goal (ractd.policy.BCGoalPolicy). Normalizers "obs" and "action" are fitted on the whole
    dataset, as `prepare` fits them for the diffusion models."""
    from ractd.data.windows import Normalizer

    obs = np.asarray(data["observations"], np.float32)
    act = np.asarray(data["actions"], np.float32)
    norm = {"obs": Normalizer.fit(obs), "action": Normalizer.fit(act)}
    cond = norm["obs"].normalize(obs)
    if task.kind == "maze":
        goal = np.zeros_like(obs)
        goal[:, :2] = bc_goals(data)
        cond = np.concatenate([cond, norm["obs"].normalize(goal)], axis=1)
    return Prepared(task, norm["action"].normalize(act).astype(np.float32), cond.astype(np.float32), norm,
                    fingerprint=fingerprint)


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
    net = ConditionalUnet1D(prep.shape_tail[1], prep.cond.shape[1], cfg.unet(prep.task), n_times=2)
    return ctm.Student(net, scalings=cfg.scalings)


def build_reward(cfg: TrainConfig, prep: Prepared) -> ResidualMLP:
    if prep.state is None:
        raise RactdError(f"{prep.task.name}: the reward model is for locomotion tasks (maze2d uses sigma = 0)")
    return ResidualMLP(prep.state.shape[1], prep.action.shape[1], cfg.reward_hidden, bounded=cfg.reward_bounded)


def build_bc(cfg: TrainConfig, prep: Prepared) -> BCActor:
    return BCActor(prep.cond.shape[1], prep.shape_tail[0], cfg.bc_hidden)


BUILDERS = {"reward": build_reward, "teacher": build_teacher, "ddpm": build_ddpm, "student": build_student,
            "bc": build_bc}


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


def _constant_lr(step: int) -> float:
    return 1.0


def _versions() -> dict:
    import gymnasium

    return {"ractd": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "gymnasium": gymnasium.__version__, "python": platform.python_version()}


def _to_torch(a, idx, device):
    return torch.from_numpy(np.ascontiguousarray(a[idx])).to(device)


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


def _stable_config(d: dict) -> dict:
    """The config fields a resumed run must share. A distill field a checkpoint predates reads as its default
    (each was added with the default being the behavior before it: term_scale "raw")."""
    out = {k: v for k, v in d.items() if k not in RESUMABLE_FIELDS}
    if isinstance(out.get("distill"), dict):
        out["distill"] = {**dataclasses.asdict(ctm.DistillConfig()), **out["distill"]}
    return out


def _finite_json(metrics: dict) -> str:
    """One JSON line; non-finite numbers become null (JSON has no NaN)."""
    clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
    return json.dumps(clean, allow_nan=False)


def train(cfg: TrainConfig, ctx: RunContext | None = None, data: dict | None = None,
          prep: Prepared | None = None) -> dict:
    """Run one stage to cfg.steps, resuming from ctx.resume_from or <run_dir>/<stage>/latest/checkpoint.pt.

    Returns {"checkpoint": path of the latest checkpoint, "best": path of best.pt, "metrics": last metrics,
    "step": the step reached}.
    """
    ctx = ctx or RunContext()
    cfg = cfg.resolved()
    if cfg.batch < ctx.world_size:
        raise RactdError(f"batch={cfg.batch} is smaller than the number of workers ({ctx.world_size})")
    device = torch.device(ctx.device)
    prep = prep or prepare(cfg, data)
    stage_dir = cfg.stage_dir
    ckpt_path, best_path = stage_dir / "latest" / "checkpoint.pt", stage_dir / "best.pt"

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
    # a CTD student (sigma = 0) still reports R_psi of its actions (distill_diagnostics) when the model is there
    if needs_reward or (cfg.stage == "student" and prep.state is not None and reward_path.is_file()):
        reward_model, _ = load_upstream(reward_path, "reward", cfg, prep)
        reward_model = reward_model.to(device)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = BUILDERS[cfg.stage](cfg, prep).to(device)
    if teacher is not None:
        load_teacher_into_student(model.net, teacher.net)  # new s pathway zero-initialised
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.stage in ("teacher", "ddpm") else None
    balance = ctm.TermBalance(cfg.distill.term_decay, cfg.distill.term_every) if cfg.stage == "student" else None
    if cfg.stage == "bc":  # CORL's BC: Adam (default betas), constant learning rate
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _constant_lr)
    else:
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
    if len(train_idx) == 0:
        raise RactdError(f"{cfg.task}: the dataset gives no training windows")

    step, best, last_select = 0, math.inf, None
    resume = Path(ctx.resume_from) if ctx.resume_from else ckpt_path
    if resume.is_file():
        ck = load_checkpoint(resume)
        if _stable_config(ck["config"]) != _stable_config(to_dict(cfg)):
            old, new = _stable_config(ck["config"]), _stable_config(to_dict(cfg))
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise RactdError(f"{resume} was written with a different config ({', '.join(diff)}); "
                             f"use another --run-dir to start anew")
        fp = ck.get("meta", {}).get("dataset_fingerprint")
        if fp != prep.fingerprint:
            raise RactdError(f"{resume} was trained on dataset {fp}, the dataset now is {prep.fingerprint}; "
                             f"use another --run-dir to start anew")
        model.load_state_dict(ck["model"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])  # keeps this run's lambda: more steps stretch the cosine
        step, best, last_select = ck["step"], ck["best"], ck.get("select_score")
        if balance is not None and ck.get("term_balance"):
            balance.load_state_dict(ck["term_balance"])
        if ctx.rank == 0:  # rank 0's streams were saved; other ranks start fresh streams keyed by the step
            gen.set_state(ck["rng"]["data"])
            torch.set_rng_state(ck["rng"]["torch"])
        else:
            gen.manual_seed(cfg.seed * 1000 + ctx.rank + 7919 * step)
            torch.manual_seed(cfg.seed * 1000 + ctx.rank + 7919 * step)
        log.info("resumed %s at step %d", resume, step)

    shapes = {"x": list(prep.shape_tail), "cond": int(prep.cond.shape[1]),
              "state": None if prep.state is None else int(prep.state.shape[1]),
              "action": None if prep.action is None else int(prep.action.shape[1])}
    meta = {"versions": _versions(), "dataset_fingerprint": prep.fingerprint, "world_size": ctx.world_size}

    def checkpoint_payload():
        return {"config": to_dict(cfg), "model": model.state_dict(), "ema": None if ema is None else ema.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "best": best,
                "select_score": last_select, "term_balance": None if balance is None else balance.state_dict(),
                "normalizers": {k: v.state_dict() for k, v in prep.normalizers.items()}, "shapes": shapes,
                "rng": {"data": gen.get_state(), "torch": torch.get_rng_state()}, "meta": meta}

    def reduce_mean(values: dict) -> dict:
        if ctx.all_reduce_sum is None or ctx.world_size == 1:
            return values
        keys = sorted(values)
        total = ctx.all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
        return {k: float(v) / ctx.world_size for k, v in zip(keys, total.tolist())}

    per_rank_batch = cfg.batch // ctx.world_size
    metrics: dict = {}
    sums: dict[str, float] = {}
    count = 0
    bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.task} {cfg.stage}", disable=not ctx.progress or ctx.rank != 0)
    t0 = time.perf_counter()
    while step < cfg.steps and (ctx.stop_at is None or step < ctx.stop_at):
        idx = train_idx[torch.randint(0, len(train_idx), (per_rank_batch,), generator=gen).numpy()]
        terms = _loss_terms(cfg, model, teacher, reward_model, prep, idx, device, balance)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if ctx.sync_grads:
            ctx.sync_grads(model)
        # the norm of the synchronized gradient is the same on every rank, so every rank stops together
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        loss_value = float(terms["loss"].detach())
        if not math.isfinite(float(grad_norm)) or (ctx.world_size == 1 and not math.isfinite(loss_value)):
            bar.close()
            kept = f"the last good checkpoint {ckpt_path} (step {step}) is kept" if ckpt_path.is_file() else \
                "no checkpoint was written"
            raise RactdError(f"{cfg.task} {cfg.stage}: non-finite loss ({loss_value}) or gradient norm "
                             f"({float(grad_norm)}) at step {step + 1}; stopped, {kept}; try a lower --lr")
        opt.step()
        sched.step()
        step += 1
        if ema is not None:
            ema_update(ema, model, ema_decay_at(step, cfg.ema_decay, cfg.ema_power))
        bar.update(1)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
        count += 1
        if ctx.on_step:
            ctx.on_step(step)
        at_ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps
        if not (step % cfg.report_every == 0 or at_ckpt):
            continue
        metrics = reduce_mean({k: v / count for k, v in sums.items()})
        metrics.update(step=step, lr=sched.get_last_lr()[0], steps_per_s=count / (time.perf_counter() - t0),
                       at_checkpoint=at_ckpt)
        if ema is not None:
            metrics["ema_decay"] = ema_decay_at(step, cfg.ema_decay, cfg.ema_power)
        sums, count = {}, 0
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "ctm", "dsm", "reward")})
        ckpt_dir = None
        if at_ckpt:
            if val_idx is not None:
                metrics["val_loss"] = _reward_val_loss(model, prep, val_idx, device)
            if cfg.stage == "student":
                metrics.update(distill_diagnostics(cfg, model, reward_model, prep, device))
            if cfg.stage == "student" and cfg.select_seeds > 0:
                last_select = _quick_eval(cfg, model, prep, ctx)
                score = -last_select
            elif cfg.stage == "bc":  # CORL reports BC's final policy: best.pt follows the latest checkpoint
                score = -float(step)  # (selecting by the training loss picked a policy at 1.1 beside 10.8 final)
            else:
                score = metrics.get("val_loss", metrics.get("loss", math.inf))
            if ctx.rank == 0:
                improved = math.isfinite(score) and score <= best
                best = min(best, score) if math.isfinite(score) else best
                save_checkpoint(ckpt_path, checkpoint_payload())
                copy_checkpoint(ckpt_path.parent / "config.json", stage_dir / "config.json")
                if improved:  # best.pt is the latest checkpoint at its best score; copy, don't re-serialize
                    copy_checkpoint(ckpt_path, best_path)
                ckpt_dir = ckpt_path.parent
        if last_select is not None:
            metrics["select_score"] = last_select
        if at_ckpt and ctx.rank == 0:
            with open(stage_dir / "metrics.jsonl", "a") as f:
                f.write(_finite_json(metrics) + "\n")
        if ctx.report:
            ctx.report(dict(metrics), ckpt_dir)
        t0 = time.perf_counter()
    bar.close()
    return {"checkpoint": ckpt_path, "best": best_path, "metrics": metrics, "step": step}


def _loss_terms(cfg: TrainConfig, model, teacher, reward_model, prep: Prepared, idx, device,
                balance: ctm.TermBalance | None = None) -> dict:
    if cfg.stage == "reward":
        pred = model(_to_torch(prep.state, idx, device), _to_torch(prep.action, idx, device))
        return {"loss": (pred - _to_torch(prep.rtg, idx, device)).pow(2).mean()}
    if cfg.stage == "bc":  # MSE on normalized actions (CORL's BC)
        pred = model(_to_torch(prep.cond, idx, device))
        return {"loss": (pred - _to_torch(prep.x, idx, device)).pow(2).mean()}
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


# the keys distill_diagnostics reports (besides the loss terms); sweeps and docs/results.md read these
DIAG_TERMS = ("at_bound", "out_of_range", "r_student", "r_data", "r_gap")


@torch.no_grad()
def distill_diagnostics(cfg: TrainConfig, student: ctm.Student, reward_model, prep: Prepared, device,
                        n: int = 512) -> dict:
    """What tells reward exploitation from undertraining, on a fixed sample of n dataset states (seeded, the
    same at every checkpoint): the one-step student's unclamped chunk x = G(x_T, T, sigma_min) and its first
    action a = x[:, 0].

    at_bound: share of elements of x at or beyond the clamp bound |x| >= 1 (normalized data range [-1, 1]).
    out_of_range: mean distance of x outside [-1, 1] (0 inside).
    r_student, r_data (locomotion, with a reward model): mean R_psi(s, clamp(a)) against R_psi(s, a_data) of the
        dataset's own action on the same states; r_gap = r_student - r_data.
    """
    g = torch.Generator().manual_seed(12345)
    idx = torch.randint(0, len(prep.cond), (min(n, len(prep.cond)),), generator=g).numpy()
    cond = _to_torch(prep.cond, idx, device)
    shape = (len(idx), *prep.shape_tail)
    x_T = edm.prior_sample(shape, scaled=cfg.distill.init_scaled, generator=g).to(device)
    was_training = student.training
    student.eval()
    try:
        x = ctm.one_step(student, x_T, cond)
    finally:
        student.train(was_training)
    out = {"at_bound": float((x.abs() >= 1.0).float().mean()),
           "out_of_range": float((x.abs() - 1.0).clamp(min=0).mean())}
    if reward_model is not None and prep.state is not None:
        state = _to_torch(prep.state, idx, device)
        r_student = float(reward_model(state, x[:, 0].clamp(-1, 1)).mean())
        r_data = float(reward_model(state, _to_torch(prep.action, idx, device)).mean())
        out.update(r_student=r_student, r_data=r_data, r_gap=r_student - r_data)
    return out


def term_gradient_norms(cfg: TrainConfig, student: ctm.Student, teacher, reward_model, prep: Prepared, device,
                        balance: ctm.TermBalance | None = None, batches: int = 4) -> dict:
    """Eq. (9)'s terms measured where they act: the norm of each weighted term's gradient on the student's
    parameters, averaged over `batches` seeded batches of cfg.batch windows (the same batches for every call).

    g_ctm, g_dsm, g_reward: ||grad(w * L_term)|| with the weights training applies (alpha, beta, sigma; under
    term_scale "balanced" alpha / m_ctm, beta / m_dsm, under "gradient" each weight over its term's running
    gradient norm, from `balance`); g_reward is 0 for sigma = 0, and g_reward_unit is the reward term's
    unweighted (locomotion with a reward model only; a_hat from one student step, the paper's variant).
    The student's requires_grad flags and the global torch RNG are restored.
    A term's logged value says little about its pull: the CTM term compares two student jumps that agree
    closely, so a small value can carry a large gradient.
    """
    d = cfg.distill
    w_ctm, w_dsm = d.alpha, d.beta
    w_rew = d.sigma
    if d.term_scale != "raw":
        need = {"ctm", "dsm"} | ({"reward"} if d.term_scale == "gradient" and d.sigma > 0 else set())
        if balance is None or not need <= set(balance.magnitude):
            raise ValueError(f"term_scale {d.term_scale!r} needs the run's TermBalance magnitudes")
        w_ctm, w_dsm = w_ctm / balance.magnitude["ctm"], w_dsm / balance.magnitude["dsm"]
        if d.term_scale == "gradient" and d.sigma > 0:
            w_rew = d.sigma / balance.magnitude["reward"]
    params = list(student.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    rng = torch.get_rng_state()
    sums: dict[str, float] = {}
    try:
        g = torch.Generator().manual_seed(2024)
        torch.manual_seed(2024)
        for _ in range(batches):
            idx = torch.randint(0, len(prep.cond), (cfg.batch,), generator=g).numpy()
            cond, x0 = _to_torch(prep.cond, idx, device), _to_torch(prep.x, idx, device)
            terms = {"ctm": w_ctm * ctm.ctm_loss(student, teacher, x0, cond, d)[0].mean(),
                     "dsm": w_dsm * ctm.dsm_loss(student, x0, cond, d).mean()}
            if reward_model is not None and prep.state is not None:
                x_T = edm.prior_sample(x0.shape, scaled=d.init_scaled, device=device, dtype=x0.dtype)
                a_hat = ctm.one_step(student, x_T, cond)[:, 0]
                terms["reward_unit"] = ctm.reward_loss(reward_model, _to_torch(prep.state, idx, device), a_hat,
                                                       clamp=d.reward_clamp).mean()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + ctm.grad_norm(value, params) / batches
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        torch.set_rng_state(rng)
    out = {"g_ctm": sums["ctm"], "g_dsm": sums["dsm"]}
    if "reward_unit" in sums:
        out.update(g_reward_unit=sums["reward_unit"], g_reward=w_rew * sums["reward_unit"])
    return out


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


@torch.no_grad()
def _reward_val_loss(model, prep: Prepared, val_idx, device, chunk: int = 65536) -> float:
    total = 0.0
    for i in range(0, len(val_idx), chunk):
        idx = val_idx[i:i + chunk]
        pred = model(_to_torch(prep.state, idx, device), _to_torch(prep.action, idx, device))
        total += float((pred - _to_torch(prep.rtg, idx, device)).pow(2).sum())
    return total / len(val_idx)
