"""docs/results-tables.md (ractd_repro.tables_doc): the twelve-task study's progress and goals decided from a store,
on synthetic cells whose verdicts are worked out by hand, and the committed document rebuilt from its snapshot."""

from pathlib import Path

from ractd_repro import tables, tables_doc
from ractd_repro.claims import _cells
from ractd_repro.spec import STUDIES, TABLES_SWEEPS
from ractd_repro.store import ResultsStore, episode_rows

REPO = Path(__file__).resolve().parents[1]
HMR = "hopper-medium-replay"


def _eps(task, method, mean, n=100, sigma=float("nan"), sampler="student", nfe=1):
    recs = [{"task": task, "seed": i, "return": mean + (i % 5) - 2.0, "normalized_score": mean + (i % 5) - 2.0,
             "length": 10, "time_per_action": 0.01, "terminated": False, "truncated": True, "batch_size": 10}
            for i in range(n)]
    return episode_rows(recs, method=method, sampler=sampler, nfe=nfe, checkpoint=f"{task}-{method}",
                        checkpoint_path="/x.pt", scale="test", sigma=sigma, wall_s=2.0, versions={"ractd": "test"})


def _hopper(store: ResultsStore, ractd=40.0, ctd=30.0, teacher=20.0, data=10.0, warm=35.0, bc10=40.5):
    store.write_episodes(_eps(HMR, "ractd", ractd, sigma=1.0))
    store.write_episodes(_eps(HMR, "ctd", ctd, sigma=0.0))
    store.write_episodes(_eps(HMR, "teacher-heun-80", teacher, n=10, sampler="heun", nfe=80))
    store.write_episodes(_eps(HMR, "data", data))
    store.write_episodes(_eps(HMR, "teacher-euler-1", warm, sampler="euler", nfe=2))
    store.write_episodes(_eps(HMR, "bc-10", bc10))


def test_goals_on_hand_worked_cells(tmp_path):
    store = ResultsStore(tmp_path / "store")
    _hopper(store)
    g = {(row[0], row[1]): row for row in tables_doc.goals(_cells(store.episodes()))}
    # SE of a cell of 100 episodes cycling -2..2 is ~0.14: every difference below is many SE
    assert g[("teacher Heun-80 at or above the data's level", HMR)][2] == "holds"        # 20 vs 10
    assert g[("RACTD above its warm start (teacher Euler, 1 call)", HMR)][2] == "holds"   # 40 vs 35
    assert g[("CTD above its warm start (teacher Euler, 1 call)", HMR)][2] == "does not hold"  # 30 vs 35
    assert g[("RACTD above CTD", HMR)][2] == "holds"
    assert g[("RACTD at or above 10% BC (one training seed)", HMR)][2] == "does not hold"  # 40 vs 40.5
    # a task with no cells is "not measured" on every goal, and maze has no warm-start or 10% BC goal
    assert g[("teacher Heun-80 at or above the data's level", "walker2d-medium")][2] == "not measured"
    assert not any(k[1].startswith("maze2d") and "warm start" in k[0] for k in g)


def test_a_teacher_below_its_data_gets_the_stores_account_of_the_cause(tmp_path):
    store = ResultsStore(tmp_path / "store")
    _hopper(store, teacher=5.0, data=10.0, warm=6.0, ctd=6.0, bc10=30.0)
    store.write_episodes(_eps(HMR, "bc", 4.0))
    rows = store.episodes()
    cells = _cells(rows)
    text = "\n".join(tables_doc.teacher_causes(rows, cells, tables_doc.goals(cells)))
    assert text.startswith(f"- **{HMR}**: trained on the whole dataset, BC 4.0") and "median 10.0" in text
    assert "BC on its best 10% of trajectories 30.0" in text and "imitating its whole mixture" in text
    store = ResultsStore(tmp_path / "store2")  # 10% BC below the data too: the store says nothing of a cause
    _hopper(store, teacher=5.0, data=10.0, warm=6.0, ctd=6.0, bc10=7.0)
    rows = store.episodes()
    cells = _cells(rows)
    text = "\n".join(tables_doc.teacher_causes(rows, cells, tables_doc.goals(cells)))
    assert "BC on its best 10% of trajectories 7.0" in text and "mixture" not in text
    store = ResultsStore(tmp_path / "store4")  # BC at the data's level, the teacher below: the teacher's shortfall
    _hopper(store, teacher=5.0, data=10.0, warm=6.0, ctd=6.0, bc10=7.0)
    store.write_episodes(_eps(HMR, "bc", 11.0))
    rows = store.episodes()
    cells = _cells(rows)
    text = "\n".join(tables_doc.teacher_causes(rows, cells, tables_doc.goals(cells)))
    assert "BC 11.0" in text and "the teacher's sampled actions fall short" in text and "worth imitating" not in text
    store = ResultsStore(tmp_path / "store3")  # a teacher at its data's level: no line
    _hopper(store)
    rows = store.episodes()
    assert tables_doc.teacher_causes(rows, _cells(rows), tables_doc.goals(_cells(rows))) == []

