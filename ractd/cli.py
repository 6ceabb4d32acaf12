"""python -m ractd train-reward | train-teacher | train-ddpm | distill | evaluate | pipeline --task T ...

CPU-scale defaults (small U-Net, a few thousand steps); `--paper` selects the paper's network sizes,
batch sizes and step counts. Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ractd import RactdError

log = logging.getLogger("ractd")

# Paper-scale training settings (released code: teacher batch 1024, student batch 4800).
PAPER = {
    "reward": dict(steps=200_000, batch=1024, lr=3e-4),
    "teacher": dict(steps=400_000, batch=1024, lr=1e-4, warmup=500),
    "ddpm": dict(steps=400_000, batch=1024, lr=1e-4, warmup=500),
    "student": dict(steps=200_000, batch=4800, lr=1e-4, warmup=500),
}
# A few-minute smoke budget for `pipeline --quick` (the README's first command): exercises every stage.
QUICK = {
    "reward": dict(steps=500, batch=256, lr=3e-4),
    "teacher": dict(steps=400, batch=64, lr=3e-4),
    "ddpm": dict(steps=400, batch=64, lr=3e-4),
    "student": dict(steps=150, batch=64, lr=1e-4),
}
CPU = {
    "reward": dict(steps=3000, batch=256, lr=3e-4),
    "teacher": dict(steps=3000, batch=256, lr=3e-4),
    "ddpm": dict(steps=3000, batch=256, lr=3e-4),
    "student": dict(steps=2000, batch=256, lr=1e-4),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name, e.g. hopper-medium-replay or maze2d-umaze")
    p.add_argument("--run-dir", default="", help="run folder (default: <cache>/runs/<task>); reusing it resumes")
    p.add_argument("--source", default="auto", choices=["auto", "d4rl", "local", "minari"], help="dataset source")
    p.add_argument("--scale", default="small", help="scale of a locally generated dataset (tiny|small|full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; use 1 when other work shares the CPUs)")


def _train_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--paper", action="store_true", help="paper network size and training budget (GPU)")
    p.add_argument("--preset", default=None, help="U-Net preset name (default: the task's CPU preset)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ckpt-every", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ractd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, stage, text in [("train-reward", "reward", "train the return-to-go model R_psi"),
                              ("train-teacher", "teacher", "train the EDM teacher (Eq. 4)"),
                              ("train-ddpm", "ddpm", "train the DDPM baseline (Tables 3, 11)")]:
        p = sub.add_parser(name, help=text, description=text)
        _train_args(p)
        p.set_defaults(stage=stage)
        if stage == "teacher":
            p.add_argument("--reward-aware", type=float, default=0.0,
                           help="ablation: weight of the reward loss while training the teacher (Tables 4, 10)")
    p = sub.add_parser("distill", help="distill the CTM student with Eq. (9)", description="distill the student (Eq. 5-9)")
    _train_args(p)
    p.set_defaults(stage="student")
    p.add_argument("--alpha", type=float, default=-1.0, help="CTM weight (default: Table 9)")
    p.add_argument("--beta", type=float, default=-1.0, help="DSM weight (default: Table 9)")
    p.add_argument("--sigma", type=float, default=-1.0, help="reward weight (default: Table 9; 0 = CTD)")
    p.add_argument("--reward-variant", default="one_step", choices=["one_step", "ctm"])
    p.add_argument("--dsm-form", default="denoiser", choices=["jump", "denoiser"])
    p.add_argument("--unscaled-init", action="store_true", help="x_T ~ N(0, I) (released code) instead of N(0, 80^2 I)")
    p.add_argument("--teacher-ckpt", default="")
    p.add_argument("--reward-ckpt", default="")
    p.add_argument("--select-seeds", type=int, default=0,
                   help="online model selection: short rollouts on this many seeds at every checkpoint (0 = by loss)")

    p = sub.add_parser("evaluate", help="roll out a trained policy and store per-episode results (Parquet)")
    _common(p)
    p.add_argument("--sampler", default="student", choices=["student", "heun", "euler", "ddpm", "ddim"])
    p.add_argument("--checkpoint", default="", help="default: <run-dir>/<stage>/best.pt for the sampler's stage")
    p.add_argument("--nfe", type=int, default=None, help="student steps (1-4) / DDPM or DDIM steps / Heun bins")
    p.add_argument("--seeds", type=int, default=10, help="number of seeds (episodes), run batched")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="cap the episode length (default: the task's)")
    p.add_argument("--unscaled-init", action="store_true")
    p.add_argument("--out", default="", help="Parquet file (default: <run-dir>/eval/<sampler>-<nfe>.parquet)")
    p.add_argument("--accelerate", default="none", choices=["none", "jit"],
                   help="jit: TorchScript-frozen networks (same numbers up to float rounding, faster on CPU)")

    p = sub.add_parser("pipeline", help="reward model, teacher and student, then evaluate (CPU-scale defaults)")
    _common(p)
    p.add_argument("--steps", type=int, default=None, help="steps for every stage (default: CPU defaults)")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke budget (about 3 minutes on 2 CPUs)")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=None)
    return parser


def _train_config(args, stage: str):
    from ractd import ctm
    from ractd.train import TrainConfig

    budgets = PAPER if getattr(args, "paper", False) else QUICK if getattr(args, "quick", False) else CPU
    budget = dict(budgets[stage])
    for key in ("steps", "batch", "lr"):
        if getattr(args, key, None) is not None:
            budget[key] = getattr(args, key)
    kw = dict(task=args.task, stage=stage, run_dir=args.run_dir, source=args.source, scale=args.scale,
              seed=args.seed, **budget)
    if getattr(args, "paper", False):
        kw["preset"] = "paper"
    if getattr(args, "preset", None):
        kw["preset"] = args.preset
    if getattr(args, "ckpt_every", None):
        kw["ckpt_every"] = args.ckpt_every
    kw["ckpt_every"] = min(kw.get("ckpt_every", 500), kw["steps"])
    if stage == "teacher":
        kw["reward_aware_teacher"] = getattr(args, "reward_aware", 0.0)
    if stage == "student":
        kw["distill"] = ctm.DistillConfig(
            alpha=getattr(args, "alpha", -1.0), beta=getattr(args, "beta", -1.0), sigma=getattr(args, "sigma", -1.0),
            reward_variant=getattr(args, "reward_variant", "one_step"), dsm_form=getattr(args, "dsm_form", "jump"),
            init_scaled=not getattr(args, "unscaled_init", False))
        kw["teacher_ckpt"] = getattr(args, "teacher_ckpt", "")
        kw["reward_ckpt"] = getattr(args, "reward_ckpt", "")
        kw["select_seeds"] = getattr(args, "select_seeds", 0)
    return TrainConfig(**kw)


def cmd_train(args) -> dict:
    from ractd.train import RunContext, train

    cfg = _train_config(args, args.stage)
    if cfg.stage == "reward" and _task(args).kind == "maze":
        raise RactdError("maze2d tasks use no reward model (sigma = 0); train the teacher and distill")
    out = train(cfg, RunContext(device=getattr(args, "device", "cpu"), progress=not args.quiet))
    print(json.dumps({"checkpoint": str(out["checkpoint"]), "best": str(out["best"]),
                      **{k: round(float(v), 6) for k, v in out["metrics"].items()}}))
    return out


def _task(args):
    from ractd.tasks import get_task

    return get_task(args.task)


def cmd_evaluate(args) -> dict:
    from ractd.evaluate import evaluate_checkpoint

    summary = evaluate_checkpoint(
        task=args.task, run_dir=args.run_dir, sampler=args.sampler, checkpoint=args.checkpoint, nfe=args.nfe,
        seeds=list(range(args.first_seed, args.first_seed + args.seeds)), max_steps=args.max_steps,
        init_scaled=not args.unscaled_init, out=args.out, progress=not args.quiet, accelerate=args.accelerate)
    print(json.dumps(summary))
    return summary


def cmd_pipeline(args) -> dict:
    task = _task(args)
    stages = (["reward"] if task.kind == "locomotion" else []) + ["teacher", "student"]
    for stage in stages:
        ns = argparse.Namespace(**vars(args), stage=stage, preset=None, paper=False, batch=None, lr=None,
                                device="cpu", ckpt_every=None)
        cmd_train(ns)
    ev = argparse.Namespace(task=args.task, run_dir=args.run_dir, sampler="student", checkpoint="", nfe=1,
                            first_seed=0, seeds=args.seeds, max_steps=args.max_steps, unscaled_init=False,
                            out="", quiet=args.quiet, accelerate="none")
    return cmd_evaluate(ev)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command == "evaluate":
            cmd_evaluate(args)
        elif args.command == "pipeline":
            cmd_pipeline(args)
        else:
            cmd_train(args)
    except RactdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
