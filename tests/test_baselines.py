"""Baseline rows: the data's own level on hand-made datasets (complete episodes only), the generator's record of
its behavior policy, and the tables' BC / data / final-checkpoint rows ("not measured" when absent)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ractd.data.level import behavior_evals, data_level
from ractd.tasks import get_task
from ractd_repro import baselines, tables
from ractd_repro.store import ResultsStore


def _loco_data():
    """hopper: a terminated 3-step episode (return 6), a full 1000-step episode ended by the TimeLimit (return
    500), a 5-step episode cut by a timeout (return 50: must not count), and 2 unfinished steps (must not count)."""
    rew = np.concatenate([[1.0, 2.0, 3.0], np.full(1000, 0.5), np.full(5, 10.0), [7.0, 7.0]])
    n = len(rew)
    term, tout = np.zeros(n, bool), np.zeros(n, bool)
    term[2] = True
    tout[1002] = True
    tout[1007] = True
    return {"observations": np.zeros((n, 11), np.float32), "actions": np.zeros((n, 3), np.float32),
            "rewards": rew.astype(np.float32), "terminals": term, "timeouts": tout}


def test_data_level_is_the_hand_computed_mean_of_complete_episodes(tmp_path):
    task = get_task("hopper-medium-replay")
    lvl = data_level(task, _loco_data())
    np.testing.assert_allclose(lvl["returns"], [6.0, 500.0])
    assert lvl["n_episodes"] == 4 and lvl["n_excluded"] == 2 and list(lvl["index"]) == [0, 1]
    scores = 100 * (np.array([6.0, 500.0]) - task.ref_min_score) / (task.ref_max_score - task.ref_min_score)
    store = ResultsStore(tmp_path / "s")
    store.write_episodes(baselines.data_rows(task.name, _loco_data(), "test"))
    (row,) = [r for r in tables.table1(store.episodes()).rows if r["task"] == task.name]
    np.testing.assert_allclose(row["data_mean"], scores.mean(), rtol=1e-6)
    np.testing.assert_allclose(row["data_se"], scores.std(ddof=1) / math.sqrt(2), rtol=1e-6)
    assert row["data_n"] == 2
    assert (row["d4rl_bc"], row["d4rl_bc10"]) == (29.8, 70.4)  # CORL on D4RL's hopper-medium-replay (REFERENCE.md)


def test_maze_data_level_scores_windows_against_the_evaluation_goal():
    task = get_task("maze2d-umaze")
    goal = np.asarray(task.goal_cell, float)
    length = task.max_episode_steps
    obs = np.zeros((2 * length + 11, 4), np.float32)          # two full windows and a partial one
    obs[:, :2] = goal + 3.0                                     # far from the goal ...
    obs[1:6, :2] = goal + 0.3                                   # ... except 5 next-positions in window 0
    obs[length + 1:length + 21, :2] = goal                     # and 20 in window 1
    obs[2 * length + 1:, :2] = goal                            # the partial window: left out
    n = len(obs)
    lvl = data_level(task, {"observations": obs, "rewards": np.zeros(n), "terminals": np.zeros(n, bool),
                            "timeouts": np.zeros(n, bool)})
    np.testing.assert_allclose(lvl["returns"], [5.0, 20.0])
    assert lvl["n_excluded"] == 1


def test_behavior_evals_come_from_the_generators_metadata():
    task = get_task("hopper-medium-expert")
    meta = {"metadata/medium_policy_eval_return": 1100.0, "metadata/medium_policy_step": 65000,
            "metadata/expert_policy_eval_return": 3000.0, "metadata/expert_policy_step": 150000,
            "metadata/random_policy_eval_return": 10.0, "metadata/recipe_json": json.dumps({"eval_episodes": 5})}
    ev = behavior_evals(task, meta)
    assert [(e["policy"], e["step"], e["episodes"]) for e in ev] == [("medium", 65000, 5), ("expert", 150000, 5)]
    np.testing.assert_allclose(ev[0]["normalized"], task.normalized_score(1100.0))
    assert behavior_evals(get_task("maze2d-umaze"), {}) == []
    rows = baselines.data_rows(task.name, {**_loco_data(), **meta}, "test")
    beh = [r for r in rows if r["method"] == "behavior"]
    text, _ = tables._behavior_cell(beh)
    assert "medium policy at step 65000: mean of 5 episodes" in text


def _eps(task, method, scores, ckpt="c", nfe=1):
    return [{"task": task, "method": method, "sampler": "x", "nfe": nfe, "checkpoint": ckpt, "checkpoint_path": "p",
             "seed": i, "return": s, "normalized_score": s, "length": 10, "time_per_action": 0.01, "wall_s": 1.0,
             "terminated": False, "truncated": True, "batch_size": 2, "max_steps": 10, "init_scaled": True,
             "sigma": 0.0, "scale": "t", "preset": "", "train_steps": 1, "device": "cpu", "versions": "{}",
             "created": "2026"} for i, s in enumerate(scores)]


def test_every_table_shows_bc_data_and_final_rows_or_says_not_measured(tmp_path):
    s = ResultsStore(tmp_path / "s")
    for task in ("hopper-medium-replay", "maze2d-umaze"):
        s.write_episodes(_eps(task, "ractd", [1.0, 2.0]))
        s.write_episodes(_eps(task, "ractd-nfe2", [1.0, 2.0], ckpt="c2", nfe=2))
        s.write_episodes(_eps(task, "ra-teacher-ctd", [1.0, 2.0], ckpt="c3"))
        s.write_episodes(_eps(task, "bc", [4.0, 6.0], ckpt="b"))
    rows = s.episodes()
    for name, fn in tables.TABLES.items():
        t = fn(rows)
        if name == "table1":
            (r,) = t.rows
            assert r["bc_mean"] == pytest.approx(5.0) and "data_mean" not in r
            assert "BC (CORL recipe) (measured)" in t.markdown and "RACTD, final checkpoint (measured)" in t.markdown
            assert "not measured" in t.markdown and "paper BC" in t.markdown
            continue
        methods = {r["method"] for r in t.rows}
        assert {"bc", "data"} <= methods, name
        bc = [r for r in t.rows if r["method"] == "bc"]
        assert all(r["mean"] == pytest.approx(5.0) for r in bc), name
        assert "not measured" in t.markdown, name  # the data rows
    t2 = tables.table2(rows)
    assert {"ractd-final", "ctd-final"} <= {r["method"] for r in t2.rows}
    assert "RACTD (PD tracker), selected checkpoint" in t2.markdown


def test_model_selection_defaults_rank_full_episodes_on_ten_seeds(monkeypatch):
    """TrainConfig is the one source of the selection defaults (the sweep takes them), and 0 steps means the
    task's full episode: the selection rollout gets no cap."""
    from ractd.data.windows import Normalizer
    from ractd.train import Prepared, TrainConfig, _quick_eval, build_student

    assert TrainConfig.select_seeds >= 10 and TrainConfig.select_max_steps == 0
    assert TrainConfig.for_stage("student", "cpu").select_seeds >= 10
    search = pytest.importorskip("ractd_ray.search")
    stu = search.SearchConfig(task="maze2d-umaze").stage_config("student")
    assert (stu.select_seeds, stu.select_max_steps) == (TrainConfig.select_seeds, 0)
    seen = {}

    def fake_rollout(task, planner, seeds, max_steps=None, progress=True):
        seen.update(seeds=list(seeds), max_steps=max_steps)
        return [{"normalized_score": float(s)} for s in seeds]

    monkeypatch.setattr("ractd.rollout.rollout_maze", fake_rollout)
    cfg = TrainConfig(task="maze2d-umaze", stage="student", preset="tiny").resolved()
    prep = Prepared(get_task("maze2d-umaze"), np.zeros((1, 128, 4), np.float32), np.zeros((1, 8), np.float32),
                    {"obs": Normalizer(np.zeros(4), np.ones(4))})
    score = _quick_eval(cfg, build_student(cfg, prep), prep)
    assert seen["max_steps"] is None and seen["seeds"] == list(range(10_000, 10_010))
    assert score == pytest.approx(np.mean(range(10_000, 10_010)))


