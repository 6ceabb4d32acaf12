"""Learning curves: train until the held-out loss stops falling, and choose the dataset size by measurement.

For each of --fractions f a teacher (TrainConfig stage "teacher": the cpu budget, --steps, --preset, --batch) is
trained with --holdout of the dataset's episodes held out whole (TrainConfig.holdout: the same episodes for every
fraction) on the first f of the other episodes (TrainConfig.data_fraction: nested subsets of one fixed permutation),
and its held-out Eq. (4) loss is logged at every checkpoint (--ckpt-every) at fixed noise levels with fixed noise
draws (ractd.holdout), of its EMA weights (val_loss) and of its trained weights (val_loss_raw, the weights the
training loss is of). --stage student draws the same curves for the CTM student of one teacher (--teacher-ckpt,
default the study's own full-data teacher, which then has the same held-out episodes): CTD by default (--sigma 0),
its held-out loss Eq. (9)'s distance terms (alpha L_CTM + beta L_DSM) with fixed draws; model selection by that
loss, no rollouts.

    python -m ractd_repro.studies.learning_curves --task hopper-medium-replay [--fractions 0.25 0.5 1.0] [--steps N]
    python -m ractd_repro.studies.learning_curves --task hopper-medium-replay --stage student [--teacher-ckpt PATH]
    python -m ractd_repro.studies.learning_curves --report --out docs/results/curves/hopper-medium-replay-small

Writes <out>/curves.parquet (default <cache>/bench/curves/<task>-<scale>): one row per (stage, fraction,
checkpoint) with the task, the dataset fingerprint, the held-out share, the fraction, the training episodes /
windows / transitions, the step, the training loss (the mean of the last report's steps) and the held-out losses.
The runs live under <cache>/bench/curves/<task>-<scale>/runs/ whatever --out is, so a store written into
docs/results/ gets the rows, not the checkpoints. Then prints per fraction the final held-out loss, its minimum,
and the step after which it stopped falling (`stopped_falling`: the first checkpoint that no later checkpoint
improves by more than --min-gain, relative; "still falling" when only the last one qualifies), and the dataset
size by measurement (`smallest_sufficient`: the smallest fraction whose final held-out loss is within --tolerance,
relative, of the largest fraction's). Resumable: a finished run returns at once, more --steps extend it, and the
rows are re-read from each run's metrics.jsonl.

How long to train is not read off one run: its learning rate decays (cosine) to zero at its last step, so every
curve flattens at its end whatever a longer run would reach. --budgets N [N ...] trains the largest fraction again
for N steps each, each run with its own warm-up and decay (a run of its own, not an extension), and reports the
final held-out loss per budget and `budget by measurement`: the smallest budget within --tolerance of the largest's.

    python -m ractd_repro.studies.learning_curves --task halfcheetah-medium --fractions 1.0 --budgets 6000
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import sys
from pathlib import Path

import numpy as np

from ractd import RactdError
from ractd.errors import run_command
from ractd.io import atomic_parquet, read_rows
from ractd.paths import cache_dir

STORE = "curves"
STUDY = "ractd_repro.studies.learning_curves"
TITLE = "Learning curves: held-out loss against steps and dataset size"
EXTRA = ("val_loss_raw", "val_ctm", "val_dsm")  # the stages' other held-out losses (ractd.holdout)


def stopped_falling(steps, values, min_gain: float = 0.01) -> int | None:
    """The step of the first checkpoint that no later checkpoint improves by more than `min_gain` of its value
    (relative; a non-finite value counts as +inf); None when no checkpoint before the last one qualifies: the
    curve was still falling at the end of the run (or has one point)."""
    v = np.asarray(values, float)
    v = np.where(np.isfinite(v), v, np.inf)
    for i in range(len(v) - 1):
        if np.isfinite(v[i]) and v[i + 1:].min() >= v[i] - min_gain * abs(v[i]):
            return int(steps[i])
    return None


def smallest_sufficient(finals: dict[float, float], tolerance: float = 0.02) -> float | None:
    """The smallest key (a data fraction, or a budget of steps) whose final held-out loss is at most
    (1 + tolerance) x the largest key's; None without a finite final of the largest."""
    if not finals:
        return None
    full = finals[max(finals)]
    if not math.isfinite(full):
        return None
    return min(f for f, v in finals.items() if math.isfinite(v) and v <= full + tolerance * abs(full))


