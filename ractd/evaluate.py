"""Evaluate a trained checkpoint: build its sampler and policy, roll out seeds batched, store records.

`evaluate_checkpoint(EvalConfig(...))` is what `python -m ractd evaluate` runs; `policy_from_checkpoint` is what a
Ray actor calls once to hold a policy (no global state).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Literal, Sequence

from ractd import RactdError
from ractd.tasks import get_task

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation of one checkpoint (`python -m ractd evaluate`; the flags are generated from these fields).

    task: registry name. run_dir: run folder ("" = <cache>/runs/<task>).
    sampler: student | heun | euler | ddpm | ddim | bc (the behavior cloning baseline: closed loop; maze2d:
        conditioned on (state, evaluation goal) at every step, ractd.policy.BCGoalPolicy).
    checkpoint: checkpoint file ("" = <run_dir>/<stage>/best.pt of the sampler's stage).
    nfe: student steps (1-4) / DDPM or DDIM steps / Heun or Euler bins (0 = the sampler's default).
    seeds: number of seeds (episodes), rolled out batched.
    first_seed: the first seed; seeds first_seed, first_seed + 1, ...
    max_steps: cap on the episode length (0 = the task's).
    init_scaled: start noise x_T ~ N(0, sigma_max^2 I) (True) or N(0, I) (False, the released code).
    out: Parquet file ("" = <run_dir>/eval/<sampler>-<nfe>.parquet).
    engine: auto | eager | jit | gemm | openvino | none -- how the sampler runs its U-Net (ractd.engine): auto = the
        sampler's fixed noise levels folded in and, per live batch, the engine measured fastest on this machine
        (never one measured slower than eager; at fp32 the same numbers up to float rounding); eager / jit / gemm /
        openvino = that engine for every batch; none = the library models as they are (with accelerate /
        precision below).
    accelerate: none | jit (the library path: TorchScript-frozen networks called per step, the earlier fast path;
        jit implies engine none, and an explicit other engine with it is an error).
    precision: auto | fp32 | bf16. auto (default): bf16 engines on a CPU with AMX-BF16 for the student and
        Heun/Euler (ractd_repro.studies.bf16_scores: 100-seed scores moved by under half their SE), fp32
        elsewhere and for DDPM/DDIM, BC and the library path; the records store what ran. bf16 with engine none:
        the U-Net's weights in bf16 (to_precision).
    overlap: locomotion: step one half of the seeds' envs while the network acts for the other half (same
        records; off by default: bench/bench_inference.py measures whether it pays on a machine).
    tracker: maze2d: pd (Diffuser's PD rule) | inverse_dynamics (closed loop: observed state -> next waypoint) |
        inverse_dynamics_plan (open loop: consecutive planned states, paper Sec. 4.2); train the model with
        python -m ractd.inverse_dynamics TASK.
    inverse_dynamics: the inverse dynamics model file ("" = its default path for the task and scale).
    inpaint: maze2d: none | start (the plan's first state pinned to the given start on every clean estimate of
        the model, ractd.policy.StartPinned: Diffuser's conditioning; DDPM/DDIM and bc take none).
    """

    task: str = "hopper-medium-replay"
    run_dir: str = ""
    sampler: Literal["student", "heun", "euler", "ddpm", "ddim", "bc"] = "student"
    checkpoint: str = ""
    nfe: int = 0
    seeds: int = 10
    first_seed: int = 0
    max_steps: int = 0
    init_scaled: bool = True
    out: str = ""
    engine: Literal["auto", "eager", "jit", "gemm", "layers", "openvino", "none"] = "auto"
    accelerate: Literal["none", "jit"] = "none"
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    overlap: bool = False
    tracker: Literal["pd", "inverse_dynamics", "inverse_dynamics_plan"] = "pd"
    inverse_dynamics: str = ""
    inpaint: Literal["none", "start"] = "none"

    def validate(self) -> "EvalConfig":
        get_task(self.task)
        if self.sampler not in SAMPLER_STAGE:
            raise RactdError(f"sampler={self.sampler!r}: expected one of {', '.join(SAMPLER_STAGE)}")
        for name in ("seeds",):
            if getattr(self, name) < 1:
                raise RactdError(f"{name}={getattr(self, name)}: must be a positive integer")
        for name in ("nfe", "first_seed", "max_steps"):
            if getattr(self, name) < 0:
                raise RactdError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.sampler == "student" and self.nfe > 4:
            raise RactdError(f"nfe={self.nfe}: the student samples with 1 to 4 steps")
        if self.sampler in ("heun", "euler") and self.nfe == 1:
            raise RactdError(f"nfe=1: --sampler {self.sampler} takes the number of Karras bins, at least 2 (2 bins: "
                             "one step from sigma_max to sigma_min; Euler's is one network call)")
        _engine_config(self.engine, self.accelerate, self.precision)
        return self

    def run(self, progress: bool = True) -> dict:
        """Evaluate the checkpoint on seeds first_seed, ..., first_seed + seeds - 1 (evaluate_checkpoint)."""
        return evaluate_checkpoint(self, progress=progress)


