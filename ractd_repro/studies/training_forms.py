"""Does a faster training form keep the scores? The README's first command's models trained in two forms of
`TrainConfig.accel` (ractd.accel), paired by training seed.

A form is an accel name (fp32) or an accel name with -bf16 (the same under bf16 autocast, TrainConfig.autocast: what
accel auto trains in on a CPU with bf16 hardware; not exact, a rounding of every product's inputs to 8 bits of
mantissa). The accel forms compute the same function up to float rounding (tests/test_accel.py), but rounding
differences grow over
thousands of optimizer steps, so two runs of one seed in two forms end as two different models: whether that moves
the score is measured here, as issue 28 asks, on training seeds. For each --forms F and training seed this study
trains the quick sweep's maze2d-umaze teacher and its Table 9 trial (`quick_budget.stage_configs`, 1200 teacher
steps) in form F in both stages, then evaluates the teacher's Heun-80 and the student's selected checkpoint on
--eval-seeds seeds (the same for every run). A run of the form "eager" already trained by `quick_budget` (the same
configs; its checkpoints' configs say accel "eager", autocast fp32) is read, not trained again.

    python -m ractd_repro.studies.training_forms [--forms eager nhwc] [--train-seeds 0 1 2]
    python -m ractd_repro.studies.training_forms --report --out docs/results/training_forms   # committed
    python -m ractd_repro.studies.training_forms --forms eager eager-bf16 --out docs/results/training_forms/bf16
                                                   # on a CPU with bf16 hardware; committed

Writes <out>/results.parquet (default <cache>/bench/training_forms): one row per (form, training seed, policy)
with the mean normalized score, its SE over the evaluation seeds, n, the form each stage resolved to (from its
checkpoint) and each stage's training seconds (this process's CPU seconds and wall seconds: numbers of this
machine under its load, not a benchmark; bench/bench_training.py times the step); a form other than the first also
gets how far its run is from the first form's run of the same seed (each stage's largest |weight difference|, the
episodes scoring differently). The report gives each form's mean over training seeds with its SE over seeds, and
the difference from the first form: "unchanged" when it is within 2 SE of the difference.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from ractd.engine_records import cpu_name
from ractd.errors import run_command
from ractd.io import read_rows
from ractd.paths import cache_dir
from ractd_repro.claims import mean_se
from ractd_repro.studies import quick_budget

STORE = "training_forms"
STUDY = "ractd_repro.studies.training_forms"
TASK = quick_budget.TASK
TEACHER_STEPS = 1200  # the quick sweep's
POLICIES = {k: quick_budget.POLICIES[k] for k in ("heun", "student")}


def runs_root() -> Path:
    return cache_dir() / "bench" / "training_forms"


def form_settings(form: str) -> dict:
    """TrainConfig fields of a form: "<accel>" runs fp32, "<accel>-bf16" under bf16 autocast (TrainConfig.autocast;
    fast only where the CPU multiplies bf16 in hardware)."""
    accel, bf16 = form.removesuffix("-bf16"), form.endswith("-bf16")
    return {"accel": accel, "autocast": "bf16" if bf16 else "fp32"}


def _resolved(stage_dir: Path) -> str | None:
    """The form a finished stage's checkpoint says it ran in (its accel, "-bf16" under bf16 autocast), None
    without one."""
    f = stage_dir / "config.json"
    if not f.is_file():
        return None
    cfg = json.loads(f.read_text())
    return cfg.get("accel") + ("-bf16" if cfg.get("autocast") == "bf16" else "")


def run_dir_for(form: str, seed: int) -> Path:
    """Where the (form, seed) run lives: quick_budget's run of the seed when the form is eager and that run's two
    stages were trained eager in fp32, else this study's own folder."""
    from ractd_repro.models import run_finished

    qb = quick_budget.runs_root() / f"t{TEACHER_STEPS}-s{seed}"
    if form == "eager" and all(_resolved(qb / stage) == "eager" and run_finished(qb / stage)
                               for stage in ("teacher", "student")):
        return qb
    return runs_root() / f"{form}-s{seed}"


def _timed_train(cfg, progress: bool, record: Path) -> None:
    """Train one stage; a run this call trained from its first step writes its CPU and wall seconds to record."""
    from ractd.train import RunContext, train

    fresh = not (cfg.stage_dir / "latest" / "checkpoint.pt").is_file()
    c0, w0 = time.process_time(), time.perf_counter()
    train(cfg, RunContext(progress=progress))  # a finished run returns at once
    if fresh:
        record.write_text(json.dumps({"cpu_s": round(time.process_time() - c0, 1),
                                      "wall_s": round(time.perf_counter() - w0, 1)}) + "\n")


