"""The configuration of one training stage: `TrainConfig` (a frozen dataclass; the CLI's flags are generated from
its fields), the stages' budgets (`BUDGETS`: cpu | quick | paper) and the fields a resumed run may change
(`RESUMABLE_FIELDS`). ractd.train runs a stage from it; ractd.train re-exports these names.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

from ractd import RactdError, ctm
from ractd.config import UNetConfig, unet_preset
from ractd.tasks import Task, get_task

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
    holdout: the share of the dataset's episodes (maze2d: its segments) held out of training whole (ractd.holdout:
        windows of one episode overlap, so a split of windows leaks); at every checkpoint the stage's loss on
        them is logged as val_loss (teacher and DDPM: of the EMA weights, at fixed noise levels and draws) and
        selects best.pt where a loss selects it (not BC, not a student with select_seeds); the reward model
        validates on them instead of val_fraction. The same episodes for every stage, seed and data_fraction.
        0 = off.
    holdout_windows: the diffusion stages measure their held-out loss on this many held-out windows (a fixed
        random subset; all where fewer), each at ractd.holdout.N_LEVELS noise levels: the cost of a checkpoint.
    data_fraction: train on this share of the episodes not held out, the first ones of a fixed permutation, so a
        smaller share is a subset of a larger one (study ractd_repro.studies.learning_curves); 1 = all.
    scalings: preconditioning, boundary | edm (the student always uses its teacher's).
    distance: Eq. (4) pseudo-Huber form: per_sample (iCT; default) | elementwise (released code).
    weighting: Eq. (4) weight: none (the paper's Eq. (4) as printed; default) | lambda (EDM's lambda(sigma), the
        released code with elementwise) | sqrt_lambda. The default pair (none, per_sample) was chosen by
        measurement (study ractd_repro.studies.eq4_forms, store docs/results/eq4/; docs/design.md).
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
    bc_top_fraction: BC on the trajectories with the best returns only (ractd.bc.best_trajectories); 1 = all
        (BC), 0.1 = CORL's "10% BC", the return-aware baseline of mixed-quality data.
    bc_goal: maze2d BC's goal (ractd.bc.bc_goals): hindsight (default: the position horizon - 1 steps later,
        the information the planner is trained on) | controller (the data controller's target, infos/goal, which
        the planner never sees).
    accel: how the training step runs (ractd.accel; every choice uses the fused optimizer where torch has one and
        the student's stacked calls): auto (resolved at setup: "gemm" where a calibration measures a U-Net
        convolution faster as one matrix product on this CPU, else "nhwc" where the whole U-Net measures faster
        in that layout, else "eager"; on CPU the Mish form is measured too) | eager (native convolutions, ncl) |
        gemm (the measured-faster layers as matrix products) | nhwc (CPU: activations channels-last, 2D
        convolutions, Mish from one exp) | compile (torch.compile of the U-Nets; its compilation takes minutes,
        bench/bench_training.py prints after how many steps it pays). The checkpoint's config records the
        resolved name, its meta the layers, forms and measurements; the same math up to rounding.
    autocast: the forward pass's precision: auto (bf16 where the device multiplies bf16 in hardware: CUDA,
        or a CPU with AMX-BF16 / AVX512-BF16; fp32 elsewhere) | fp32 | bf16 (torch.autocast; weights, optimizer
        and EMA stay fp32). bf16 changes the numbers, not only their rounding. Recorded resolved.
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
    holdout: float = 0.0
    holdout_windows: int = 512
    data_fraction: float = 1.0
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
    bc_top_fraction: float = 1.0
    bc_goal: Literal["hindsight", "controller"] = "hindsight"
    accel: Literal["auto", "eager", "gemm", "nhwc", "compile"] = "auto"
    autocast: Literal["auto", "fp32", "bf16"] = "auto"

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
        for name in ("steps", "batch", "ckpt_every", "report_every", "obs_history", "holdout_windows"):
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
        if not 0 <= self.holdout < 1:
            bad("holdout", self.holdout, "must be in [0, 1)")
        if not 0 < self.data_fraction <= 1:
            bad("data_fraction", self.data_fraction, "must be in (0, 1]")
        if self.scale not in SCALES:
            bad("scale", self.scale, f"expected one of {', '.join(SCALES)}")
        if self.source not in ("auto", "d4rl", "local", "minari"):
            bad("source", self.source, "expected one of auto, d4rl, local, minari")
        for name, allowed in (("rtg", ("paper", "code")), ("scalings", ("boundary", "edm")),
                              ("distance", ("per_sample", "elementwise")),
                              ("weighting", ("lambda", "sqrt_lambda", "none")),
                              ("accel", ("auto", "eager", "gemm", "nhwc", "compile")),
                              ("autocast", ("auto", "fp32", "bf16"))):
            if getattr(self, name) not in allowed:
                bad(name, getattr(self, name), f"expected one of {', '.join(allowed)}")
        if not 0.0 < self.bc_top_fraction <= 1.0:
            bad("bc_top_fraction", self.bc_top_fraction, "must be in (0, 1]")
        if self.bc_goal not in ("hindsight", "controller"):
            bad("bc_goal", self.bc_goal, "expected one of hindsight, controller")
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


# Training budgets per stage: "cpu" (CPU scale), "quick" (the README's first command, sized for 2 CPUs),
# "paper" (released code: teacher batch 1024, student batch 4800; paper network sizes).
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
# more steps, other selection or checkpoint cadence, the same upstream checkpoints at another path, another
# machine's resolution of accel / autocast: the checkpoint's meta keeps the history of how its steps ran).
RESUMABLE_FIELDS = frozenset({"run_dir", "steps", "ckpt_every", "report_every", "teacher_ckpt", "reward_ckpt",
                              "select_seeds", "select_max_steps", "source", "accel", "autocast"})
