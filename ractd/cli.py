"""python -m ractd train-reward | train-teacher | train-ddpm | distill | train-bc | evaluate | pipeline | export --task T

Every flag of the training and evaluation commands is generated from the config dataclasses
(ractd.train.TrainConfig with its ractd.ctm.DistillConfig, ractd.evaluate.EvalConfig), so a default cannot drift
from the library's: a flag the user does not give keeps the dataclass value. `--quick` / `--paper` pick a
training budget (ractd.train.BUDGETS); the CPU budget is the default. Bad input exits with status 2 and a
one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from ractd import RactdError
from ractd.errors import Parser, run_command

log = logging.getLogger("ractd")

TRAIN_COMMANDS = {"train-reward": ("reward", "train the return-to-go model R_psi"),
                  "train-teacher": ("teacher", "train the EDM teacher (Eq. 4)"),
                  "train-ddpm": ("ddpm", "train the DDPM baseline (Tables 3, 11)"),
                  "distill": ("student", "distill the CTM student with Eq. (5)-(9)"),
                  "train-bc": ("bc", "train the behavior cloning baseline (CORL's BC: 2 x 256 MLP, MSE)")}
# fields a stage does not use are not offered on its command line
STAGE_ONLY = {"distill": {"student"}, "teacher_ckpt": {"student"}, "reward_ckpt": {"student", "teacher"},
              "select_seeds": {"student"}, "select_max_steps": {"student"}, "reward_aware_teacher": {"teacher"},
              "bc_hidden": {"bc"}, "bc_top_fraction": {"bc"}, "bc_goal": {"bc"},
              "holdout_windows": {"teacher", "ddpm", "student"}}
ALIASES = {"reward_aware_teacher": ["--reward-aware"]}
PIPELINE_FIELDS = ("task", "run_dir", "source", "scale", "seed", "preset")


def _budget_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick budget (ractd.train.BUDGETS['quick'])")
    g.add_argument("--paper", action="store_true", help="paper network sizes and budgets (GPU)")


def _process_flags(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; use 1 when other work shares the CPUs)")
    if device:
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def _skip_for(stage: str) -> tuple[str, ...]:
    return ("stage",) + tuple(k for k, stages in STAGE_ONLY.items() if stage not in stages)


def build_parser() -> argparse.ArgumentParser:
    from ractd.evaluate import EvalConfig
    from ractd.train import TrainConfig

    parser = Parser(prog="python -m ractd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (stage, text) in TRAIN_COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        dests = _add_train_args(p, stage)
        p.set_defaults(stage=stage, dests=dests)
    p = sub.add_parser("evaluate", help="roll out a trained policy and store per-episode results (Parquet)",
                       description="roll out a trained policy on seeded episodes and store one record per episode")
    dests = _add_required_task(p, EvalConfig, EvalConfig())
    p.add_argument("--unscaled-init", dest="init_scaled", action="store_false", default=argparse.SUPPRESS,
                   help="same as --no-init-scaled: x_T ~ N(0, I) (released code)")
    _process_flags(p, device=False)
    p.set_defaults(dests=dests)

    p = sub.add_parser("pipeline", help="reward model, teacher and student, then evaluate student and teacher",
                       description="train every stage of a task (reward model for locomotion, teacher, student), "
                                   "then evaluate the one-step student and the Heun teacher and print a table")
    base = TrainConfig.for_stage("teacher")
    dests = _add_required_task(p, TrainConfig, base, skip=tuple(f.name for f in dataclasses.fields(TrainConfig)
                                                               if f.name not in PIPELINE_FIELDS))
    p.add_argument("--steps", type=int, default=argparse.SUPPRESS, metavar="STEPS",
                   help="steps of every stage (default: each stage's budget, ractd.train.BUDGETS)")
    dests.append("steps")
    ev = EvalConfig()
    p.add_argument("--seeds", type=int, default=ev.seeds, help=f"evaluation seeds (default: {ev.seeds})")
    p.add_argument("--max-steps", type=int, default=ev.max_steps, help="cap the episode length (0 = the task's)")
    p.add_argument("--eval-teacher", action=argparse.BooleanOptionalAction, default=None,
                   help="also evaluate the teacher with Heun-80 (default: on for maze2d, where it plans once per "
                        "episode; off for locomotion, where it costs 158 network calls per env step)")
    _budget_flags(p)
    _process_flags(p)
    p.set_defaults(dests=dests)

    p = sub.add_parser("export", help="export a one-step student as one ONNX / TorchScript file", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _add_required_task(p, cls, defaults, skip=()) -> list[str]:
    from ractd.tasks import TASKS

    p.add_argument("--task", required=True, help=f"task name, one of: {', '.join(TASKS)}")
    return ["task"] + [d for d in _config_args(p, cls, defaults, skip=("task",) + tuple(skip))]


def _config_args(p, cls, defaults, skip):
    from ractd.config import add_config_args

    return add_config_args(p, cls, defaults, skip=skip, aliases=ALIASES)


def _add_train_args(p: argparse.ArgumentParser, stage: str) -> list[str]:
    from ractd.train import TrainConfig

    dests = _add_required_task(p, TrainConfig, TrainConfig.for_stage(stage), skip=_skip_for(stage))
    if stage == "student":
        p.add_argument("--unscaled-init", dest="distill.init_scaled", action="store_false",
                       default=argparse.SUPPRESS, help="same as --no-init-scaled: x_T ~ N(0, I) (released code)")
    _budget_flags(p)
    _process_flags(p)
    return dests


def train_config(args, stage: str):
    """The TrainConfig a command line asks for: the budget's config of the stage, then the flags given."""
    from ractd.config import replace_from_args
    from ractd.train import BUDGETS, TrainConfig

    budget = "paper" if getattr(args, "paper", False) else "quick" if getattr(args, "quick", False) else "cpu"
    cfg = TrainConfig.for_stage(stage, budget, task=args.task)
    cfg = replace_from_args(cfg, args, [d for d in args.dests if d != "task"])
    if not hasattr(args, "ckpt_every"):  # the budget's cadence, capped by the steps given
        every = BUDGETS[budget][stage].get("ckpt_every", TrainConfig.ckpt_every)
        cfg = dataclasses.replace(cfg, ckpt_every=min(every, cfg.steps))
    return cfg