CURVE_SET = ("stage", "preset", "batch", "seed", "holdout")  # the runs that differ only in data fraction or budget


def _set_name(key: tuple) -> str:
    return "{} (preset {}, batch {}, seed {}, holdout {:g})".format(*key)


def _with_budget(df):
    """The rows with their run's budget (its total steps); rows written before the column existed ran their whole
    budget, so theirs is the last step of their run."""
    df = df.copy()
    if "budget" not in df:
        df["budget"] = np.nan
    missing = df["budget"].isna()
    if missing.any():
        df.loc[missing, "budget"] = df[missing].groupby([*CURVE_SET, "fraction"])["step"].transform("max")
    df["budget"] = df["budget"].astype(int)
    return df


def normalized(rows: list[dict]) -> list[dict]:
    """Stored rows, each with its budget (see _with_budget)."""
    import pandas as pd

    return _with_budget(pd.DataFrame(rows)).to_dict("records") if rows else []


def _fraction_budget(g) -> int:
    """The budget the fraction curves share: the smaller fractions' (the budget runs are of the largest fraction
    only), else the smallest budget."""
    small = g[g["fraction"] < g["fraction"].max()]
    return int((small if len(small) else g)["budget"].min())


def _curve(c, min_gain: float) -> dict:
    val = c["val_loss"].astype(float).to_numpy()
    best = int(np.nanargmin(val)) if np.isfinite(val).any() else 0
    return {"fraction": float(c["fraction"].iloc[0]), "budget": int(c["budget"].iloc[0]),
            "n_train_transitions": int(c["n_train_transitions"].iloc[0]),
            "n_train_episodes": int(c["n_train_episodes"].iloc[0]), "steps": int(c["step"].max()),
            "final_val_loss": float(val[-1]), "best_val_loss": float(val[best]), "best_step": int(c["step"].iloc[best]),
            "stopped_falling_at": stopped_falling(c["step"].to_numpy(), val, min_gain)}


def _sufficient(g, by: str, min_gain: float, tolerance: float) -> list[dict]:
    """One _curve per value of `by` (fraction or budget), "sufficient": True on the smallest value whose final
    held-out loss is within the tolerance of the largest's (smallest_sufficient)."""
    table = [_curve(c, min_gain) for _, c in g.sort_values("step").groupby(by)]
    pick = smallest_sufficient({r[by]: r["final_val_loss"] for r in table}, tolerance)
    for r in table:
        r["sufficient"] = r[by] == pick
    return table


def summary(rows: list[dict], min_gain: float = 0.01, tolerance: float = 0.02) -> dict[str, list[dict]]:
    """Per set of curves (CURVE_SET), one dict per fraction at the fractions' budget: its training size, final and
    best held-out loss and where the curve stopped falling, and "sufficient": True on the smallest fraction within
    the tolerance of the largest."""
    import pandas as pd

    out: dict[str, list[dict]] = {}
    df = _with_budget(pd.DataFrame(rows))
    for key, g in df.groupby(list(CURVE_SET), sort=False):
        g = g[g["budget"] == _fraction_budget(g)]
        out[_set_name(key)] = _sufficient(g, "fraction", min_gain, tolerance)
    return out


def budget_summary(rows: list[dict], min_gain: float = 0.01, tolerance: float = 0.02) -> dict[str, list[dict]]:
    """Per set of curves with two or more budgets of its largest fraction, one dict per budget (each run its own
    warm-up and cosine decay to zero): final and best held-out loss, and "sufficient": True on the smallest budget
    whose final held-out loss is within the tolerance of the largest budget's. Within one run the loss flattens as
    its learning rate decays, whatever a longer run would reach: only runs of different budgets say how long to
    train."""
    import pandas as pd

    out: dict[str, list[dict]] = {}
    df = _with_budget(pd.DataFrame(rows))
    for key, g in df.groupby(list(CURVE_SET), sort=False):
        g = g[g["fraction"] == g["fraction"].max()]
        if g["budget"].nunique() < 2:
            continue
        out[_set_name(key)] = _sufficient(g, "budget", min_gain, tolerance)
    return out


