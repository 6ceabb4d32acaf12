"""RACTD against CTD (and behavior cloning, and the data's own level) on several training seeds.

The claims study (eval/reproduce_tables.py --study claims) trains one student per method, so its verdicts rule on
the spread across evaluation episodes only. This script adds the other spread: one shared teacher and reward
model (training seed 0, the study's budget), then for each training seed a CTD student (alpha = beta = 1,
sigma = 0), a RACTD student (the task's Table 9 alpha, beta at the reward weight --sigma) and a BC MLP (CORL's
recipe, TrainConfig stage "bc"; `--methods ... bc10`: also CORL's 10% BC, the bar a reward-aware method must clear on
replay data), each evaluated on the same --eval-seeds evaluation seeds at its selected and its final checkpoint.

    python -m ractd_repro.studies.training_seeds --task hopper-medium-replay [--sigma 0.3] [--train-seeds 0 1 2]
    python -m ractd_repro.studies.training_seeds --methods ractd ractd_ctm --train-seeds 0 --nfe 2 4   # Table 5's
    question
    python -m ractd_repro.studies.training_seeds --report --out docs/results/seeds/hopper-medium-replay-small   #
    committed

The default budget is the claims study's hopper sweep (ractd_repro.spec.CLAIMS_SWEEPS): 2000 teacher steps, students
400 steps at batch 128 with a checkpoint (and model selection on 10 full-length episodes) every 100; --sigma 0.3
is that sweep's pick.

--methods teacher trains a teacher per training seed (TrainConfig "teacher", --teacher-steps, the library's
default Eq. (4) form) and evaluates its Heun-80 (158 network calls) on --teacher-eval-seeds seeds, in pieces of
--chunk seeds (each piece stored as it finishes: a run cut short resumes at the next piece); --teacher-run
names where each seed's teacher run lives ("{seed}" is replaced; default <out>/teacher-seed{seed}; the students
then distil training seed 0's teacher there instead of a shared one of their own), and episodes
already stored under that run's eval/heun-*.parquet (python -m ractd evaluate's default place) are reused, never
rolled out twice. The report then rules on the teacher against the behavior policy's level and against BC.

    python -m ractd_repro.studies.training_seeds --task walker2d-medium --methods teacher bc --teacher-steps 3000 \
        --teacher-run ~/.cache/ractd/science/walker2d-medium-s{seed} --teacher-eval-seeds 30

--methods ractd_ctm adds a RACTD student whose reward term is applied at a random t (DistillConfig.reward_variant
"ctm", the released code's multi-step variant); --nfe K ... also evaluates each student's selected checkpoint with
K steps (Table 5).

Writes <out>/results.parquet: one row per (method, training seed) with the selected ("best") and final
checkpoints' mean normalized score and its SE over the evaluation seeds, and one "data" row (the dataset's
complete episodes, ractd.data.level). The episodes of each evaluation are kept beside it
(<out>/<method>-seed<k>/eval-<best|final>.parquet). Prints the table and the verdict: RACTD beats CTD on a
training seed when the difference exceeds 2 SE of the difference (SE over episodes); the claim holds on the seeds
when it does on every training seed, and the spread across training seeds is reported beside the mean.
Resumable: a trained model is not retrained (train() resumes its run), a stored row is not redone.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

from ractd.accel import ACCELS
from ractd.errors import run_command
from ractd.evaluate import EvalConfig, evaluate_checkpoint
from ractd.io import atomic_parquet, read_rows
from ractd.paths import cache_dir
from ractd.tasks import get_task
from ractd.train import TrainConfig, train
from ractd_repro.claims import Z

METHODS = ("ctd", "ractd", "bc", "bc10", "ractd_ctm", "teacher")  # bc10: CORL's 10% BC (BC on the best tenth
# of the trajectories by return); ractd_ctm: RACTD with reward_variant "ctm"; teacher: a teacher per training seed
# (none of these three by default)
BC_METHODS = {"bc": 1.0, "bc10": 0.1}  # method -> TrainConfig.bc_top_fraction


def teacher_run_dir(args, seed: int, out: Path) -> Path:
    """Where training seed `seed`'s teacher run lives: --teacher-run with {seed} replaced, else
    <out>/teacher-seed<seed>."""
    if args.teacher_run:
        return Path(str(args.teacher_run).replace("{seed}", str(seed))).expanduser()
    return out / f"teacher-seed{seed}"


def shared_models(args, out: Path) -> tuple[str, str]:
    """(teacher best.pt, reward best.pt) of the shared run (training seed 0), trained when missing. With
    --teacher-run the shared teacher is training seed 0's teacher there (the students distil the teacher the
    teacher rows evaluate)."""
    common = dict(task=args.task, scale=args.scale, seed=0, run_dir=str(out / "shared"))
    steps = {"steps": args.reward_steps} if args.reward_steps else {}
    reward = TrainConfig.for_stage("reward", "cpu", **common, **steps)
    teacher = TrainConfig.for_stage("teacher", "cpu", steps=args.teacher_steps, **common)
    if args.teacher_run:
        teacher = dataclasses.replace(teacher, run_dir=str(teacher_run_dir(args, 0, out))).resolved()
    reward_best = str(train(reward)["best"])  # train() resumes: a finished run returns at once
    return str(train(teacher)["best"]), reward_best


def method_config(args, method: str, seed: int, out: Path, teacher: str, reward: str) -> TrainConfig:
    run_dir = str(out / f"{method}-seed{seed}")
    if method in BC_METHODS:
        return TrainConfig.for_stage("bc", "cpu", task=args.task, scale=args.scale, seed=seed, run_dir=run_dir,
                                     bc_top_fraction=BC_METHODS[method],
                                     **({"steps": args.bc_steps} if args.bc_steps else {})).resolved()
    base = TrainConfig.for_stage("student", "cpu", task=args.task, scale=args.scale, seed=seed, run_dir=run_dir,
                                 steps=args.steps, batch=args.batch, ckpt_every=args.ckpt_every,
                                 teacher_ckpt=teacher, reward_ckpt=reward, accel=getattr(args, "accel", "auto"))
    w = get_task(args.task).weights
    a, b, s = (1.0, 1.0, 0.0) if method == "ctd" else (w.alpha, w.beta, args.sigma)
    variant = "ctm" if method == "ractd_ctm" else base.distill.reward_variant
    return dataclasses.replace(base, distill=dataclasses.replace(base.distill, alpha=a, beta=b, sigma=s,
                                                                  reward_variant=variant)).resolved()


def multi_step(args, rows: list[dict], out: Path, store: Path) -> None:
    """Table 5: each student row of --methods and --train-seeds also evaluated at its selected checkpoint with
    each of --nfe steps (ctm.sample_student: jump to sigma_min, re-noise, jump again); stored as nfe<k>_mean/_sem
    (a stored value is not redone)."""
    for row in rows:
        if row["method"] in (*BC_METHODS, "data", "teacher") or row["method"] not in args.methods:
            continue
        if int(row["train_seed"]) not in args.train_seeds:
            continue
        run_dir = out / f"{row['method']}-seed{int(row['train_seed'])}"
        for k in args.nfe:
            key = f"nfe{k}_mean"
            if k == 1 or (key in row and row[key] == row[key]):  # present and not NaN
                continue
            s = evaluate_checkpoint(EvalConfig(task=args.task, run_dir=str(run_dir), sampler="student", nfe=k, checkpoint=str(run_dir / "student" / "best.pt"), seeds=args.eval_seeds, out=str(run_dir / f"eval-best-nfe{k}.parquet")), progress=False)
            row.update({key: s["score_mean"], f"nfe{k}_sem": s["score_sem"]})
            atomic_parquet(store, rows)
            print(f"{row['method']} seed {int(row['train_seed'])}: {k} steps {s['score_mean']:.1f} ± "
                  f"{s['score_sem']:.1f}", flush=True)


def teacher_row(args, seed: int, out: Path) -> dict:
    """Train (or resume) the training seed's teacher and evaluate its Heun-80 on seeds 0 .. teacher_eval_seeds - 1,
    reusing stored episodes and storing new ones a piece (--chunk seeds) at a time."""
    import numpy as np
    import pandas as pd

    run_dir = teacher_run_dir(args, seed, out)
    cfg = TrainConfig.for_stage("teacher", "cpu", task=args.task, scale=args.scale, seed=seed,
                                steps=args.teacher_steps, run_dir=str(run_dir)).resolved()
    t0 = time.perf_counter()
    res = train(cfg)   # a finished run returns at once
    train_s = time.perf_counter() - t0
    ckpt = Path(res["best"])

    def stored() -> pd.DataFrame:
        files = sorted((run_dir / "eval").glob("heun-*.parquet"))
        eps = pd.concat([pd.read_parquet(f) for f in files]) if files else pd.DataFrame(columns=["seed"])
        if len(eps):  # Heun-80 at fp32 of this very checkpoint only (the folder may hold other evaluations)
            keep = (eps["nfe"] == 80) & (eps["precision"] == "fp32") if "precision" in eps else eps["nfe"] == 80
            keep &= eps["checkpoint"].map(lambda c: Path(c).resolve() == ckpt.resolve())
            eps = eps[keep]
        return eps.drop_duplicates("seed")

    want = list(range(args.teacher_eval_seeds))
    while True:
        have = set(int(s) for s in stored()["seed"])
        missing = [s for s in want if s not in have]
        if not missing:
            break
        piece = missing[:args.chunk]
        print(f"teacher seed {seed}: Heun-80 on evaluation seeds {piece[0]}..{piece[-1]}", flush=True)
        evaluate_checkpoint(EvalConfig(task=args.task, run_dir=str(run_dir), sampler="heun", checkpoint=str(ckpt), precision="fp32", out=str(run_dir / "eval" / f"heun-{piece[0]}-{len(piece)}.parquet")), seeds=piece, progress=True)
    eps = stored()
    x = eps[eps["seed"].isin(want)]["normalized_score"].to_numpy(float)
    sem = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {"method": "teacher", "train_seed": seed, "sigma": 0.0, "steps": int(res["step"]), "train_s": train_s,
            "best_mean": float(np.mean(x)), "best_sem": sem, "final_mean": float(np.mean(x)), "final_sem": sem,
            "n": len(x), "run_dir": str(run_dir)}


def data_row(args) -> dict:
    from ractd.data.d4rl import load_dataset
    from ractd.data.level import behavior_evals, data_level

    t = get_task(args.task)
    data = load_dataset(t, scale=args.scale)
    lvl = data_level(t, data)
    x = lvl["scores"]
    beh = behavior_evals(t, data)
    return {"method": "data", "train_seed": -1, "best_mean": float(x.mean()),
            "best_sem": float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan"),
            "n": len(x), "behavior": float(beh[-1]["normalized"]) if beh else float("nan")}


def run(args) -> int:
    out = Path(args.out) if args.out else cache_dir() / "bench" / "seeds" / f"{args.task}-{args.scale}"
    store = out / "results.parquet"
    rows = read_rows(store, required=args.report)
    done = {(r["method"], r["train_seed"]) for r in rows}
    if not args.report:
        out.mkdir(parents=True, exist_ok=True)
        if ("data", -1) not in done:
            rows.append(data_row(args))
            atomic_parquet(store, rows)
        students = set(args.methods) & {"ctd", "ractd", "ractd_ctm"}
        teacher, reward = shared_models(args, out) if students else ("", "")  # BC and teacher rows need neither
        for seed in args.train_seeds:
            for method in args.methods:
                if (method, seed) in done:
                    continue
                if method == "teacher":
                    rows.append(teacher_row(args, seed, out))
                    atomic_parquet(store, rows)
                    r = rows[-1]
                    print(f"teacher seed {seed}: Heun-80 {r['best_mean']:.1f} ± {r['best_sem']:.1f} (n={r['n']})",
                          flush=True)
                    continue
                cfg = method_config(args, method, seed, out, teacher, reward)
                t0 = time.perf_counter()
                res = train(cfg)
                sigma = 0.0 if method in BC_METHODS else cfg.distill.sigma
                row = {"method": method, "train_seed": seed, "sigma": sigma, "steps": int(res["step"]),
                       "train_s": time.perf_counter() - t0}
                sampler = "bc" if method in BC_METHODS else "student"
                for which, ckpt in (("best", res["best"]), ("final", res["checkpoint"])):
                    s = evaluate_checkpoint(EvalConfig(task=args.task, run_dir=cfg.run_dir, sampler=sampler, checkpoint=str(ckpt), seeds=args.eval_seeds, out=str(Path(cfg.run_dir) / f"eval-{which}.parquet")), progress=False)
                    row.update({f"{which}_mean": s["score_mean"], f"{which}_sem": s["score_sem"], "n": s["n"]})
                rows.append(row)
                atomic_parquet(store, rows)
                print(f"{method} seed {seed}: selected {row['best_mean']:.1f} ± {row['best_sem']:.1f}, "
                      f"final {row['final_mean']:.1f} ± {row['final_sem']:.1f} (n={row['n']}, "
                      f"{row['train_s'] / 60:.1f} min)", flush=True)
        multi_step(args, rows, out, store)
    print("\n".join(seed_report(rows, args.task)))
    print(f"\nstore: {store}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-replay")
    ap.add_argument("--scale", default="small")
    ap.add_argument("--sigma", type=float, default=0.3, help="RACTD's reward weight (the claims sweep's pick)")
    ap.add_argument("--teacher-steps", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=400, help="student steps")
    ap.add_argument("--batch", type=int, default=128, help="student batch")
    ap.add_argument("--ckpt-every", type=int, default=100, help="student checkpoint / model selection interval")
    ap.add_argument("--reward-steps", type=int, default=0, help="0 = the cpu budget's")
    ap.add_argument("--bc-steps", type=int, default=0, help="0 = the cpu budget's")
    ap.add_argument("--methods", nargs="+", default=list(METHODS[:3]), choices=list(METHODS))
    ap.add_argument("--train-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--eval-seeds", type=int, default=100)
    ap.add_argument("--teacher-eval-seeds", type=int, default=30, help="Heun-80 rollouts per teacher (method teacher)")
    ap.add_argument("--chunk", type=int, default=10, help="teacher evaluation seeds per stored piece")
    ap.add_argument("--teacher-run", default="", help="where training seed {seed}'s teacher run lives (method "
                    "teacher; default <out>/teacher-seed{seed})")
    ap.add_argument("--nfe", nargs="+", type=int, default=[], help="also evaluate each student's selected "
                    "checkpoint with these step counts (Table 5), e.g. --nfe 2 4")
    ap.add_argument("--accel", default="auto", choices=ACCELS, help="the students' TrainConfig.accel (ractd.accel; "
                    "a form's paired seeds: the same --train-seeds with another --out)")
    ap.add_argument("--out", default="", help="default <cache>/bench/seeds/<task>-<scale>")
    ap.add_argument("--report", action="store_true", help="only print the table of the store in --out")
    args = ap.parse_args(argv)

    def body():
        get_task(args.task)
        return run(args)

    return run_command(body)


# ---------------------------------------------------------------------------------------------- report

STUDY = "ractd_repro.studies.training_seeds"
STORE = "seeds"


def section(data: Path) -> list[str]:
    """docs/results.md's part for this study: one block per <data>/seeds/<task>-<scale>/results.parquet."""
    import pandas as pd

    parts = []
    for f in sorted((Path(data) / STORE).glob("*/results.parquet")):
        rows = pd.read_parquet(f).to_dict("records")
        task = f.parent.name.rsplit("-", 1)[0]
        methods = {r["method"] for r in rows}
        about = []
        if "ractd" in methods:
            about.append("One shared teacher and reward model; per training seed a CTD student (σ = 0), a RACTD "
                         "student and a BC MLP, each on the same 100 evaluation seeds at its selected and its final "
                         f"checkpoint. Verdict rule: RACTD beats on a training seed when the difference exceeds {Z:g} "
                         "SE; the claim holds when it does on every training seed.")
        if "teacher" in methods:
            about.append("A teacher per training seed (its final EMA weights), Heun-80 on the first n evaluation "
                         "seeds, against the behavior policy's level and BC (100 seeds, final checkpoint); the "
                         f"teacher is below on a seed when it is more than {Z:g} SE under."
                         + (" The CTD student (σ = 0, 100 seeds) distils training seed 0's teacher."
                            if "ctd" in methods and "ractd" not in methods else ""))
        parts += [f"### Teachers, students and BC on several training seeds ({STUDY}): "
                  f"{f.parent.name}", "", " ".join(about), "", *seed_report(rows, task), ""]
    return parts


