"""The results store (exactly-once keys, atomic parts, dedupe), the table statistics checked against numbers
computed by hand, the paper's numbers in their own columns, the study's commands, and the figures."""

import csv
import dataclasses
import math
import shlex

import numpy as np
import pyarrow.parquet as pq
import pytest

from ractd_repro import figures, spec
from ractd_repro import jobs as rjobs
from ractd_repro import models as rmodels
from ractd_repro import tables as rtables
from ractd_repro.paper import PAPER
from ractd_repro.store import ResultsStore, cell_stats, episode_rows


def _episodes(task, method, scores, ckpt="c0", sampler="student", nfe=1, sigma=float("nan"), first_seed=0,
              scale="test", time_per_action=0.01):
    records = [{"task": task, "seed": first_seed + i, "return": float(s), "normalized_score": float(s), "length": 10,
                "time_per_action": time_per_action, "terminated": False, "truncated": True, "batch_size": len(scores)}
               for i, s in enumerate(scores)]
    return episode_rows(records, method=method, sampler=sampler, nfe=nfe, checkpoint=ckpt, checkpoint_path="/x.pt",
                        scale=scale, sigma=sigma, versions={"ractd": "test"})


def _by_hand(x):
    """mean, SE = sample std (n - 1) / sqrt(n), IQM = mean of the middle half of the sorted sample (n % 4 == 0)."""
    x = sorted(x)
    n = len(x)
    mean = sum(x) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1)) / math.sqrt(n)
    middle = x[n // 4: n - n // 4]
    return mean, se, sum(middle) / len(middle)


HOPPER_RACTD = [90.0, 100.0, 110.0, 120.0, 95.0, 105.0, 5.0, 300.0]    # outliers: IQM differs from the mean
HOPPER_CTD = [50.0, 52.0, 48.0, 51.0]
MAZE_RACTD = [120.0, 130.0, 125.0, 127.0]


@pytest.fixture
def store(tmp_path):
    s = ResultsStore(tmp_path / "store")
    s.write_episodes(_episodes("hopper-medium-replay", "ractd", HOPPER_RACTD, sigma=1.0))
    s.write_episodes(_episodes("hopper-medium-replay", "ctd", HOPPER_CTD, ckpt="c1", sigma=0.0))
    s.write_episodes(_episodes("hopper-medium-replay", "ractd-sigma-0.5", [70.0, 72.0, 74.0, 76.0], ckpt="c2",
                               sigma=0.5))
    s.write_episodes(_episodes("maze2d-umaze", "ractd", MAZE_RACTD, ckpt="c3"))
    return s


def test_cell_stats_equal_hand_computed_mean_se_iqm():
    s = cell_stats(HOPPER_RACTD)
    mean, se, iqm = _by_hand(HOPPER_RACTD)
    assert s["n"] == 8
    np.testing.assert_allclose([s["mean"], s["se"], s["iqm"]], [mean, se, iqm], rtol=1e-12)
    assert iqm == pytest.approx(102.5) and mean == pytest.approx(115.625)  # the outliers move the mean only
    # the 95% bootstrap interval of the IQM brackets it and stays inside the data, and is reproducible
    assert min(HOPPER_RACTD) <= s["iqm_low"] <= iqm <= s["iqm_high"] <= max(HOPPER_RACTD)
    assert cell_stats(HOPPER_RACTD) == s
    const = cell_stats([3.0, 3.0, 3.0, 3.0])
    assert (const["se"], const["iqm_low"], const["iqm_high"]) == (0.0, 3.0, 3.0)


def test_table1_and_table2_cells_are_the_hand_computed_numbers(store, tmp_path):
    tables = {t.name: t for t in rtables.build_tables(store, tmp_path / "out")}
    t1 = tables["table1"]
    (row,) = [r for r in t1.rows if r["task"] == "hopper-medium-replay"]
    for mid, data in (("ractd", HOPPER_RACTD), ("ctd", HOPPER_CTD)):
        mean, se, iqm = _by_hand(data)
        np.testing.assert_allclose([row[f"{mid}_mean"], row[f"{mid}_se"], row[f"{mid}_iqm"]], [mean, se, iqm],
                                   rtol=1e-12)
        assert row[f"{mid}_n"] == len(data) and row[f"{mid}_scale"] == "test"
    assert "teacher-heun-80_mean" not in row  # not measured: no number
    # the paper's numbers sit in their own columns, straight from PAPER
    assert row["paper_RACTD"] == PAPER["table1"]["RACTD"]["hopper-medium-replay"][0] == 104.9
    assert row["paper_Diffuser"] == 93.6
    mean, se, iqm = _by_hand(HOPPER_RACTD)
    line = next(l for l in t1.markdown.splitlines() if l.startswith("| hopper-medium-replay"))
    assert f"{mean:.1f} ± {se:.1f} · IQM {iqm:.1f}" in line and "· test" in line and "missing" in line
    assert "104.9 ± 2.1" in line
    # Table 2 (maze2d)
    (maze,) = [r for r in tables["table2"].rows if r["method"] == "ractd"]
    mean, se, iqm = _by_hand(MAZE_RACTD)
    np.testing.assert_allclose([maze["mean"], maze["se"], maze["iqm"]], [mean, se, iqm], rtol=1e-12)
    assert maze["paper_score"] == 125.7 and maze["paper_nfe"] == 1
    # written as Markdown and CSV; the CSV carries the same numbers
    with open(tmp_path / "out" / "table1.csv") as f:
        csv_row = next(r for r in csv.DictReader(f) if r["task"] == "hopper-medium-replay")
    assert float(csv_row["ractd_iqm"]) == pytest.approx(_by_hand(HOPPER_RACTD)[2])
    assert (tmp_path / "out" / "table1.md").read_text().startswith("### Table 1")


def test_table3_and_table5_time_and_nfe(tmp_path):
    s = ResultsStore(tmp_path / "s")
    s.write_episodes(_episodes("hopper-medium-replay", "ractd", [1.0, 2.0], time_per_action=0.004))
    s.write_episodes(_episodes("hopper-medium-replay", "ractd-nfe2", [3.0, 5.0], nfe=2, time_per_action=0.008,
                               ckpt="c0"))
    t3 = rtables.table3(s.episodes())
    (r,) = [r for r in t3.rows if r["method"] == "ractd"]
    assert r["time_s"] == pytest.approx(0.004) and r["nfe"] == 1 and r["paper_time_s"] == 0.015
    t5 = rtables.table5(s.episodes())
    (r2,) = [r for r in t5.rows if r["nfe"] == 2]
    assert r2["time_s"] == pytest.approx(0.008) and r2["mean"] == pytest.approx(4.0) and r2["paper_score"] == 109.8
    assert [r["mean"] if "mean" in r else None for r in t5.rows if r["nfe"] in (3, 4)] == [None, None]


def test_store_keys_dedupe_and_atomic_parts(tmp_path):
    s = ResultsStore(tmp_path / "s")
    block = _episodes("maze2d-umaze", "ctd", [1.0, 2.0, 3.0])
    p1 = s.write_episodes(block)
    assert s.write_episodes(block) == p1 and s.n_parts() == 1          # the same block replaces its own part
    # a racing writer stores seeds 1..3 split differently: read-time dedupe keeps one row per key
    s.write_episodes(_episodes("maze2d-umaze", "ctd", [20.0, 30.0, 40.0], first_seed=1))
    assert s.n_parts() == 2
    raw = sum(pq.read_table(p).num_rows for p in s.episodes_dir.glob("part-*.parquet"))
    rows = s.episodes()
    assert raw == 6 and len(rows) == 4 and sorted(r["seed"] for r in rows) == [0, 1, 2, 3]
    assert s.done_keys() == {("maze2d-umaze", "ctd", "c0", k) for k in range(4)}
    # another checkpoint of the same method is another key
    s.write_episodes(_episodes("maze2d-umaze", "ctd", [5.0], ckpt="other"))
    assert ("maze2d-umaze", "ctd", "other", 0) in s.done_keys() and len(s.episodes()) == 5
    s.compact()
    assert s.n_parts() == 1 and len(s.episodes()) == 5
    assert not list(s.episodes_dir.glob(".*.tmp"))  # no temp files left behind
    assert all(r["versions"] == '{"ractd": "test"}' for r in s.episodes())


def test_dropping_a_task_removes_its_rows_and_keeps_the_others(store):
    before = store.episodes()
    assert store.drop_tasks(["maze2d-umaze"]) == len(MAZE_RACTD)
    after = store.episodes()
    keys = lambda rows: [(r["task"], r["method"], r["checkpoint"], r["seed"], r["normalized_score"]) for r in rows]
    assert keys(after) == keys([r for r in before if r["task"] != "maze2d-umaze"]) and store.n_parts() == 1
    assert len(after) == len(HOPPER_RACTD) + len(HOPPER_CTD) + 4
    assert store.drop_tasks(["maze2d-umaze", "walker2d-medium"]) == 0 and keys(store.episodes()) == keys(after)
    assert store.drop_tasks(["hopper-medium-replay"], keep_methods=["ctd"]) == len(HOPPER_RACTD) + 4
    assert {r["method"] for r in store.episodes()} == {"ctd"}
    store.write_episodes(_episodes("maze2d-umaze", "ractd", [1.0, 2.0], ckpt="c9"))  # the re-run's cells
    assert sorted(r["normalized_score"] for r in store.episodes() if r["task"] == "maze2d-umaze") == [1.0, 2.0]


def test_blocks_skip_stored_seeds(tmp_path):
    job = rjobs.EvalJob("maze2d-umaze", "ctd", "student", 1, "/x.pt", "c0", "test")
    done = {("maze2d-umaze", "ctd", "c0", s) for s in (0, 1, 5)}
    out = rjobs.blocks([job], list(range(8)), done, block_size=2)
    assert [b for _, b in out] == [[2, 3], [4, 6], [7]]
    capped = rjobs.EvalJob("maze2d-umaze", "ctd", "student", 1, "/x.pt", "c0", "test", max_steps=50)
    assert capped.key_method == "ctd@50" and len(rjobs.blocks([capped], list(range(8)), done, 8)[0][1]) == 8


def test_figures_written_and_non_empty(store, tmp_path):
    store.write_rewards([{"task": "hopper-medium-replay", "method": m, "checkpoint": "c", "state_index": i,
                          "reward": float(v), "reward_checkpoint": "r", "scale": "test"}
                         for m, mu in (("teacher-heun-80", 0.0), ("ctd", 0.1), ("ractd", 0.5))
                         for i, v in enumerate(np.random.default_rng(0).normal(mu, 0.1, 50))])
    figs = figures.build_figures(store, tmp_path / "fig")
    names = sorted(p.name for p in figs)
    assert names == ["fig3_returns.png", "fig3_reward_hist.png", "fig4_sigma.png", "score_distribution.png"]
    for p in figs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # Fig. 4 points: sigma 0 (CTD), 0.5 and 1 (RACTD), sorted, with the cells' means
    pts = figures.sigma_points(store.episodes())["hopper-medium-replay"]
    assert [s for s, _ in pts] == [0.0, 0.5, 1.0]
    np.testing.assert_allclose([c["mean"] for _, c in pts], [np.mean(HOPPER_CTD), 73.0, np.mean(HOPPER_RACTD)])


def test_paper_numbers_match_the_papers_averages():
    """The transcription of Tables 1 and 11 reproduces the paper's printed averages (RACTD 97.6, ...) to the
    printed digit (Diffusion QL's nine scores average 89.38, printed 89.3)."""
    printed = {"RACTD": 97.6, "Diffuser": 77.5, "Diffusion QL": 89.3, "Consistency AC": 89.8, "BC": 51.9,
               "CQL": 77.6, "IQL": 77.0, "TT": 78.9}
    for method, avg in printed.items():
        vals = [v[0] for v in PAPER["table1"][method].values()]
        assert len(vals) == 9 and np.mean(vals) == pytest.approx(avg, abs=0.1), method  # printed truncated
    t11 = {"DDPM 100": 132.6, "DDIM 10": 130.2, "EDM 80": 131.5, "CTD 1": 123.4, "RACTD 1": 133.4}
    for method, avg in t11.items():
        assert np.mean([v[0] for v in PAPER["table11"][method].values()]) == pytest.approx(avg, abs=0.06), method


def test_study_commands_reproduce_the_planned_configs():
    """Each printed `python -m ractd ...` command parses (with ractd.cli) to exactly the config the study trains."""
    from ractd.cli import build_parser, train_config

    bad = []
    for name in ("quick", "default"):
        s = spec.get_study(name)
        for task in s.tasks:
            for m in rmodels.plan_models(s, task).values():
                if m.final_of:  # a student's final checkpoint: written by that student's command
                    continue
                argv = shlex.split(m.command(s.budget).split(" && ")[-1])[3:]
                try:
                    args = build_parser().parse_args(argv)
                except SystemExit:
                    bad.append(f"{name}/{task}/{m.name}: does not parse: {m.command(s.budget)}")
                    continue
                if train_config(args, args.stage) != m.cfg:
                    bad.append(f"{name}/{task}/{m.name}")
    assert not bad, bad


def test_a_missing_ddpm_or_bc_cell_of_a_swept_task_names_its_own_command_not_the_sweep():
    """The tables study sweeps maze2d-umaze, but its sweep trains the teacher and the students only: the DDPM
    cells (Table 11) and BC say how to train their models; the teacher's cell names the sweep."""
    s = spec.get_study("tables", tasks=["maze2d-umaze"])
    _, missing = rjobs.study_jobs(s)
    sweep = f"python tune/search.py --task maze2d-umaze {dict(s.sweep_flags)['maze2d-umaze']}"
    assert by_method_cmd(missing, "maze2d-umaze", "teacher-heun-80") == sweep
    for method in ("ddpm-100", "ddim-10", "ddim-1"):
        assert by_method_cmd(missing, "maze2d-umaze", method).startswith("python -m ractd train-ddpm --task maze2d-umaze")
    assert by_method_cmd(missing, "maze2d-umaze", "bc").startswith("python -m ractd train-bc --task maze2d-umaze")


def test_the_ddpm_baseline_trains_at_its_sweep_teachers_steps_and_batch(tmp_path):
    """Table 11 compares samplers of models trained alike: where the sweep's teacher has its own steps and batch
    (tune/search.py --teacher-steps / --teacher-batch), the study's DDPM model takes them, not the budget's."""
    import json

    from ractd.data.generate_maze import generate_maze
    from ractd.paths import sweep_dir
    from ractd.train import RunContext, TrainConfig, train

    generate_maze("maze2d-umaze", scale="tiny", seed=0, progress=False)
    tiny = dict(task="maze2d-umaze", scale="tiny", preset="tiny", ckpt_every=3, report_every=3)
    teacher = train(TrainConfig(stage="teacher", run_dir=str(tmp_path / "shared"), steps=3, batch=6, **tiny),
                    RunContext(progress=False))["best"]
    best = train(TrainConfig(stage="student", run_dir=str(tmp_path / "trial"), teacher_ckpt=str(teacher), steps=3,
                             batch=8, select_seeds=0, **tiny), RunContext(progress=False))["best"]
    d = sweep_dir("maze2d-umaze", "tiny")
    d.mkdir(parents=True)
    (d / "best_config.json").write_text(json.dumps({"alpha": 1.0, "beta": 1.0, "sigma": 0.0, "checkpoint": str(best),
                                                    "teacher": str(teacher), "reward": ""}))
    s = dataclasses.replace(spec.get_study("tables", tasks=["maze2d-umaze"]), data_scale="tiny")
    budget = TrainConfig.for_stage("ddpm", s.budget)
    assert (budget.steps, budget.batch) != (3, 6)
    ddpm = rmodels.plan_models(s, "maze2d-umaze")["ddpm"]
    assert ddpm.source == "study" and (ddpm.cfg.steps, ddpm.cfg.batch) == (3, 6)
    # without a sweep, the study trains its own teacher and DDPM at the budget's sizes, alike
    (d / "best_config.json").unlink()
    models = rmodels.plan_models(s, "maze2d-umaze")
    assert (models["ddpm"].cfg.steps, models["ddpm"].cfg.batch) == (budget.steps, budget.batch) == (
        models["teacher"].cfg.steps, models["teacher"].cfg.batch)


def test_study_plan_and_missing_cells_are_not_invented(tmp_path):
    s = spec.get_study("default")
    jobs, missing = rjobs.study_jobs(s)
    assert jobs == []  # nothing trained in this empty cache
    methods = {(m.task, m.method) for m in missing}
    assert ("hopper-medium-replay", "ractd-sigma-1.5") in methods and ("maze2d-umaze", "ddim-1") in methods
    assert not any(m.method.startswith("ra-teacher") for m in missing if m.task == "maze2d-umaze")
    ractd = next(m for m in missing if m.task == "hopper-medium-replay" and m.method == "ractd")
    assert "train-reward" in ractd.command and "train-teacher" in ractd.command and "--sigma 1.0" in ractd.command
    # maze2d RACTD with Table 9's sigma = 0 trains exactly CTD: one checkpoint serves both
    models = rmodels.plan_models(s, "maze2d-umaze")
    assert models["ractd"].checkpoint == models["ctd"].checkpoint
    # no numbers come out of an empty store
    assert all(r.get("mean") is None for r in rtables.table11(ResultsStore(tmp_path / "e").episodes()).rows)


def test_study_reuses_the_sweeps_student_and_teacher_and_trains_what_is_missing(tmp_path):
    """With a sweep's best_config.json in place, RACTD is the sweep's best student with its weights, the other
    students distill from the sweep's teacher, ensure_models trains only the missing CTD, and evaluate_serial
    stores every (cell, seed) once."""
    import dataclasses
    import json

    from ractd.checkpoint import load_checkpoint
    from ractd.data.generate_maze import generate_maze
    from ractd.paths import sweep_dir
    from ractd.train import RunContext, TrainConfig, train

    generate_maze("maze2d-umaze", scale="tiny", seed=0, progress=False)
    tiny = dict(scale="tiny", preset="tiny", steps=2, batch=8, ckpt_every=2, report_every=2)
    shared = tmp_path / "shared"
    teacher = train(TrainConfig(task="maze2d-umaze", stage="teacher", run_dir=str(shared), **tiny),
                    RunContext(progress=False))["best"]
    best = train(TrainConfig(task="maze2d-umaze", stage="student", run_dir=str(tmp_path / "trial"),
                             teacher_ckpt=str(teacher), **tiny),
                 RunContext(progress=False))["best"]
    d = sweep_dir("maze2d-umaze", "tiny")
    d.mkdir(parents=True)
    (d / "best_config.json").write_text(json.dumps({"alpha": 0.5, "beta": 2.0, "sigma": 0.0, "checkpoint": str(best),
                                                    "teacher": str(teacher), "reward": ""}))
    assert spec.get_study("quick").data_scale == "small"  # the first command's study; here on tiny data
    s = dataclasses.replace(spec.get_study("quick"), data_scale="tiny")
    assert rmodels.ractd_weights(s, "maze2d-umaze") == (0.5, 2.0, 0.0, "sweep")
    models = rmodels.plan_models(s, "maze2d-umaze")
    assert models["ractd"].source == "sweep" and models["ractd"].checkpoint == best
    assert models["teacher"].source == "sweep" and models["teacher"].checkpoint == teacher
    assert models["ctd"].cfg.teacher_ckpt == str(teacher) and not models["ctd"].exists
    jobs, missing = rjobs.study_jobs(s)
    # the sweep's student comes with its final checkpoint (<trial>/student/latest/checkpoint.pt)
    # (and the warm-start control, the teacher's one-step Euler, from the sweep's teacher)
    assert sorted(j.method for j in jobs) == ["ractd", "ractd-final", "teacher-euler-1", "teacher-heun-80"]
    assert {j.method: j.checkpoint_path for j in jobs}["teacher-euler-1"] == str(teacher)
    assert {j.method: j.checkpoint_path for j in jobs}["ractd-final"] == str(best.parent / "latest" / "checkpoint.pt")
    assert [m.method for m in missing] == ["ctd", "bc", "ctd-final"] and f"--teacher-ckpt {teacher}" in missing[0].command
    assert missing[1].command.startswith("python -m ractd train-bc --task maze2d-umaze --quick")
    assert missing[2].command == missing[0].command  # the final checkpoint comes with CTD's training

    trained = []

    def small_trainer(cfg):  # the planned run, shrunk to a tiny network and two steps
        trained.append(cfg.run_dir)
        train(dataclasses.replace(cfg, preset="tiny", steps=2, batch=8, ckpt_every=2), RunContext(progress=False))

    done = rmodels.ensure_models(s, small_trainer)
    assert [m.name for m in done] == ["bc", "ctd"] and trained == [models["bc"].cfg.run_dir, models["ctd"].cfg.run_dir]
    assert load_checkpoint(models["ctd"].checkpoint)["config"]["teacher_ckpt"] == str(teacher)
    assert rmodels.ensure_models(s, small_trainer) == []  # nothing left to train
    jobs, missing = rjobs.study_jobs(s, max_steps=20)
    assert missing == [] and len(jobs) == 7
    store = ResultsStore(tmp_path / "store")
    # two steps at a checkpoint every two: each student's best.pt is its final checkpoint, byte for byte (one
    # hash): those cells are rolled out once and stored twice
    assert {(a.method, b.method) for a, b in rjobs.twins(jobs).items()} == {("ractd-final", "ractd"),
                                                                          ("ctd-final", "ctd")}
    first = rjobs.evaluate_serial(jobs, [0, 1, 2], store, block_size=2, progress=False)
    assert (first["episodes_run"], first["episodes_copied"]) == (15, 6)
    assert rjobs.evaluate_serial(jobs, [0, 1, 2], store, block_size=2, progress=False)["episodes_run"] == 0
    rows = store.episodes()
    assert len(rows) == 21 and {r["method"] for r in rows} == {"ctd@20", "ractd@20", "teacher-heun-80@20", "bc@20",
                                                                "teacher-euler-1@20", "ctd-final@20",
                                                                "ractd-final@20"}
    assert {r["length"] for r in rows} == {20} and {r["scale"] for r in rows} == {"quick"}
    # The sweep's completed trial at alpha = beta = 1, sigma = 0 is CTD; a trial ASHA stopped early is not.
    import pyarrow as pa

    trial = tmp_path / "trial-ctd.pt"
    trial.write_bytes(models["ctd"].checkpoint.read_bytes())
    rows = [{"trial_id": "a", "alpha": 1.0, "beta": 1.0, "sigma": 0.0, "status": "stopped", "checkpoint": str(best)},
            {"trial_id": "b", "alpha": 1.0, "beta": 1.0, "sigma": 0.0, "status": "completed", "checkpoint": str(trial)}]
    pq.write_table(pa.Table.from_pylist(rows), d / "trials.parquet")
    ctd = rmodels.plan_models(s, "maze2d-umaze")["ctd"]
    assert ctd.source == "sweep" and ctd.checkpoint == trial
    pq.write_table(pa.Table.from_pylist(rows[:1]), d / "trials.parquet")
    assert rmodels.plan_models(s, "maze2d-umaze")["ctd"].source == "study"


def test_claims_study_takes_every_sigma_student_from_the_sweep_and_caps_only_costly_cells(tmp_path):
    """A sweep run with --sigmas holds CTD and the sigma study's students: the study evaluates those trials'
    checkpoints (completed ones only) and trains none of them; the Heun-80 teacher gets costly_seeds seeds on
    locomotion, one-step cells all of them; maze2d's inverse-dynamics cell needs its model and says how to make it."""
    import dataclasses
    import json
    from pathlib import Path

    import pyarrow as pa

    from ractd.data.generate_random import random_locomotion_dataset
    from ractd.paths import sweep_dir
    from ractd.train import RunContext, TrainConfig, train

    task = "hopper-medium-replay"
    random_locomotion_dataset(task, 600, 0, cut_prob=0.01)
    tiny = dict(task=task, scale="tiny", preset="tiny", steps=2, batch=8, ckpt_every=2, report_every=2)
    shared = tmp_path / "shared"
    reward = train(TrainConfig(stage="reward", run_dir=str(shared), **tiny), RunContext(progress=False))["best"]
    teacher = train(TrainConfig(stage="teacher", run_dir=str(shared), **tiny), RunContext(progress=False))["best"]
    d = sweep_dir(task, "tiny")
    d.mkdir(parents=True)
    trials = []
    for i, (sigma, status) in enumerate([(1.0, "completed"), (0.0, "completed"), (0.3, "completed"),
                                         (1.5, "stopped")]):
        cfg = TrainConfig(stage="student", run_dir=str(tmp_path / f"trial{i}"), teacher_ckpt=str(teacher),
                          reward_ckpt=str(reward), select_seeds=0, **tiny)
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, alpha=1.0, beta=1.0, sigma=sigma))
        ckpt = train(cfg, RunContext(progress=False))["best"]
        trials.append({"trial_id": str(i), "alpha": 1.0, "beta": 1.0, "sigma": sigma, "status": status,
                       "checkpoint": str(ckpt)})
    pq.write_table(pa.Table.from_pylist(trials), d / "trials.parquet")
    (d / "best_config.json").write_text(json.dumps({"alpha": 1.0, "beta": 1.0, "sigma": 1.0, "checkpoint":
                                                    trials[0]["checkpoint"], "teacher": str(teacher),
                                                    "reward": str(reward)}))
    s = dataclasses.replace(spec.get_study("claims", tasks=[task, "maze2d-umaze"]), data_scale="tiny")
    models = rmodels.plan_models(s, task)
    assert {n: str(models[n].checkpoint) for n in ("ractd", "ctd", "sigma-0.3")} == {
        "ractd": trials[0]["checkpoint"], "ctd": trials[1]["checkpoint"], "sigma-0.3": trials[2]["checkpoint"]}
    assert all(models[n].source == "sweep" for n in ("ractd", "ctd", "sigma-0.3", "teacher", "reward"))
    # ASHA stopped the sigma = 1.5 trial: the study would train that student from the sweep's teacher
    assert models["sigma-1.5"].source == "study" and models["sigma-1.5"].cfg.teacher_ckpt == str(teacher)
    jobs, missing = rjobs.study_jobs(s)
    caps = {j.method: j.seed_cap for j in jobs if j.task == task}
    # the plan's sigma 1 is the sweep's best (RACTD) trial: the same file is evaluated once, as RACTD
    assert rmodels.plan_models(s, task)["sigma-1"].checkpoint == Path(trials[0]["checkpoint"])
    assert caps == {"teacher-heun-80": 10, "teacher-euler-1": 0, "ctd": 0, "ractd": 0, "ractd-nfe2": 0, "ractd-nfe3": 0, "ractd-nfe4": 0,
                    "ractd-sigma-0.3": 0, "ctd-final": 0, "ractd-final": 0}
    # BC is not a sweep model: its missing cell says how to train it, not how to rerun the sweep
    assert by_method_cmd(missing, task, "bc").startswith(f"python -m ractd train-bc --task {task}")
    assert {j.sigma for j in jobs if j.method in ("ctd", "ractd-sigma-0.3")} == {0.0, 0.3}
    by_method = {(m.task, m.method): m.command for m in missing}
    assert by_method[(task, "ractd-sigma-1.5")].startswith(f"python tune/search.py --task {task} ")
    # blocks: the teacher's cell only ever gets its first 10 seeds, a one-step cell all 100
    todo = rjobs.blocks([j for j in jobs if j.method in ("teacher-heun-80", "ctd")], list(range(100)), set(), 7)
    seeds = {}
    for job, block in todo:
        seeds.setdefault(job.method, []).extend(block)
    assert seeds == {"teacher-heun-80": list(range(10)), "ctd": list(range(100))}
    assert "ractd-invdyn" not in spec.expand_methods(s, task)  # a planner-only method is maze2d's alone
    assert "ractd-invdyn" in spec.expand_methods(s, "maze2d-umaze")


