"""docs/results.md: the paper's claims, measured by the project's own sweep and evaluation, with a verdict each.

Data. Everything the document says comes from one snapshot folder (docs/results/ in the repository):
  store/                    the results store of the claims study (ractd.results.ResultsStore, compacted):
                            every evaluated episode and Fig. 3's R_psi samples
  sweeps/<task>/trials.parquet   the task's `tune/search.py` trials (weights, select_score, diagnostics)
  sweeps/<task>/curves.parquet   one row per trial checkpoint: step, select_score and the distillation
                            diagnostics of ractd.train.distill_diagnostics (Fig. 4's training curves)
  sweeps/<task>/search.json      the sweep's config, dataset and shared-model record
`snapshot()` copies these from the cache (the store eval/reproduce_tables.py wrote, the sweeps under
ractd.paths.sweep_dir); `render()` turns a snapshot into the Markdown text, deterministically (a test rebuilds
the committed document from the committed snapshot and compares). Figures go to <snapshot>/figures/.

Verdicts. Each claim gets "holds", "does not hold", "inconclusive" or "not measured", by a rule stated in the
document and applied to the stored numbers (never typed):
  * a difference of two cells is decided at two standard errors of the difference,
    SE = sqrt(SE_a^2 + SE_b^2), each SE over the cell's episodes (ractd.results.cell_stats);
  * "matches" allows MATCH_MARGIN normalized points: the student matches when (student - reference) - 2 SE >
    -MATCH_MARGIN, does not match when (student - reference) + 2 SE < -MATCH_MARGIN; it is "not meaningful" when
    both sides are below the data's own level (the "data" cell, ractd.study.baseline_rows) at 2 SE, and where the
    store has no data cell the evidence says "data level not measured";
  * claim 3 compares R_psi of two methods' actions on the same dataset states: paired differences.
Naming. The teacher is named by its cost, "Heun-80 (158 network calls)" (ractd.results.sampler_name: 79 Heun steps
of 2 calls); a RACTD cell whose episodes carry sigma = 0 is named "RACTD (σ = 0, i.e. CTD)", with "the sweep's
pick" where the task's sweep tried a sigma > 0.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from ractd import RactdError
from ractd.edm import N_BINS
from ractd.results import (CTD_NOTE, TABLES, ResultsStore, cell_stats, fig_return_dist, fig_reward_hist,
                           fig_score_distribution, fig_sigma, is_ctd, network_calls, sampler_name)
from ractd.train import DIAG_TERMS

MATCH_MARGIN = 10.0   # normalized points within which a one-step student "matches" its reference
Z = 2.0               # standard errors at which a difference counts
CURVE_TERMS = ("select_score", "ctm", "dsm", "reward") + DIAG_TERMS


# ---------------------------------------------------------------------------------------------- snapshot

def snapshot(store: ResultsStore, sweeps: dict[str, Path], out: Path) -> Path:
    """Copy the claims study's store (compacted) and each task's sweep record into `out` (see the module doc)."""
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


# ---------------------------------------------------------------------------------------------- verdicts

def _cells(rows: list[dict]) -> dict[tuple[str, str], dict]:
    from ractd.results import _group

    return {k: cell_stats([r["normalized_score"] for r in eps]) for k, eps in _group(rows).items()}


def _fmt(c: dict) -> str:
    se = "" if math.isnan(c["se"]) else f" ± {c['se']:.1f}"
    return f"{c['mean']:.1f}{se} (n={c['n']})"


def _diff(a: dict, b: dict) -> tuple[float, float]:
    se = math.sqrt((0.0 if math.isnan(a["se"]) else a["se"]) ** 2 + (0.0 if math.isnan(b["se"]) else b["se"]) ** 2)
    return a["mean"] - b["mean"], se


def better(a: dict, b: dict) -> str:
    """a beats b: holds / does not hold (b beats a) / inconclusive, at Z standard errors of the difference."""
    d, se = _diff(a, b)
    if d - Z * se > 0:
        return "holds"
    if d + Z * se < 0:
        return "does not hold"
    return "inconclusive"


def matches(student: dict, reference: dict, margin: float = MATCH_MARGIN, data: dict | None = None) -> str:
    """student matches (or beats) reference within `margin` normalized points, at Z standard errors; "not
    meaningful" when both are below the data's own level `data` at Z standard errors (matching a reference that
    does worse than the dataset's episodes says nothing). data None: the data level is not measured (old rule)."""
    if data is not None and better(data, student) == "holds" and better(data, reference) == "holds":
        return "not meaningful"
    d, se = _diff(student, reference)
    if d - Z * se > -margin:
        return "holds"
    if d + Z * se < -margin:
        return "does not hold"
    return "inconclusive"