def run_one(form: str, seed: int, eval_seeds: int, scale: str = "small", threads: int = 1,
            progress: bool = True) -> list[dict]:
    """Train (or find) one form's teacher and student for one seed, evaluate the policies (or read their records)."""
    import torch

    from ractd.evaluate import EvalConfig, evaluate_checkpoint

    torch.set_num_threads(threads)
    run_dir = run_dir_for(form, seed)
    teacher, student = quick_budget.stage_configs(TEACHER_STEPS, seed, run_dir, scale)
    teacher, student = (dataclasses.replace(c, **form_settings(form)) for c in (teacher, student))
    times = {}
    for cfg in (teacher, student):
        record = run_dir / f"{cfg.stage}_time.json"
        if run_dir.parent == runs_root():
            _timed_train(cfg, progress, record)
        times[cfg.stage] = json.loads(record.read_text()) if record.is_file() else {}
    qb_time = run_dir / "teacher_time_s.txt"  # quick_budget's own record (wall seconds) of an adopted run
    if not times["teacher"] and qb_time.is_file():
        times["teacher"] = {"wall_s": float(qb_time.read_text())}
    rows = []
    for name, (stage, sampler, nfe) in POLICIES.items():
        out = run_dir / f"eval-{name}.parquet"
        if not out.is_file():
            ckpt = (teacher if stage == "teacher" else student).stage_dir / "best.pt"
            evaluate_checkpoint(EvalConfig(task=TASK, sampler=sampler, nfe=nfe, checkpoint=str(ckpt),
                                           seeds=eval_seeds, out=str(out)), progress=progress)
        x = np.asarray([r["normalized_score"] for r in read_rows(out)], float)
        rows.append({"task": TASK, "scale": scale, "form": form, "seed": seed, "policy": name, "cpu": cpu_name(),
                     **dict(zip(("mean", "se"), mean_se(x))), "n": len(x),
                     "teacher_accel": _resolved(teacher.stage_dir), "student_accel": _resolved(student.stage_dir),
                     **{f"{stage}_{k}": float(times[stage].get(k, math.nan)) for stage in ("teacher", "student")
                        for k in ("cpu_s", "wall_s")}})
    return rows