def test_table2_reports_the_inverse_dynamics_tracker_beside_the_pd_rule(tmp_path):
    s = ResultsStore(tmp_path / "store")
    s.write_episodes(_episodes("maze2d-umaze", "ractd", MAZE_RACTD, ckpt="c3"))
    s.write_episodes(_episodes("maze2d-umaze", "ractd-invdyn", [100.0, 110.0, 90.0, 104.0], ckpt="c3"))
    t2 = rtables.table2(s.episodes())
    rows = {r["method"]: r for r in t2.rows}
    assert rows["ractd-invdyn"]["mean"] == pytest.approx(101.0) and rows["ractd"]["mean"] == pytest.approx(125.5)
    assert "RACTD (inverse dynamics, closed loop)" in t2.markdown and "RACTD (PD tracker)" in t2.markdown
    assert "open loop" not in t2.markdown  # no episodes of the open-loop tracker: no row
    # without inverse-dynamics episodes the row is left out rather than shown as missing
    s2 = ResultsStore(tmp_path / "store2")
    s2.write_episodes(_episodes("maze2d-umaze", "ractd", MAZE_RACTD, ckpt="c3"))
    assert "inverse dynamics" not in rtables.table2(s2.episodes()).markdown


def test_jobs_that_differ_only_in_their_tracker_never_share_a_policy(monkeypatch, tmp_path):
    """evaluate_serial (and the pool's actors, through the same rjobs.policy_key) cache one policy per key: the
    inverse-dynamics cell of a checkpoint must not reuse the PD planner of the same checkpoint."""
    jobs = [rjobs.EvalJob(task="maze2d-umaze", method=m, sampler="student", nfe=1, checkpoint_path="/x.pt",
                          checkpoint="h", scale="test", tracker=tr)
            for m, tr in (("ractd", "pd"), ("ractd-invdyn", "inverse_dynamics"))]
    used = []
    monkeypatch.setattr(rjobs, "load_policy", lambda job, *a, **k: f"planner-{job.tracker}")
    monkeypatch.setattr(rjobs, "run_block", lambda job, seeds, policy, **k: used.append((job.method, policy)) or [])
    rjobs.evaluate_serial(jobs, [0, 1], ResultsStore(tmp_path / "s"), block_size=2, progress=False)
    assert used == [("ractd", "planner-pd"), ("ractd-invdyn", "planner-inverse_dynamics")]


