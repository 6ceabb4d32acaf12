"""Rebuild the paper's tables and figures: evaluate a study's cells with a Ray actor pool into one results store.

    python eval/reproduce_tables.py --quick                  # the README's first command (after tune/search.py --quick)
    python eval/reproduce_tables.py                          # CPU-scale default study (maze2d-umaze,
    hopper-medium-replay)
    python eval/reproduce_tables.py --paper --address auto   # every task at the paper's scale, on a Ray cluster

Steps: (0) every task's dataset: on this machine, else fetched from the cluster's storage, else generated (each line
says which); (1) the study (ractd_repro.spec) lists its cells and the checkpoint each needs; missing checkpoints are
trained (--train-missing; Ray Train when --address names a cluster, else in this process) or their `python -m ractd
...` commands are printed and the cells marked missing; (2) the actor pool (ractd_ray.pool) rolls out every (cell,
seed) not yet in the store, block by block; (3) Fig. 3's reward samples and the data-level rows
(ractd_repro.baselines.baseline_rows); (4) tables (Markdown + CSV) and figures (PNG) from the store
(ractd_repro.store), printed and written under --out. Rerunning resumes: stored episodes are never rerun. On a
cluster ($RACTD_STORAGE_PATH) the store, tables and figures are also kept in storage, block by block, and the
sweep's records and checkpoints are read from there, so a new head (the old one lost with its disk) continues where
the old one stopped. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ractd import RactdError
from ractd.errors import Parser, run_command

log = logging.getLogger("reproduce_tables")


def build_parser() -> argparse.ArgumentParser:
    from ractd_ray.pool import PoolConfig
    from ractd_repro.spec import STUDIES

    pc = PoolConfig()
    p = Parser(prog="python eval/reproduce_tables.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--study", choices=list(STUDIES), default="default",
                   help="which study (ractd_repro.spec.STUDIES; default: default, the CPU-scale study)")
    g.add_argument("--quick", dest="study", action="store_const", const="quick", help="same as --study quick")
    g.add_argument("--paper", dest="study", action="store_const", const="paper", help="same as --study paper")
    p.add_argument("--tasks", nargs="+", default=None, help="only these tasks (default: the study's)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the study's, 100 as in the paper)")
    p.add_argument("--actors", type=int, default=pc.actors,
                   help="rollout actors (default: from the cluster's CPUs, or GPUs x --actors-per-gpu)")
    p.add_argument("--cpus-per-actor", type=float, default=pc.cpus_per_actor,
                   help=f"CPUs (and torch threads) per actor (default: {pc.cpus_per_actor:g})")
    p.add_argument("--actors-per-gpu", type=int, default=pc.actors_per_gpu,
                   help=f"actors sharing one GPU (default: {pc.actors_per_gpu})")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default=pc.gpu,
                   help="rollout actors on GPUs: auto (when the cluster has free GPUs), yes (ask for them: brings up "
                        "the GPU workers of an autoscaling cluster), no (default: auto)")
    p.add_argument("--block-size", type=int, default=pc.block_size,
                   help="seeds per block (default: a cell's seeds spread evenly over the actors)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (e.g. auto; default: $RAY_ADDRESS if set, else a local Ray instance); "
                        "on a cluster, missing checkpoints are trained with Ray Train")
    p.add_argument("--store", default=None, help="results store folder (default: <cache>/results/<study>/store)")
    p.add_argument("--out", default=None, help="tables and figures folder (default: <cache>/results/<study>)")
    p.add_argument("--train-missing", action=argparse.BooleanOptionalAction, default=None,
                   help="train missing checkpoints (default: the study's: on for --quick, off otherwise)")
    p.add_argument("--train-workers", type=int, default=1,
                   help="Ray Train workers per training stage when --address is given (default: 1)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="cap episodes at this many steps (smoke runs; stored as method@steps, not in the tables)")
    p.add_argument("--no-ray", action="store_true", help="evaluate in this process, without Ray")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of this process, which trains missing checkpoints (default: "
                        "torch's; use 1 when other work shares the CPUs: oversubscribed threads slow training "
                        "several-fold)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _on_cluster(args) -> bool:
    """--address given, or RAY_ADDRESS set (a `ray job submit` entrypoint on the cluster's head)."""
    import os

    return bool(args.address or os.environ.get("RAY_ADDRESS")) and not args.no_ray


def _trainer(args):
    if not _on_cluster(args):
        def local(cfg):
            from ractd.train import RunContext, train

            train(cfg, RunContext(progress=not args.quiet))

        return local

    def fit(cfg):
        from ractd_ray.train import RayTrainConfig, fit_stage

        fit_stage(cfg, RayTrainConfig(num_workers=args.train_workers, progress=not args.quiet))

    return fit


def fetch_trained(study) -> list[str]:
    """On a cluster, the study's missing checkpoints that a Ray Train run of an earlier head finished (fit_stage's
    storage: ractd.storage.folder_location("runs", run_dir), name = the stage), fetched instead of trained again.
    Returns "task/model" of each."""
    from ractd import storage
    from ractd_repro.models import plan_models
    from ractd_repro.records import fetch_finished_stage

    if storage.configured() is None:
        return []
    got = []
    for task in study.tasks:
        for m in plan_models(study, task).values():
            if m.cfg is None or m.exists or m.final_of:
                continue
            cfg = m.cfg.resolved()
            if fetch_finished_stage(storage.folder_location("runs", cfg.run_dir), cfg.stage, cfg.stage, cfg.steps,
                                    cfg.stage_dir) and m.exists:
                got.append(f"{task}/{m.name}")
    return got


def ensure_datasets(study) -> list[str]:
    """Every task's dataset on this machine before anything reads it: the file present, else fetched from the
    cluster's storage (where the sweep or an earlier head stored it), else generated (seed 0, the sweep's
    default: the same file for the same library versions); the paper budget's is D4RL's file (downloaded).
    Returns one line per task saying which (ractd_repro.sweep.ensure_dataset)."""
    from ractd.tasks import get_task
    from ractd_repro.sweep import describe_dataset, ensure_dataset

    lines = []
    for task in study.tasks:
        info = ensure_dataset(get_task(task), study.data_scale, "d4rl" if study.budget == "paper" else "auto",
                              seed=0, use_minari=False)
        lines.append(f"{task}: dataset {describe_dataset(info)}")
    return lines


def _prepare_models(study, args) -> None:
    """The datasets, the sweep's models, and (--train-missing) the missing ones: fetched where an earlier head
    trained them, else trained; one line each on what it used."""
    from ractd_repro.models import ensure_models, sweep_usage_lines

    for line in ensure_datasets(study):
        print(line)
    for line in sweep_usage_lines(study):
        print(line)
    if not study.train_missing:
        return
    if _on_cluster(args):
        fetched = fetch_trained(study)
        if fetched:
            print(f"fetched {len(fetched)} checkpoints an earlier head trained: {', '.join(fetched)}")
    trained = ensure_models(study, _trainer(args))
    if trained:
        print(f"trained {len(trained)} checkpoints: " + ", ".join(f"{m.task}/{m.name}" for m in trained))


def run(args) -> dict:
    from ractd.paths import cache_dir
    from ractd_repro.baselines import baseline_rows, reward_rows
    from ractd_repro.figures import build_figures
    from ractd_repro.jobs import evaluate_serial, study_jobs, summary_lines
    from ractd_repro.records import mirror_of
    from ractd_repro.spec import get_study
    from ractd_repro.store import ResultsStore
    from ractd_repro.tables import build_tables

    study = get_study(args.study, tasks=args.tasks, seeds=args.seeds, train_missing=args.train_missing)
    if args.threads is not None:
        if args.threads < 1:
            raise RactdError(f"--threads {args.threads}: must be a positive integer")
        import torch

        torch.set_num_threads(args.threads)
    if args.max_steps < 0:
        raise RactdError(f"--max-steps {args.max_steps}: must be >= 0")
    out = Path(args.out) if args.out else cache_dir() / "results" / study.name
    store = ResultsStore(Path(args.store) if args.store else out / "store")
    # on a cluster the store, tables and figures also live in storage: a new head continues from there
    stored = mirror_of("results", store.root)
    stored.pull()
    if _on_cluster(args):
        from ractd_ray.pool import connect

        connect(args.address)
    _prepare_models(study, args)
    jobs, missing = study_jobs(study, max_steps=args.max_steps)
    for line in summary_lines(jobs, missing):
        print(line)
    seeds = list(range(study.seeds))
    if args.no_ray:
        summary = evaluate_serial(jobs, seeds, store, block_size=args.block_size or len(seeds),
                                  progress=not args.quiet)
    else:
        from ractd_ray.pool import PoolConfig, connect, evaluate

        connect(args.address)
        cfg = PoolConfig(actors=args.actors, cpus_per_actor=args.cpus_per_actor, actors_per_gpu=args.actors_per_gpu,
                         gpu=args.gpu, block_size=args.block_size)
        summary = evaluate(jobs, seeds, store, cfg, progress=not args.quiet,
                           on_block=lambda pool, rows: stored.push())
    print(f"episodes run: {summary['episodes_run']} (already stored episodes are not rerun"
          + (f"; actors lost: {summary.get('actor_failures', 0)}, blocks dispatched again: "
             f"{summary.get('redispatched_blocks', 0)}" if not args.no_ray else "") + ")"
          + (f"; {summary['episodes_copied']} stored as copies of a cell with the same policy and seeds"
             if summary.get("episodes_copied") else ""))
    reward_rows(study, store)
    baseline_rows(study, store)  # the data's own level (and the behavior policy's record), no rollouts
    stored.push()
    tables = build_tables(store, out)
    figures = build_figures(store, out / "figures")
    outputs = mirror_of("results", out)
    for f in [*out.glob("table*.md"), *out.glob("table*.csv"), *figures]:
        outputs.publish(f)
    for t in tables:
        print(f"\n### {t.title}\n\n{t.markdown}")
    from ractd_repro.tables import headline_lines

    lines = headline_lines(store.episodes(), [p.task for p in study.plans])
    if lines:
        print("\n## What this study found\n")
        print("\n".join(lines))
    if missing:
        print(f"\n{len(missing)} cells are missing (no checkpoint); the commands above train them, or rerun with "
              "--train-missing")
    print(f"\nstore:   {store.root}" + (f" (and {stored.stored})" if stored.stored else ""))
    print(f"tables:  {out}/table*.md, table*.csv")
    print("figures: " + (", ".join(str(f) for f in figures) if figures else "(none: no data for them yet)"))
    if study.name == "quick":
        print("next:    the CPU-scale study (hours): python eval/reproduce_tables.py; on a Ray cluster: ray up "
              "cluster.yaml, then the same commands on its head (docs/sweep.md, docs/evaluation.md)")
    return {"summary": summary, "tables": tables, "figures": figures, "missing": missing, "store": store}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)

    def body() -> None:
        run(args)

    return run_command(body,
                       interrupted="interrupted; rerun the same command to continue (stored episodes are kept)")


if __name__ == "__main__":
    sys.exit(main())