def test_bc_by_share_is_evidence_only_on_its_own_task_and_dataset(tmp_path):
    store = ResultsStore(tmp_path / "store")
    _hopper(store, teacher=5.0, data=10.0, warm=6.0, ctd=6.0, bc10=30.0)
    rows = store.episodes()
    cells = _cells(rows)
    fp = next(r["checkpoint"] for r in rows if r["method"] == "data")

    def share(task, f, score, dataset=fp):
        return [{"task": task, "fraction": f, "seed": i, "normalized_score": score + i, "trajectories": 10,
                 "of": 20, "worst_kept": 1.0, "random_kept": 3, "random_level": 5.0, "dataset": dataset}
                for i in range(2)]

    mine = share(HMR, 1.0, 2.0) + share(HMR, 0.5, 30.0)
    text = "\n".join(tables_doc.teacher_causes(rows, cells, tables_doc.goals(cells), (), mine))
    assert "BC on the best share of its trajectories (n=2 seeds each" in text and "0.5: 30.5 ± 0.5" in text
    others = share("walker2d-medium-replay", 0.5, 30.0) + share(HMR, 0.5, 30.0, dataset="another dataset")
    text = "\n".join(tables_doc.teacher_causes(rows, cells, tables_doc.goals(cells), (), others))
    assert text.startswith(f"- **{HMR}**") and "best share" not in text


def test_a_maze_teacher_below_its_data_gets_its_measured_plans_as_evidence(tmp_path):
    """The plans of the very teacher the store evaluated (its checkpoint hash), not another teacher's of the task."""
    task = "maze2d-large"
    store = ResultsStore(tmp_path / "store")
    store.write_episodes(_eps(task, "teacher-heun-80", 0.0, sampler="heun", nfe=80))
    store.write_episodes(_eps(task, "data", 10.0))
    rows = store.episodes()
    cells = _cells(rows)

    def plan(model, ck, wall, end, source="heun-80"):
        return {"task": task, "model": model, "source": source, "index": 0, "checkpoint": ck, "wall_share": wall,
                "end_to_goal": end, "min_to_goal": end, "step_mean": 0.1, "step_max": 0.2}

    plans = [plan("teacher 12000 x 64", f"{task}-teacher-heun-80", 0.5, 1.0),
             plan("teacher 12000 x 64", f"{task}-teacher-heun-80", 0.0, 2.0),
             plan("teacher 3000 x 256", "another", 0.9, 5.0),
             plan("dataset windows", "", 0.0, float("nan"), source="data")]
    text = "\n".join(tables_doc.teacher_causes(rows, cells, tables_doc.goals(cells), plans))
    assert ("The teacher: its plans (n=2, maze2d plans below) put 25.0% of their states in wall cells, 1 of 2 plans "
            "at least one (the dataset's windows of the same horizon: 0.0%), and end 1.50 from the goal") in text
    no_plans = "\n".join(tables_doc.teacher_causes(rows, cells, tables_doc.goals(cells), plans[2:]))
    assert no_plans.startswith(f"- **{task}**") and "The teacher:" not in no_plans


def _seed(method, seed, mean, sem=1.0):
    return {"method": method, "train_seed": seed, "best_mean": mean, "best_sem": sem, "final_mean": mean,
            "final_sem": sem}


def test_training_seed_goal_needs_three_seeds_none_below_10_percent_bc(tmp_path):
    """RACTD against 10% BC per training seed (selected checkpoints, SE 1 each: the difference's SE is 1.41, so
    "below" means more than 2.83 under): two seeds at or above -> inconclusive; a third within the noise -> holds;
    one clearly below -> does not hold. The goal row reads the rows committed beside the store."""
    goal = "RACTD at or above 10% BC (>= 3 training seeds)"
    rows = [_seed("ractd", 0, 35.0), _seed("bc10", 0, 30.0), _seed("ractd", 1, 29.0), _seed("bc10", 1, 30.0),
            _seed("ctd", 2, 50.0)]
    assert tables_doc.seed_goal([]) == [goal, HMR, "not measured", ""]
    assert tables_doc.seed_goal(rows)[2] == "inconclusive (2 of 3 seeds)"
    three = rows + [_seed("ractd", 2, 28.0), _seed("bc10", 2, 30.0)]  # -2.0: within 2 SE
    assert tables_doc.seed_goal(three)[2] == "holds"
    assert "seed 2: 28.0 vs 30.0 (-2.0 ± 1.4)" in tables_doc.seed_goal(three)[3]
    below = rows + [_seed("ractd", 2, 26.0), _seed("bc10", 2, 30.0)]  # -4.0: below by more than 2 SE
    assert tables_doc.seed_goal(below)[2] == "does not hold"
    # against CTD a seed counts only where RACTD is above by more than 2 SE: a tie fails the goal
    ctd = [_seed("ractd", s, 35.0) for s in range(3)] + [_seed("ctd", s, 30.0) for s in range(3)]
    assert tables_doc.seed_goal(ctd, against="ctd")[:3] == ["RACTD above CTD (>= 3 training seeds)", HMR, "holds"]
    ctd[-1] = _seed("ctd", 2, 33.0)  # +2.0: a tie on seed 2
    assert tables_doc.seed_goal(ctd, against="ctd")[2] == "does not hold"
    assert tables_doc.seed_goal(ctd[:2] + ctd[3:5], against="ctd")[2] == "inconclusive (2 of 3 seeds)"
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "seeds" / f"{HMR}-small"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(three), folder / "results.parquet")
    g = {(row[0], row[1]): row for row in tables_doc.goals({}, tables_doc.seed_rows(tmp_path))}
    assert g[(goal, HMR)][2] == "holds"
    # the run that fills the goal: at the reward weight of the sweep's best trial, Table 9's before the sweep
    sweep = {"trials": [{"sigma": 0.3, "select_score": 5.0}, {"sigma": 1.0, "select_score": 2.0},
                        {"sigma": 2.0, "select_score": float("nan")}]}
    assert "--sigma 0.3 --methods ctd ractd bc bc10" in "\n".join(tables_doc.seed_commands(sweep))
    assert "--sigma 1 --methods" in "\n".join(tables_doc.seed_commands({}))