def paired(values_a: list[float], values_b: list[float]) -> tuple[str, float, float]:
    """(verdict that a > b, mean of a - b, its SE) for values on the same items (Fig. 3's states)."""
    d = np.asarray(values_a, float) - np.asarray(values_b, float)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    m = float(d.mean())
    if not math.isfinite(se):
        return "inconclusive", m, se
    return ("holds" if m - Z * se > 0 else "does not hold" if m + Z * se < 0 else "inconclusive"), m, se


def any_holds(verdicts: list[str]) -> str:
    """"Some X beats Y" from the verdicts of each X: holds if one holds, does not hold if all do not."""
    if "holds" in verdicts:
        return "holds"
    return "does not hold" if all(v == "does not hold" for v in verdicts) else "inconclusive"


def claims(rows: list[dict], rewards: list[dict], sweeps: dict[str, dict]) -> list[dict]:
    """[{claim, task, verdict, evidence}] for the paper's claims (module doc), from stored rows only."""
    cells = _cells(rows)
    tasks = sorted({t for t, _ in cells})
    out = []

    def add(claim, task, verdict, evidence):
        out.append({"claim": claim, "task": task, "verdict": verdict, "evidence": evidence})

    for task in tasks:
        c = {m: cells[(t, m)] for t, m in cells if t == task}
        data = c.get("data")
        ractd = _ractd_label(rows, task, sweeps.get(task, {}))
        teacher = _teacher_name(rows, task)
        if "ctd" in c and "teacher-heun-80" in c:
            d, se = _diff(c["ctd"], c["teacher-heun-80"])
            add(f"1. The one-step CTD student matches (or beats) the teacher's {teacher} (within "
                f"{MATCH_MARGIN:g} points)", task, matches(c["ctd"], c["teacher-heun-80"], data=data),
                f"CTD {_fmt(c['ctd'])} vs teacher {_fmt(c['teacher-heun-80'])}: difference {d:+.1f} ± {se:.1f}; "
                + _data_level(data))
        if "ractd" in c and "ctd" in c:
            sigma = _sigma_of(rows, task, "ractd")
            d, se = _diff(c["ractd"], c["ctd"])
            if sigma == 0 and _kind(task) != "locomotion":
                add("2a. RACTD beats CTD", task, "not measured",
                    f"maze2d has no reward model (sigma = 0, Table 9), so its RACTD is CTD: {_fmt(c['ractd'])}")
            elif sigma == 0:
                add("2a. RACTD beats CTD", task, "does not hold",
                    f"{ractd} {_fmt(c['ractd'])}: the sweep's model selection picked sigma = 0, the CTD point, as its "
                    "best student, so no sigma > 0 scored higher; 2c compares every sigma on the evaluation seeds")
            else:
                add("2a. RACTD beats CTD", task, better(c["ractd"], c["ctd"]),
                    f"RACTD (sigma {sigma:g}) {_fmt(c['ractd'])} vs CTD {_fmt(c['ctd'])}: difference "
                    f"{d:+.1f} ± {se:.1f}")
        if "ractd" in c and "teacher-heun-80" in c and _sigma_of(rows, task, "ractd") != 0:
            d, se = _diff(c["ractd"], c["teacher-heun-80"])
            add(f"2b. RACTD matches or beats the teacher's {teacher} (within {MATCH_MARGIN:g} points)", task,
                matches(c["ractd"], c["teacher-heun-80"], data=data),
                f"RACTD {_fmt(c['ractd'])} vs teacher {_fmt(c['teacher-heun-80'])}: difference {d:+.1f} ± {se:.1f}; "
                + _data_level(data))
        # 2c: any sigma > 0 the study evaluated (RACTD and the sigma cells) against CTD
        positive = sorted({(_sigma_of(rows, task, m), m) for m in c
                           if (m == "ractd" or m.startswith("ractd-sigma-")) and _sigma_of(rows, task, m) > 0})
        if positive and "ctd" in c:
            each = [(s, m, better(c[m], c["ctd"]), *_diff(c[m], c["ctd"])) for s, m in positive]
            v = any_holds([x for _, _, x, _, _ in each])
            diag = _diag_line(sweeps.get(task, {}))
            add("2c. Some reward weight sigma > 0 that the sweep tried beats CTD", task, v,
                "; ".join(f"sigma {s:g}: {d:+.1f} ± {se:.1f} ({x})" for s, _, x, d, se in each)
                + (f". Diagnostics: {diag}" if diag else ""))
        # Fig. 3: R_psi of RACTD's actions against CTD's on the same dataset states
        r = {m: {x["state_index"]: x["reward"] for x in rewards if x["task"] == task and x["method"] == m}
             for m in ("ractd", "ctd", "teacher-heun-80")}
        if r["ractd"] and r["ctd"] and _sigma_of(rows, task, "ractd") == 0:
            add("3. Reward-aware distillation moves the student's actions to higher R_psi (Fig. 3)", task,
                "not measured", "the sweep picked sigma = 0 (CTD) as RACTD, so Fig. 3 compares CTD with itself")
        elif r["ractd"] and r["ctd"]:
            keys = sorted(set(r["ractd"]) & set(r["ctd"]))
            v, m, se = paired([r["ractd"][k] for k in keys], [r["ctd"][k] for k in keys])
            diag = _diag_line(sweeps.get(task, {}))
            add("3. Reward-aware distillation moves the student's actions to higher R_psi (Fig. 3)", task, v,
                f"mean R_psi(s, a_RACTD) - R_psi(s, a_CTD) = {m:+.4f} ± {se:.4f} over {len(keys)} dataset states"
                + (f"; {diag}" if diag else ""))
        # Fig. 4: the effect of sigma on the final score
        # one point per sigma: a RACTD cell at sigma = 0 (the sweep's pick) is CTD's point, and CTD's cell speaks for it
        by_sigma: dict[float, dict] = {}
        for m in sorted((m for m in c if m in ("ctd", "ractd") or m.startswith("ractd-sigma-")),
                        key=lambda m: (m != "ctd", m != "ractd", m)):
            s = _sigma_of(rows, task, m)
            if not math.isnan(s):
                by_sigma.setdefault(s, c[m])
        pts = sorted(by_sigma.items(), key=lambda p: p[0])
        if len(pts) >= 3:
            zero = next((x for s, x in pts if s == 0), None)
            best_s, best = max(((s, x) for s, x in pts if s > 0), key=lambda p: p[1]["mean"])
            top_s, top = max(pts, key=lambda p: p[0])
            listing = ", ".join(f"sigma {s:g}: {x['mean']:.1f} ± {0 if math.isnan(x['se']) else x['se']:.1f}"
                                for s, x in pts)
            if zero is not None:
                add("4a. A moderate reward weight raises the score over sigma = 0 (Fig. 4)", task,
                    better(best, zero), f"best sigma {best_s:g}; {listing}")
            lower = [x for s, x in pts if 0 < s < top_s]
            if lower:
                peak = max(lower, key=lambda x: x["mean"])
                add(f"4b. Too large a weight (sigma {top_s:g}) does worse than a moderate one (Fig. 4)", task,
                    better(peak, top), listing)
        # Table 5: multi-step sampling
        multi = [(k, c[f"ractd-nfe{k}"]) for k in (2, 3, 4) if f"ractd-nfe{k}" in c]
        if multi and "ractd" in c:
            v = any_holds([better(x, c["ractd"]) for _, x in multi])
            add("5. Multi-step sampling (2-4 steps) improves on one step (Table 5)", task, v,
                f"{ractd}: 1 step {_fmt(c['ractd'])}; " + "; ".join(f"{k} steps {_fmt(x)}" for k, x in multi))
        # Table 2: maze2d actions from the inverse dynamics model (the paper's Sec. 4.2) against the PD rule
        for mid, how in (("ractd-invdyn-plan", "open loop, consecutive planned states"),
                         ("ractd-invdyn", "closed loop, observed state to the next waypoint")):
            if mid in c and "ractd" in c:
                d, se = _diff(c[mid], c["ractd"])
                add(f"7. maze2d: an inverse dynamics model turns the plan into actions as well as the PD rule ({how})",
                    task, matches(c[mid], c["ractd"], data=data),
                    f"{ractd} plans: inverse dynamics {_fmt(c[mid])} vs PD rule {_fmt(c['ractd'])} on the same plans: "
                    f"difference {d:+.1f} ± {se:.1f}; {_data_level(data)}. The model is fitted on the dataset's "
                    "one-step transitions "
                    "(tests/test_inverse_dynamics.py bounds its error there); how far the student's planned steps "
                    "are from such transitions is not measured here")
        # the baselines: BC trained on the same data, and the data's own level (ractd.data.level)
        for ref, claim in BASELINE_CLAIMS:
            models = [m for m in DIFFUSION_MODELS if m in c]
            if not models:
                continue
            if ref not in c:
                add(claim, task, "not measured",
                    f"the store has no {ref} cell ({BASELINE_LABEL[ref]}; the baseline rows came after this study's "
                    "evaluation; eval/reproduce_tables.py --study claims adds them)")
                continue
            each = [(m, better(c[m], c[ref]), *_diff(c[m], c[ref])) for m in models]
            verdicts = [x for _, x, _, _ in each]
            v = "does not hold" if "does not hold" in verdicts else "holds" if all(
                x == "holds" for x in verdicts) else "inconclusive"
            label = {**MODEL_LABEL, "teacher-heun-80": f"teacher {teacher}", "ractd": ractd}
            add(claim, task, v, f"{BASELINE_LABEL[ref]} {_fmt(c[ref])}; " + "; ".join(
                f"{label[m]} {d:+.1f} ± {se:.1f} ({'**below**' if x == 'does not hold' else x})"
                for m, x, d, se in each))
            out[-1]["below"] = [(label[m], BASELINE_LABEL[ref], d, se) for m, x, d, se in each
                                if x == "does not hold"]
        # Table 3: speed per action
        t = _times(rows, task)
        if "teacher-heun-80" in t and "ractd" in t:
            (tt, bt), (ts, bs) = t["teacher-heun-80"], t["ractd"]
            calls = _calls(rows, task, "teacher-heun-80") / max(1, _calls(rows, task, "ractd"))
            ratio = tt / ts
            v = "inconclusive" if bt != bs else "holds" if ratio >= calls / 2 else "does not hold"
            add("6. The one-step student is faster per action than the teacher roughly in proportion to the network "
                "calls (Table 3: 142x on a V100, where the paper counts Heun-80 as 80 NFE)", task, v,
                f"teacher {teacher} {tt * 1e3:.1f} ms vs student {ts * 1e3:.2f} ms per batched policy call (batch "
                f"{bt} vs {bs}): {ratio:.0f}x for {calls:g}x the network calls (rule: at least half the ratio of "
                "network calls, at equal batch)")
    return sorted(out, key=lambda v: (v["claim"].split(".")[0], v["task"]))


