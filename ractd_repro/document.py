"""docs/results.md: the paper's claims, measured by the project's own sweep and evaluation, with a verdict each.

Data. Everything the document says comes from one snapshot folder (docs/results/ in the repository):
  store/                    the results store of the claims study (ractd_repro.store.ResultsStore, compacted):
                            every evaluated episode and Fig. 3's R_psi samples
  sweeps/<task>/trials.parquet   the task's `tune/search.py` trials (weights, select_score, diagnostics)
  sweeps/<task>/curves.parquet   one row per trial checkpoint: step, select_score and the distillation
                            diagnostics of ractd.train.distill_diagnostics (Fig. 4's training curves)
  sweeps/<task>/search.json      the sweep's config, dataset and shared-model record
`snapshot()` copies these from the cache (the store eval/reproduce_tables.py wrote, the sweeps under
ractd.paths.sweep_dir); `render()` turns a snapshot into the Markdown text, deterministically (a test rebuilds
the committed document from the committed snapshot and compares). Figures go to <snapshot>/figures/.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from ractd import RactdError
from ractd.edm import N_BINS
from ractd.train import DIAG_TERMS
from ractd_repro.claims import MATCH_MARGIN, Z, _cells, claims, findings
from ractd_repro.figures import (
    fig_return_dist,
    fig_reward_hist,
    fig_score_distribution,
    fig_sigma,
)
from ractd_repro.store import ResultsStore
from ractd_repro.sweep import differs_from_flags
from ractd_repro.tables import CTD_NOTE, TABLES, sampler_name

log = logging.getLogger(__name__)

CURVE_TERMS = ("select_score", "ctm", "dsm", "reward") + DIAG_TERMS


def machines(before: str, here: str, pieces: bool) -> str:
    """The provenance's "machine": this machine's line, or for a study run in pieces (each adding to one store)
    every machine its pieces ran on, in order."""
    if pieces and before:
        return before if here in before else f"{before}; later pieces: {here}"
    return here


def snapshot(store: ResultsStore, sweeps: dict[str, Path], out: Path, flags: dict[str, str] | None = None) -> Path:
    """Copy the claims study's store (compacted) and each task's sweep record into `out` (see the module doc).
    flags: task -> the study's tune/search.py flags; a sweep run with other settings (the README's quick sweep
    shares maze2d-umaze's sweep folder) is not copied, and the snapshot's earlier copy of that task stays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ractd.io import atomic_write

    out = Path(out)
    if not (store.root / "episodes").is_dir():
        raise RactdError(f"no results store at {store.root}: run eval/reproduce_tables.py --study claims first")
    dst = out / "store"
    tmp = out / "store.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(store.root, tmp, ignore=shutil.ignore_patterns(".*"))
    ResultsStore(tmp).compact()
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    for task, d in sweeps.items():
        d = Path(d)
        if not (d / "trials.parquet").is_file():
            continue
        if flags and task in flags and (d / "search.json").is_file():
            differs = differs_from_flags(json.loads((d / "search.json").read_text()).get("config", {}), task,
                                         flags[task])
            if differs:
                log.warning("not snapshotting the sweep in %s: it is not the study's sweep of %s (%s)", d, task,
                            ", ".join(differs))
                continue
        sd = out / "sweeps" / task
        sd.mkdir(parents=True, exist_ok=True)
        trials = pq.read_table(d / "trials.parquet").to_pylist()
        keep = ("trial_id", "alpha", "beta", "sigma", "select_score", "last_score", "step", "status",
                "train_time_s", "trial_time_s")
        rows = [{k: t.get(k) for k in keep} for t in trials]
        atomic_write(sd / "trials.parquet", lambda f: pq.write_table(pa.Table.from_pylist(rows), f))
        curves = []
        for t in trials:
            metrics = d / "trials" / t["trial_id"] / "student" / "metrics.jsonl"
            if not metrics.is_file():
                continue
            for line in metrics.read_text().splitlines():
                m = json.loads(line) if line.strip() else {}
                if m.get("at_checkpoint"):
                    curves.append({"trial_id": t["trial_id"], "alpha": t["alpha"], "beta": t["beta"],
                                   "sigma": t["sigma"], "step": int(m["step"]),
                                   **{k: float(m[k]) if m.get(k) is not None else math.nan for k in CURVE_TERMS}})
        atomic_write(sd / "curves.parquet", lambda f: pq.write_table(pa.Table.from_pylist(curves), f))
        if (d / "search.json").is_file():
            search = json.loads((d / "search.json").read_text())
            marker = Path(search.get("shared", {}).get("dir", "")) / "models.json"
            if marker.is_file():
                search["shared_models"] = json.loads(marker.read_text())
            atomic_write(sd / "search.json", lambda f: f.write(json.dumps(search, indent=1, sort_keys=True).encode()))
    return out