def test_committed_learning_curves_get_their_section(tmp_path):
    """A curves.parquet in the snapshot's curves/<task>-small/ is summarised in the document; none, no section."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert tables_doc.curve_sections(tmp_path) == []
    rows = [{"stage": "teacher", "preset": "cpu", "batch": 256, "seed": 0, "holdout": 0.1, "fraction": f,
             "n_train_transitions": int(1000 * f), "n_train_episodes": int(10 * f), "step": step,
             "val_loss": 1.0 + 1.0 / step + (0.5 if f < 1 else 0.0)} for f in (0.5, 1.0) for step in (100, 200, 300)]
    folder = tmp_path / "curves" / f"{HMR}-small"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "curves.parquet")
    text = "\n".join(tables_doc.curve_sections(tmp_path))
    assert f"### {HMR}-small" in text and "data size by measurement: fraction 1 (1000 transitions)" in text


def test_at_or_above_holds_within_the_noise_and_fails_only_below_it(tmp_path):
    store = ResultsStore(tmp_path / "store")
    _hopper(store, teacher=10.1, data=10.0)
    g = {(row[0], row[1]): row for row in tables_doc.goals(_cells(store.episodes()))}
    assert g[("teacher Heun-80 at or above the data's level", HMR)][2] == "holds"  # inside the noise
    store2 = ResultsStore(tmp_path / "store2")
    _hopper(store2, teacher=8.0, data=10.0)
    g = {(row[0], row[1]): row for row in tables_doc.goals(_cells(store2.episodes()))}
    assert g[("teacher Heun-80 at or above the data's level", HMR)][2] == "does not hold"


def test_coverage_counts_a_row_only_with_ractd_ctd_and_the_teacher(tmp_path):
    store = ResultsStore(tmp_path / "store")
    _hopper(store)
    store.write_episodes(_eps("walker2d-medium", "ractd", 50.0))  # no CTD, no teacher: not a row
    lines, counts = tables_doc.coverage(_cells(store.episodes()))
    by = {row[0]: row for row in lines}
    assert counts == {"table1": 1, "table2": 0}
    assert by[HMR][1] == "yes" and by["walker2d-medium"][1] == "no"
    assert "bc" in by[HMR][3].split(", ") and "ractd" not in by[HMR][3].split(", ")  # BC missing, RACTD not
    assert "bc-10" not in by["maze2d-umaze"][3]  # 10% BC is planned on locomotion only
    assert len(lines) == len(STUDIES["tables"].tasks) == 12


def test_document_lists_each_missing_task_with_its_piece_commands_and_carries_the_tables(tmp_path):
    store = ResultsStore(tmp_path / "snap" / "store")
    _hopper(store)
    text = tables_doc.render(tmp_path / "snap")
    assert f"python tune/search.py --task walker2d-medium {TABLES_SWEEPS['walker2d-medium']}" in text
    assert f"python tune/search.py --task {HMR} " not in text.split("## Goals")[0]  # its piece ran
    assert "Table 1: 1 of 9 rows measured; Table 2: 0 of 3" in text
    rows = store.episodes()
    for name in ("table1", "table2", "table11"):
        assert tables.TABLES[name](rows).markdown in text
    assert (tmp_path / "snap" / "tables" / "table1.csv").is_file()


def test_committed_tables_document_is_rebuilt_exactly_from_its_snapshot():
    text = tables_doc.render(REPO / "docs" / "results" / "twelve", write=False)
    assert text == (REPO / "docs" / "results-tables.md").read_text()
    assert text.count(tables_doc.ONE_SEED) == 2  # the goals and the claims say what their verdicts rest on
