"""The paper's tables rebuilt from the results store (ractd_repro.store).

Tables. The paper's published numbers live in one place, `PAPER`, transcribed from the paper's tables
(/work/shared/paper/ractd-paper.txt: Tables 1-5, 10, 11); each table shows them in separate columns headed
"paper ...". Every measured cell names the scale at which it was measured (the study's scale label stored
with each episode, e.g. "quick", "cpu", "paper"). `build_tables` writes <out>/tableN.md and tableN.csv.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from ractd.tasks import get_task
from ractd_repro.paper import _T1_TASKS, fmt_paper, paper_value
from ractd_repro.store import ResultsStore, _group, cell_stats


@dataclasses.dataclass
class Table:
    """One rebuilt table: `rows` (dicts of plain values, for CSV) and `markdown` (tabulate, GitHub pipes)."""

    name: str
    title: str
    rows: list[dict]
    markdown: str

    def write(self, out: Path) -> tuple[Path, Path]:
        import csv
        import io

        from ractd.io import atomic_write

        md = atomic_write(Path(out) / f"{self.name}.md", f"### {self.title}\n\n{self.markdown}\n".encode())
        buf = io.StringIO()
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows(self.rows)
        csv_path = atomic_write(Path(out) / f"{self.name}.csv", buf.getvalue().encode())
        return md, csv_path


def network_calls(sampler: str, nfe: int) -> int:
    """Network calls per policy call of a stored (sampler, nfe): Heun over nfe Karras bins takes nfe - 1 steps of 2
    calls (edm.sample_heun; the schedule ends at sigma_min > 0, so no step is Euler): Heun-80 = 158; Euler over
    nfe bins takes nfe - 1; DDPM/DDIM and the student take nfe (their steps)."""
    if sampler == "heun":
        return 2 * (int(nfe) - 1)
    if sampler == "euler":
        return int(nfe) - 1
    return int(nfe)


def sampler_name(sampler: str, nfe: int) -> str:
    """How the document names a sampler's cost: 'Heun-80 (158 network calls)', 'Euler-80 (79 network calls)'."""
    if sampler in ("heun", "euler"):
        return f"{sampler.capitalize()}-{nfe} ({network_calls(sampler, nfe)} network calls)"
    return f"{sampler} {nfe}"


def _nfe_cell(eps: list[dict]) -> str | int:
    """The NFE column: network calls per policy call, with the sampler's name where they differ from the bins."""
    r = eps[0]
    return sampler_name(r["sampler"], r["nfe"]) if r["sampler"] in ("heun", "euler") else r["nfe"]


def _nfe_numbers(eps: list[dict] | None, mid: str) -> dict:
    if not eps or mid == "data":
        return {"nfe": None, "network_calls": None}
    return {"nfe": eps[0]["nfe"], "network_calls": network_calls(eps[0]["sampler"], eps[0]["nfe"])}


def is_ctd(eps: list[dict] | None) -> bool:
    """A RACTD cell whose reward weight is 0 (the sweep picked sigma = 0, or the task has no reward model): its
    student is CTD's. Read from the episodes' sigma, never from the task's name."""
    return bool(eps) and eps[0]["method"].startswith("ractd") and all(
        r["sigma"] is not None and float(r["sigma"]) == 0.0 for r in eps)


CTD_NOTE = "σ = 0, i.e. CTD"


def _score_cell(eps: list[dict] | None, absent: str = "missing") -> tuple[str, dict]:
    """('mean ± se · IQM x [lo, hi] · n=N · scale', numbers) of a cell's episodes; (absent, {}) if none. A RACTD
    cell at sigma = 0 (is_ctd) says so."""
    if not eps:
        return absent, {}
    s = cell_stats([r["normalized_score"] for r in eps])
    scale = "/".join(sorted({r["scale"] for r in eps}))
    se = "" if math.isnan(s["se"]) else f" ± {s['se']:.1f}"
    ci = "" if math.isnan(s["iqm_low"]) else f" [{s['iqm_low']:.1f}, {s['iqm_high']:.1f}]"
    text = f"{s['mean']:.1f}{se} · IQM {s['iqm']:.1f}{ci} · n={s['n']} · {scale}"
    if is_ctd(eps):
        text += f" · RACTD ({CTD_NOTE})"
    return text, {**s, "scale": scale}