def _sweep_tables(data: Path) -> dict[str, dict]:
    import pyarrow.parquet as pq

    out = {}
    for sd in sorted((Path(data) / "sweeps").glob("*")):
        entry = {"trials": pq.read_table(sd / "trials.parquet").to_pylist() if (sd / "trials.parquet").is_file()
                 else [],
                 "curves": pq.read_table(sd / "curves.parquet").to_pylist() if (sd / "curves.parquet").is_file()
                 else [],
                 "search": json.loads((sd / "search.json").read_text()) if (sd / "search.json").is_file() else {}}
        out[sd.name] = entry
    return out


def _sweep_section(task: str, sweep: dict) -> list[str]:
    from tabulate import tabulate

    trials = sorted(sweep.get("trials") or [], key=lambda t: (t["sigma"], t["alpha"], t["beta"]))
    curves = sweep.get("curves") or []
    lines = [f"### {task}", ""]
    search = sweep.get("search") or {}
    cfg = search.get("config") or {}
    if cfg:
        from ractd.train import BUDGETS

        budget = BUDGETS.get(cfg.get("budget"), {})
        resolved = {**cfg, "preset": cfg.get("preset") or "cpu",
                    "teacher_steps": cfg.get("teacher_steps") or budget.get("teacher", {}).get("steps"),
                    "teacher_batch": cfg.get("teacher_batch") or budget.get("teacher", {}).get("batch"),
                    "steps": cfg.get("steps") or budget.get("student", {}).get("steps"),
                    "batch": cfg.get("batch") or budget.get("student", {}).get("batch")}
        labels = {"budget": "budget", "scale": "data scale", "preset": "U-Net preset", "teacher_steps":
                  "teacher steps", "teacher_batch": "teacher batch", "steps": "student steps", "batch": "student batch", "num_samples": "trials",
                  "sigmas": "sigma grid", "select_seeds": "selection seeds", "select_max_steps":
                  "selection episode steps"}
        flags = ", ".join(f"{label} {resolved[k]}" for k, label in labels.items() if k in resolved)
        lines += [f"Sweep settings: {flags}.", ""]
    table = []
    for t in trials:
        pts = [c for c in curves if c["trial_id"] == t["trial_id"] and math.isfinite(c["select_score"])]
        best = max(pts, key=lambda c: c["select_score"]) if pts else {}
        table.append([f"{t['alpha']:g}", f"{t['beta']:g}", f"{t['sigma']:g}", t["status"], f"{t['select_score']:.1f}",
                      best.get("step", "—"),
                      *[("—" if not best or not math.isfinite(best[k]) else f"{best[k]:.3f}") for k in DIAG_TERMS],
                      "—" if t.get("train_time_s") is None or not math.isfinite(t["train_time_s"])
                      else f"{t['train_time_s'] / 60:.1f}"])
    if table:
        lines.append(tabulate(table, headers=["alpha", "beta", "sigma", "status", "select_score", "best step",
                                              *DIAG_TERMS, "train min"], tablefmt="github", disable_numparse=True))
        lines.append("")
    return lines


def fig_curves(sweeps: dict[str, dict], path: Path) -> Path | None:
    """Fig. 4's training curves: select_score at each student checkpoint per sigma, one panel per task."""
    from ractd_repro.figures import _plt, _savefig

    tasks = [t for t, s in sweeps.items() if s.get("curves")]
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        curves = sweeps[task]["curves"]
        for tid in sorted({c["trial_id"] for c in curves}):
            pts = sorted((c["step"], c["select_score"]) for c in curves if c["trial_id"] == tid)
            c0 = next(c for c in curves if c["trial_id"] == tid)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"sigma {c0['sigma']:g} (alpha {c0['alpha']:.2g}, beta {c0['beta']:.2g})")
        ax.set(title=task, xlabel="student step", ylabel="select_score (normalized)")
        ax.legend(fontsize=7)
    fig.suptitle("Fig. 4 counterpart: model-selection score during distillation")
    fig.tight_layout()
    return _savefig(fig, Path(path))


# file name -> caption under it in the document
FIGURES = {"fig3_returns.png": "Fig. 3 as the paper draws it: the distribution of per-episode normalized returns of "
                               "CTD's and RACTD's rollouts (the stored episodes); a task without both cells' episodes "
                               "in the snapshot says so in its panel.",
           "rpsi_dataset_states.png": "Diagnostic beside Fig. 3 (claim 3): R_psi of the first action each model "
                                      "samples on the same dataset states.",
           "fig4_sigma.png": "Fig. 4: normalized score against the reward weight sigma.",
           "fig4_curves.png": "Fig. 4's training curves: model-selection score at each student checkpoint.",
           "score_distribution.png": "Episode scores per method."}