# the diffusion teacher and the one-step students (selected checkpoints) compared with each baseline
DIFFUSION_MODELS = ("teacher-heun-80", "ctd", "ractd")
MODEL_LABEL = {"teacher-heun-80": "teacher Heun-80", "ctd": "CTD", "ractd": "RACTD"}
BASELINE_LABEL = {"bc": "BC", "data": "the data's own level"}
BASELINE_CLAIMS = (("bc", "8a. The diffusion teacher and the one-step students score above behavior cloning (BC)"),
                   ("data", "8b. The diffusion teacher and the one-step students score above the data's own level"))


def findings(verdicts: list[dict]) -> list[str]:
    """One sentence per model that scores below BC or below the data (claims 8a/8b at Z standard errors)."""
    return [f"- {v['task']}: {model} scores below {ref} by {-d:.1f} ± {se:.1f} normalized points."
            for v in verdicts for model, ref, d, se in v.get("below", [])]


def _kind(task: str) -> str:
    from ractd.tasks import get_task

    return get_task(task).kind


def _sigma_of(rows: list[dict], task: str, method: str) -> float:
    s = {r["sigma"] for r in rows if r["task"] == task and r["method"] == method}
    return float(next(iter(s))) if len(s) == 1 else math.nan


def _calls(rows: list[dict], task: str, method: str) -> int:
    """Network calls per policy call of a cell (ractd.results.network_calls of its stored sampler and NFE)."""
    return max((network_calls(r["sampler"], r["nfe"]) for r in rows if r["task"] == task and r["method"] == method),
               default=1)