SEED_METHODS = ("teacher", "ctd", "ractd", "bc", "bc10", "ractd_ctm")


def seed_verdicts(rows: list[dict]) -> list[dict]:
    """RACTD vs CTD and RACTD vs BC per training seed (ractd_repro.studies.training_seeds's rows: one per method and training
    seed, "best_*" = selected checkpoint, "final_*" = final one): the difference and its SE over evaluation
    episodes, "beats" / "below" / "ties" at Z SE; the claim holds on the seeds when RACTD beats on every one.
    The teacher (one checkpoint per training seed: its final EMA weights) against BC: final checkpoints only."""
    by = {(r["method"], int(r["train_seed"])): r for r in rows}
    out = []
    for a, b in (("ractd", "ctd"), ("ractd", "bc"), ("ractd", "bc10"), ("teacher", "bc")):
        for which in ("final",) if a == "teacher" else ("best", "final"):
            seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
            if not seeds:
                continue
            per = []
            for s in seeds:
                ra, rb = by[(a, s)], by[(b, s)]
                d = float(ra[f"{which}_mean"] - rb[f"{which}_mean"])
                se = math.hypot(float(ra[f"{which}_sem"]), float(rb[f"{which}_sem"]))
                per.append({"seed": s, "diff": d, "se": se,
                            "outcome": "beats" if d > Z * se else "below" if d < -Z * se else "ties"})
            held = all(p["outcome"] == "beats" for p in per)
            worse = all(p["outcome"] == "below" for p in per)
            out.append({"a": a, "b": b, "checkpoint": "selected" if which == "best" else "final", "per_seed": per,
                        "verdict": "holds" if held else "does not hold" if worse else "inconclusive"})
    return out