NOT_MEASURED = "not measured"


# Baseline rows beside the methods of every table (ractd_repro.methods: "bc" is evaluated like a method; "data" and
# "behavior" are written by ractd_repro.baselines.baseline_rows from the dataset, ractd.data.level). Absent: "not
# measured".
BASELINES = [("bc", "BC (CORL recipe)"), ("bc-10", "10% BC (CORL recipe, top 10% trajectories)"),
             ("data", "data (the dataset's episodes)")]


# the final checkpoints of the selected students (ractd_repro.methods: ctd-final, ractd-final)
FINALS = [("ractd-final", "RACTD, final checkpoint"), ("ctd-final", "CTD, final checkpoint")]
# the warm-start control: the teacher's one-step Euler, which is the student at step 0 (ractd_repro.methods)
CONTROLS = [("teacher-euler-1", "warm start: teacher Euler, 1 call (= student at step 0)")]


def _behavior_cell(eps: list[dict] | None) -> tuple[str, dict]:
    """The generator's record of its behavior policies' evaluation (no episodes stored: a mean, no SE)."""
    if not eps:
        return NOT_MEASURED, {}
    parts = [f"{r['normalized_score']:.1f} ({r['sampler'].split(':')[-1]} policy at step {r['train_steps']}: mean of "
             f"{r['batch_size']} episodes, no SE)" for r in sorted(eps, key=lambda r: r["seed"])]
    return "; ".join(parts), {"mean": float(np.mean([r["normalized_score"] for r in eps]))}


def _time_cell(eps: list[dict] | None, kind: str) -> tuple[str, dict]:
    """Policy latency of a cell: seconds per batched policy call (locomotion: per action; maze: the plan and
    its tracking, per episode batch) and the batch size it was measured at."""
    if not eps:
        return "missing", {}
    if kind == "maze":
        t = np.array([r["time_per_action"] * r["length"] for r in eps])
    else:
        t = np.array([r["time_per_action"] for r in eps])
    b = sorted({int(r["batch_size"]) for r in eps})
    dev = "/".join(sorted({r["device"] for r in eps}))
    text = f"{np.mean(t):.4g} s (batch {','.join(map(str, b))}, {dev})"
    return text, {"time_s": float(np.mean(t)), "batch": ",".join(map(str, b)), "device": dev}


def _numbers(prefix: str, d: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in d.items()}


def _kind(task: str) -> str:
    return get_task(task).kind


def table1(rows: list[dict]) -> Table:
    """Table 1 (D4RL locomotion): measured RACTD, CTD and teacher per task; the paper's columns beside them."""
    g = _group(rows)
    tasks = [t for t in _T1_TASKS if any(k[0] == t for k in g)]
    tasks += sorted({k[0] for k in g if _kind(k[0]) == "locomotion"} - set(tasks))
    measured = [("ractd", "RACTD, selected checkpoint"), ("ctd", "CTD, selected checkpoint"),
                ("teacher-heun-80", "Teacher Heun-80")] + CONTROLS + FINALS + BASELINES
    paper_cols = ["RACTD", "Diffuser", "Consistency AC", "Diffusion QL", "BC"]
    md, csv_rows = [], []
    for task in tasks:
        line, rec = [task], {"task": task}
        for mid, label in measured:
            text, nums = _score_cell(g.get((task, mid)), absent=NOT_MEASURED if mid not in ("ractd", "ctd",
                                                                                          "teacher-heun-80")
                                     else "missing")
            line.append(text)
            rec.update(_numbers(f"{mid}_", nums))
        text, nums = _behavior_cell(g.get((task, "behavior")))
        line.append(text)
        rec.update(_numbers("behavior_", nums))
        for p in paper_cols:
            v = paper_value("table1", p, task)
            line.append(fmt_paper(v))
            rec[f"paper_{p}"] = None if v is None else v[0]
        bc, bc10 = get_task(task).d4rl_bc  # the level D4RL's own data supports (ractd.tasks)
        line += [f"{bc:g}", f"{bc10:g}"]
        rec.update({"d4rl_bc": bc, "d4rl_bc10": bc10})
        md.append(line)
        csv_rows.append(rec)
    headers = (["task"] + [f"{label} (measured)" for _, label in measured] + ["behavior policy (generator's record)"]
               + [f"paper {p}" for p in paper_cols] + ["CORL BC on D4RL's data", "CORL 10% BC on D4RL's data"])
    return Table("table1", "Table 1: D4RL locomotion, normalized score", csv_rows, _md(md, headers))


