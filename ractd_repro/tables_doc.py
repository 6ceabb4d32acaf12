"""docs/results-tables.md: the twelve-task study (ractd_repro.spec.STUDIES["tables"]: Tables 1 and 2 in full, with the
baselines and controls), its progress and its goals, computed from a snapshot folder (docs/results/twelve/).

The study runs in pieces, a task at a time (`python tune/search.py --task T <TABLES_SWEEPS[T]>`, then
`python eval/reproduce_tables.py --study tables --tasks T --train-missing --store docs/results/twelve/store`), and
`python eval/results_doc.py --study tables` snapshots the sweeps and writes this document. Until every piece has
run the document says which tasks and cells are missing and the commands that fill them.

Goals (issue 27), each decided from stored episodes only, at Z standard errors of the difference (ractd_repro.claims):
  * coverage: Table 1 has a row per locomotion task, Table 2 per maze, where RACTD, CTD and the teacher are measured;
  * the teacher's Heun-80 at or above its data's level ("data" cell): not below it at Z SE;
  * the distilled student above its step-0 warm start (the teacher's one-step Euler);
  * RACTD above CTD on the medium-replay tasks;
  * RACTD at or above 10% BC on hopper-medium-replay: on the study's one training seed, and on >= 3 training seeds
    from the training-seed study's rows committed beside the store (seed_goal), with RACTD above CTD there too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ractd.tasks import get_task
from ractd_repro.claims import Z, _cells, _diff, _fmt, better, claims
from ractd_repro.document import _eval_compute, _sweep_section, _sweep_tables, _train_compute
from ractd_repro.spec import LOCOMOTION_TASKS, MAZE_TASKS, STUDIES, TABLES_SWEEPS
from ractd_repro.store import ResultsStore
from ractd_repro.tables import TABLES

STUDY = "tables"
# the cells a task's row needs to count as measured in Table 1 / Table 2
ROW_CELLS = ("ractd", "ctd", "teacher-heun-80")
# the training-seed goal: RACTD against 10% BC on this task, from ractd_repro.studies.training_seeds's rows
# (`--methods ctd ractd bc bc10 --train-seeds 0 1 2`, its results.parquet copied to <snapshot>/seeds/<task>-small/)
SEED_TASK, SEED_GOAL_SEEDS = "hopper-medium-replay", 3
SEED_GOAL = f"RACTD at or above 10% BC (>= {SEED_GOAL_SEEDS} training seeds)"
SEED_CTD_GOAL = f"RACTD above CTD (>= {SEED_GOAL_SEEDS} training seeds)"
# what every verdict of the document rests on, said where verdicts are given
ONE_SEED = (f"Every verdict rests on one training seed per model (the sweep's pick, the study's baselines: the SE is "
            f"over evaluation episodes only), except the rows marked \">= {SEED_GOAL_SEEDS} training seeds\".")


def seed_goal(rows: list[dict], against: str = "bc10") -> list[str]:
    """[goal, task, verdict, evidence]: RACTD against `against` (bc10: 10% BC, "at or above"; ctd: CTD, "above")
    on each of >= SEED_GOAL_SEEDS training seeds, at the selected checkpoints of the training-seed study's rows
    (training_seeds.seed_verdicts' per-seed difference and its SE over evaluation episodes, at Z SE). Against 10% BC
    a seed counts unless RACTD is "below" there; against CTD only where RACTD "beats". The goal holds when every
    one of at least SEED_GOAL_SEEDS seeds counts, does not hold when one is below (against CTD: when one does not
    count), and is inconclusive on fewer seeds."""
    from ractd_repro.studies.training_seeds import seed_verdicts

    goal = SEED_GOAL if against == "bc10" else SEED_CTD_GOAL
    pair = next((v for v in seed_verdicts(rows) if (v["a"], v["b"], v["checkpoint"]) == ("ractd", against, "selected")),
                None)
    if pair is None:
        return [goal, SEED_TASK, "not measured", ""]
    by = {(r["method"], int(r["train_seed"])): r["best_mean"] for r in rows}
    per = [f"seed {p['seed']}: {by[('ractd', p['seed'])]:.1f} vs {by[(against, p['seed'])]:.1f} "
           f"({p['diff']:+.1f} ± {p['se']:.1f})" for p in pair["per_seed"]]
    n = len(pair["per_seed"])
    fails = ("below",) if against == "bc10" else ("below", "ties")
    verdict = ("does not hold" if any(p["outcome"] in fails for p in pair["per_seed"]) else
               "holds" if n >= SEED_GOAL_SEEDS else f"inconclusive ({n} of {SEED_GOAL_SEEDS} seeds)")
    return [goal, SEED_TASK, verdict, "; ".join(per)]


def seed_rows(data: Path) -> list[dict]:
    """The training-seed study's rows committed in the snapshot folder (none yet: [])."""
    import pyarrow.parquet as pq

    path = Path(data) / "seeds" / f"{SEED_TASK}-small" / "results.parquet"
    return pq.read_table(path).to_pylist() if path.is_file() else []


def curve_sections(data: Path) -> list[str]:
    """Markdown: per task with held-out learning curves committed in the snapshot (<data>/curves/<task>-small/
    curves.parquet, ractd_repro.studies.learning_curves), its summary (where each curve stopped falling, the data
    size by measurement)."""
    import pyarrow.parquet as pq

    from ractd_repro.studies.learning_curves import summary_lines

    lines = []
    for path in sorted(Path(data).glob("curves/*/curves.parquet")):
        lines += [f"### {path.parent.name}", "", *summary_lines(pq.read_table(path).to_pylist()), ""]
    return lines


# the studies measured beside the tables (their stores under <snapshot>/<folder>/<task>-small/<file>): the section
# each gets in the document, its title and what it measures
STUDY_SECTIONS = {
    "maze_plans": ("plans", "plans.parquet", "maze2d plans",
                   "A maze2d planner plans once per episode and a PD rule follows the plan, so a plan through walls "
                   "cannot be followed. The teachers' Heun-80 plans from the evaluation resets toward the evaluation "
                   "goal, measured beside windows of the same horizon from the dataset (`python -m "
                   "ractd_repro.studies.maze_plans`): the share of their states in wall cells, how far they end from "
                   "the goal, and how far apart their consecutive states are."),
    "bc_fractions": ("bc_fractions", "scores.parquet", "BC on the best share of trajectories",
                     "Where a dataset's whole-data imitators fall below its own level, BC trained on the best share "
                     "of its trajectories by return (`python -m ractd_repro.studies.bc_fractions`; 1 is the tables' "
                     "BC, 0.1 their 10% BC) beside what each share keeps: where the score breaks says which "
                     "trajectories the whole-data models learn from."),
}


def study_rows(data: Path, study: str) -> list[dict]:
    """The rows of a STUDY_SECTIONS study measured in the snapshot, every task's, in path order."""
    from ractd.io import read_rows

    folder, filename = STUDY_SECTIONS[study][:2]
    return [r for path in sorted(Path(data).glob(f"{folder}/*/{filename}")) for r in read_rows(path)]


def study_section(study: str, rows: list[dict]) -> list[str]:
    """Markdown: a STUDY_SECTIONS study's section (its title, what it measures, the study's summary_lines of
    `rows`); [] without rows."""
    import importlib

    if not rows:
        return []
    title, text = STUDY_SECTIONS[study][2:]
    lines = importlib.import_module(f"ractd_repro.studies.{study}").summary_lines(rows)
    return [f"## {title}", "", text, "", *lines]


def seed_commands(sweep: dict) -> list[str]:
    """The training-seed goal's run: the study's shared teacher and reward model (its sweep's, copied in so the
    students distil the teacher the tables evaluate), three training seeds at the reward weight the sweep picked
    (its best-scoring trial in `sweep`, a _sweep_tables entry; the task's Table 9 weight before the sweep), the
    rows copied beside the store."""
    trials = [t for t in sweep.get("trials") or [] if t.get("select_score") == t.get("select_score")]
    sigma = max(trials, key=lambda t: t["select_score"])["sigma"] if trials else get_task(SEED_TASK).weights.sigma
    out = f"~/.cache/ractd/bench/seeds/{SEED_TASK}-small-tables"
    return [f"# copy the {SEED_TASK} sweep's shared teacher/ and reward/ run folders into {out}/shared/, then",
            f"python -m ractd_repro.studies.training_seeds --task {SEED_TASK} --sigma {sigma:g} "
            f"--methods ctd ractd bc bc10 --train-seeds 0 1 2 --out {out}",
            f"mkdir -p docs/results/twelve/seeds/{SEED_TASK}-small && "
            f"cp {out}/results.parquet docs/results/twelve/seeds/{SEED_TASK}-small/"]


def piece_commands(task: str) -> list[str]:
    """The commands that run one task's piece of the study and add it to the committed store."""
    return [f"python tune/search.py --task {task} {TABLES_SWEEPS[task]}",
            f"python eval/reproduce_tables.py --study {STUDY} --tasks {task} --train-missing "
            "--store docs/results/twelve/store"]


def commands() -> list[str]:
    lines = []
    for t in STUDIES[STUDY].tasks:
        lines += piece_commands(t)
    return lines + [f"python eval/results_doc.py --study {STUDY}"]


def _planned(task: str) -> tuple[str, ...]:
    from ractd_repro.methods import LOCO_ONLY

    plan = {p.task: p for p in STUDIES[STUDY].plans}[task]
    return tuple(m for m in plan.methods if task in LOCOMOTION_TASKS or m not in LOCO_ONLY) + ("data",)


def coverage(cells: dict) -> tuple[list[list[str]], dict[str, int]]:
    """One line per task of the study (measured cells with their n, missing planned cells) and the rows counted
    in Table 1 and Table 2."""
    lines, counts = [], {"table1": 0, "table2": 0}
    for task in STUDIES[STUDY].tasks:
        have = {m: c for (t, m), c in cells.items() if t == task}
        missing = [m for m in _planned(task) if m not in have]
        complete = all(m in have for m in ROW_CELLS)
        if complete:
            counts["table1" if task in LOCOMOTION_TASKS else "table2"] += 1
        lines.append([task, "yes" if complete else "no",
                      ", ".join(f"{m} (n={have[m]['n']})" for m in _planned(task) if m in have) or "—",
                      ", ".join(missing) or "—"])
    return lines, counts


def _verdict_of(a: dict | None, b: dict | None, at_or_above: bool = False) -> tuple[str, str]:
    """(verdict, evidence) of "a above b" (at_or_above: "a not below b") at Z SE; "not measured" without both."""
    if a is None or b is None:
        return "not measured", ""
    d, se = _diff(a, b)
    v = better(a, b)
    if at_or_above:
        v = "holds" if v != "does not hold" else "does not hold"
    return v, f"{_fmt(a)} vs {_fmt(b)}: {d:+.1f} ± {se:.1f}"


def goals(cells: dict, seeds: list[dict] = ()) -> list[list[str]]:
    """[goal, task, verdict, evidence] for the issue's per-task goals (module doc); `seeds`: the training-seed
    study's rows (seed_rows)."""
    out = []
    for task in STUDIES[STUDY].tasks:
        c = {m: s for (t, m), s in cells.items() if t == task}
        v, e = _verdict_of(c.get("teacher-heun-80"), c.get("data"), at_or_above=True)
        out.append(["teacher Heun-80 at or above the data's level", task, v, e])
        if task in LOCOMOTION_TASKS:
            for m, label in (("ractd", "RACTD"), ("ctd", "CTD")):
                v, e = _verdict_of(c.get(m), c.get("teacher-euler-1"))
                out.append([f"{label} above its warm start (teacher Euler, 1 call)", task, v, e])
        if task.endswith("medium-replay"):
            v, e = _verdict_of(c.get("ractd"), c.get("ctd"))
            out.append(["RACTD above CTD", task, v, e])
        if task == "hopper-medium-replay":
            v, e = _verdict_of(c.get("ractd"), c.get("bc-10"), at_or_above=True)
            out.append(["RACTD at or above 10% BC (one training seed)", task, v, e])
        if task == SEED_TASK:
            out += [seed_goal(list(seeds)), seed_goal(list(seeds), against="ctd")]
    return out


IMITATORS = (("bc", "BC"), ("teacher-heun-80", "teacher Heun-80"), ("teacher-euler-1", "its one-step Euler"),
             ("ctd", "CTD"))


def teacher_causes(rows: list[dict], cells: dict, goal_rows: list[list[str]], plans: list[dict] = (),
                   fractions: list[dict] = ()) -> list[str]:
    """For each task whose teacher is below its data's level: what the store says of the cause. The models trained
    on the whole dataset (BC, the teacher, its one-step Euler, CTD) against the data's episodes (median, 10th and
    90th percentiles) and BC on its best 10% of trajectories; when every whole-data imitator is below the data and
    10% BC is not, the line says so: the data holds a policy worth imitating that imitating the whole mixture does
    not reach (a finding of this budget and dataset, not a proof of its mechanism); when BC is not below the data,
    the shortfall is the teacher's own (its training or sampling), not the data's. On a maze, `plans`
    (ractd_repro.studies.maze_plans rows) add what the evaluated teacher's plans look like, where they were measured;
    on a locomotion task, `fractions` (ractd_repro.studies.bc_fractions rows) add BC on the best shares of the
    trajectories, where they were measured on the dataset of the store's data cell (its fingerprint).
    """
    from ractd_repro.studies import bc_fractions
    from ractd_repro.studies.maze_plans import teacher_evidence

    out = []
    for goal, task, verdict, _ in goal_rows:
        if not goal.startswith("teacher ") or verdict != "does not hold":
            continue
        c = {m: s for (t, m), s in cells.items() if t == task}
        data = np.asarray([r["normalized_score"] for r in rows if r["task"] == task and r["method"] == "data"])
        parts = [f"{label} {_fmt(c[m])}" for m, label in IMITATORS if m in c]
        line = (f"- **{task}**: trained on the whole dataset, {', '.join(parts)}; the data's "
                f"{len(data)} episodes score median {np.median(data):.1f} (10th-90th percentile "
                f"{np.quantile(data, 0.1):.1f} to {np.quantile(data, 0.9):.1f}), mean {c['data']['mean']:.1f}")
        if "bc-10" in c:
            line += f"; BC on its best 10% of trajectories {_fmt(c['bc-10'])}"
        below = [m for m, _ in IMITATORS if m in c and better(c[m], c["data"]) == "does not hold"]
        top_ok = "bc-10" in c and better(c["bc-10"], c["data"]) != "does not hold"
        if top_ok and len(below) == sum(m in c for m, _ in IMITATORS):
            line += (". Every model of the whole dataset is below the data while BC on its best trajectories is "
                     "not: the data holds behaviour worth imitating, and imitating its whole mixture of policies "
                     "does not reach it (the held-out curves below say whether the teacher had stopped improving).")
        elif "bc" in c and "bc" not in below:
            line += (". BC, a deterministic imitation of the same whole dataset, is not below the data while the "
                     "teacher is: the data's level is within reach of imitating the whole mixture at this budget, "
                     "and the teacher's sampled actions fall short of it (its training or its sampling, not the "
                     "data).")
        else:
            line += "."
        teacher = {r["checkpoint"] for r in rows if r["task"] == task and r["method"] == "teacher-heun-80"}
        evidence = [e for e in (teacher_evidence(list(plans), task, ck) for ck in sorted(teacher)) if e]
        if evidence:
            line += f" The teacher: {'; '.join(evidence)}."
        fps = {r["checkpoint"] for r in rows if r["task"] == task and r["method"] == "data"}  # its dataset's
        by_share = bc_fractions.evidence([r for r in fractions if r.get("dataset") in fps], task)
        if by_share:
            line += f" {by_share}."
        out.append(line)
    return out


def _summary(goal_rows: list[list[str]], counts: dict[str, int]) -> list[str]:
    def tally(label: str) -> str:  # label: one goal's exact name, or a prefix (ending in a space) of several
        rows = [g for g in goal_rows if g[0] == label or (label.endswith(" ") and g[0].startswith(label))]
        measured = [g for g in rows if g[2] != "not measured"]
        held = sum(g[2] == "holds" for g in measured)
        return f"{held} of {len(measured)} measured ({len(rows)} planned)"

    seeds = {g[0]: g[2] for g in goal_rows if g[0] in (SEED_GOAL, SEED_CTD_GOAL)}
    return [f"- Table 1: {counts['table1']} of {len(LOCOMOTION_TASKS)} rows measured; Table 2: {counts['table2']} "
            f"of {len(MAZE_TASKS)} (a row: RACTD, CTD and the teacher measured).",
            f"- Teacher at or above its data's level: {tally('teacher ')} (goal: >= 10 of 12).",
            f"- Students above their warm start: {tally('RACTD above its ')} for RACTD, {tally('CTD above its ')} for "
            "CTD (goal: every locomotion task).",
            f"- RACTD above CTD on medium-replay: {tally('RACTD above CTD')} (goal: >= 2 of 3).",
            f"- RACTD at or above 10% BC on hopper-medium-replay, one training seed: "
            f"{tally('RACTD at or above 10% BC (one training seed)')}; on {SEED_GOAL_SEEDS} training seeds: "
            f"{seeds.get(SEED_GOAL, 'not measured')} (RACTD above CTD on them: "
            f"{seeds.get(SEED_CTD_GOAL, 'not measured')})."]


def render(data: Path, write: bool = True) -> str:
    """The Markdown of the twelve-task document from a snapshot folder (store/, sweeps/<task>/, provenance.json).
    write: also (re)write the tables (Markdown + CSV) under <data>/tables; the text is the same either way."""
    from tabulate import tabulate

    data = Path(data)
    prov = json.loads((data / "provenance.json").read_text()) if (data / "provenance.json").is_file() else {}
    store = ResultsStore(data / "store")
    rows = store.episodes() if (data / "store" / "episodes").is_dir() else []
    rewards = store.rewards() if rows else []
    sweeps = _sweep_tables(data)
    cells = _cells(rows)
    cov, counts = coverage(cells)
    goal_rows = goals(cells, seed_rows(data))
    tables = [fn(rows) for name, fn in TABLES.items() if name in ("table1", "table2", "table3", "table11")]
    if write:
        for t in tables:
            t.write(data / "tables")
    todo = [r[0] for r in cov if r[1] == "no"]
    lines = ["# Tables 1 and 2 on all twelve tasks, at CPU scale", "",
             "Generated by `python eval/results_doc.py --study tables` from the snapshot in `docs/results/twelve/` "
             "(the study's results store and its sweeps' records); do not edit by hand. `tests/test_tables_doc.py` "
             "rebuilds this file from those Parquet files and compares.", "",
             "**Scale.** Small U-Nets at the CPU budget, on datasets generated here with D4RL's recipes at "
             "`--scale small` (`python -m ractd.data info TASK` gives each one's size and level), not the paper's "
             "networks on D4RL's files: a verdict says what these numbers show at this budget.", "",
             "## Progress", "", *_summary(goal_rows, counts), "",
             tabulate(cov, headers=["task", "row measured", "cells measured (episodes)", "cells missing"],
                      tablefmt="github", disable_numparse=True), ""]
    if todo:
        lines += ["Each missing task is one piece (its sweep, then its cells, added to the committed store; two pieces "
                  "side by side on one machine: add `--cpus-per-worker 1` to each sweep, whose workers otherwise each "
                  "take every CPU):", "",
                  "```bash", *[c for t in todo for c in piece_commands(t)], "```", ""]
    if not any(g[0] == SEED_GOAL and g[2] in ("holds", "does not hold") for g in goal_rows):
        lines += ["The training-seed goal (RACTD at or above 10% BC on 3 training seeds) is its own run:", "",
                  "```bash", *seed_commands(sweeps.get(SEED_TASK, {})), "```", ""]
    lines += ["## Goals", "",
              f"Each at {Z:g} standard errors of the difference (SE over episodes); \"at or above\" holds unless the "
              f"first is below the second at that level. {ONE_SEED}", "",
              tabulate(goal_rows, headers=["goal", "task", "verdict", "evidence"], tablefmt="github",
                       disable_numparse=True), ""]
    plans, fractions = study_rows(data, "maze_plans"), study_rows(data, "bc_fractions")
    causes = teacher_causes(rows, cells, goal_rows, plans, fractions)
    if causes:
        lines += ["### Where the teacher is below its data", "", *causes, ""]
    verdicts = claims(rows, rewards, sweeps)
    if verdicts:
        lines += ["## The paper's claims on these tasks", "",
                  f"The verdict rules are docs/results.md's (ractd_repro.claims). {ONE_SEED}", "",
                  tabulate([[v["claim"], v["task"], f"**{v['verdict']}**", v["evidence"]] for v in verdicts],
                           headers=["claim", "task", "verdict", "evidence"], tablefmt="github",
                           disable_numparse=True), ""]
    curves = curve_sections(data)
    if curves:
        lines += ["## Held-out learning curves", "",
                  "Teachers trained on nested shares of a task's episodes with 10% of them held out whole "
                  "(`python -m ractd_repro.studies.learning_curves`), their Eq. (4) loss on the held-out episodes at "
                  "every checkpoint, and where runs of several lengths were made (`--budgets`, each its own warm-up "
                  "and cosine decay) the final held-out loss per budget: how much data is enough, and how long to "
                  "train (within one run the curve flattens as the learning rate decays to zero).", "", *curves]
    lines += study_section("maze_plans", plans) + study_section("bc_fractions", fractions)
    lines += ["## Tables", ""]
    for t in tables:
        lines += [f"### {t.title}", "", t.markdown, ""]
    lines += ["## Compute", ""] + ([f"- machine: {prov['machine']}"] if prov.get("machine") else [])
    lines += _train_compute(sweeps) + _eval_compute(rows)
    pieces = prov.get("pieces") or {}
    lines += [f"- piece {t}: {p}" for t, p in sorted(pieces.items())] + [""]
    lines += ["## The sweeps", ""]
    for task, sweep in sweeps.items():
        lines += _sweep_section(task, sweep)
    lines += ["## How it was produced", "", "```bash", *prov.get("commands", commands()), "```", ""]
    return "\n".join(lines)