def test_a_cell_with_another_cells_policy_and_seeds_is_rolled_out_once_and_stored_as_its_own(tmp_path):
    """Two cells of one checkpoint, sampler and NFE (the study's RACTD when the sweep picked its CTD trial) are
    one rollout: evaluate_serial runs the first and stores the second's episodes as copies under the second's
    method, equal to what rolling the second out itself gives; a cell that differs in its NFE is rolled out."""
    from ractd.data.generate_maze import generate_maze
    from ractd.train import RunContext, TrainConfig, train

    generate_maze("maze2d-umaze", scale="tiny", seed=0, progress=False)
    tiny = dict(scale="tiny", preset="tiny", steps=2, batch=8, ckpt_every=2, report_every=2)
    teacher = train(TrainConfig(task="maze2d-umaze", stage="teacher", run_dir=str(tmp_path), **tiny),
                    RunContext(progress=False))["best"]
    student = train(TrainConfig(task="maze2d-umaze", stage="student", run_dir=str(tmp_path), teacher_ckpt=str(teacher),
                                **tiny), RunContext(progress=False))["best"]
    job = dict(task="maze2d-umaze", sampler="student", checkpoint_path=str(student),
               checkpoint=rjobs.checkpoint_hash(student), scale="tiny", max_steps=20)
    ctd = rjobs.EvalJob(method="ctd", nfe=1, sigma=0.0, **job)
    ractd = rjobs.EvalJob(method="ractd", nfe=1, sigma=0.5, train_steps=2, **job)
    two = rjobs.EvalJob(method="ractd-nfe2", nfe=2, **job)
    jobs = [ctd, ractd, two]
    assert rjobs.twins(jobs) == {ractd: ctd}
    store = ResultsStore(tmp_path / "store")
    summary = rjobs.evaluate_serial(jobs, [0, 1, 2], store, block_size=2, progress=False)
    assert summary["episodes_run"] == 6 and summary["episodes_copied"] == 3
    rows = {(r["method"], r["seed"]): r for r in store.episodes()}
    assert len(rows) == 9
    own = {r["seed"]: r for r in rjobs.run_block(ractd, [0, 1, 2])}  # the twin rolled out itself
    for seed in (0, 1, 2):
        r = rows[("ractd@20", seed)]
        assert (r["sigma"], r["train_steps"]) == (0.5, 2) and rows[("ctd@20", seed)]["sigma"] == 0.0
        np.testing.assert_allclose(r["return"], own[seed]["return"], rtol=1e-5)
        assert r["length"] == own[seed]["length"]
    again = rjobs.evaluate_serial(jobs, [0, 1, 2], store, block_size=2, progress=False)
    assert again["episodes_run"] == 0 and again["episodes_copied"] == 0
    # the copies are the twin's newest episodes even when its primary was stored long ago, before episodes of an
    # older checkpoint of the twin's method: the cell shows the copies (store._group keeps the newest checkpoint)
    from ractd_repro.store import _group

    older = ResultsStore(tmp_path / "older")
    ctd_rows = [r for r in store.episodes() if r["method"] == "ctd@20"]
    older.write_episodes([{**r, "created": "2000-01-01T00:00:00+00:00"} for r in ctd_rows])
    older.write_episodes([{**r, "method": "ractd@20", "checkpoint": "old", "created": "2001-01-01T00:00:00+00:00"}
                          for r in ctd_rows])
    assert rjobs.copy_twins(jobs[:2], [0, 1, 2], older) == 3
    cell = _group(older.episodes())[("maze2d-umaze", "ractd@20")]
    assert {r["checkpoint"] for r in cell} == {ctd.checkpoint} and len(cell) == 3