def _teacher_name(rows: list[dict], task: str) -> str:
    """The teacher's sampler named by its cost, from its stored episodes: 'Heun-80 (158 network calls)'."""
    r = next((r for r in rows if r["task"] == task and r["method"] == "teacher-heun-80"), None)
    return sampler_name(r["sampler"], r["nfe"]) if r else "Heun-80"


def _ractd_label(rows: list[dict], task: str, sweep: dict) -> str:
    """'RACTD', or where the cell's episodes carry sigma = 0 (ractd.results.is_ctd) 'RACTD (σ = 0, i.e. CTD)',
    with "the sweep's pick" when the task's sweep tried a sigma > 0 and selected sigma = 0."""
    eps = [r for r in rows if r["task"] == task and r["method"] == "ractd"]
    if not is_ctd(eps):
        return "RACTD"
    tried = any(t["sigma"] > 0 for t in sweep.get("trials") or [])
    return f"RACTD (the sweep's pick: {CTD_NOTE})" if tried else f"RACTD ({CTD_NOTE})"


def _data_level(data: dict | None) -> str:
    return f"the data's own level {_fmt(data)}" if data else "data level not measured"


def _times(rows: list[dict], task: str) -> dict[str, tuple[float, int]]:
    """{method: (median time per batched policy call, batch size)} at each method's most common batch size."""
    out = {}
    for m in {r["method"] for r in rows if r["task"] == task}:
        eps = [r for r in rows if r["task"] == task and r["method"] == m]
        sizes = [r["batch_size"] for r in eps]
        b = max(set(sizes), key=sizes.count)
        out[m] = (float(np.median([r["time_per_action"] for r in eps if r["batch_size"] == b])), int(b))
    return out


