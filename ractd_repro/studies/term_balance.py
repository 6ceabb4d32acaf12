"""Eq. (9)'s term balance, measured: each term's magnitude as training logs it, and the students' scores when
the terms are added as they come (DistillConfig.term_scale "raw", the paper and its code) or with L_CTM and L_DSM
each divided by a running mean of its own value ("balanced": App. B.3's "keep the individual loss terms within
the same order of magnitude" made exact), over a grid of reward weights sigma.

    python -m ractd_repro.studies.term_balance --task hopper-medium-replay --scales balanced --sigmas 0 0.03 0.1 0.3 1
    python -m ractd_repro.studies.term_balance --scales balanced --sigmas 0 0.1 --train-seeds 1 2   # a point on more
    seeds
    python -m ractd_repro.studies.term_balance --report --out docs/results/balance/hopper-medium-replay-small   #
    committed

Every student distils the same teacher with the same reward model: those of ractd_repro.studies.training_seeds's shared
run (--shared, default <cache>/bench/seeds/<task>-<scale>/shared; trained there when missing), at that study's budget
(400 steps at batch 128, model selection on 10 full episodes every 100 steps), evaluated on the same 100 seeds at
its selected and its final checkpoint. A "raw" point that study already trained (CTD: sigma 0, RACTD: its
--sigma) is taken from its store (--seeds-store) instead of being trained twice.

Each finished (scale, sigma, training seed) is one file <out>/rows/*.parquet (two processes can share an --out:
run one per core); <out>/results.parquet gathers them. A row carries the scores and the run's term magnitudes:
ctm, dsm, reward = the mean over the logged checkpoints of each term's raw batch mean, and the share of the
weighted loss each term makes (under "balanced" the distance terms weigh alpha and beta each); with --grad-norms
also g_ctm, g_dsm, g_reward: the norm of each weighted term's gradient on the student at its final checkpoint
(ractd.train.term_gradient_norms), which is what a term's weight acts through.
Resumable: a stored row is not redone, train() resumes a cut run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from ractd import RactdError
from ractd.errors import Parser, run_command
from ractd.evaluate import EvalConfig, evaluate_checkpoint
from ractd.io import atomic_parquet
from ractd.paths import cache_dir
from ractd.tasks import get_task
from ractd.train import TrainConfig, train
from ractd_repro.claims import Z


def _shared(args) -> tuple[str, str]:
    """(teacher best.pt, reward best.pt) of the shared run, trained there when missing (train() resumes)."""
    common = dict(task=args.task, scale=args.scale, seed=0, run_dir=str(args.shared))
    reward = TrainConfig.for_stage("reward", "cpu", **common)
    teacher = TrainConfig.for_stage("teacher", "cpu", steps=args.teacher_steps, **common)
    return str(train(teacher)["best"]), str(train(reward)["best"])


def _terms(run_dir: Path) -> dict:
    """Mean over the run's logged checkpoints of each term and of its diagnostics at the last one."""
    lines = [json.loads(x) for x in (run_dir / "student" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    out = {}
    for k in ("ctm", "dsm", "reward"):
        vals = [m[k] for m in lines if m.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    for k in ("at_bound", "r_gap"):
        out[k] = lines[-1].get(k, float("nan")) if lines else float("nan")
    return out


def _shares(row: dict) -> dict:
    """The share of the weighted loss each term makes (|weight x term| over their sum)."""
    if row["term_scale"] == "raw":
        parts = {"ctm": row["alpha"] * row["ctm"], "dsm": row["beta"] * row["dsm"]}
    else:  # balanced: the distance terms enter at ~1; gradient: every term does (its value over its pull)
        parts = {"ctm": row["alpha"], "dsm": row["beta"]}
    parts["reward"] = 0.0 if row["sigma"] <= 0 else row["sigma"] * (
        1.0 if row["term_scale"] == "gradient" else abs(row["reward"]))
    total = sum(parts.values())
    return {f"share_{k}": v / total for k, v in parts.items()}


def _from_seeds_store(args, scale: str, sigma: float, seed: int) -> dict | None:
    """A raw row ractd_repro.studies.training_seeds already made with this teacher and budget (CTD or its RACTD
    sigma)."""
    import pandas as pd

    if scale != "raw" or not args.seeds_store.is_file():
        return None
    method = "ctd" if sigma == 0 else "ractd"
    rows = pd.read_parquet(args.seeds_store)
    hit = rows[(rows["method"] == method) & (rows["train_seed"] == seed) & (rows["sigma"].round(6) == round(sigma, 6))]
    if hit.empty:
        return None
    r = hit.iloc[0].to_dict()
    run_dir = args.seeds_store.parent / f"{method}-seed{seed}"
    return {**{k: r[k] for k in ("best_mean", "best_sem", "final_mean", "final_sem", "n", "train_s", "steps")},
            **_terms(run_dir), "run_dir": str(run_dir), "source": "ractd_repro.studies.training_seeds"}


def _weights(task: str, sigma: float) -> tuple[float, float]:
    """Eq. (9)'s alpha, beta of a point: CTD (sigma 0) at 1, 1, RACTD at the task's Table 9 values."""
    w = get_task(task).weights
    return (1.0, 1.0) if sigma == 0 else (w.alpha, w.beta)


def _train_row(args, scale: str, sigma: float, seed: int, teacher: str, reward: str) -> dict:
    run_dir = args.out / "runs" / f"{scale}-sigma{sigma:g}-seed{seed}"
    base = TrainConfig.for_stage("student", "cpu", task=args.task, scale=args.scale, seed=seed, run_dir=str(run_dir),
                                 steps=args.steps, batch=args.batch, ckpt_every=args.ckpt_every,
                                 teacher_ckpt=teacher, reward_ckpt=reward)
    a, b = _weights(args.task, sigma)
    cfg = dataclasses.replace(base, distill=dataclasses.replace(base.distill, alpha=a, beta=b, sigma=sigma,
                                                                 term_scale=scale)).resolved()
    t0 = time.perf_counter()
    res = train(cfg)
    row = {"steps": int(res["step"]), "train_s": time.perf_counter() - t0}
    for which, ckpt in (("best", res["best"]), ("final", res["checkpoint"])):
        s = evaluate_checkpoint(EvalConfig(task=args.task, run_dir=str(run_dir), sampler="student", checkpoint=str(ckpt), seeds=args.eval_seeds, precision="fp32", out=str(run_dir / f"eval-{which}.parquet")), progress=False)
        row.update({f"{which}_mean": s["score_mean"], f"{which}_sem": s["score_sem"], "n": s["n"]})
    return {**row, **_terms(run_dir), "run_dir": str(run_dir), "source": "ractd_repro.studies.term_balance"}


def _grad_norms(run_dir: Path) -> dict:
    """ractd.train.term_gradient_norms at the run's final checkpoint, with its own teacher and reward model."""
    import torch

    from ractd import ctm
    from ractd.train import (
        load_stage_model,
        load_upstream,
        prepare,
        term_gradient_norms,
    )

    student, cfg, ck = load_stage_model(run_dir / "student" / "latest" / "checkpoint.pt", use_ema=False)
    prep = prepare(cfg)
    teacher, _ = load_upstream(Path(cfg.teacher_ckpt), "teacher", cfg, prep)
    reward, _ = load_upstream(Path(cfg.reward_ckpt), "reward", cfg, prep) if cfg.reward_ckpt else (None, None)
    balance = None
    if ck.get("term_balance"):
        balance = ctm.TermBalance()
        balance.load_state_dict(ck["term_balance"])
    return term_gradient_norms(cfg, student, teacher, reward, prep, torch.device("cpu"), balance)


def _fill_grad_norms(out: Path) -> None:
    """Add the gradient norms to every stored row without them (one process: it rewrites the row files)."""
    import pandas as pd

    for f in sorted((out / "rows").glob("*.parquet")):
        row = pd.read_parquet(f).to_dict("records")[0]
        if row.get("g_ctm") is not None and not math.isnan(row["g_ctm"]):
            continue
        row.update(_grad_norms(Path(row["run_dir"])))
        atomic_parquet(f, [row])
        print(f"{f.stem}: |grad| ctm {row['g_ctm']:.3g}, dsm {row['g_dsm']:.3g}, reward "
              f"{row.get('g_reward', float('nan')):.3g}", flush=True)


def _rows(out: Path) -> list[dict]:
    import pandas as pd

    files = sorted((out / "rows").glob("*.parquet"))
    return [r for f in files for r in pd.read_parquet(f).to_dict("records")]


def run(args) -> int:
    get_task(args.task)  # an unknown task: one line
    args.out = Path(args.out) if args.out else cache_dir() / "bench" / "balance" / f"{args.task}-{args.scale}"
    seeds_dir = cache_dir() / "bench" / "seeds" / f"{args.task}-{args.scale}"
    args.shared = Path(args.shared).expanduser() if args.shared else seeds_dir / "shared"
    args.seeds_store = Path(args.seeds_store).expanduser() if args.seeds_store else seeds_dir / "results.parquet"
    if not args.report:
        if get_task(args.task).kind == "maze":
            raise RactdError(f"{args.task}: maze2d students have no reward term; use a locomotion task")
        (args.out / "rows").mkdir(parents=True, exist_ok=True)
        teacher = reward = ""
        for seed in args.train_seeds:
            for scale in args.scales:
                for sigma in args.sigmas:
                    f = args.out / "rows" / f"{scale}-sigma{sigma:g}-seed{seed}.parquet"
                    if f.is_file():
                        continue
                    row = _from_seeds_store(args, scale, sigma, seed)
                    if row is None:
                        if not teacher:
                            teacher, reward = _shared(args)
                        row = _train_row(args, scale, sigma, seed, teacher, reward)
                    a, b = _weights(args.task, sigma)
                    row = {"task": args.task, "term_scale": scale, "sigma": sigma, "train_seed": seed, "alpha": a,
                           "beta": b, **row}
                    row.update(_shares(row))
                    atomic_parquet(f, [row])
                    print(f"{scale} σ={sigma:g} seed {seed}: selected {row['best_mean']:.1f} ± "
                          f"{row['best_sem']:.1f}, final {row['final_mean']:.1f} (ctm {row['ctm']:.3f}, "
                          f"dsm {row['dsm']:.1f}, reward {row['reward']:.2f})", flush=True)
    if args.grad_norms:
        _fill_grad_norms(args.out)
    rows = _rows(args.out)
    if not rows:
        raise RactdError(f"no rows under {args.out / 'rows'}")
    atomic_parquet(args.out / "results.parquet", rows)
    print("\n".join(balance_report(rows)))
    print(f"\nstore: {args.out / 'results.parquet'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-replay")
    ap.add_argument("--scale", default="small")
    ap.add_argument("--scales", nargs="+", default=["raw", "balanced"], choices=["raw", "balanced", "gradient"],
                    help="DistillConfig.term_scale values to run")
    ap.add_argument("--sigmas", nargs="+", type=float, default=[0.0, 0.3], help="reward weights (0 = CTD)")
    ap.add_argument("--train-seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--teacher-steps", type=int, default=2000, help="the shared teacher's (when trained here)")
    ap.add_argument("--steps", type=int, default=400, help="student steps")
    ap.add_argument("--batch", type=int, default=128, help="student batch")
    ap.add_argument("--ckpt-every", type=int, default=100, help="student checkpoint / model selection interval")
    ap.add_argument("--eval-seeds", type=int, default=100)
    ap.add_argument("--shared", default="", help="the teacher and reward run (default: the training_seeds study's)")
    ap.add_argument("--seeds-store", default="", help="the training_seeds study's results.parquet to take raw rows "
                    "from (default: its cache folder's)")
    ap.add_argument("--out", default="", help="default <cache>/bench/balance/<task>-<scale>")
    ap.add_argument("--report", action="store_true", help="only gather <out>/rows and print the table")
    ap.add_argument("--grad-norms", action="store_true", help="add each term's gradient norm at the final "
                    "checkpoint to the rows without one (ractd.train.term_gradient_norms; run it in one process)")
    args = ap.parse_args(argv)
    return run_command(lambda: run(args))


# ---------------------------------------------------------------------------------------------- report

STUDY = "ractd_repro.studies.term_balance"
STORE = "balance"


def section(data: Path) -> list[str]:
    """docs/results.md's part for this study: one block per <data>/balance/<task>-<scale>/results.parquet."""
    import pandas as pd

    parts = []
    for f in sorted((Path(data) / STORE).glob("*/results.parquet")):
        parts += [f"### Eq. (9)'s term balance ({STUDY}): {f.parent.name}", "",
                  "Students of one teacher and reward model (those of the training-seed study), 400 steps at batch "
                  "128, selected on 10 full episodes every 100 steps, 100 evaluation seeds. raw: Eq. (9) adds the "
                  "terms as they come (the paper); balanced: L_CTM and L_DSM each divided by a running mean of its "
                  "own value (DistillConfig.term_scale). L_* are the logged raw terms (mean over checkpoints); the "
                  "loss shares are each weighted term's part of the loss; ‖∇‖ is the norm of each weighted "
                  "term's gradient on the student at its final checkpoint (ractd.train.term_gradient_norms, 4 "
                  "batches).", "",
                  *balance_report(pd.read_parquet(f).to_dict("records")), ""]
    return parts


def balance_report(rows: list[dict]) -> list[str]:
    """This study's store as Markdown: one line per (term scale, sigma) with its score per training
    seed (selected checkpoint ± SE, final in brackets) and its terms' mean magnitudes and shares of the weighted
    loss and, where measured, the norms of their weighted gradients at the final checkpoint (mean over seeds); then
    each "balanced" or "gradient" point against the raw point of the same role (CTD for sigma = 0, RACTD for
    sigma > 0) on the training seeds both have (a difference counts at Z SE of the difference; "above"/"below"
    only when it does on every such seed)."""
    from tabulate import tabulate

    if not rows:
        return ["(no rows)"]
    by = {}
    for r in rows:
        by.setdefault((r["term_scale"], float(r["sigma"])), []).append(r)
    table = []
    for (scale, sigma), rs in sorted(by.items()):
        rs = sorted(rs, key=lambda r: r["train_seed"])
        scores = "; ".join(f"{int(r['train_seed'])}: {r['best_mean']:.1f} ± {r['best_sem']:.1f} "
                           f"({r['final_mean']:.1f})" for r in rs)
        m = {k: sum(r[k] for r in rs) / len(rs) for k in ("ctm", "dsm", "reward", "share_ctm", "share_dsm",
                                                           "share_reward", "at_bound")}
        grads = [r for r in rs if r.get("g_ctm") is not None and not math.isnan(r["g_ctm"])]
        g = "" if not grads else " / ".join(
            f"{sum(r[k] for r in grads) / len(grads):.3g}" for k in ("g_ctm", "g_dsm", "g_reward"))
        table.append([scale, f"{sigma:g}", scores, f"{m['ctm']:.3f}", f"{m['dsm']:.1f}",
                      "" if sigma == 0 else f"{m['reward']:.2f}",
                      f"{m['share_ctm']:.2f} / {m['share_dsm']:.2f} / {m['share_reward']:.2f}", g,
                      f"{m['at_bound']:.3f}"])
    lines = [tabulate(table, headers=["terms", "σ", "selected ± SE (final) per training seed", "L_CTM", "L_DSM",
                                      "L_Reward", "loss share CTM / DSM / reward", "‖∇‖ CTM / DSM / reward",
                                      "at bound"], tablefmt="github"), ""]
    raw = {(int(r["train_seed"]), r["sigma"] > 0): r for r in rows if r["term_scale"] == "raw"}
    for (scale, sigma), rs in sorted(by.items()):
        if scale == "raw":
            continue
        diffs = []
        for r in rs:  # against the raw point of the same role: CTD for sigma = 0, RACTD for sigma > 0
            ref = raw.get((int(r["train_seed"]), sigma > 0))
            if ref is None:
                continue
            d = r["best_mean"] - ref["best_mean"]
            diffs.append((int(r["train_seed"]), d, math.hypot(r["best_sem"], ref["best_sem"]), ref["sigma"]))
        if diffs:
            word = ("above" if all(d > Z * se for _, d, se, _ in diffs) else
                    "below" if all(d < -Z * se for _, d, se, _ in diffs) else "mixed or level")
            parts = ", ".join(f"seed {s}: {d:+.1f} ± {se:.1f}" for s, d, se, _ in diffs)
            ref_name = "CTD" if sigma == 0 else f"RACTD (σ = {diffs[0][3]:g})"
            lines.append(f"- {scale} σ = {sigma:g} minus raw {ref_name}, selected checkpoints: {parts} → {word} on "
                         f"{len(diffs)} training seed(s)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