SAMPLER_STAGE = {"student": "student", "heun": "teacher", "euler": "teacher", "ddpm": "ddpm", "ddim": "ddpm",
                 "bc": "bc"}
DEFAULT_NFE = {"student": 1, "heun": 80, "euler": 80, "ddpm": 100, "ddim": 10, "bc": 1}


def _engine_config(engine: str, accelerate: str, precision: str):
    """The ractd.engine.EngineConfig of the evaluation options, or None for the library path (engine "none")."""
    from ractd.engine import ENGINE_CHOICES, EngineConfig

    if engine not in ENGINE_CHOICES:
        raise RactdError(f"engine={engine!r}: expected one of {', '.join(ENGINE_CHOICES)}")
    if accelerate != "none" and engine not in ("auto", "none"):
        raise RactdError(f"accelerate={accelerate!r} acts on the library path only; it cannot be combined with "
                         f"engine {engine} (use engine jit alone)")
    if engine == "none" or accelerate != "none":  # an explicit accelerate asks for the library path
        return None
    return EngineConfig(engine=engine, precision=precision).validate()


def effective_precision(sampler: str, engine: str, accelerate: str, precision: str) -> str:
    """fp32 or bf16: what a policy built with these options computes in (what the records store). auto means
    ractd.engine.resolve_precision's choice for the sampler on the engines, fp32 on the library path (engine
    none / accelerate) and for BC (an MLP, no U-Net)."""
    if precision != "auto":
        return precision
    if sampler == "bc" or _engine_config(engine, accelerate, "fp32") is None:
        return "fp32"
    from ractd.engine import resolve_precision

    return resolve_precision(precision, sampler)


def _sampler_opts(sampler: str, nfe: int, init_scaled: bool) -> dict:
    if sampler == "student":
        return {"n_steps": nfe, "init_scaled": init_scaled}
    if sampler in ("heun", "euler"):
        return {"n_bins": nfe, "init_scaled": init_scaled}
    return {"n_steps": nfe}


def policy_from_checkpoint(checkpoint: str | Path, sampler: str = "student", nfe: int | None = None,
                           init_scaled: bool = True, accelerate: str = "none", precision: str = EvalConfig.precision,
                           tracker: str = "pd", inverse_dynamics: str = "", device: str = "cpu",
                           inpaint: str = "none", engine: str = "auto"):
    """(policy or planner, task, its TrainConfig) for a checkpoint of the stage the sampler needs.

    accelerate: "none" or "jit" (ractd.nets.unet1d.accelerate: same numbers up to float rounding;
    bench/bench_core.py measures the speed-up). precision: "auto", "fp32" or "bf16" (EvalConfig.precision; with
    engine none ractd.nets.unet1d.to_precision: the U-Net's weights and arithmetic only). device: where the
    network runs (the samplers draw noise on CPU per seed and move it to the model's device). tracker (maze2d):
    "pd" or "inverse_dynamics", the latter with the model file `inverse_dynamics` ("" =
    ractd.inverse_dynamics.default_path of the checkpoint's task and scale).
    inpaint (maze2d): "none" or "start" (ractd.policy.StartPinned around the teacher or the student).
    engine: auto | eager | jit | gemm | openvino | none, see EvalConfig and ractd.engine (CPU only; a GPU model
    keeps the library path)."""
    from ractd.data.windows import Normalizer
    from ractd.policy import LocomotionPolicy, MazePlanner, StartPinned, make_sampler
    from ractd.train import load_stage_model

    if sampler not in SAMPLER_STAGE:
        raise RactdError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_STAGE)}")
    precision = effective_precision(sampler, engine, accelerate, precision)
    engine_cfg = _engine_config(engine, accelerate, precision) if sampler != "bc" else None
    if inpaint not in ("none", "start"):
        raise RactdError(f"inpaint={inpaint!r}: expected none or start")
    model, cfg, ck = load_stage_model(Path(checkpoint))
    model = model.to(device)
    if cfg.stage != SAMPLER_STAGE[sampler]:
        raise RactdError(f"sampler {sampler!r} needs a {SAMPLER_STAGE[sampler]} checkpoint; {checkpoint} is a {cfg.stage}")
    task = get_task(cfg.task)
    norms = {k: Normalizer.from_state_dict(v) for k, v in ck["normalizers"].items()}
    if sampler == "bc":  # a deterministic MLP: no sampler, no U-Net options
        from ractd.policy import BCGoalPolicy, BCPolicy

        if tracker != "pd" or accelerate != "none" or precision != "fp32":
            raise RactdError("the bc policy takes no tracker, accelerate or precision option")
        return (BCPolicy if task.kind == "locomotion" else BCGoalPolicy)(model, norms["obs"], norms["action"]), task, cfg
    if precision != "fp32" and engine_cfg is None:
        from ractd.nets.unet1d import to_precision

        to_precision(model, precision)
    if accelerate != "none":
        from ractd.nets.unet1d import accelerate as accelerate_net

        model.net = accelerate_net(model.net, accelerate, horizon=ck["shapes"]["x"][0])
    shape_tail = tuple(ck["shapes"]["x"])
    if inpaint == "start":
        if task.kind != "maze" or sampler not in ("heun", "euler", "student"):
            raise RactdError(f"inpaint=start: maze2d plans of the heun, euler or student sampler only (got {task.name}, "
                             f"{sampler})")
        model = StartPinned(model, obs_dim=shape_tail[1])
    opts = _sampler_opts(sampler, nfe or DEFAULT_NFE[sampler], init_scaled)
    fn = make_sampler(sampler, model, shape_tail, **opts, engine=engine_cfg)
    if task.kind == "locomotion":
        return LocomotionPolicy(fn, norms["obs"], norms["action"], obs_history=cfg.obs_history), task, cfg
    inv = None
    if tracker != "pd":
        from ractd.inverse_dynamics import InverseDynamics, default_path

        inv = InverseDynamics.load(Path(inverse_dynamics) if inverse_dynamics else default_path(task.name, cfg.scale))
    return MazePlanner(fn, norms["obs"], horizon=shape_tail[0], tracker=tracker, inverse_dynamics=inv), task, cfg


