"""The README's first command on fewer teacher steps: does the quick budget's maze2d-umaze policy keep its score?

The first command (`tune/search.py --task maze2d-umaze --quick`, then the quick study) spends most of its time on
the shared teacher (1200 steps at batch 64). For each --teacher-steps N and training seed this study trains that
teacher with N steps and the quick sweep's Table 9 trial from it (the configs of `SearchConfig` with
`ractd_repro.sweep.quick_settings`: the same stages the sweep trains, here in one process, no Ray), then
evaluates on --eval-seeds seeds (0, 1, ...; the study's seeds) the teacher's Heun-80, its one-step Euler (the
student's warm start) and the student's selected checkpoint.

    python -m ractd_repro.studies.quick_budget [--teacher-steps 1200 600] [--train-seeds 0 1 2]
    python -m ractd_repro.studies.quick_budget --report --out docs/results/quick_budget   # committed

Writes <out>/results.parquet (default <cache>/bench/quick_teacher): one row per (teacher steps, training seed,
policy) with the mean normalized score, its SE over the evaluation seeds, n and the teacher's training time (wall,
this process; a number of this machine, not a benchmark). The runs live under <cache>/bench/quick_teacher/
t<steps>-s<seed>/ (teacher/, student/, eval-<policy>.parquet) whatever --out is; a finished run or evaluation is
not redone. The report compares every budget with the largest, seed by seed (paired: one training seed, one
dataset, the same evaluation seeds): "below" where the student's score is lower by more than 2 SE of the
difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

from ractd.errors import run_command
from ractd.io import atomic_parquet, read_rows
from ractd.paths import cache_dir
from ractd_repro.claims import mean_se

STORE = "quick_budget"
STUDY = "ractd_repro.studies.quick_budget"
TASK = "maze2d-umaze"
POLICIES = {"heun": ("teacher", "heun", 0), "euler": ("teacher", "euler", 2), "student": ("student", "student", 1)}


def runs_root() -> Path:
    return cache_dir() / "bench" / "quick_teacher"


def stage_configs(steps: int, seed: int, run_dir: Path, scale: str = "small"):
    """(teacher, student) TrainConfigs: the quick sweep's (SearchConfig with quick_settings), the teacher with
    `steps` steps, both in run_dir; the student is the sweep's Table 9 trial (maze2d: CTD)."""
    from ractd_repro.sweep import SearchConfig, quick_settings

    scfg = SearchConfig(task=TASK, **{**quick_settings(TASK), "scale": scale}, seed=seed, teacher_steps=steps)
    teacher, student = scfg.stage_configs()
    teacher = dataclasses.replace(teacher, run_dir=str(run_dir))
    student = dataclasses.replace(student, run_dir=str(run_dir), teacher_ckpt=str(teacher.stage_dir / "best.pt"))
    return teacher, student


def run_one(steps: int, seed: int, eval_seeds: int, scale: str = "small", threads: int = 1,
            progress: bool = True) -> list[dict]:
    """Train (or find) one budget's teacher and student, evaluate the three policies (or read their records)."""
    import torch

    from ractd.evaluate import EvalConfig, evaluate_checkpoint
    from ractd.train import RunContext, train

    torch.set_num_threads(threads)
    run_dir = runs_root() / f"t{steps}-s{seed}"
    teacher, student = stage_configs(steps, seed, run_dir, scale)
    timing = run_dir / "teacher_time_s.txt"  # written only by a run this study trained from its first step
    fresh = not (teacher.stage_dir / "latest" / "checkpoint.pt").is_file()
    t0 = time.perf_counter()
    train(teacher, RunContext(progress=progress))  # a finished run returns at once
    if fresh:
        timing.write_text(f"{time.perf_counter() - t0:.1f}\n")
    train(student, RunContext(progress=progress))  # a finished run returns at once
    rows = []
    for name, (stage, sampler, nfe) in POLICIES.items():
        out = run_dir / f"eval-{name}.parquet"
        if not out.is_file():
            ckpt = (teacher if stage == "teacher" else student).stage_dir / "best.pt"
            evaluate_checkpoint(EvalConfig(task=TASK, sampler=sampler, nfe=nfe, checkpoint=str(ckpt), seeds=eval_seeds,
                                           out=str(out)), progress=progress)
        x = np.asarray([r["normalized_score"] for r in read_rows(out)], float)
        rows.append({"task": TASK, "scale": scale, "teacher_steps": steps, "seed": seed, "policy": name,
                     **dict(zip(("mean", "se"), mean_se(x))), "n": len(x),
                     "teacher_time_s": float(timing.read_text()) if timing.is_file() else math.nan,
                     "student_steps": student.steps, "teacher_batch": teacher.batch})
    return rows