def eval_config(args):
    from ractd.config import replace_from_args
    from ractd.evaluate import EvalConfig

    return replace_from_args(EvalConfig(task=args.task), args, [d for d in args.dests if d != "task"])


def cmd_train(args) -> dict:
    from ractd.train import RunContext, train

    cfg = train_config(args, args.stage)
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
    summary = eval_config(args).run(progress=not args.quiet)
    print(json.dumps(summary))
    return summary


def cmd_pipeline(args) -> dict:
    """Every stage of one task at the chosen budget, then the one-step student (and the Heun teacher) on
    `--seeds` evaluation seeds; prints a table of scores, per-action times and where the records are."""
    from tabulate import tabulate

    from ractd.evaluate import EvalConfig
    from ractd.train import RunContext, train

    task = _task(args)
    stages = (["reward"] if task.kind == "locomotion" else []) + ["teacher", "student"]
    run_dir = ""
    times = {}
    import time

    for stage in stages:
        cfg = train_config(args, stage)
        run_dir = cfg.resolved().run_dir
        t0 = time.perf_counter()
        out = train(cfg, RunContext(device=args.device, progress=not args.quiet))
        times[stage] = time.perf_counter() - t0
        log.info("%s: %s (%.0f s)", stage, out["best"], times[stage])
    rows = []
    eval_teacher = task.kind == "maze" if args.eval_teacher is None else args.eval_teacher
    for sampler, nfe in [("student", 1)] + ([("heun", 80)] if eval_teacher else []):
        ev = EvalConfig(task=task.name, run_dir=run_dir, sampler=sampler, nfe=nfe, seeds=args.seeds,
                        max_steps=args.max_steps)
        t0 = time.perf_counter()
        s = ev.run(progress=not args.quiet)
        rows.append([{"student": "one-step student", "heun": "teacher (Heun)"}[sampler], s["nfe"],
                     f"{s['score_mean']:.1f} ± {s['score_sem']:.1f}",
                     f"{1000 * s['time_per_action_mean']:.2f}", f"{time.perf_counter() - t0:.0f}", s["records"]])
    print(tabulate(rows, headers=["policy", "NFE", f"normalized score ({args.seeds} seeds, mean ± SE)",
                                  "ms / action", "eval s", "records"], tablefmt="github"))
    print("training time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; run folder: {run_dir}")
    return {"rows": rows, "train_s": times, "run_dir": run_dir}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        from ractd import export

        return export.main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    command = {"evaluate": cmd_evaluate, "pipeline": cmd_pipeline}.get(args.command, cmd_train)

    def body() -> None:
        command(args)

    return run_command(body,
                       interrupted="interrupted; rerun the same command to resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
