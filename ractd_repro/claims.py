"""The paper's claims, each with a verdict decided from stored numbers only (docs/results.md renders them:
ractd_repro.document).

Verdicts. Each claim gets "holds", "does not hold", "inconclusive" or "not measured", by a rule stated in the
document and applied to the stored numbers (never typed):
  * a difference of two cells is decided at two standard errors of the difference,
    SE = sqrt(SE_a^2 + SE_b^2), each SE over the cell's episodes (ractd_repro.store.cell_stats);
  * "matches" allows MATCH_MARGIN normalized points: the student matches when (student - reference) - 2 SE >
    -MATCH_MARGIN, does not match when (student - reference) + 2 SE < -MATCH_MARGIN; it is "not meaningful" when
    the reference (the teacher) is not above the data's own level (the "data" cell,
    ractd_repro.baselines.baseline_rows) at 2 SE, and where the store has no data cell the evidence says "data
    level not measured";
  * claim 3 compares R_psi of two methods' actions on the same dataset states: paired differences. It is a
    diagnostic of the training objective (the student is trained to raise R_psi), not evidence of the method.
Naming. The teacher is named by its cost, "Heun-80 (158 network calls)" (ractd_repro.tables.sampler_name: 79 Heun steps
of 2 calls); a RACTD cell whose episodes carry sigma = 0 is named "RACTD (σ = 0, i.e. CTD)", with "the sweep's
pick" where the task's sweep tried a sigma > 0.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ractd_repro.store import _group, cell_stats
from ractd_repro.tables import CTD_NOTE, is_ctd, network_calls, sampler_name

MATCH_MARGIN = 10.0   # normalized points within which a one-step student "matches" its reference


Z = 2.0               # standard errors at which a difference counts


def _cells(rows: list[dict]) -> dict[tuple[str, str], dict]:
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
    meaningful" when the reference is not above the data's own level `data` at Z standard errors (matching a
    teacher that does no better than the dataset's episodes says nothing about distillation). data None: the data
    level is not measured (the evidence says so)."""
    if data is not None and better(reference, data) != "holds":
        return "not meaningful"
    d, se = _diff(student, reference)
    if d - Z * se > -margin:
        return "holds"
    if d + Z * se < -margin:
        return "does not hold"
    return "inconclusive"


