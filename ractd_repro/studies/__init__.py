"""The science studies beside the claims study: one module each, its script (`python -m ractd_repro.studies.<name>
--help`) and its report (`section`: the part of docs/results.md it renders from its store under docs/results/)."""

from __future__ import annotations

# in the order docs/results.md shows them
ALL = ("eq4_forms", "dsm_forms", "inverse_dynamics_plans", "training_seeds", "term_balance", "bf16_scores",
       "learning_curves", "quick_budget", "training_forms")


def sections(data) -> list[str]:
    """Every study's part of docs/results.md, from the stores under `data` (docs/results/)."""
    import importlib

    parts: list[str] = []
    for name in ALL:
        parts += importlib.import_module(f"{__name__}.{name}").section(data)
    return parts


def task_store(args, folder: str, filename: str):
    """(out folder, its Parquet store, the stored rows) of a study kept per task: args.out, else
    <cache>/bench/<folder>/<args.task>-<args.scale>; with args.report the store must exist (a one-line error)."""
    from pathlib import Path

    from ractd.io import read_rows
    from ractd.paths import cache_dir

    out = Path(args.out) if args.out else cache_dir() / "bench" / folder / f"{args.task}-{args.scale}"
    store = out / filename
    return out, store, read_rows(store, required=args.report)


def add_store_args(ap, folder: str, threads: int = 1) -> None:
    """The options every per-task study shares: --threads, --out (its task_store folder) and --report."""
    ap.add_argument("--threads", type=int, default=threads, help="torch threads" + (" (0: torch's)" if not threads
                                                                                    else ""))
    ap.add_argument("--out", default="", help=f"default <cache>/bench/{folder}/<task>-<scale>")
    ap.add_argument("--report", action="store_true", help="only print the summary of the store in --out")