def _diag_line(sweep: dict) -> str:
    """The diagnostics of the CTD trial and of the best-scoring sigma > 0 trial at their best checkpoints, from
    the sweep's curves."""
    curves = sweep.get("curves") or []
    parts = []
    for label, pick in (("CTD", lambda r: r["sigma"] == 0), ("the best sigma > 0 trial", lambda r: r["sigma"] > 0)):
        rows = [r for r in curves if pick(r) and math.isfinite(r["select_score"])]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["select_score"])
        parts.append(f"{label} (sigma {best['sigma']:g}) at its best checkpoint: {100 * best['at_bound']:.0f}% of "
                     f"chunk elements at the clamp bound, R_psi gap to the data's actions {best['r_gap']:+.3f}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- document

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
                    "steps": cfg.get("steps") or budget.get("student", {}).get("steps"),
                    "batch": cfg.get("batch") or budget.get("student", {}).get("batch")}
        labels = {"budget": "budget", "scale": "data scale", "preset": "U-Net preset", "teacher_steps":
                  "teacher steps", "steps": "student steps", "batch": "student batch", "num_samples": "trials",
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
    from ractd.results import _plt, _savefig

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
             "meaningful\" when both sides are below the data's own level at the same 2 SE (where the data level "
             "is not measured the evidence says so); claim 3 uses paired differences of R_psi on the same dataset "
             "states. \"inconclusive\" = the interval contains both outcomes. The teacher is named by its cost: "
             f"Heun over {N_BINS} bins is {N_BINS - 1} steps of 2 network calls, "
             f"{sampler_name('heun', N_BINS)}. A RACTD cell whose episodes carry σ = 0 is named "
             f"\"RACTD ({CTD_NOTE})\".", ""]
    from tabulate import tabulate

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


# ---------------------------------------------------------------------------------------------- later studies