def paired(rows: list[dict], policy: str = "student") -> list[dict]:
    """Each budget against the largest on the same training seed: difference, its SE (the two SEs in quadrature;
    the evaluation seeds are the same, so this is conservative), and 'below' where the difference is under -2 SE."""
    by = {(r["teacher_steps"], r["seed"]): r for r in rows if r["policy"] == policy}
    top = max(s for s, _ in by)
    out = []
    for (steps, seed), r in sorted(by.items()):
        ref = by.get((top, seed))
        if steps == top or ref is None:
            continue
        d, se = r["mean"] - ref["mean"], math.hypot(r["se"], ref["se"])
        out.append({"teacher_steps": steps, "reference_steps": top, "seed": seed, "policy": policy, "difference": d,
                    "se": se, "below": d < -2 * se})
    return out


def seed_table(rows: list[dict], key: str, keys: list, policies) -> str:
    """One line per (key value, policy): each training seed's mean ± SE and the mean over seeds (this study's and
    training_forms' table)."""
    from tabulate import tabulate

    seeds = sorted({r["seed"] for r in rows})
    cells = []
    for k in keys:
        for policy in policies:
            got = {r["seed"]: r for r in rows if r[key] == k and r["policy"] == policy}
            if got:
                means = [got[s]["mean"] for s in seeds if s in got]
                cells.append([k, policy, *(f"{got[s]['mean']:.1f} ± {got[s]['se']:.1f}" if s in got else "—"
                                           for s in seeds), f"{np.mean(means):.1f}"])
    return tabulate(cells, headers=[key.replace("_", " "), "policy", *(f"seed {s}" for s in seeds), "mean of seeds"],
                    tablefmt="github", disable_numparse=True)


def report_lines(rows: list[dict]) -> list[str]:
    steps = sorted({r["teacher_steps"] for r in rows}, reverse=True)
    lines = [seed_table(rows, "teacher_steps", steps, POLICIES), ""]
    for p in paired(rows):
        lines.append(f"student, {p['teacher_steps']} teacher steps vs {p['reference_steps']}, seed {p['seed']}: "
                     f"{p['difference']:+.1f} ± {p['se']:.1f}" + ("  BELOW (more than 2 SE)" if p["below"] else ""))
    times = {}
    for r in rows:
        times.setdefault(r["teacher_steps"], []).append(r["teacher_time_s"])
    lines.append("teacher training wall time (median over seeds; this machine, --threads threads, other jobs may have "
                 "run beside it: not a benchmark): " + ", ".join(
        f"{s} steps {np.nanmedian(t):.0f} s" for s, t in sorted(times.items(), reverse=True)))
    return lines


def store_section(data: Path, store: str, title: str, intro: str, report) -> list[str]:
    """A study's part of docs/results.md: title, intro and report(rows) of <data>/<store>/results.parquet; nothing
    without rows."""
    rows = read_rows(Path(data) / store / "results.parquet")
    return [title, "", intro, "", *report(rows), ""] if rows else []


def section(data: Path) -> list[str]:
    """docs/results.md's part for this study: <data>/quick_budget/results.parquet."""
    return store_section(data, STORE, f"### The first command's teacher budget ({STUDY})",
                         "maze2d-umaze, the quick sweep's teacher (small-maze U-Net, batch 64) at each number of steps "
                         "and its Table 9 trial (75 distillation steps), per training seed; normalized score, mean ± "
                         "SE over the same evaluation seeds. heun: the teacher's Heun-80; euler: its one-step Euler "
                         "(the student's warm start); student: the distilled student's selected checkpoint.",
                         report_lines)


def parser(doc: str, default_out: str) -> argparse.ArgumentParser:
    """The flags this study and ractd_repro.studies.training_forms share (the caller adds its grid's own)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--eval-seeds", type=int, default=100)
    ap.add_argument("--scale", default="small")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (two studies side by side: 1 each)")
    ap.add_argument("--out", default="", help=f"default {default_out}")
    ap.add_argument("--report", action="store_true", help="only print the report of the store in --out")
    ap.add_argument("--quiet", action="store_true")
    return ap


def run_grid(args, keys: list, one, default_out: Path, report) -> int:
    """Every (key, training seed) run of the grid (one(key, seed, eval_seeds, scale, threads, progress) -> rows)
    unless --report, its rows written to <out>/results.parquet; then the report of the store."""
    out = Path(args.out).expanduser() if args.out else default_out
    store = out / "results.parquet"
    if not args.report:
        rows = [r for key in keys for seed in args.train_seeds
                for r in one(key, seed, args.eval_seeds, args.scale, args.threads, not args.quiet)]
        out.mkdir(parents=True, exist_ok=True)
        atomic_parquet(store, rows)
    print("\n".join(report(read_rows(store, required=True))))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "<cache>/bench/quick_teacher")
    ap.add_argument("--teacher-steps", nargs="+", type=int, default=[1200, 600])
    args = ap.parse_args(argv)
    return run_command(lambda: run_grid(args, args.teacher_steps, run_one, runs_root(), report_lines))


if __name__ == "__main__":
    sys.exit(main())