def summary_lines(rows: list[dict], min_gain: float = 0.01, tolerance: float = 0.02) -> list[str]:
    """The summary as markdown: a table per stage and the dataset size by measurement; where runs of several
    budgets exist, the budget table and the budget by measurement."""
    from tabulate import tabulate

    lines = []
    budgets = budget_summary(rows, min_gain, tolerance)
    for name, table in summary(rows, min_gain, tolerance).items():
        cells = [[f"{r['fraction']:g}", r["n_train_transitions"], r["n_train_episodes"], r["steps"],
                  f"{r['final_val_loss']:.5g}", f"{r['best_val_loss']:.5g} (step {r['best_step']})",
                  "still falling" if r["stopped_falling_at"] is None else r["stopped_falling_at"]] for r in table]
        lines += [f"{name}: held-out loss per data fraction (stopped falling: the first checkpoint no later one "
                  f"improves by more than {min_gain:.0%})", "",
                  tabulate(cells, headers=["fraction", "train transitions", "train episodes", "steps",
                                           "final held-out loss", "best (step)", "stopped falling at"],
                           tablefmt="github", disable_numparse=True), ""]
        pick = [r for r in table if r["sufficient"]]
        largest = table[-1]
        if pick:
            r = pick[0]
            lines.append(f"{name}: data size by measurement: fraction {r['fraction']:g} ({r['n_train_transitions']} "
                         f"transitions), the smallest whose final held-out loss is within {tolerance:.0%} of fraction "
                         f"{largest['fraction']:g}'s.")
        if largest["stopped_falling_at"] is None:
            lines.append(f"{name}: fraction {largest['fraction']:g}'s held-out loss was still falling at step "
                         f"{largest['steps']}: train longer before reading the data size off these curves.")
        elif largest["best_step"] == largest["steps"]:
            lines.append(f"{name}: fraction {largest['fraction']:g}'s best held-out loss is at its last checkpoint: "
                         f"it still falls, by less than {min_gain:.0%} in all after step "
                         f"{largest['stopped_falling_at']}.")
        if name not in budgets:
            lines.append(f"{name}: within one run the learning rate decays to zero at its last step, so where a "
                         f"curve flattens is not where a longer run would stop improving; runs of other budgets "
                         f"(--budgets) say that.")
        lines.append("")
    for name, table in budgets.items():
        cells = [[r["budget"], f"{r['fraction']:g}", f"{r['final_val_loss']:.5g}",
                  f"{r['best_val_loss']:.5g} (step {r['best_step']})",
                  f"{r['final_val_loss'] / table[0]['final_val_loss'] - 1:+.2%}"] for r in table]
        lines += [f"{name}: held-out loss per training budget (each run its own warm-up and cosine decay to zero)",
                  "", tabulate(cells, headers=["budget (steps)", "fraction", "final held-out loss", "best (step)",
                                               f"final vs {table[0]['budget']} steps"],
                               tablefmt="github", disable_numparse=True), ""]
        r, largest = next(r for r in table if r["sufficient"]), table[-1]
        if r is largest:
            lines.append(f"{name}: budget by measurement: {largest['budget']} steps, the largest tried: every "
                         f"shorter run ends more than {tolerance:.0%} above it (train longer, or try more).")
        else:
            lines.append(f"{name}: budget by measurement: {r['budget']} steps, the smallest whose final held-out "
                         f"loss is within {tolerance:.0%} of {largest['budget']} steps'.")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------- runs

def run_config(args, stage: str, fraction: float, runs: Path, teacher: str = "", budget: int | None = None):
    """The TrainConfig of one fraction's run; its folder names what defines the run (a changed setting is a new
    run, more steps extend the old one). `budget`: the run's total steps (its own warm-up and cosine decay to zero),
    a run of its own (tag `-n<budget>`) unless it equals the fractions' --steps."""
    from ractd.train import TrainConfig

    over = dict(task=args.task, scale=args.scale, seed=args.seed, holdout=args.holdout, data_fraction=fraction,
                preset=args.preset, report_every=min(50, args.ckpt_every or 50))
    for name in ("steps", "batch", "ckpt_every"):
        if getattr(args, name):
            over[name] = getattr(args, name)
    own_budget = budget is not None and budget != over.get("steps", TrainConfig.for_stage(stage, "cpu").steps)
    if own_budget:
        over["steps"] = budget
    if stage == "student":
        over.update(teacher_ckpt=teacher, reward_ckpt=args.reward_ckpt, select_seeds=0)
    cfg = TrainConfig.for_stage(stage, "cpu", **over)
    if stage == "student":
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, sigma=args.sigma))
    tag = f"{stage}-{args.preset}-b{cfg.batch}-h{args.holdout:g}-f{fraction:g}-s{args.seed}"
    tag += f"-n{budget}" if own_budget else ""
    if stage == "student":
        tag += f"-sigma{args.sigma:g}-t{hashlib.sha1(str(Path(teacher).resolve()).encode()).hexdigest()[:8]}"
    return dataclasses.replace(cfg, run_dir=str(runs / tag)).resolved()