def test_a_study_model_whose_run_was_cut_short_is_missing_not_evaluated(tmp_path):
    """A run killed mid-way (a session's end) leaves best.pt behind: the study must resume it, not evaluate it as
    the finished model; a sweep's checkpoint counts as the sweep left it."""
    import json

    stage = tmp_path / "ddpm" / "ddpm"
    stage.mkdir(parents=True)
    (stage / "best.pt").write_bytes(b"x")
    (stage / "latest").mkdir()
    (stage / "latest" / "checkpoint.pt").write_bytes(b"x")
    plan = rmodels.ModelPlan("maze2d-umaze", "ddpm", "ddpm", stage / "best.pt", cfg=object())
    final = rmodels.ModelPlan("maze2d-umaze", "ctd-final", "student", stage / "latest" / "checkpoint.pt", None,
                              final_of="ctd")
    swept = dataclasses.replace(plan, source="sweep")
    assert plan.exists and final.exists  # no records beside it: a checkpoint put there by other means
    (stage / "config.json").write_text(json.dumps({"steps": 3000}))
    (stage / "metrics.jsonl").write_text("".join(json.dumps({"step": k}) + "\n" for k in (500, 1000)))
    assert not plan.exists and not final.exists and swept.exists
    (stage / "metrics.jsonl").write_text((stage / "metrics.jsonl").read_text() + '{"step": 15')  # cut mid-line
    assert not plan.exists
    (stage / "metrics.jsonl").write_text("".join(json.dumps({"step": k}) + "\n" for k in (500, 3000)))
    assert plan.exists and final.exists
    (stage / "best.pt").unlink()
    assert not plan.exists


def by_method_cmd(missing, task, method):
    return next(m.command for m in missing if m.task == task and m.method == method)