def against_reference(rows: list[dict], form: str, reference: str, seed: int) -> list[dict]:
    """`rows` (one form's run of `seed`) with how far its models and episodes are from the reference form's run of
    the same seed: each stage's largest |weight difference| over its best.pt's parameters, and per policy the
    number of evaluation episodes (paired by evaluation seed) whose scores differ."""
    import torch

    here, there = run_dir_for(form, seed), run_dir_for(reference, seed)
    diffs = {}
    for stage in ("teacher", "student"):
        a, b = (torch.load(d / stage / "best.pt", map_location="cpu", weights_only=False)["model"]
                for d in (here, there))
        diffs[f"{stage}_max_weight_diff"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    out = []
    for r in rows:
        x, y = ({e["seed"]: e["normalized_score"] for e in read_rows(d / f"eval-{r['policy']}.parquet")}
                for d in (here, there))
        out.append({**r, **diffs, "reference": reference,
                    "episodes_differing": sum(x[k] != y[k] for k in x.keys() & y.keys())})
    return out


def compare(rows: list[dict], policy: str = "student") -> list[dict]:
    """Each form against the first form of the rows on the seeds both have: their means over training seeds, each
    mean's SE over seeds, the difference and its SE (the two in quadrature), "unchanged" when |difference| <= 2 SE;
    and the per-seed differences. A form with fewer than 2 seeds in common has no SE over seeds: not compared."""
    forms = list(dict.fromkeys(r["form"] for r in rows if r["policy"] == policy))
    by = {(r["form"], r["seed"]): r["mean"] for r in rows if r["policy"] == policy}
    out = []
    for form in forms[1:]:
        seeds = sorted(s for f, s in by if f == form and (forms[0], s) in by)
        if len(seeds) < 2:
            continue
        a = np.asarray([by[(forms[0], s)] for s in seeds])
        b = np.asarray([by[(form, s)] for s in seeds])
        se_a, se_b = a.std(ddof=1) / math.sqrt(len(a)), b.std(ddof=1) / math.sqrt(len(b))
        d, se = float(b.mean() - a.mean()), math.hypot(se_a, se_b)
        out.append({"form": form, "reference": forms[0], "policy": policy, "seeds": seeds, "mean": float(b.mean()),
                    "reference_mean": float(a.mean()), "difference": d, "se": se, "unchanged": abs(d) <= 2 * se,
                    "per_seed": [float(x) for x in b - a]})
    return out


def report_lines(rows: list[dict]) -> list[str]:
    lines = [quick_budget.seed_table(rows, "form", list(dict.fromkeys(r["form"] for r in rows)), POLICIES), ""]
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        if isinstance(r.get("reference"), str) and math.isfinite(r.get("teacher_max_weight_diff", math.nan)):
            runs.setdefault((r["form"], r["reference"], r["seed"]), []).append(r)
    for (form, reference, seed), got in runs.items():
        lines.append(f"{form} against {reference}, seed {seed}: largest |weight difference| teacher "
                     f"{got[0]['teacher_max_weight_diff']:.1e}, student {got[0]['student_max_weight_diff']:.1e}; "
                     "episodes scoring differently " + ", ".join(f"{r['policy']} {int(r['episodes_differing'])} "
                                                                 f"of {r['n']}" for r in got))
    for policy in POLICIES:
        for c in compare(rows, policy):
            lines.append(f"{policy}, {c['form']} vs {c['reference']} on seeds {c['seeds']}: mean of seeds "
                         f"{c['mean']:.1f} vs {c['reference_mean']:.1f}, {c['difference']:+.1f} ± {c['se']:.1f} "
                         f"(SE over seeds) -- {'unchanged' if c['unchanged'] else 'CHANGED (more than 2 SE)'}; "
                         "per seed " + ", ".join(f"{x:+.1f}" for x in c["per_seed"]))
    for stage in ("teacher", "student"):
        parts = []
        for form in dict.fromkeys(r["form"] for r in rows):
            got = [r for r in rows if r["form"] == form and r["policy"] == "student"]
            cpu, wall = ([r[f"{stage}_{k}"] for r in got if math.isfinite(r[f"{stage}_{k}"])]
                         for k in ("cpu_s", "wall_s"))
            if cpu:
                parts.append(f"{form} {np.median(cpu):.0f} s CPU / {np.median(wall):.0f} s wall")
            elif wall:
                parts.append(f"{form} {np.median(wall):.0f} s wall (CPU seconds not recorded)")
            else:
                parts.append(f"{form} not recorded")
        lines.append(f"{stage} training, median over seeds (this machine beside other jobs: not a benchmark): "
                     + ", ".join(parts))
    return lines


def section(data: Path) -> list[str]:
    """docs/results.md's part for this study: <data>/training_forms/results.parquet (the accel forms, fp32) and
    <data>/training_forms/bf16/results.parquet (fp32 against bf16 autocast, run on a CPU with bf16 hardware)."""
    rows = read_rows(Path(data) / STORE / "bf16" / "results.parquet")
    cpus = sorted({r.get("cpu") for r in rows if r.get("cpu")})
    return quick_budget.store_section(
        data, STORE, f"### Training forms on paired training seeds ({STUDY})",
        "maze2d-umaze, the quick sweep's teacher (1200 steps) and Table 9 trial trained in each form of "
        "`TrainConfig.accel` per training seed; normalized score, mean ± SE over the same evaluation seeds. The forms "
        "compute the same function up to float rounding; this asks whether the models they end at score alike.",
        report_lines) + quick_budget.store_section(
        data, f"{STORE}/bf16", "#### fp32 against bf16 autocast",
        "The same models trained in fp32 and under bf16 autocast (form -bf16: what `accel auto` trains in on a CPU "
        "that multiplies bf16 in hardware), on " + (", ".join(cpus) or "a CPU with bf16 hardware") + ". bf16 is "
        "not exact: every product's inputs keep 8 bits of mantissa.", report_lines)


def main(argv: list[str] | None = None) -> int:
    from ractd.accel import ACCELS

    ap = quick_budget.parser(__doc__, "<cache>/bench/training_forms")
    accels = [a for a in ACCELS if a != "auto"]
    ap.add_argument("--forms", nargs="+", choices=accels + [f"{a}-bf16" for a in accels], default=["eager", "nhwc"],
                    help="the first is the reference; an accel name runs fp32, with -bf16 under bf16 autocast")
    args = ap.parse_args(argv)

    def one(form, seed, *rest):
        rows = run_one(form, seed, *rest)
        return rows if form == args.forms[0] else against_reference(rows, form, args.forms[0], seed)

    return run_command(lambda: quick_budget.run_grid(args, args.forms, one, runs_root(), report_lines))


if __name__ == "__main__":
    sys.exit(main())