def teacher_vs_behavior(by: dict, seeds: list[int], level: float) -> str:
    """One line: the teachers' Heun-80 per training seed against the behavior policy's level (a number without an
    SE: its own evaluation): "at or above" (mean >= level), "below, within Z SE" or "below" (by more than Z SE);
    the goal holds when every training seed is at or above, does not hold when every one is clearly below, and
    is inconclusive otherwise."""
    per, means, outcomes = [], [], []
    for s in seeds:
        r = by[("teacher", s)]
        m, se = float(r["final_mean"]), float(r["final_sem"])
        means.append(m)
        outcome = "at or above" if m >= level else "below" if level - m > Z * se else f"below, within {Z:g} SE"
        outcomes.append(outcome)
        per.append(f"seed {s}: {m:.1f} ± {se:.1f}, n={int(r['n'])} ({outcome})")
    verdict = ("holds" if all(o == "at or above" for o in outcomes) else
               "does not hold" if all(o == "below" for o in outcomes) else "inconclusive")
    return (f"- TEACHER (Heun-80, 158 network calls) at least the behavior policy's level ({level:.1f}): **{verdict}** "
            f"on {len(seeds)} training seed(s): " + "; ".join(per) + f"; mean over training seeds "
            f"{np.mean(means):.1f}.")


