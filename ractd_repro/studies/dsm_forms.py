"""Eq. (7) settled by measurement: the DSM term's form and weight, their magnitude against the CTM term, and the
one-step student's score, at equal compute.

The forms (DSM_FORMS below, DistillConfig fields dsm_form x dsm_weighting):
  "lambda_denoiser"  EDM's lambda(sigma) x d(x0, g(x_sigma, sigma, sigma)) -- the library's default
                     (DistillConfig: dsm_form "denoiser", dsm_weighting "lambda"), kept by this study;
  "lambda_jump"      lambda(sigma) x d(x0, G(x_sigma, sigma, sigma_min)) -- the released code's form;
  "paper"            d(x0, G(x_sigma, sigma, 0)) with no weight -- Eq. (7) as printed ("the same as ... Equation
                     4", which the paper writes without a weight);
  "none_denoiser"    d(x0, g(x_sigma, sigma, sigma)) with no weight.
Every form distills from the same teacher (one per training seed: the Eq. (4) default form at the quick budget,
reused from ractd_repro.studies.eq4_forms's store when present, else trained here), with the same budget and seed. The
students are maze2d-umaze's (sigma = 0: CTD, no reward term), so the comparison is of CTM against DSM alone.

    python -m ractd_repro.studies.dsm_forms [--train-seeds 0 1 2] [--eval-seeds 100] [--forms paper lambda_denoiser]
    python -m ractd_repro.studies.dsm_forms --report --out docs/results/dsm/maze2d-umaze-small    # the committed
    measurement
    python -m ractd_repro.studies.dsm_forms --toy [--train-seeds 0 1 2]    # the two-mode bandit of ractd.toy instead

--toy: the mode-coverage check behind the choice of "denoiser" (ractd.toy: a 30% / 70% two-mode bandit;
a CTD student should keep the teacher's share of the 30% mode): one teacher per training seed, one CTD student per
form, the share of one-step samples on the 30% mode (2000 states). Rows go to <out>/toy.parquet.

Writes <out>/results.parquet (one row per form and training seed: the terms' mean over the second half of
training, their ratio, the selected and final checkpoints' scores on --eval-seeds seeds, and the selected one's
with the plan's first state inpainted (ractd.policy.StartPinned); one "teacher" row per training seed: Heun-80
without and with inpainting) and prints a table.
Resumable: a finished student is not retrained, a stored row is not redone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from ractd import RactdError
from ractd.errors import run_command
from ractd.evaluate import EvalConfig, evaluate_checkpoint
from ractd.io import atomic_parquet, read_rows
from ractd.paths import cache_dir
from ractd.train import TrainConfig, train

DSM_FORMS: dict[str, tuple[str, str]] = {  # name -> (dsm_form, dsm_weighting)
    "lambda_denoiser": ("denoiser", "lambda"),
    "lambda_jump": ("jump", "lambda"),
    "paper": ("jump", "none"),
    "none_denoiser": ("denoiser", "none"),
}


def term_means(metrics_file: Path) -> dict:
    """Mean ctm / dsm / loss over the second half of the logged reports of a student's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "ctm" in r and "dsm" in r]
    if not rows:
        raise RactdError(f"{metrics_file}: no ctm / dsm reports")
    half = rows[len(rows) // 2:]
    out = {k: float(np.mean([r[k] for r in half])) for k in ("ctm", "dsm")}
    out["dsm_over_ctm"] = out["dsm"] / max(out["ctm"], 1e-12)
    return out


def _load(store: Path, report: bool) -> tuple[list[dict], set]:
    """(rows of the store, their (form, training seed) keys); --report on an empty store is an error."""
    rows = read_rows(store, required=report)
    return rows, {(r["form"], r["train_seed"]) for r in rows}


def ensure_teacher(args, seed: int, out: Path) -> Path:
    reuse = cache_dir() / "bench" / "eq4" / f"{args.task}-{args.scale}" / f"paper-seed{seed}" / "teacher" / "best.pt"
    if reuse.is_file() and args.budget == "quick":
        return reuse
    cfg = TrainConfig.for_stage("teacher", args.budget, task=args.task, scale=args.scale, seed=seed,
                                run_dir=str(out / f"teacher-seed{seed}")).resolved()
    return Path(train(cfg)["best"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="maze2d-umaze")
    ap.add_argument("--scale", default="small")
    ap.add_argument("--budget", default="quick", help="budget of teacher and students (ractd.train.BUDGETS)")
    ap.add_argument("--steps", type=int, default=0, help="override the budget's student steps")
    ap.add_argument("--forms", nargs="+", default=list(DSM_FORMS), choices=list(DSM_FORMS))
    ap.add_argument("--train-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--eval-seeds", type=int, default=100, help="one-step rollouts per checkpoint")
    ap.add_argument("--out", default="", help="default <cache>/bench/dsm/<task>-<scale>")
    ap.add_argument("--report", action="store_true", help="only print the table of the store in --out")
    ap.add_argument("--toy", action="store_true", help="the two-mode bandit (ractd.toy) instead of the task")
    args = ap.parse_args(argv)
    return run_command(lambda: run_toy(args) if args.toy else run(args))


def run_toy(args) -> int:
    """Share of the CTD student's one-step samples on the bandit's 30% mode, per DSM form and training seed."""
    import pandas as pd
    import torch

    from ractd import ctm, edm, toy

    out = Path(args.out) if args.out else cache_dir() / "bench" / "dsm" / "toy"
    store = out / "toy.parquet"
    rows, done = _load(store, args.report)
    for seed in [] if args.report else args.train_seeds:
        out.mkdir(parents=True, exist_ok=True)
        cfg = toy.ToyConfig(seed=seed)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        state, action, high, _ = toy.make_bandit(cfg, cfg.n_data, g)
        teacher = toy.train_teacher(cfg, state, action)
        s_eval = torch.rand(2000, 2, generator=g) * 2 - 1

        def prior(n):
            return edm.prior_sample((n, 1, 2), generator=g)

        share_teacher = toy.high_mode_share(
            lambda s: edm.sample_heun(teacher.bind(s), prior(len(s)), edm.karras_sigmas()), s_eval)
        for form in args.forms:
            if (form, seed) in done:
                continue
            dsm_form, weighting = DSM_FORMS[form]
            dcfg = ctm.DistillConfig(sigma=0.0, dsm_form=dsm_form, dsm_weighting=weighting)
            student = toy.distill(cfg, teacher, None, state, action, dcfg)
            share = toy.high_mode_share(lambda s: ctm.sample_student(student, prior(len(s)), s), s_eval)
            rows.append({"form": form, "train_seed": seed, "data": high.float().mean().item(),
                         "teacher": share_teacher, "ctd": share})
            atomic_parquet(store, rows)
            print(f"toy {form} seed {seed}: 30%-mode share {share:.3f} (teacher {share_teacher:.3f})", flush=True)
    df = pd.DataFrame(rows).sort_values(["form", "train_seed"])
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nstore: {store}")
    return 0


def run(args) -> int:
    import pandas as pd

    out = Path(args.out) if args.out else cache_dir() / "bench" / "dsm" / f"{args.task}-{args.scale}"
    store = out / "results.parquet"
    rows, done = _load(store, args.report)
    for seed in [] if args.report else args.train_seeds:
        out.mkdir(parents=True, exist_ok=True)
        teacher = ensure_teacher(args, seed, out)
        if ("teacher", seed) not in done:
            row = {"form": "teacher", "train_seed": seed}
            for inpaint, col in (("none", "best"), ("start", "best_pinned")):
                s = evaluate_checkpoint(EvalConfig(task=args.task, run_dir=str(out), sampler="heun", checkpoint=str(teacher), seeds=args.eval_seeds, inpaint=inpaint, out=str(out / f"teacher-seed{seed}-{inpaint}.parquet")), progress=False)
                row.update({f"{col}_mean": s["score_mean"], f"{col}_sem": s["score_sem"], "n": s["n"]})
            rows.append(row)
            atomic_parquet(store, rows)
            print(f"teacher seed {seed}: Heun-80 {row['best_mean']:.1f}, inpainted {row['best_pinned_mean']:.1f}",
                  flush=True)
        for form in args.forms:
            if (form, seed) in done:
                continue
            dsm_form, weighting = DSM_FORMS[form]
            run_dir = out / f"{form}-seed{seed}"
            over = dict(task=args.task, scale=args.scale, seed=seed, run_dir=str(run_dir), teacher_ckpt=str(teacher))
            if args.steps:
                over["steps"] = args.steps
            base = TrainConfig.for_stage("student", args.budget, **over)
            cfg = dataclasses.replace(base, distill=dataclasses.replace(base.distill, dsm_form=dsm_form,
                                                                          dsm_weighting=weighting)).resolved()
            t0 = time.perf_counter()
            res = train(cfg)
            train_s = time.perf_counter() - t0
            row = {"form": form, "dsm_form": dsm_form, "dsm_weighting": weighting, "train_seed": seed,
                   "steps": res["step"], "train_s": train_s, **term_means(cfg.stage_dir / "metrics.jsonl")}
            for which, ckpt, inpaint in (("best", res["best"], "none"), ("final", res["checkpoint"], "none"),
                                         ("best_pinned", res["best"], "start")):
                s = evaluate_checkpoint(EvalConfig(task=args.task, run_dir=str(run_dir), sampler="student", checkpoint=str(ckpt), seeds=args.eval_seeds, inpaint=inpaint, out=str(run_dir / f"eval-{which}.parquet")), progress=False)
                row.update({f"{which}_mean": s["score_mean"], f"{which}_sem": s["score_sem"], "n": s["n"]})
            rows.append(row)
            atomic_parquet(store, rows)
            print(f"{form} seed {seed}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                      if isinstance(v, float)), flush=True)
    df = pd.DataFrame(rows).sort_values(["form", "train_seed"])
    cols = [c for c in ("form", "train_seed", "ctm", "dsm", "dsm_over_ctm", "best_mean", "best_sem", "final_mean",
                        "final_sem", "best_pinned_mean", "best_pinned_sem") if c in df]
    print("\nper training seed (terms: mean over the second half of training; scores: normalized, mean +- SE):")
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    agg = df.groupby("form").agg(ctm=("ctm", "mean"), dsm=("dsm", "mean"), best=("best_mean", "mean"),
                                 best_sd=("best_mean", "std"), final=("final_mean", "mean"),
                                 final_sd=("final_mean", "std"), pinned=("best_pinned_mean", "mean"),
                                 pinned_sd=("best_pinned_mean", "std"), seeds=("train_seed", "count"))
    print("\nacross training seeds (mean, and SD across training seeds):")
    print(agg.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"\nstore: {store}")
    return 0


# ---------------------------------------------------------------------------------------------- report

STUDY = "ractd_repro.studies.dsm_forms"
STORE = "dsm"
TITLE = "Eq. (7): the DSM term's form"


def section(data: Path) -> list[str]:
    """docs/results.md's part for this study: one block per store folder <data>/dsm/<task>-<scale>/."""
    parts = []
    for folder in sorted(p for p in (Path(data) / STORE).glob("*") if p.is_dir()):
        lines = _dsm_lines(folder)
        if lines:
            parts += [f"### {TITLE} ({STUDY}): {folder.name}", "", *lines, ""]
    return parts


def _dsm_lines(folder: Path) -> list[str]:
    import pandas as pd
    from tabulate import tabulate

    lines = []
    if (folder / "results.parquet").is_file():
        df = pd.read_parquet(folder / "results.parquet")
        table = []
        for form, g in df.groupby("form", sort=False):
            g = g.sort_values("train_seed")
            has_ratio = "dsm_over_ctm" in g and g["dsm_over_ctm"].notna().any()
            ratio = f"{g['dsm_over_ctm'].mean():.0f}x" if has_ratio else ""
            table.append([form, "; ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(g["best_mean"], g["best_sem"])), ratio])
        lines += [tabulate(table, headers=["form", "score per training seed (100 seeds each)", "DSM / CTM"],
                           tablefmt="github", disable_numparse=True)]
    if (folder / "toy.parquet").is_file():
        df = pd.read_parquet(folder / "toy.parquet")
        lines.append("Share of one-step samples on the toy bandit's 30% mode (teacher "
                     f"{df['teacher'].mean():.3f}, data {df['data'].mean():.3f}): "
                     + ", ".join(f"{r.form} {r.ctd:.3f}" for r in df.itertuples()) + ".")
    return lines


if __name__ == "__main__":
    sys.exit(main())