def evaluate_checkpoint(cfg: EvalConfig, seeds: Sequence[int] | None = None, progress: bool = True) -> dict:
    """Roll out the checkpoint's policy on `seeds` (default: cfg.seeds seeds from cfg.first_seed; a list gives any
    others, e.g. the ones a store lacks); write records to Parquet; return a summary. The options are cfg's
    (EvalConfig, validated here)."""
    from ractd.paths import runs_dir
    from ractd.rollout import rollout_locomotion, rollout_maze, save_records, summarize

    cfg.validate()
    t = get_task(cfg.task)
    run = Path(cfg.run_dir) if cfg.run_dir else runs_dir() / t.name
    sampler = cfg.sampler
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else run / SAMPLER_STAGE[sampler] / "best.pt"
    nfe = cfg.nfe or DEFAULT_NFE[sampler]
    policy, t2, train_cfg = policy_from_checkpoint(ckpt, sampler, nfe, cfg.init_scaled, cfg.accelerate, cfg.precision,
                                                   cfg.tracker, cfg.inverse_dynamics, inpaint=cfg.inpaint,
                                                   engine=cfg.engine)
    if t2.name != t.name:
        raise RactdError(f"{ckpt} was trained on {t2.name}, not {t.name}")
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds)) if seeds is None else list(seeds)
    max_steps = cfg.max_steps or None
    start = time.perf_counter()
    if t.kind == "locomotion":
        records = rollout_locomotion(t, policy, seeds, max_steps=max_steps, progress=progress, overlap=cfg.overlap)
    else:
        records = rollout_maze(t, policy, seeds, max_steps=max_steps, progress=progress)
    extra = {"sampler": sampler, "nfe": nfe, "init_scaled": cfg.init_scaled, "accelerate": cfg.accelerate,
             "engine": cfg.engine, "precision": effective_precision(sampler, cfg.engine, cfg.accelerate, cfg.precision),
             "tracker": ("bc" if sampler == "bc" else cfg.tracker) if t.kind == "maze" else "", "checkpoint": str(ckpt),
             "sigma": train_cfg.distill.sigma if train_cfg.stage == "student" else 0.0, "train_seed": train_cfg.seed,
             **({"inpaint": cfg.inpaint} if t.kind == "maze" else {})}
    records = [{**r, **extra} for r in records]
    path = Path(cfg.out) if cfg.out else run / "eval" / f"{sampler}-{nfe}.parquet"
    save_records(records, path)
    summary = {**summarize(records), "task": t.name, "sampler": sampler, "nfe": nfe, "records": str(path),
               "wall_s": round(time.perf_counter() - start, 2)}
    log.info("evaluated %s: %s", ckpt, summary)
    return summary
