"""Episodes, return-to-go, windows and the normalizer, against hand-computed values at episode edges."""

import numpy as np
import pytest
import torch

from ractd import RactdError
from ractd.data.windows import (
    Normalizer,
    episode_bounds,
    locomotion_windows,
    maze_segments,
    maze_windows,
    return_to_go,
    rtg_settings,
)
from ractd.tasks import get_task

# Three episodes: [0, 3) ends by a terminal, [3, 5) by a timeout, [5, 7) by the end of the data.
REWARDS = np.array([1, 2, 3, 4, 5, 6, 7], np.float32)
TERMINALS = np.array([0, 0, 1, 0, 0, 0, 0], bool)
TIMEOUTS = np.array([0, 0, 0, 0, 1, 0, 0], bool)


def test_episode_bounds():
    assert episode_bounds(TERMINALS, TIMEOUTS) == [(0, 3), (3, 5), (5, 7)]
    assert episode_bounds(np.zeros(4, bool), np.array([0, 0, 0, 1], bool)) == [(0, 4)]
    assert episode_bounds(np.ones(2, bool), np.zeros(2, bool)) == [(0, 1), (1, 2)]


def test_return_to_go_hand_computed():
    q = return_to_go(REWARDS, TERMINALS, TIMEOUTS, gamma=0.5, termination_penalty=-100.0)
    # ep 0 (terminal): r = [1, 2, 3 - 100]; ep 1 (timeout, no penalty): [4, 5]; ep 2 (unflagged): [6, 7].
    np.testing.assert_allclose(q, [-22.25, -46.5, -97.0, 6.5, 5.0, 9.5, 7.0])
    assert q.dtype == np.float32
    q0 = return_to_go(REWARDS, TERMINALS, TIMEOUTS, gamma=0.5)
    np.testing.assert_allclose(q0, [2.75, 3.5, 3.0, 6.5, 5.0, 9.5, 7.0])
    np.testing.assert_allclose(return_to_go(np.ones(1000), np.zeros(1000), np.zeros(1000), 0.99)[0],
                               (1 - 0.99 ** 1000) / (1 - 0.99), rtol=1e-6)


def test_rtg_settings_paper_vs_released_code():
    assert rtg_settings(get_task("hopper-medium")) == (0.997, -100.0)
    assert rtg_settings(get_task("halfcheetah-medium"), paper=True) == (0.9, -100.0)
    assert rtg_settings(get_task("hopper-medium"), paper=False) == (0.99, 0.0)


def test_locomotion_windows_pad_at_episode_edges():
    data = {"observations": np.arange(7, dtype=np.float32)[:, None] * 10,
            "actions": np.arange(7, dtype=np.float32)[:, None] + 100,
            "rewards": REWARDS, "terminals": TERMINALS, "timeouts": TIMEOUTS}
    w = locomotion_windows(data, horizon=3, obs_history=2, gamma=0.5, termination_penalty=-100.0)
    np.testing.assert_array_equal(w["obs_idx"], [[0, 0], [0, 1], [1, 2], [3, 3], [3, 4], [5, 5], [5, 6]])
    np.testing.assert_array_equal(w["action_idx"],
                                  [[0, 1, 2], [1, 2, 2], [2, 2, 2], [3, 4, 4], [4, 4, 4], [5, 6, 6], [6, 6, 6]])
    np.testing.assert_array_equal(w["action_mask"][:3], [[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    assert w["obs"].shape == (7, 2, 1) and w["actions"].shape == (7, 3, 1)
    np.testing.assert_allclose(w["obs"][3, :, 0], [30, 30])  # first state repeated, not the previous episode's
    np.testing.assert_allclose(w["actions"][3, :, 0], [103, 104, 104])  # last action repeated
    np.testing.assert_allclose(w["rtg"], [-22.25, -46.5, -97.0, 6.5, 5.0, 9.5, 7.0])
    np.testing.assert_allclose(w["first_obs"][:, 0], np.arange(7) * 10)
    lazy = locomotion_windows(data, horizon=3, obs_history=2, materialize=False)
    assert "actions" not in lazy
    np.testing.assert_array_equal(data["actions"][lazy["action_idx"]], w["actions"])


def test_maze_windows_follow_diffuser_segments():
    # x coordinate of the path; the evaluation goal is at (0, 0). At goal at t = 4, 5; leaves at t = 6.
    x = np.array([5, 4, 3, 1, 0.2, 0.1, 1, 2, 3, 4, 5, 6], np.float32)
    obs = np.stack([x, np.zeros(12), np.arange(12), -np.arange(12)], 1).astype(np.float32)
    data = {"observations": obs, "terminals": np.zeros(12, bool), "timeouts": np.zeros(12, bool),
            "metadata/eval_goal": [0.0, 0.0]}
    assert maze_segments(data) == [(0, 6), (6, 12)]
    w = maze_windows(data, horizon=3)
    np.testing.assert_array_equal(w["starts"], [0, 1, 2, 3, 6, 7, 8, 9])
    assert w["states"].shape == (8, 3, 4) and w["n_segments"] == 2
    np.testing.assert_allclose(np.asarray(w["states"])[4, :, 2], [6, 7, 8])
    np.testing.assert_allclose(w["states"][np.array([3])][0, :, 2], [3, 4, 5])  # never crosses t = 5 | 6
    np.testing.assert_allclose(w["start"][:, 2], [0, 1, 2, 3, 6, 7, 8, 9])
    np.testing.assert_allclose(w["goal"][:, 2], [2, 3, 4, 5, 8, 9, 10, 11])
    # Without a goal, timeouts split; a segment shorter than H gives no window.
    data2 = {**data, "timeouts": np.eye(12, dtype=bool)[1]}
    del data2["metadata/eval_goal"]
    np.testing.assert_array_equal(maze_windows(data2, horizon=3)["starts"], np.arange(2, 10))
    with pytest.raises(RactdError, match="no maze window"):
        maze_windows(data, horizon=7)


def test_normalizer_range_constant_dims_numpy_torch(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(100, 5, 3)) * [1, 10, 0] + [0, 5, 2]).astype(np.float32)  # dim 2 constant (= 2)
    norm = Normalizer.fit(x)
    y = norm.normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.reshape(-1, 3).min(0), [-1, -1, 0], atol=1e-6)
    np.testing.assert_allclose(y.reshape(-1, 3).max(0), [1, 1, 0], atol=1e-6)
    np.testing.assert_allclose(norm.unnormalize(y), x, atol=1e-5)
    t = torch.from_numpy(x)
    yt = norm.normalize(t)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32
    np.testing.assert_allclose(yt.numpy(), y, atol=1e-6)
    np.testing.assert_allclose(norm.unnormalize(yt).numpy(), x, atol=1e-5)
    torch.save({"normalizer": norm.state_dict()}, tmp_path / "ckpt.pt")
    loaded = Normalizer.from_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["normalizer"])
    np.testing.assert_allclose(loaded.normalize(x), y)
    with pytest.raises(RactdError, match="last dim"):
        norm.normalize(np.zeros((2, 4)))