def curve_rows(cfg, prep) -> list[dict]:
    """The rows of one run: one per checkpoint of its metrics.jsonl (the last line of a step), with the sizes of
    its training and held-out sets."""
    import json

    from ractd import holdout

    train_idx, val_idx = holdout.split(cfg, prep)
    eps_train, eps_val = np.unique(prep.episode[train_idx]), np.unique(prep.episode[val_idx])
    base = {"task": cfg.task, "scale": cfg.scale, "stage": cfg.stage, "fingerprint": prep.fingerprint,
            "preset": cfg.preset, "batch": cfg.batch, "seed": cfg.seed, "holdout": cfg.holdout,
            "fraction": cfg.data_fraction, "budget": cfg.steps, "n_train_episodes": len(eps_train),
            "n_train_windows": len(train_idx),
            "n_train_transitions": int(prep.episode_lengths[eps_train].sum()), "n_val_episodes": len(eps_val),
            "n_val_windows": len(val_idx)}
    by_step = {}
    for line in (cfg.stage_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        by_step[int(m["step"])] = m
    nan = float("nan")
    return [{**base, "step": step, "train_loss": _num(m.get("loss")), "val_loss": _num(m.get("val_loss")),
             **{k: _num(m.get(k)) for k in EXTRA if k in m}, "lr": _num(m.get("lr", nan))}
            for step, m in sorted(by_step.items())]


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def default_teacher(args, runs: Path) -> str:
    """The teacher a student curve distils: --teacher-ckpt, else the study's own full-data teacher's best.pt."""
    if args.teacher_ckpt:
        path = Path(args.teacher_ckpt)
    else:
        found = sorted(runs.glob(f"teacher-{args.preset}-b*-h{args.holdout:g}-f1-s{args.seed}/teacher/best.pt"))
        if len(found) != 1:
            raise RactdError(f"{len(found)} full-data teachers of this study under {runs} (preset {args.preset}, "
                             f"holdout {args.holdout:g}, seed {args.seed}): run the teacher curve with fraction 1 "
                             f"first, or give --teacher-ckpt")
        path = found[0]
    if not path.is_file():
        raise RactdError(f"no teacher checkpoint at {path}")
    from ractd.checkpoint import load_checkpoint

    held = load_checkpoint(path)["config"].get("holdout", 0.0)
    if held != args.holdout:
        print(f"note: the teacher held out {held} of the episodes, this curve {args.holdout}: the student's "
              f"held-out episodes are not all unseen by its teacher", flush=True)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-replay")
    ap.add_argument("--scale", default="small")
    ap.add_argument("--stage", default="teacher", choices=["teacher", "student"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 1.0],
                    help="shares of the training episodes (nested subsets)")
    ap.add_argument("--holdout", type=float, default=0.1, help="share of the episodes held out (the same for all)")
    ap.add_argument("--steps", type=int, default=0, help="steps of every run (default: the cpu budget's)")
    ap.add_argument("--budgets", nargs="+", type=int, default=[],
                    help="more runs of the largest fraction, each this many steps with its own warm-up and cosine "
                         "decay: how long to train (within one run the loss flattens as the learning rate decays)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (default: the cpu budget's)")
    ap.add_argument("--ckpt-every", type=int, default=0, help="steps between points of the curve (default: steps/20)")
    ap.add_argument("--preset", default="cpu", help="U-Net preset (ractd.config.UNET_PRESETS, cpu, paper)")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: torch's; 1 when another job shares the CPUs: two threads on a "
                         "shared core wait on each other)")
    ap.add_argument("--teacher-ckpt", default="", help="--stage student: the teacher (default: this study's, f=1)")
    ap.add_argument("--reward-ckpt", default="", help="--stage student with --sigma > 0: the reward model")
    ap.add_argument("--sigma", type=float, default=0.0, help="--stage student: Eq. (9)'s reward weight (0 = CTD)")
    ap.add_argument("--min-gain", type=float, default=0.01, help="a later improvement smaller than this (relative) "
                                                                   "is no longer falling")
    ap.add_argument("--tolerance", type=float, default=0.02, help="a final held-out loss within this (relative) of "
                                                                    "the largest fraction's is as good")
    ap.add_argument("--out", default="", help="default <cache>/bench/curves/<task>-<scale>")
    ap.add_argument("--report", action="store_true", help="only print the summary of the store in --out")
    args = ap.parse_args(argv)
    return run_command(lambda: run(args))