SEED_METHODS = ("teacher", "ctd", "ractd", "bc", "ractd_ctm")


def seed_verdicts(rows: list[dict]) -> list[dict]:
    """RACTD vs CTD and RACTD vs BC per training seed (bench/training_seeds.py's rows: one per method and training
    seed, "best_*" = selected checkpoint, "final_*" = final one): the difference and its SE over evaluation
    episodes, "beats" / "below" / "ties" at Z SE; the claim holds on the seeds when RACTD beats on every one.
    The teacher (one checkpoint per training seed: its final EMA weights) against BC: final checkpoints only."""
    by = {(r["method"], int(r["train_seed"])): r for r in rows}
    out = []
    for a, b in (("ractd", "ctd"), ("ractd", "bc"), ("teacher", "bc")):
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
        # with teacher rows the students distil training seed 0's teacher (bench/training_seeds.py --teacher-run)
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


def _eq4_lines(folder: Path) -> list[str]:
    import pandas as pd
    from tabulate import tabulate

    lines = []
    f = folder / "results.parquet"
    if f.is_file():
        df = pd.read_parquet(f)
        bands = [c for c in df.columns if c.startswith("mse[")]
        table = []
        for form, g in df.groupby("form", sort=False):
            heun = g[g["measure"] == "heun80"].sort_values("train_seed")
            held = g[g["measure"] == "heldout"]
            table.append([form, "; ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(heun["score_mean"], heun["score_sem"])),
                          *[f"{held[c].mean():.5f}" for c in bands]])
        lines += [tabulate(table, headers=["Eq. (4) form", "Heun-80 per training seed", *bands], tablefmt="github",
                           disable_numparse=True)]
    for p in sorted(folder.glob("*.parquet")):
        if p.name == "results.parquet":
            continue
        ep = pd.read_parquet(p)
        x = ep["normalized_score"].to_numpy(float)
        sampler = str(ep["sampler"].iloc[0]) if "sampler" in ep else ""
        name = "BC" if sampler == "bc" else sampler_name(sampler, int(ep["nfe"].iloc[0])) if sampler else p.stem
        seed = f", training seed {int(ep['train_seed'].iloc[0])}" if "train_seed" in ep else ""
        lines.append(f"- {name}{seed}: {x.mean():.1f} ± {x.std(ddof=1) / math.sqrt(len(x)):.1f} (n={len(x)}, "
                     f"`{p.name}`)")
    return lines


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


def tracking_report(df) -> list[str]:
    """Markdown table of bench/inverse_dynamics_plans.py's rows: per plan source and tracker, the mean position
    error to the planned state over the plan and at its last step, and the episode score (mean ± SE)."""
    from tabulate import tabulate

    def ms(x, digits):
        x = np.asarray(x, float)
        return f"{x.mean():.{digits}f} ± {x.std(ddof=1) / math.sqrt(len(x)):.{digits}f}" if len(x) > 1 else ""

    table = [[source, tracker, ms(g["mean_error"], 3), ms(g["last_error"], 3), ms(g["score"].dropna(), 1), len(g)]
             for (source, tracker), g in df.groupby(["source", "tracker"], sort=False)]
    return [tabulate(table, headers=["plan", "tracker", "mean position error", "error at the last step", "score",
                                     "n"], tablefmt="github", disable_numparse=True)]


def balance_report(rows: list[dict]) -> list[str]:
    """bench/term_balance.py's store as Markdown: one line per (term scale, sigma) with its score per training
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


def bf16_report(rows: list[dict]) -> list[str]:
    """Markdown table of bench/bf16_scores.py's store: per case, the fp32 and bf16 scores on the same seeds, the
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
        se = lambda v: float(v.std(ddof=1) / math.sqrt(len(v)))  # noqa: E731
        unchanged = abs(d.mean()) <= max(0.5 * se(a), Z * se(d))
        table.append([case, len(common), f"{a.mean():.1f} ± {se(a):.1f}", f"{b.mean():.1f} ± {se(b):.1f}",
                      f"{d.mean():+.2f} ± {se(d):.2f}", f"{float(np.mean(a == b)):.2f}",
                      "unchanged" if unchanged else "CHANGED"])
    return [tabulate(table, headers=["case", "seeds", "fp32", "bf16", "bf16 - fp32 (paired)", "share of equal scores",
                                     "verdict"], tablefmt="github", disable_numparse=True)]