def _verdict_lines(verdicts: list[dict]) -> list[str]:
    """The document's head: title, scale, the verdict rules and table, and the baselines' findings."""
    from tabulate import tabulate

    lines = ["# The paper's claims at CPU scale, measured", "",
             "Generated by `python eval/results_doc.py` from the snapshot in `docs/results/` (the claims study's "
             "results store and sweep records); do not edit by hand. Every number below is computed from those "
             "Parquet files; `tests/test_claims.py` rebuilds this file from them and compares.", "",
             "**Scale.** These are CPU-budget models (small U-Nets; thousands of teacher steps, hundreds of "
             "student steps: each task's settings are in its sweep section below) on datasets generated here with "
             "D4RL's recipes at `--scale small`, not the paper's 248 M-parameter networks on D4RL's files. "
             "A verdict says what these numbers show at this budget; it does not "
             "confirm or refute the paper at its scale.", "",
             "## Verdicts", "",
             f"Rules: a difference counts at {Z:g} standard errors of the difference (SE over episodes, "
             f"sqrt(SE_a^2 + SE_b^2)); \"matches\" allows {MATCH_MARGIN:g} normalized points, and is \"not "
             "meaningful\" when the reference (the teacher) is not above the data's own level at the same 2 SE: a "
             "student matching a teacher that does no better than the data says nothing about distillation (where "
             "the data level is not measured the evidence says so); claim 3 uses paired differences of R_psi on the "
             "same dataset states and is a diagnostic of the training objective, not evidence of the method. "
             "\"inconclusive\" = the interval contains both outcomes. The teacher is named by its cost: "
             f"Heun over {N_BINS} bins is {N_BINS - 1} steps of 2 network calls, "
             f"{sampler_name('heun', N_BINS)}. A RACTD cell whose episodes carry σ = 0 is named "
             f"\"RACTD ({CTD_NOTE})\".", ""]
    if verdicts:
        lines.append(tabulate([[v["claim"], v["task"], f"**{v['verdict']}**", v["evidence"]] for v in verdicts],
                              headers=["claim", "task", "verdict", "evidence"], tablefmt="github",
                              disable_numparse=True))
    else:
        lines.append("(no evaluated cells in the store yet)")
    found = findings(verdicts)
    measured = [v for v in verdicts if v["claim"].startswith(("8a.", "8b.")) and v["verdict"] != "not measured"]
    lines += ["", "**Baselines.** " + (
        "Models that score below a baseline (claims 8a, 8b, at 2 standard errors):" if found else
        "No teacher or student scores below BC or the data's own level where they are measured (claims 8a, 8b)."
        if measured else "BC and the data's own level are not measured in this snapshot (claims 8a, 8b).")]
    lines += [""] + found if found else []
    return lines


def _figure_lines(data: Path, rows: list[dict], rewards: list[dict], sweeps: dict, write: bool) -> list[str]:
    """The figures section (drawing them into <data>/figures first when `write`)."""
    lines: list[str] = []
    fig3_tasks = sorted({r["task"] for r in rows} | set(sweeps))
    if write:
        fig_return_dist(rows, data / "figures" / "fig3_returns.png", tasks=fig3_tasks)
        fig_reward_hist(rewards, data / "figures" / "rpsi_dataset_states.png")
        fig_sigma(rows, data / "figures" / "fig4_sigma.png")
        fig_curves(sweeps, data / "figures" / "fig4_curves.png")
        fig_score_distribution(rows, data / "figures" / "score_distribution.png")
    present = [name for name in FIGURES if (data / "figures" / name).is_file()]
    if present:
        lines += ["## Figures", ""]
        for n in present:
            lines += [f"![{Path(n).stem}](results/figures/{n})", "", FIGURES[n], ""]
        cells = _cells(rows)
        lacking = [t for t in fig3_tasks if not ((t, "ctd") in cells and (t, "ractd") in cells)]
        if "fig3_returns.png" in present and lacking:
            lines += [f"Fig. 3 has no CTD/RACTD episodes for {', '.join(lacking)} in this snapshot.", ""]
    return lines