def seed_report(rows: list[dict], task: str) -> list[str]:
    """Markdown lines: the table of one task's training-seed study and its verdicts (seed_verdicts)."""
    from tabulate import tabulate

    by = {(r["method"], int(r["train_seed"])): r for r in rows}
    table = []
    for m in SEED_METHODS:
        seeds = sorted(s for (mm, s) in by if mm == m)
        for s in seeds:
            r = by[(m, s)]
            table.append([m, s, f"{r['best_mean']:.1f} ± {r['best_sem']:.1f}",
                          f"{r['final_mean']:.1f} ± {r['final_sem']:.1f}", int(r["n"])])
        if len(seeds) > 1:
            cells = []
            for which in ("best", "final"):
                v = np.array([by[(m, s)][f"{which}_mean"] for s in seeds], float)
                cells.append(f"{v.mean():.1f} (sd {v.std(ddof=1):.1f}, {v.min():.1f} to {v.max():.1f})")
            table.append([f"{m}: over {len(seeds)} training seeds", "", *cells, ""])
    lines = [tabulate(table, headers=["method", "training seed", "selected checkpoint", "final checkpoint", "n"],
                      tablefmt="github", disable_numparse=True), ""]
    if ("data", -1) in by:
        d = by[("data", -1)]
        lines.append(f"The data's own level: {d['best_mean']:.1f} ± {d['best_sem']:.1f} over the dataset's "
                     f"{int(d['n'])} complete episodes; the behavior policy (the generator's record): "
                     f"{d['behavior']:.1f}.")
        lines.append("")
        teachers = sorted(s for (m, s) in by if m == "teacher")
        if teachers and d["behavior"] == d["behavior"]:
            lines.append(teacher_vs_behavior(by, teachers, float(d["behavior"])))
            lines.append("")
    if ("teacher", 0) in by and any(m == "ctd" for m, _ in by):
        # with teacher rows the students distil training seed 0's teacher (ractd_repro.studies.training_seeds --teacher-run)
        t = by[("teacher", 0)]
        per = [f"seed {s}: {by[('ctd', s)]['best_mean'] - t['final_mean']:+.1f} ± "
               f"{math.hypot(by[('ctd', s)]['best_sem'], t['final_sem']):.1f}"
               for s in sorted(s for m, s in by if m == "ctd")]
        lines += [f"- CTD (selected checkpoint) minus the teacher it distils (training seed 0's, Heun-80 "
                  f"{t['final_mean']:.1f} ± {t['final_sem']:.1f}): " + "; ".join(per) + ".", ""]
    for v in seed_verdicts(rows):
        per = "; ".join(f"seed {p['seed']}: {p['diff']:+.1f} ± {p['se']:.1f} ({p['outcome']})" for p in v["per_seed"])
        lines.append(f"- {v['a'].upper()} vs {v['b'].upper()}, {v['checkpoint']} checkpoints: **{v['verdict']}** "
                     f"on {len(v['per_seed'])} training seed(s): {per}.")
    multi = []
    for (m, s), r in sorted(by.items()):
        steps = sorted(int(k[3:-5]) for k in r if k.startswith("nfe") and k.endswith("_mean") and r[k] == r[k])
        if steps:
            multi.append(f"{m} seed {s}: 1 step {r['best_mean']:.1f} ± {r['best_sem']:.1f}, " + ", ".join(
                f"{k} steps {r[f'nfe{k}_mean']:.1f} ± {r[f'nfe{k}_sem']:.1f}" for k in steps))
    if multi:
        lines.append("- Multi-step sampling (Table 5), selected checkpoints (ractd_ctm: the reward applied at a "
                     "random t, `reward_variant=\"ctm\"`): " + "; ".join(multi) + ".")
    return lines


if __name__ == "__main__":
    sys.exit(main())