# (method id, label, the paper's row it is compared with). The paper infers maze2d actions with an inverse dynamics
# model (Sec. 4.2); "RACTD (PD)" tracks the same plans with Diffuser's PD rule, the project's default tracker.
TABLE2_METHODS = [("ractd", "RACTD (PD tracker), selected checkpoint", "RACTD"),
                  ("ractd-invdyn", "RACTD (inverse dynamics, closed loop)", "RACTD"),
                  ("ractd-invdyn-plan", "RACTD (inverse dynamics on the plan, open loop)", "RACTD"),
                  ("ctd", "CTD (PD tracker), selected checkpoint", "CTD"),
                  ("ractd-final", "RACTD (PD tracker), final checkpoint", None),
                  ("ctd-final", "CTD (PD tracker), final checkpoint", None),
                  ("teacher-euler-1", "warm start: teacher Euler, 1 call (= student at step 0)", None),
                  ("bc", "BC (goal-conditioned, closed loop)", None),
                  ("data", "data (300-step windows of the dataset at the evaluation goal)", None)]


# rows that say "not measured" when the store lacks them (the others say "missing": a planned cell not run)
_OPTIONAL = {m for m, _ in FINALS + BASELINES + CONTROLS}


def table2(rows: list[dict]) -> Table:
    """Table 2 (maze2d): measured RACTD and CTD score, NFE and policy time; the paper's columns beside them.
    The inverse-dynamics row appears when the store has it."""
    g = _group(rows)
    tasks = sorted({k[0] for k in g if _kind(k[0]) == "maze"})
    md, csv_rows = [], []
    for task in tasks:
        for mid, label, paper_label in TABLE2_METHODS:
            eps = g.get((task, mid))
            if eps is None and mid.startswith("ractd-invdyn"):
                continue
            text, nums = _score_cell(eps, absent=NOT_MEASURED if mid in _OPTIONAL else "missing")
            ttext, tnums = _time_cell(eps, "maze") if eps and mid != "data" else ("—" if mid in _OPTIONAL else
                                                                                  "missing", {})
            nfe = _nfe_cell(eps) if eps and mid != "data" else "—"
            pv = paper_value("table2", paper_label, task) if paper_label else None
            pt = paper_value("table2_time", paper_label, task) if paper_label else None
            md.append([task, label, text, nfe, ttext, fmt_paper(pv), pt[1] if pt else "—", pt[0] if pt else "—"])
            csv_rows.append({"task": task, "method": mid, **nums, **_nfe_numbers(eps, mid), **tnums,
                             "paper_score": pv[0] if pv else None, "paper_se": pv[1] if pv else None,
                             "paper_nfe": pt[1] if pt else None, "paper_time_s": pt[0] if pt else None})
        for label in ("Diffuser",):
            pv, pt = paper_value("table2", label, task), paper_value("table2_time", label, task)
            md.append([task, label, "not evaluated here", "—", "—", fmt_paper(pv), pt[1] if pt else "—",
                       pt[0] if pt else "—"])
    headers = ["task", "method", "score (measured)", "NFE", "policy time per episode batch (measured)",
               "paper score", "paper NFE", "paper time (s, V100)"]
    return Table("table2", "Table 2: maze2d, normalized score, NFE and planning time", csv_rows, _md(md, headers))


TABLE3_METHODS = [("ddpm-15", "DDPM 15"), ("ddim-15", "DDIM 15"), ("teacher-heun-80", "EDM (Teacher) 80"),
                  ("ractd", "RACTD (Student) 1")] + BASELINES


