"""Write docs/results.md: the paper's claims measured by the claims study, with a verdict per claim; or, with
--study tables, docs/results-tables.md: the twelve-task study (Tables 1 and 2 in full), its progress and goals.

    python eval/results_doc.py                   # snapshot the claims study's store and sweeps, then write the doc
    python eval/results_doc.py --no-snapshot     # rebuild the doc from the committed snapshot in docs/results/
    python eval/results_doc.py --study tables    # the twelve-task study (ractd_repro.tables_doc): its store is
                                                 # docs/results/twelve/store itself; its sweeps are snapshotted

The study it reads is run by (CPU, in this order; the tune/search.py flags are ractd_repro.spec.CLAIMS_SWEEPS):

    python tune/search.py --task T <CLAIMS_SWEEPS[T]>     # T: hopper-medium-replay, walker2d-medium, maze2d-umaze
    python eval/reproduce_tables.py --study claims --block-size 10 --actors 2 --train-missing

The snapshot (docs/results/: the compacted results store, each sweep's trials and checkpoint curves) is what the
document is computed from (ractd_repro.claims); a test rebuilds the committed document from it. Bad input: one line on
stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from ractd import RactdError  # noqa: E402


# study -> (snapshot folder, document) under the repository
DOCS = {"claims": ("docs/results", "docs/results.md"), "tables": ("docs/results/twelve", "docs/results-tables.md")}


def commands() -> list[str]:
    """The exact commands that produce the study (datasets, sweeps, evaluation, this document)."""
    from ractd_repro.spec import CLAIMS_SWEEPS, STUDIES

    study = STUDIES["claims"]
    lines = [f"python -m ractd.data generate {t} --scale {study.data_scale}" for t in study.tasks]
    lines += [f"python tune/search.py --task {t} {CLAIMS_SWEEPS[t]}" for t in study.tasks]
    lines += ["python eval/reproduce_tables.py --study claims --block-size 10 --actors 2 --train-missing",
              "python eval/results_doc.py"]
    return lines


def machine() -> str:
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        import ray

        ray_v = f", ray {ray.__version__}"
    except ImportError:
        ray_v = ""
    return (f"{os.cpu_count()} CPUs ({model}), {gpu}; python {platform.python_version()}, torch {torch.__version__}"
            f"{ray_v}; one torch thread per process")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python eval/results_doc.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=tuple(DOCS), default="claims",
                   help="claims (docs/results.md) or tables (docs/results-tables.md); default claims")
    p.add_argument("--store", default="", help="the study's results store (default: claims: "
                   "<cache>/results/cpu-claims/store, where eval/reproduce_tables.py --study claims writes; tables: "
                   "docs/results/twelve/store, where each piece writes)")
    p.add_argument("--data", default="", help="snapshot folder (default: claims docs/results, tables "
                   "docs/results/twelve)")
    p.add_argument("--out", default="", help="the document (default: claims docs/results.md, tables "
                   "docs/results-tables.md)")
    p.add_argument("--no-snapshot", action="store_true", help="do not copy the store and sweeps; use --data as is")
    p.add_argument("--no-write", action="store_true", help="write only the document (not the tables and figures)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        from ractd.io import atomic_write
        from ractd.paths import cache_dir, sweep_dir
        from ractd_repro.document import machines, render, snapshot
        from ractd_repro.spec import STUDIES
        from ractd_repro.store import ResultsStore

        from ractd_repro import tables_doc

        folder, doc = DOCS[args.study]
        data = Path(args.data or REPO / folder)
        out = Path(args.out or REPO / doc)
        study = STUDIES[args.study]
        if not args.no_snapshot:
            default_store = data / "store" if args.study == "tables" else cache_dir() / "results" / study.name / "store"
            store = ResultsStore(Path(args.store) if args.store else default_store)
            snapshot(store, {t: sweep_dir(t, study.data_scale) for t in study.tasks}, data,
                     dict(study.sweep_flags))
            prov_path = data / "provenance.json"
            old = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
            here = machines(old.get("machine", ""), machine(), pieces=args.study == "tables")
            prov = {**old, "commands": commands() if args.study == "claims" else tables_doc.commands(),
                    "machine": here}
            atomic_write(prov_path, lambda f: f.write(json.dumps(prov, indent=1).encode()))
        elif not (data / "store").is_dir():
            raise RactdError(f"no snapshot at {data}: run without --no-snapshot after the {args.study} study")
        renderer = render if args.study == "claims" else tables_doc.render
        text = renderer(data, write=not args.no_write)
        atomic_write(out, lambda f: f.write(text.encode()))
    except RactdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} from {data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