def studies_section(data: Path) -> list[str]:
    """Markdown of the studies run after the claims snapshot, from their stores under <data>: eq4/<task>-<scale>/
    (bench/eq4_forms.py: the teacher's Eq. (4) form), dsm/<task>-<scale>/ (bench/dsm_forms.py: the student's Eq. (7)
    form), seeds/<task>-<scale>/ (bench/training_seeds.py: RACTD vs CTD vs BC on several training seeds). Their
    datasets were generated again on this machine (same recipe and scale, not the snapshot's files)."""
    data = Path(data)
    parts = []
    for kind, title, fn in (("eq4", "Eq. (4): the teacher's loss form (bench/eq4_forms.py)", _eq4_lines),
                            ("dsm", "Eq. (7): the DSM term's form (bench/dsm_forms.py)", _dsm_lines)):
        for folder in sorted(p for p in (data / kind).glob("*") if p.is_dir()):
            body = fn(folder)
            if body:
                parts += [f"### {title}: {folder.name}", "", *body, ""]
    for f in sorted((data / "inverse_dynamics").glob("*/tracking.parquet")):
        import pandas as pd

        parts += [f"### maze2d trackers on feasible and on planned paths (bench/inverse_dynamics_plans.py): "
                  f"{f.parent.name}", "",
                  "pd: Diffuser's PD rule; id_closed: the inverse dynamics model from the observed state to the next "
                  "waypoint; id_open: from consecutive planned states (the paper's reading); data: the dataset's own "
                  "actions. Dataset windows are feasible paths (the env set to each window's first state); the "
                  "teacher's and the student's plans are followed from the evaluation's start states. Position "
                  "error in maze units (one cell = 1).", "", *tracking_report(pd.read_parquet(f)), ""]
    for f in sorted((data / "seeds").glob("*/results.parquet")):
        import pandas as pd

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
        parts += [f"### Teachers, students and BC on several training seeds (bench/training_seeds.py): "
                  f"{f.parent.name}", "", " ".join(about), "", *seed_report(rows, task), ""]
    for f in sorted((data / "balance").glob("*/results.parquet")):
        import pandas as pd

        parts += [f"### Eq. (9)'s term balance (bench/term_balance.py): {f.parent.name}", "",
                  "Students of one teacher and reward model (those of the training-seed study), 400 steps at batch "
                  "128, selected on 10 full episodes every 100 steps, 100 evaluation seeds. raw: Eq. (9) adds the "
                  "terms as they come (the paper); balanced: L_CTM and L_DSM each divided by a running mean of its "
                  "own value (DistillConfig.term_scale). L_* are the logged raw terms (mean over checkpoints); the "
                  "loss shares are each weighted term's part of the loss; ‖∇‖ is the norm of each weighted "
                  "term's gradient on the student at its final checkpoint (ractd.train.term_gradient_norms, 4 "
                  "batches).", "",
                  *balance_report(pd.read_parquet(f).to_dict("records")), ""]
    for f in sorted((data / "bf16").glob("scores.parquet")):
        import pandas as pd

        parts += ["### bf16 inference on 100 paired seeds (bench/bf16_scores.py)", "",
                  "Each checkpoint rolled out on the same seeds at fp32 and at bf16 (engine auto: the calibrated "
                  "fastest engine per live batch). Cases: hopper-medium-replay students of training seed 0 "
                  "(docs/results/seeds/), maze2d-umaze student (DSM form paper) and teacher (Heun-80) of "
                  "docs/results/dsm/.", "", *bf16_report(pd.read_parquet(f).to_dict("records")), ""]
    if not parts:
        return []
    return ["## Studies beside the claims study: loss forms and training seeds", "",
            "Each from its own store under `docs/results/` (the bench script named in its title rebuilds it; "
            "`--report --out <folder>` prints it). These runs use datasets generated again on this machine with the "
            "same recipe and scale, and the library's defaults of their time (stated in each README section).", "",
            *parts]