def table3(rows: list[dict]) -> Table:
    """Table 3: policy time per action, NFE and score per sampler, measured on this machine."""
    g = _group(rows)
    tasks = sorted({k[0] for k in g if _kind(k[0]) == "locomotion"})
    md, csv_rows = [], []
    for task in tasks:
        for mid, label in TABLE3_METHODS:
            eps = g.get((task, mid))
            text, nums = _score_cell(eps, absent=NOT_MEASURED if mid in _OPTIONAL else "missing")
            ttext, tnums = _time_cell(eps, "locomotion") if eps and mid != "data" else (
                "—" if mid in _OPTIONAL else "missing", {})
            nfe = _nfe_cell(eps) if eps and mid != "data" else "—"
            pv, pt = paper_value("table3", label, task), paper_value("table3_time", label, task)
            md.append([task, label, ttext, nfe, text, pt[0] if pt else "—", pt[1] if pt else "—", fmt_paper(pv)])
            csv_rows.append({"task": task, "method": mid, **tnums, **_nfe_numbers(eps, mid), **nums,
                             "paper_time_s": pt[0] if pt else None, "paper_nfe": pt[1] if pt else None,
                             "paper_score": pv[0] if pv else None})
    headers = ["task", "method", "time per action (measured)", "NFE", "score (measured)", "paper time (s, V100)",
               "paper NFE", "paper score"]
    return Table("table3", "Table 3: inference time per action and NFE", csv_rows, _md(md, headers))


TABLE4_CELLS = [("ctd", "unconditioned teacher / unconditioned student"),
                ("ractd", "unconditioned teacher / reward-aware student"),
                ("ra-teacher-ctd", "reward-aware teacher / unconditioned student"),
                ("ra-teacher-ractd", "reward-aware teacher / reward-aware student")]


def table4(rows: list[dict]) -> Table:
    """Tables 4 and 10: the reward objective in the teacher, the student, both or neither (per task)."""
    g = _group(rows)
    tasks = sorted({k[0] for k in g if k[1].startswith("ra-teacher")})
    md, csv_rows = [], []
    for task in tasks:
        for mid, label in TABLE4_CELLS + BASELINES:
            text, nums = _score_cell(g.get((task, mid)), absent=NOT_MEASURED if mid in _OPTIONAL else "missing")
            pv = paper_value("table4", label, task)
            md.append([task, label, text, fmt_paper(pv)])
            csv_rows.append({"task": task, "method": mid, **nums, "paper_score": pv[0] if pv else None,
                             "paper_se": pv[1] if pv else None})
    headers = ["task", "teacher / student", "score (measured)", "paper (Table 4: hopper-mr, Table 10: walker2d-m)"]
    return Table("table4", "Tables 4 and 10: reward objective in teacher and/or student", csv_rows, _md(md, headers))


def table5(rows: list[dict]) -> Table:
    """Table 5: multi-step sampling of the RACTD student (1-4 steps): time per action and score."""
    g = _group(rows)
    tasks = sorted({k[0] for k in g if k[1].startswith("ractd-nfe")})
    md, csv_rows = [], []
    for task in tasks:
        for k in (1, 2, 3, 4):
            mid = "ractd" if k == 1 else f"ractd-nfe{k}"
            eps = g.get((task, mid))
            text, nums = _score_cell(eps)
            ttext, tnums = _time_cell(eps, _kind(task))
            pv, pt = paper_value("table5", str(k), task), paper_value("table5_time", str(k), task)
            md.append([task, k, ttext, text, pt[0] if pt else "—", fmt_paper(pv)])
            csv_rows.append({"task": task, "method": mid, "nfe": k, **tnums, **nums,
                             "paper_time_s": pt[0] if pt else None, "paper_score": pv[0] if pv else None,
                             "paper_se": pv[1] if pv else None})
        for mid, label in BASELINES:
            eps = g.get((task, mid))
            text, nums = _score_cell(eps, absent=NOT_MEASURED)
            ttext, tnums = _time_cell(eps, _kind(task)) if eps and mid != "data" else ("—", {})
            md.append([task, label, ttext, text, "—", "—"])
            csv_rows.append({"task": task, "method": mid, "nfe": eps[0]["nfe"] if eps and mid != "data" else None,
                             **tnums, **nums})
    headers = ["task", "NFE", "time (measured)", "score (measured)", "paper time (s, V100)", "paper score"]
    return Table("table5", "Table 5: multi-step student sampling", csv_rows, _md(md, headers))


TABLE11_METHODS = [("ddpm-100", "DDPM 100"), ("ddim-10", "DDIM 10"), ("ddim-1", "DDIM 1"),
                   ("teacher-heun-80", "EDM 80"), ("ctd", "CTD 1"), ("ractd", "RACTD 1"),
                   ("ctd-final", "CTD 1, final checkpoint"), ("ractd-final", "RACTD 1, final checkpoint")] + BASELINES