def run(args) -> int:
    from ractd.train import prepare, train

    folder = cache_dir() / "bench" / STORE / f"{args.task}-{args.scale}"
    out, runs = Path(args.out) if args.out else folder, folder / "runs"
    store = out / "curves.parquet"
    rows = read_rows(store, required=args.report)
    if not args.report:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if not all(0 < f <= 1 for f in args.fractions) or not 0 < args.holdout < 1:
            raise RactdError("--fractions must be in (0, 1] and --holdout in (0, 1)")
        if any(n < 1 for n in args.budgets):
            raise RactdError(f"--budgets must be positive step counts, got {args.budgets}")
        if not args.ckpt_every:
            from ractd.train import TrainConfig

            steps = args.steps or TrainConfig.for_stage(args.stage, "cpu").steps
            args.ckpt_every = max(1, steps // 20)
        out.mkdir(parents=True, exist_ok=True)
        teacher = default_teacher(args, runs) if args.stage == "student" else ""
        rows, prep = normalized(rows), None
        plan = [(f, None) for f in sorted(args.fractions)] + [(max(args.fractions), n) for n in sorted(args.budgets)]
        for fraction, budget in plan:
            cfg = run_config(args, args.stage, fraction, runs, teacher, budget)
            prep = prepare(cfg) if prep is None else prep
            train(cfg, prep=prep)
            new = curve_rows(cfg, prep)
            key = (*CURVE_SET, "fraction", "budget")
            rows = [r for r in rows if tuple(r[k] for k in key) != tuple(new[0][k] for k in key)] + new
            atomic_parquet(store, rows)
            last = new[-1]
            print(f"{args.stage} fraction {fraction:g}, {cfg.steps} steps: {last['n_train_transitions']} transitions, "
                  f"step {last['step']}, held-out loss {new[0]['val_loss']:.5g} -> {last['val_loss']:.5g}", flush=True)
    print("\n" + "\n".join(summary_lines(rows, args.min_gain, args.tolerance)))
    print(f"store: {store}")
    return 0


# ---------------------------------------------------------------------------------------------- report

def section(data: Path) -> list[str]:
    """docs/results.md's part for this study: per store folder <data>/curves/<task>-<scale>/, the summary and the
    curves (held-out loss per checkpoint, one column per run: its fraction, and its budget where there are several)."""
    import pandas as pd

    parts = []
    for f in sorted((Path(data) / STORE).glob("*/curves.parquet")):
        rows = read_rows(f)
        if not rows:
            continue
        parts += [f"### {TITLE} ({STUDY}): {f.parent.name}", "", *summary_lines(rows)]
        df = _with_budget(pd.DataFrame(rows))
        for key, g in df.groupby(list(CURVE_SET), sort=False):
            several = g["budget"].nunique() > 1
            g = g.assign(run=[f"fraction {f:g}" + (f", {n} steps" if several else "")
                              for f, n in zip(g["fraction"], g["budget"])])
            wide = g.pivot_table(index="step", columns="run", values="val_loss", aggfunc="last", sort=False)
            name = _set_name(key)
            parts += [f"{name}: held-out loss at each checkpoint", "",
                      wide.to_markdown(floatfmt=".5g"), ""]
    return parts


if __name__ == "__main__":
    sys.exit(main())
