"""maze2d generation (D4RL recipe in PointMaze v3) and the D4RL <-> PointMaze coordinate pair."""

import gymnasium as gym
import gymnasium_robotics
import numpy as np
import pytest

from ractd.data.d4rl import load_d4rl_hdf5
from ractd.data.generate_maze import generate_maze, generate_maze_arrays
from ractd.maze import d4rl_to_pointmaze, maze_map, pointmaze_to_d4rl
from ractd.tasks import get_task

gym.register_envs(gymnasium_robotics)


@pytest.mark.parametrize("name", ["maze2d-umaze", "maze2d-large"])
def test_controller_reaches_goals_without_noise(name):
    task = get_task(name)
    data, meta = generate_maze_arrays(task, 4000, seed=1, noise=False, progress=False)
    goals, pos = data["infos/goal"], data["observations"][:, :2]
    change = np.flatnonzero(np.any(goals[1:] != goals[:-1], axis=1))  # last step of each finished goal
    assert len(change) >= 10
    lengths = np.diff(np.concatenate([[-1], change]))
    reached = np.linalg.norm(pos[change] - goals[change], axis=1) <= 0.1
    assert reached.mean() >= 0.95, reached.mean()
    assert lengths.max() <= task.max_episode_steps
    np.testing.assert_array_equal(np.flatnonzero(data["timeouts"]), change)
    # Never inside a wall: D4RL cell of a position is (round(x + 0.2), round(y + 0.2)).
    cells = np.floor(pos + 0.2 + 0.5).astype(int)
    np.testing.assert_array_equal(maze_map(task)[cells[:, 0], cells[:, 1]], 0)
    # Sparse reward: 1 exactly when the next position is within 0.5 of the goal.
    near = np.linalg.norm(pos[1:] - goals[:-1], axis=1) <= 0.5
    np.testing.assert_array_equal(data["rewards"][:-1] == 1, near)


def test_file_is_valid_d4rl_and_deterministic(tmp_path):
    a = generate_maze("maze2d-umaze", seed=3, out=tmp_path / "a.hdf5", n_steps=2000, progress=False)
    b = generate_maze("maze2d-umaze", seed=3, out=tmp_path / "b.hdf5", n_steps=2000, progress=False)
    c = generate_maze("maze2d-umaze", seed=4, out=tmp_path / "c.hdf5", n_steps=2000, progress=False)
    da, db, dc = (load_d4rl_hdf5(p, kind="maze") for p in (a, b, c))
    for key in ("observations", "actions", "rewards", "terminals", "timeouts", "infos/goal", "infos/qpos",
                "infos/qvel"):
        np.testing.assert_array_equal(da[key], db[key])
        assert len(da[key]) == 2000
    assert not np.allclose(da["observations"], dc["observations"])
    assert da["observations"].dtype == np.float32 and not da["terminals"].any()
    np.testing.assert_array_equal(da["infos/qpos"], da["observations"][:, :2])
    assert da["metadata/seed"] == 3 and da["metadata/eval_goal"] == [1.0, 1.0]
    assert np.abs(da["actions"]).max() <= 1.0 and np.abs(da["actions"]).max() > 0.99  # noise, clipped


@pytest.mark.parametrize("name", ["maze2d-umaze", "maze2d-medium", "maze2d-large"])
def test_coordinate_pair_matches_pointmaze_geometry(name):
    task = get_task(name)
    env = gym.make(task.env_id)
    maze = env.unwrapped.maze
    grid = maze_map(task)
    shape = grid.shape
    free = np.argwhere(grid == 0)
    # D4RL's cell (i, j) is centred at qpos (i - 0.2, j - 0.2) (body at 1.2, walls at i + 1).
    centres = pointmaze_to_d4rl(np.array([maze.cell_rowcol_to_xy(c) for c in free]), shape)
    np.testing.assert_allclose(centres, free - 0.2, atol=1e-12)
    rng = np.random.default_rng(0)
    p = rng.normal(size=(50, 2)) * 3
    np.testing.assert_allclose(pointmaze_to_d4rl(d4rl_to_pointmaze(p, shape), shape), p, atol=1e-12)
    np.testing.assert_allclose(pointmaze_to_d4rl(d4rl_to_pointmaze(p, shape, vector=True), shape, vector=True), p)
    # Vectors rotate with the frame: a D4RL displacement maps to the PointMaze displacement of its endpoints.
    np.testing.assert_allclose(d4rl_to_pointmaze(p, shape, vector=True),
                               d4rl_to_pointmaze(p + 1.0, shape) - d4rl_to_pointmaze(np.ones(2), shape), atol=1e-12)
    env.close()


def test_generated_steps_replay_through_the_gym_env():
    """The direct MuJoCo stepping equals PointMazeEnv.step on the converted actions."""
    task = get_task("maze2d-medium")
    data, _ = generate_maze_arrays(task, 60, seed=5, progress=False)
    shape = maze_map(task).shape
    env = gym.make(task.env_id, continuing_task=True)
    env.reset(seed=0)
    point = env.unwrapped.point_env
    obs = data["observations"].astype(np.float64)
    point.set_state(d4rl_to_pointmaze(obs[0, :2], shape), d4rl_to_pointmaze(obs[0, 2:], shape, vector=True))
    for t in range(59):
        o, *_ = env.unwrapped.step(d4rl_to_pointmaze(data["actions"][t].astype(np.float64), shape, vector=True))
        got = np.concatenate([pointmaze_to_d4rl(o["observation"][:2], shape),
                              pointmaze_to_d4rl(o["observation"][2:], shape, vector=True)])
        np.testing.assert_allclose(got, obs[t + 1], atol=1e-5)
    env.close()