# the teacher's row named by its cost ("EDM 80" is the paper's row, which counts its 80 bins as the NFE)
TABLE11_SHOWN = {"EDM 80": f"EDM {sampler_name('heun', 80)}"}


def table11(rows: list[dict]) -> Table:
    """Table 11 (maze2d): fast samplers (DDPM, DDIM) against the EDM teacher, CTD and RACTD."""
    g = _group(rows)
    tasks = sorted({k[0] for k in g if _kind(k[0]) == "maze"})
    md, csv_rows = [], []
    for mid, label in TABLE11_METHODS:
        line = [TABLE11_SHOWN.get(label, label)]
        for task in tasks:
            eps = g.get((task, mid))
            text, nums = _score_cell(eps, absent=NOT_MEASURED if mid in _OPTIONAL else "missing")
            pv = paper_value("table11", label, task)
            line += [text, fmt_paper(pv)]
            csv_rows.append({"task": task, "method": mid, **nums, "nfe": eps[0]["nfe"] if eps else None,
                             "paper_score": pv[0] if pv else None, "paper_se": pv[1] if pv else None})
        md.append(line)
    headers = ["method (NFE)"] + [h for t in tasks for h in (f"{t} (measured)", f"{t} paper")]
    return Table("table11", "Table 11: maze2d fast samplers", csv_rows, _md(md, headers))


TABLES = {"table1": table1, "table2": table2, "table3": table3, "table4": table4, "table5": table5,
          "table11": table11}


def _md(lines: list[list], headers: list[str]) -> str:
    from tabulate import tabulate

    if not lines:
        return "(no measured cells for this table in the store)"
    return tabulate(lines, headers=headers, tablefmt="github", disable_numparse=True)


def build_tables(store: ResultsStore, out) -> list[Table]:
    """Every table from the store's episodes, written as <out>/<name>.md and .csv; returns the tables."""
    rows = store.episodes()
    tables = [fn(rows) for fn in TABLES.values()]
    for t in tables:
        t.write(Path(out))
    return tables


HEADLINE = [("ractd", "RACTD, one-step student", ("RACTD 1", "RACTD")),
            ("teacher-heun-80", "teacher, EDM Heun-80 (158 network calls)", ("EDM 80", None)),
            ("ctd", "CTD (alpha = beta = 1, sigma = 0)", ("CTD 1", None)),
            ("bc", "BC (2 x 256 MLP, CORL recipe)", (None, "BC")),
            ("data", "data (the dataset's own level)", (None, None))]


def headline_lines(rows: list[dict], tasks: list[str]) -> list[str]:
    """What a study found, a few lines per task: each method's normalized score (mean ± SE, IQM, n) beside the
    paper's, and the one-step student's speed-up per policy call over the teacher, measured in the same run."""
    g = _group(rows)
    out = []
    for task in tasks:
        cells = {mid: g.get((task, mid)) for mid, *_ in HEADLINE}
        if not any(cells.values()):
            continue
        scale = "/".join(sorted({r["scale"] for eps in cells.values() if eps for r in eps}))
        out.append(f"{task} ({scale}), normalized score, mean ± SE over episodes:")
        for mid, label, (t11, t1) in HEADLINE:
            eps = cells[mid]
            if not eps:
                continue
            s = cell_stats([r["normalized_score"] for r in eps])
            paper = paper_value("table11", t11, task) if t11 else None
            paper = paper or (paper_value("table1", t1, task) if t1 else None)
            se = "" if math.isnan(s["se"]) else f" ± {s['se']:.1f}"
            out.append(f"  {label:44s} {s['mean']:6.1f}{se:7s} (IQM {s['iqm']:.1f}, n={s['n']})"
                       + (f"   paper: {fmt_paper(paper)}" if paper else ""))
        student, teacher = cells["ractd"], cells["teacher-heun-80"]
        if student and teacher:
            kind = _kind(task)  # maze2d plans once per episode: _time_cell gives the plan's time
            ts, tt = (_time_cell(eps, kind)[1]["time_s"] for eps in (student, teacher))
            what = "per plan" if kind == "maze" else "per action"
            out.append(f"  speed: {ts * 1e3:.3g} ms {what} for the student, {tt * 1e3:.3g} ms for the teacher: "
                       f"{tt / ts:.0f}x faster")
    return out
