"""Does bf16 inference change a policy's score? Paired 100-seed evaluations of trained checkpoints at fp32 and bf16
(ractd.engine, engine auto: the calibrated fastest engine per live batch, bf16 engines with precision bf16).

Issue 17 lets the evaluation path run bf16 only where the score on 100 seeds is unchanged, measured: this is that
measurement. Each case is one checkpoint rolled out on the same seeds (same environments, same sampler noise) at
both precisions; bf16 changes each network output by ~1e-2, so closed-loop trajectories part ways and the
comparison is statistical: the paired difference of the per-seed scores, mean +- SE. "unchanged" when the shift
is at most half the fp32 score's own SE over the seeds (the resolution of the evaluation: a shift below it cannot
move any comparison the evaluation can make) or within 2 paired SE of zero; otherwise "CHANGED". (Paired seeds
share the environment and the noise, so the paired SE can be far below the score's SE: a 0.1-point shift can be
"significant" and still be a tenth of what the evaluation resolves.)

    python -m ractd_repro.studies.bf16_scores [--cases hopper-ractd hopper-ctd maze-student maze-teacher] [--seeds 100]
    python -m ractd_repro.studies.bf16_scores --report --out docs/results/bf16      # the committed measurement

Cases (checkpoints from the studies' caches: ractd_repro.studies.training_seeds and ractd_repro.studies.dsm_forms):
    hopper-ractd   hopper-medium-replay RACTD student (sigma 0.3), training seed 0, selected checkpoint
    hopper-ctd     hopper-medium-replay CTD student, training seed 0, selected checkpoint
    maze-student   maze2d-umaze student (DSM form "paper"), training seed 0
    maze-teacher   maze2d-umaze teacher, Heun-80 (158 network calls), training seed 2

Writes <out>/scores.parquet (one row per case, precision and seed; resumable: a stored (case, precision) is not
redone) and prints the table.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from ractd.errors import Parser, run_command
from ractd.paths import cache_dir
from ractd_repro.claims import Z

CASES = {
    "hopper-ractd": ("hopper-medium-replay", "student", "seeds/hopper-medium-replay-small/ractd-seed0/student/best.pt"),
    "hopper-ctd": ("hopper-medium-replay", "student", "seeds/hopper-medium-replay-small/ctd-seed0/student/best.pt"),
    "maze-student": ("maze2d-umaze", "student", "dsm/maze2d-umaze-small/paper-seed0/student/best.pt"),
    "maze-teacher": ("maze2d-umaze", "heun", "dsm/maze2d-umaze-small/teacher-seed2/teacher/best.pt"),
}
PRECISIONS = ("fp32", "bf16")


def measure(case: str, precision: str, seeds: int, threads: int) -> list[dict]:
    import pandas as pd
    import torch

    from ractd.evaluate import EvalConfig, evaluate_checkpoint

    task, sampler, rel = CASES[case]
    ckpt = cache_dir() / "bench" / rel
    if not ckpt.is_file():
        from ractd import RactdError

        raise RactdError(f"{case}: no checkpoint at {ckpt} (train it with the study named in this script's doc)")
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.parquet"
        evaluate_checkpoint(EvalConfig(task=task, sampler=sampler, checkpoint=str(ckpt), seeds=seeds, out=str(out), precision=precision, engine="auto"), progress=True)
        df = pd.read_parquet(out)
    return [{"case": case, "task": task, "sampler": sampler, "precision": precision, "seed": int(r.seed),
             "normalized": float(r.normalized_score), "length": int(r.length), "checkpoint": rel}
            for r in df.itertuples()]


def main(argv=None) -> int:
    from ractd.io import atomic_parquet, read_rows

    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="default <cache>/bench/bf16")
    ap.add_argument("--report", action="store_true", help="only print the table of the store in --out")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else cache_dir() / "bench" / "bf16"
    store = out / "scores.parquet"
    rows = read_rows(store, required=args.report)
    if not args.report:
        for case in args.cases:
            for precision in PRECISIONS:
                if any(r["case"] == case and r["precision"] == precision for r in rows):
                    continue
                print(f"== {case} {precision}", flush=True)
                rows += measure(case, precision, args.seeds, args.threads)
                atomic_parquet(store, rows)
    print("\n".join(bf16_report(rows)))
    return 0


# ---------------------------------------------------------------------------------------------- report

STUDY = "ractd_repro.studies.bf16_scores"
STORE = "bf16"


def section(data: Path) -> list[str]:
    """docs/results.md's part for this study: <data>/bf16/scores.parquet."""
    import pandas as pd

    parts = []
    for f in sorted((Path(data) / STORE).glob("scores.parquet")):
        parts += [f"### bf16 inference on 100 paired seeds ({STUDY})", "",
                  "Each checkpoint rolled out on the same seeds at fp32 and at bf16 (engine auto: the calibrated "
                  "fastest engine per live batch). Cases: hopper-medium-replay students of training seed 0 "
                  "(docs/results/seeds/), maze2d-umaze student (DSM form paper) and teacher (Heun-80) of "
                  "docs/results/dsm/.", "", *bf16_report(pd.read_parquet(f).to_dict("records")), ""]
    return parts


def bf16_report(rows: list[dict]) -> list[str]:
    """Markdown table of this study's store: per case, the fp32 and bf16 scores on the same seeds, the
    paired shift and the verdict: "unchanged" when the shift is at most half the fp32 score's SE over the seeds
    (what the evaluation resolves) or within Z paired SE of zero."""
    from tabulate import tabulate

    table = []
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {p: {int(r["seed"]): float(r["normalized"]) for r in rows if r["case"] == case and r["precision"] == p}
              for p in ("fp32", "bf16")}
        common = sorted(set(by["fp32"]) & set(by["bf16"]))
        if len(common) < 2:
            continue
        a, b = np.array([by["fp32"][s] for s in common]), np.array([by["bf16"][s] for s in common])
        d = b - a
        se = lambda v: float(v.std(ddof=1) / math.sqrt(len(v)))
        unchanged = abs(d.mean()) <= max(0.5 * se(a), Z * se(d))
        table.append([case, len(common), f"{a.mean():.1f} ± {se(a):.1f}", f"{b.mean():.1f} ± {se(b):.1f}",
                      f"{d.mean():+.2f} ± {se(d):.2f}", f"{float(np.mean(a == b)):.2f}",
                      "unchanged" if unchanged else "CHANGED"])
    return [tabulate(table, headers=["case", "seeds", "fp32", "bf16", "bf16 - fp32 (paired)", "share of equal scores",
                                     "verdict"], tablefmt="github", disable_numparse=True)]


if __name__ == "__main__":
    sys.exit(run_command(lambda: main()))