def test_a_store_refuses_the_data_level_of_another_dataset(tmp_path, monkeypatch):
    """A task's cells share one dataset: baseline_rows writes the data level once, and refuses a dataset whose
    fingerprint differs from the one the store's data rows came from (a regenerated or resized dataset)."""
    import dataclasses

    from ractd import RactdError
    from ractd.data import d4rl
    from ractd_repro.spec import TaskPlan, get_study

    data = {"value": _loco_data()}
    monkeypatch.setattr(d4rl, "load_dataset", lambda task, scale: data["value"])
    study = dataclasses.replace(get_study("quick"), plans=(TaskPlan("hopper-medium-replay", ("ctd",)),))
    store = ResultsStore(tmp_path / "s")
    assert baselines.baseline_rows(study, store) == 2
    assert baselines.baseline_rows(study, store) == 0  # the same dataset: nothing new, no error
    other = _loco_data()
    other["rewards"] = other["rewards"] * 2.0
    data["value"] = other
    with pytest.raises(RactdError, match="hopper-medium-replay: the store at .* holds the data level of another"):
        baselines.baseline_rows(study, store)


def test_jobs_of_one_task_from_two_datasets_are_refused():
    from ractd import RactdError
    from ractd_repro.jobs import EvalJob, one_dataset

    jobs = [EvalJob("maze2d-umaze", m, "student", 1, f"/{m}.pt", m, "test") for m in ("ctd", "ractd")]
    same = {Path("/ctd.pt"): ("h1", {}, "fpA"), Path("/ractd.pt"): ("h2", {}, "fpA")}
    one_dataset("maze2d-umaze", jobs, same)
    mixed = {**same, Path("/ractd.pt"): ("h2", {}, "fpB")}
    with pytest.raises(RactdError, match=r"maze2d-umaze: the study's checkpoints were trained on different datasets "
                                         r"\(fpA: /ctd.pt; fpB: /ractd.pt\)"):
        one_dataset("maze2d-umaze", jobs, mixed)
    one_dataset("hopper-medium", jobs, mixed)  # another task's jobs are not this task's business


def test_ten_percent_bc_is_planned_on_locomotion_only_with_its_own_command():
    from ractd_repro import models
    from ractd_repro.spec import expand_methods, get_study

    s = get_study("tables")
    assert "bc-10" in expand_methods(s, "hopper-medium-replay")
    assert "bc-10" not in expand_methods(s, "maze2d-umaze")
    plan = models.plan_models(s, "hopper-medium-replay")
    bc10, bc = plan["bc-10"], plan["bc"]
    assert bc10.stage == bc.stage == "bc" and bc10.checkpoint != bc.checkpoint
    assert (bc10.cfg.bc_top_fraction, bc.cfg.bc_top_fraction) == (0.1, 1.0)
    assert "--bc-top-fraction 0.1" in bc10.command("cpu") and "--bc-top-fraction" not in bc.command("cpu")