def render(data: Path, write: bool = True) -> str:
    """The Markdown of docs/results.md from a snapshot folder (module doc; its provenance.json gives the commands
    and the machine). write: also (re)write the tables (Markdown + CSV) under <data>/tables and the figures (PNG)
    under <data>/figures; the text is the same either way (it links the figures present in <data>/figures)."""
    data = Path(data)
    prov = json.loads((data / "provenance.json").read_text()) if (data / "provenance.json").is_file() else {}
    commands = ["```bash", *prov.get("commands", []), "```"]
    compute = [f"- machine: {prov['machine']}"] if prov.get("machine") else []
    store = ResultsStore(data / "store")
    rows, rewards = store.episodes(), store.rewards()
    sweeps = _sweep_tables(data)
    tables = [fn(rows) for fn in TABLES.values()]
    if write:
        for t in tables:
            t.write(data / "tables")
    verdicts = claims(rows, rewards, sweeps)
    lines = _verdict_lines(verdicts)
    lines += ["", "Not measured in this study: the reward-aware teacher (Tables 4, 10) and the DDPM/DDIM "
              "baselines (Tables 3, 11) need a second diffusion model per task, which did not fit the budget; "
              "`python eval/reproduce_tables.py --study default` plans them.", ""]
    lines += studies_section(data)
    lines += ["## How it was produced", ""] + commands + [""]
    lines += ["## Compute", ""] + compute + _train_compute(sweeps) + _eval_compute(rows) + [""]
    lines += ["## Tables", ""]
    for t in tables:
        lines += [f"### {t.title}", "", t.markdown, ""]
    lines += ["## The sweeps: weights, model-selection score and distillation diagnostics", "",
              "Diagnostics at each trial's best checkpoint (ractd.train.distill_diagnostics, 512 fixed dataset "
              "states): at_bound = share of the one-step chunk's elements at the clamp bound |x| >= 1; "
              "out_of_range = mean distance outside [-1, 1]; r_student / r_data = mean R_psi of the student's "
              "first action / of the dataset's action on the same states; r_gap = their difference. A student "
              "exploiting R_psi shows a large r_gap together with many actions at the bound.", ""]
    for task, sweep in sweeps.items():
        lines += _sweep_section(task, sweep)
    lines += _figure_lines(data, rows, rewards, sweeps, write)
    return "\n".join(lines)


def _train_compute(sweeps: dict[str, dict]) -> list[str]:
    """Training time per task: the shared teacher and reward model (their models.json) and the trials."""
    out = []
    for task, sweep in sweeps.items():
        shared = (sweep.get("search") or {}).get("shared_models") or {}
        trials = [t["train_time_s"] for t in sweep.get("trials") or []
                  if t.get("train_time_s") is not None and math.isfinite(t["train_time_s"])]
        wall = sum(t["trial_time_s"] for t in sweep.get("trials") or []
                   if t.get("trial_time_s") is not None and math.isfinite(t["trial_time_s"]))
        t_shared = f"{shared['train_time_s'] / 60:.1f} min" if "train_time_s" in shared else "(not recorded)"
        n_all = len(sweep.get("trials") or [])
        recorded = "" if len(trials) == n_all else f", recorded for {len(trials)} of them"
        out.append(f"- training of {task}: shared teacher (+ reward model) {t_shared}; {n_all} students: "
                   f"{sum(trials) / 60:.1f} min of training{recorded} ({wall / 60:.1f} min of trial wall time with "
                   "Tune's and Ray Train's start-up)")
    return out


def _eval_compute(rows: list[dict]) -> list[str]:
    """Evaluation wall time per task: the sum over stored blocks (each block's rows carry its wall time)."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        blocks = {(r["method"], r["checkpoint"], r["created"][:19], r["wall_s"]) for r in rows if r["task"] == task}
        wall = sum(w for *_, w in blocks if math.isfinite(w))
        n = sum(1 for r in rows if r["task"] == task)
        out.append(f"- evaluation of {task}: {n} episodes, {wall / 60:.1f} min of rollout wall time summed over "
                   "blocks (one CPU thread per actor)")
    return out


def studies_section(data: Path) -> list[str]:
    """Markdown of the studies beside the claims study (ractd_repro.studies: the teacher's Eq. (4) form, the
    student's Eq. (7) form, the maze2d trackers, training seeds, Eq. (9)'s term balance, bf16 inference), each from
    its own store under <data>. Their datasets were generated again on this machine (same recipe and scale, not the
    snapshot's files)."""
    from ractd_repro.studies import sections

    parts = sections(Path(data))
    if not parts:
        return []
    return ["## Studies beside the claims study: loss forms and training seeds", "",
            "Each from its own store under `docs/results/` (the study module named in its title rebuilds it: "
            "`python -m <module>`; `--report --out <folder>` prints it). These runs use datasets generated again on this machine "
            "with the same recipe and scale, and the library's defaults of their time (docs/design.md says which "
            "defaults changed since).", "",
            *parts]