def mean_se(values) -> tuple[float, float]:
    """(mean, standard error of the mean) of values; the SE is NaN for fewer than two."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan)


def paired(values_a: list[float], values_b: list[float]) -> tuple[str, float, float]:
    """(verdict that a > b, mean of a - b, its SE) for values on the same items (Fig. 3's states)."""
    m, se = mean_se(np.asarray(values_a, float) - np.asarray(values_b, float))
    if not math.isfinite(se):
        return "inconclusive", m, se
    return ("holds" if m - Z * se > 0 else "does not hold" if m + Z * se < 0 else "inconclusive"), m, se


def any_holds(verdicts: list[str]) -> str:
    """"Some X beats Y" from the verdicts of each X: holds if one holds, does not hold if all do not."""
    if "holds" in verdicts:
        return "holds"
    return "does not hold" if all(v == "does not hold" for v in verdicts) else "inconclusive"


@dataclasses.dataclass(frozen=True)
class _Task:
    """What every claim's check reads of one task: its cells (method -> cell_stats), the stored rows and R_psi
    samples, its sweep record, and the names the evidence uses."""

    task: str
    c: dict
    rows: list
    rewards: list
    sweep: dict

    @property
    def data(self) -> dict | None:
        return self.c.get("data")

    @property
    def ractd(self) -> str:
        return _ractd_label(self.rows, self.task, self.sweep)

    @property
    def teacher(self) -> str:
        return _teacher_name(self.rows, self.task)

    def sigma(self, method: str) -> float:
        return _sigma_of(self.rows, self.task, method)


def _verdict(claim: str, t: _Task, verdict: str, evidence: str) -> dict:
    return {"claim": claim, "task": t.task, "verdict": verdict, "evidence": evidence}


def _claim_1(t: _Task) -> list[dict]:
    c = t.c
    if not ("ctd" in c and "teacher-heun-80" in c):
        return []
    d, se = _diff(c["ctd"], c["teacher-heun-80"])
    return [_verdict(f"1. The one-step CTD student matches (or beats) the teacher's {t.teacher} (within "
                     f"{MATCH_MARGIN:g} points)", t, matches(c["ctd"], c["teacher-heun-80"], data=t.data),
                     f"CTD {_fmt(c['ctd'])} vs teacher {_fmt(c['teacher-heun-80'])}: difference {d:+.1f} ± {se:.1f}; "
                     + _data_level(t.data))]


def _claim_2ab(t: _Task) -> list[dict]:
    c, out = t.c, []
    if "ractd" in c and "ctd" in c:
        sigma = t.sigma("ractd")
        d, se = _diff(c["ractd"], c["ctd"])
        if sigma == 0 and _kind(t.task) != "locomotion":
            out.append(_verdict("2a. RACTD beats CTD", t, "not measured",
                                f"maze2d has no reward model (sigma = 0, Table 9), so its RACTD is CTD: "
                                f"{_fmt(c['ractd'])}"))
        elif sigma == 0:
            out.append(_verdict("2a. RACTD beats CTD", t, "does not hold",
                                f"{t.ractd} {_fmt(c['ractd'])}: the sweep's model selection picked sigma = 0, the CTD "
                                "point, as its best student, so no sigma > 0 scored higher; 2c compares every sigma on "
                                "the evaluation seeds"))
        else:
            out.append(_verdict("2a. RACTD beats CTD", t, better(c["ractd"], c["ctd"]),
                                f"RACTD (sigma {sigma:g}) {_fmt(c['ractd'])} vs CTD {_fmt(c['ctd'])}: difference "
                                f"{d:+.1f} ± {se:.1f}"))
    if "ractd" in c and "teacher-heun-80" in c and t.sigma("ractd") != 0:
        d, se = _diff(c["ractd"], c["teacher-heun-80"])
        out.append(_verdict(f"2b. RACTD matches or beats the teacher's {t.teacher} (within {MATCH_MARGIN:g} points)",
                            t, matches(c["ractd"], c["teacher-heun-80"], data=t.data),
                            f"RACTD {_fmt(c['ractd'])} vs teacher {_fmt(c['teacher-heun-80'])}: difference "
                            f"{d:+.1f} ± {se:.1f}; " + _data_level(t.data)))
    return out


def _claim_2c(t: _Task) -> list[dict]:
    """Any sigma > 0 the study evaluated (RACTD and the sigma cells) against CTD."""
    c = t.c
    positive = sorted({(t.sigma(m), m) for m in c
                       if (m == "ractd" or m.startswith("ractd-sigma-")) and t.sigma(m) > 0})
    if not (positive and "ctd" in c):
        return []
    each = [(s, m, better(c[m], c["ctd"]), *_diff(c[m], c["ctd"])) for s, m in positive]
    diag = _diag_line(t.sweep)
    return [_verdict("2c. Some reward weight sigma > 0 that the sweep tried beats CTD", t,
                     any_holds([x for _, _, x, _, _ in each]),
                     "; ".join(f"sigma {s:g}: {d:+.1f} ± {se:.1f} ({x})" for s, _, x, d, se in each)
                     + (f". Diagnostics: {diag}" if diag else ""))]


def _claim_3(t: _Task) -> list[dict]:
    """Fig. 3: R_psi of RACTD's actions against CTD's on the same dataset states (a diagnostic of the objective)."""
    r = {m: {x["state_index"]: x["reward"] for x in t.rewards if x["task"] == t.task and x["method"] == m}
         for m in ("ractd", "ctd", "teacher-heun-80")}
    claim = ("3. Diagnostic (the training objective itself, not evidence of the method): reward-aware distillation "
             "moves the student's actions to higher R_psi (Fig. 3)")
    if not (r["ractd"] and r["ctd"]):
        return []
    if t.sigma("ractd") == 0:
        return [_verdict(claim, t, "not measured",
                         "the sweep picked sigma = 0 (CTD) as RACTD, so Fig. 3 compares CTD with itself")]
    keys = sorted(set(r["ractd"]) & set(r["ctd"]))
    v, m, se = paired([r["ractd"][k] for k in keys], [r["ctd"][k] for k in keys])
    diag = _diag_line(t.sweep)
    return [_verdict(claim, t, v, f"mean R_psi(s, a_RACTD) - R_psi(s, a_CTD) = {m:+.4f} ± {se:.4f} over {len(keys)} "
                                  "dataset states" + (f"; {diag}" if diag else ""))]


def _claim_4(t: _Task) -> list[dict]:
    """Fig. 4: the effect of sigma on the final score; one point per sigma (a RACTD cell at sigma = 0, the sweep's
    pick, is CTD's point, and CTD's cell speaks for it)."""
    c, out = t.c, []
    by_sigma: dict[float, dict] = {}
    for m in sorted((m for m in c if m in ("ctd", "ractd") or m.startswith("ractd-sigma-")),
                    key=lambda m: (m != "ctd", m != "ractd", m)):
        s = t.sigma(m)
        if not math.isnan(s):
            by_sigma.setdefault(s, c[m])
    pts = sorted(by_sigma.items(), key=lambda p: p[0])
    if len(pts) < 3:
        return []
    zero = next((x for s, x in pts if s == 0), None)
    best_s, best = max(((s, x) for s, x in pts if s > 0), key=lambda p: p[1]["mean"])
    top_s, top = max(pts, key=lambda p: p[0])
    listing = ", ".join(f"sigma {s:g}: {x['mean']:.1f} ± {0 if math.isnan(x['se']) else x['se']:.1f}"
                        for s, x in pts)
    if zero is not None:
        out.append(_verdict("4a. A moderate reward weight raises the score over sigma = 0 (Fig. 4)", t,
                            better(best, zero), f"best sigma {best_s:g}; {listing}"))
    lower = [x for s, x in pts if 0 < s < top_s]
    if lower:
        peak = max(lower, key=lambda x: x["mean"])
        out.append(_verdict(f"4b. Too large a weight (sigma {top_s:g}) does worse than a moderate one (Fig. 4)", t,
                            better(peak, top), listing))
    return out


def _claim_5(t: _Task) -> list[dict]:
    """Table 5: multi-step sampling."""
    c = t.c
    multi = [(k, c[f"ractd-nfe{k}"]) for k in (2, 3, 4) if f"ractd-nfe{k}" in c]
    if not (multi and "ractd" in c):
        return []
    return [_verdict("5. Multi-step sampling (2-4 steps) improves on one step (Table 5)", t,
                     any_holds([better(x, c["ractd"]) for _, x in multi]),
                     f"{t.ractd}: 1 step {_fmt(c['ractd'])}; " + "; ".join(f"{k} steps {_fmt(x)}" for k, x in multi))]


def _claim_7(t: _Task) -> list[dict]:
    """Table 2: maze2d actions from the inverse dynamics model (the paper's Sec. 4.2) against the PD rule."""
    c, out = t.c, []
    for mid, how in (("ractd-invdyn-plan", "open loop, consecutive planned states"),
                     ("ractd-invdyn", "closed loop, observed state to the next waypoint")):
        if mid in c and "ractd" in c:
            d, se = _diff(c[mid], c["ractd"])
            out.append(_verdict(
                f"7. maze2d: an inverse dynamics model turns the plan into actions as well as the PD rule ({how})",
                t, matches(c[mid], c["ractd"], data=t.data),
                f"{t.ractd} plans: inverse dynamics {_fmt(c[mid])} vs PD rule {_fmt(c['ractd'])} on the same plans: "
                f"difference {d:+.1f} ± {se:.1f}; {_data_level(t.data)}. The model is fitted on the dataset's "
                "one-step transitions "
                "(tests/test_inverse_dynamics.py bounds its error there); how far the student's planned steps "
                "are from such transitions is not measured here"))
    return out


def _claim_8(t: _Task) -> list[dict]:
    """The baselines: BC trained on the same data, and the data's own level (ractd.data.level)."""
    c, out = t.c, []
    for ref, claim in BASELINE_CLAIMS:
        models = [m for m in DIFFUSION_MODELS if m in c]
        if not models:
            continue
        if ref not in c:
            out.append(_verdict(claim, t, "not measured",
                                f"the store has no {ref} cell ({BASELINE_LABEL[ref]}; the baseline rows came after "
                                "this study's evaluation; eval/reproduce_tables.py --study claims adds them)"))
            continue
        each = [(m, better(c[m], c[ref]), *_diff(c[m], c[ref])) for m in models]
        verdicts = [x for _, x, _, _ in each]
        v = "does not hold" if "does not hold" in verdicts else "holds" if all(
            x == "holds" for x in verdicts) else "inconclusive"
        label = {**MODEL_LABEL, "teacher-heun-80": f"teacher {t.teacher}", "ractd": t.ractd}
        out.append(_verdict(claim, t, v, f"{BASELINE_LABEL[ref]} {_fmt(c[ref])}; " + "; ".join(
            f"{label[m]} {d:+.1f} ± {se:.1f} ({'**below**' if x == 'does not hold' else x})"
            for m, x, d, se in each)))
        out[-1]["below"] = [(label[m], BASELINE_LABEL[ref], d, se) for m, x, d, se in each if x == "does not hold"]
    return out


def _claim_8c(t: _Task) -> list[dict]:
    """RACTD against 10% BC (BC on the trajectories with the best 10% returns), the return-aware baseline."""
    c = t.c
    if "ractd" not in c or _kind(t.task) != "locomotion":
        return []
    claim = "8c. RACTD scores above 10% BC (BC on the best 10% of trajectories: the return-aware baseline)"
    if "bc-10" not in c:
        return [_verdict(claim, t, "not measured", "the store has no 10% BC cell")]
    d, se = _diff(c["ractd"], c["bc-10"])
    return [_verdict(claim, t, better(c["ractd"], c["bc-10"]),
                     f"{t.ractd} {_fmt(c['ractd'])} vs 10% BC {_fmt(c['bc-10'])}: difference {d:+.1f} ± {se:.1f}")]


def _claim_6(t: _Task) -> list[dict]:
    """Table 3: speed per action."""
    times = _times(t.rows, t.task)
    if not ("teacher-heun-80" in times and "ractd" in times):
        return []
    (tt, bt), (ts, bs) = times["teacher-heun-80"], times["ractd"]
    calls = _calls(t.rows, t.task, "teacher-heun-80") / max(1, _calls(t.rows, t.task, "ractd"))
    ratio = tt / ts
    v = "inconclusive" if bt != bs else "holds" if ratio >= calls / 2 else "does not hold"
    return [_verdict("6. The one-step student is faster per action than the teacher roughly in proportion to the "
                     "network calls (Table 3: 142x on a V100, where the paper counts Heun-80 as 80 NFE)", t, v,
                     f"teacher {t.teacher} {tt * 1e3:.1f} ms vs student {ts * 1e3:.2f} ms per batched policy call "
                     f"(batch {bt} vs {bs}): {ratio:.0f}x for {calls:g}x the network calls (rule: at least half the "
                     "ratio of network calls, at equal batch)")]


def _claim_9(t: _Task) -> list[dict]:
    """The warm-start control: each one-step student against the teacher's one-step Euler, which is the student at
    step 0 (ractd_repro.methods: load_teacher_into_student makes them the same policy). A student that does not beat
    it shows nothing that distillation added."""
    c = t.c
    ref = c.get("teacher-euler-1")
    students = [m for m in ("ctd", "ractd") if m in c]
    if ref is None or not students:
        return []
    label = {"ctd": "CTD", "ractd": t.ractd}
    each = [(m, better(c[m], ref), *_diff(c[m], ref)) for m in students]
    verdicts = [x for _, x, _, _ in each]
    v = "holds" if all(x == "holds" for x in verdicts) else "does not hold" if "does not hold" in verdicts \
        else "inconclusive"
    return [_verdict("9. Distillation adds to its warm start: the one-step students score above the teacher's "
                     "one-step Euler, which is the student at step 0", t, v,
                     f"warm start {_fmt(ref)}; " + "; ".join(f"{label[m]} {d:+.1f} ± {se:.1f} ({x})"
                                                             for m, x, d, se in each))]


# every claim's check, in the order its verdicts are listed within a claim number
CHECKS = (_claim_1, _claim_2ab, _claim_2c, _claim_3, _claim_4, _claim_5, _claim_7, _claim_8, _claim_8c, _claim_6,
          _claim_9)


def claims(rows: list[dict], rewards: list[dict], sweeps: dict[str, dict]) -> list[dict]:
    """[{claim, task, verdict, evidence}] for the paper's claims (module doc), from stored rows only."""
    cells = _cells(rows)
    out = []
    for task in sorted({t for t, _ in cells}):
        t = _Task(task, {m: cells[(k, m)] for k, m in cells if k == task}, rows, rewards, sweeps.get(task, {}))
        for check in CHECKS:
            out += check(t)
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
    """Network calls per policy call of a cell (ractd_repro.tables.network_calls of its stored sampler and NFE)."""
    return max((network_calls(r["sampler"], r["nfe"]) for r in rows if r["task"] == task and r["method"] == method),
               default=1)


def _teacher_name(rows: list[dict], task: str) -> str:
    """The teacher's sampler named by its cost, from its stored episodes: 'Heun-80 (158 network calls)'."""
    r = next((r for r in rows if r["task"] == task and r["method"] == "teacher-heun-80"), None)
    return sampler_name(r["sampler"], r["nfe"]) if r else "Heun-80"


def _ractd_label(rows: list[dict], task: str, sweep: dict) -> str:
    """'RACTD', or where the cell's episodes carry sigma = 0 (ractd_repro.tables.is_ctd) 'RACTD (σ = 0, i.e. CTD)',
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
