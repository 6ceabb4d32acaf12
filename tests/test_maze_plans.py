"""ractd_repro.studies.maze_plans: the measures of a maze plan, against hand-computed values and the dataset."""

import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from ractd.tasks import get_task
from ractd_repro.studies import maze_plans

GRID = np.array([[1, 1, 1, 1],
                 [1, 0, 0, 1],
                 [1, 0, 1, 1],
                 [1, 1, 1, 1]], np.int8)


def test_plan_metrics_are_the_hand_computed_ones():
    # D4RL positions: (0.85, 1.0) lies in cell (round(1.05), round(1.2)) = (1, 1), free; (1.85, 1.85) in (2, 2), a
    # wall; (1.85, 0.85) in (2, 1), free; (-0.9, 0.0) outside the grid (counts as a wall)
    xy = np.array([[0.85, 1.0], [1.85, 1.85], [1.85, 0.85], [-0.9, 0.0]])
    m = maze_plans.plan_metrics(xy, GRID, goal=np.array([1.85, 0.85]))
    assert m["wall_share"] == pytest.approx(2 / 4)
    steps = [math.hypot(1.0, 0.85), 1.0, math.hypot(2.75, 0.85)]
    assert m["step_mean"] == pytest.approx(np.mean(steps)) and m["step_max"] == pytest.approx(max(steps))
    assert m["end_to_goal"] == pytest.approx(math.hypot(2.75, 0.85)) and m["min_to_goal"] == 0.0
    # the cell offset matters: (1.35, 1.75) lies in the wall cell (2, 2); rounded without it, in the free (1, 2)
    assert maze_plans.plan_metrics(np.array([[1.35, 1.75]]), GRID, None)["wall_share"] == 1.0
    no_goal = maze_plans.plan_metrics(xy[:2], GRID, None)
    assert math.isnan(no_goal["end_to_goal"]) and math.isnan(no_goal["min_to_goal"])


def test_the_datasets_own_windows_never_lie_in_a_wall():
    """The geometry against the environment itself: every state of a generated maze2d dataset is where the point
    could be, so no window of it has a state in a wall cell."""
    from ractd.data.generate_maze import generate_maze

    generate_maze("maze2d-umaze", scale="tiny", seed=0, progress=False)
    rows = maze_plans.window_rows(get_task("maze2d-umaze"), "tiny", 40)
    assert len(rows) == 40 and {r["source"] for r in rows} == {"data"}
    assert max(r["wall_share"] for r in rows) == 0.0
    assert 0 < np.mean([r["step_mean"] for r in rows]) < 0.2  # the point moves a few hundredths a step


def test_a_teachers_plans_are_stored_once_per_model_and_reported(tmp_path, capsys):
    from ractd.data.generate_maze import generate_maze
    from ractd.train import RunContext, TrainConfig, train

    generate_maze("maze2d-umaze", scale="tiny", seed=0, progress=False)
    teacher = train(TrainConfig(task="maze2d-umaze", stage="teacher", run_dir=str(tmp_path / "run"), scale="tiny",
                                preset="tiny", steps=2, batch=8, ckpt_every=2, report_every=2),
                    RunContext(progress=False))["best"]
    argv = ["--task", "maze2d-umaze", "--scale", "tiny", "--checkpoint", str(teacher), "--seeds", "3", "--nfe", "4",
            "--windows", "5", "--out", str(tmp_path / "store")]
    assert maze_plans.main(argv) == 0
    assert maze_plans.main(argv) == 0  # measured again: replaced, not added
    rows = pq.read_table(tmp_path / "store" / "plans.parquet").to_pylist()
    assert sorted((r["model"], r["source"]) for r in rows) == [("dataset windows", "data")] * 5 + [
        ("teacher 2 x 8", "heun-4")] * 3
    plans = [r for r in rows if r["source"] == "heun-4"]
    assert [r["index"] for r in plans] == [0, 1, 2] and all(0 <= r["wall_share"] <= 1 for r in plans)
    assert all(r["end_to_goal"] >= r["min_to_goal"] >= 0 for r in plans)
    from ractd_repro.store import checkpoint_hash

    assert {r["checkpoint"] for r in plans} == {checkpoint_hash(teacher)}  # the results store's identity of it
    capsys.readouterr()
    assert maze_plans.main(["--report", "--out", str(tmp_path / "store")]) == 0
    assert re.search(r"\| teacher 2 x 8 +\| heun-4 +\| 3 ", capsys.readouterr().out)
    assert maze_plans.main(["--task", "maze2d-umaze", "--windows", "0", "--out", str(tmp_path / "x")]) == 2
