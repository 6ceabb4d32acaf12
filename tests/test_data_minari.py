"""Minari source: datasets made with Minari's own API load correctly; ours → Minari → ours is lossless."""

import gymnasium as gym
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from ractd import RactdError
from ractd.data.generate_maze import generate_maze_arrays
from ractd.data.minari_io import export_minari, load_minari
from ractd.maze import d4rl_to_pointmaze, maze_map
from ractd.tasks import get_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:minari")


def _box(dim, low=-np.inf, high=np.inf):
    return gym.spaces.Box(low, high, shape=(dim,), dtype=np.float32)


def test_reads_dataset_made_with_minari_api():
    rng = np.random.default_rng(0)
    lengths, buffers, expected = [5, 3, 4], [], []
    for k, t in enumerate(lengths):
        obs = rng.normal(size=(t + 1, 11)).astype(np.float32)
        act = rng.uniform(-1, 1, size=(t, 3)).astype(np.float32)
        rew = rng.normal(size=t)
        term, trunc = np.zeros(t, bool), np.zeros(t, bool)
        (term if k == 0 else trunc)[-1] = True
        qpos = rng.normal(size=(t + 1, 6))  # Minari infos include the reset info: T + 1 rows
        buffers.append(EpisodeBuffer(id=k, observations=obs, actions=act, rewards=rew, terminations=term,
                                     truncations=trunc, infos={"qpos": qpos}))
        expected.append((obs, act, rew, term, trunc, qpos))
    minari.create_dataset_from_buffers("test/hopper/tiny-v0", buffers, observation_space=_box(11),
                                       action_space=_box(3, -1, 1), algorithm_name="test")
    data = load_minari("test/hopper/tiny-v0", download=False)
    cat = lambda i, f=lambda a: a: np.concatenate([f(e[i]) for e in expected])
    np.testing.assert_array_equal(data["observations"], cat(0, lambda o: o[:-1]))
    np.testing.assert_array_equal(data["next_observations"], cat(0, lambda o: o[1:]))
    np.testing.assert_array_equal(data["actions"], cat(1))
    np.testing.assert_allclose(data["rewards"], cat(2))
    np.testing.assert_array_equal(data["terminals"], cat(3))
    np.testing.assert_array_equal(data["timeouts"], cat(4))
    np.testing.assert_allclose(data["infos/qpos"], cat(5, lambda q: q[:-1]))
    np.testing.assert_array_equal(np.flatnonzero(data["terminals"] | data["timeouts"]), [4, 7, 11])
    assert data["metadata/minari_id"] == "test/hopper/tiny-v0"


def test_pointmaze_dict_observations_convert_to_d4rl_frame():
    task = get_task("maze2d-umaze")
    shape = maze_map(task).shape
    d4rl_obs = np.array([[1.0, 1.0, 0.5, -0.25], [1.2, 1.1, 0.3, 0.0], [1.3, 1.5, 0.0, 0.1]])
    goal = np.array([3.0, 1.0])
    pm = np.concatenate([d4rl_to_pointmaze(d4rl_obs[:, :2], shape),
                         d4rl_to_pointmaze(d4rl_obs[:, 2:], shape, vector=True)], axis=1)
    pm_goal = np.repeat(d4rl_to_pointmaze(goal, shape)[None], 3, axis=0)
    buf = EpisodeBuffer(id=0, observations={"observation": pm, "achieved_goal": pm[:, :2], "desired_goal": pm_goal},
                        actions=np.zeros((2, 2)), rewards=np.zeros(2), terminations=np.zeros(2, bool),
                        truncations=np.array([False, True]), infos={"success": np.zeros(3, bool)})
    space = gym.spaces.Dict({"observation": gym.spaces.Box(-np.inf, np.inf, (4,), np.float64),
                             "achieved_goal": gym.spaces.Box(-np.inf, np.inf, (2,), np.float64),
                             "desired_goal": gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)})
    minari.create_dataset_from_buffers("test/pointmaze/umaze-v0", [buf], observation_space=space,
                                       action_space=_box(2, -1, 1))
    data = load_minari("test/pointmaze/umaze-v0", task=task, download=False)
    np.testing.assert_allclose(data["observations"], d4rl_obs[:2], atol=1e-6)
    np.testing.assert_allclose(data["infos/goal"], goal[None].repeat(2, 0), atol=1e-6)
    np.testing.assert_allclose(data["infos/qvel"], d4rl_obs[:2, 2:], atol=1e-6)
    with pytest.raises(RactdError, match="maze task"):
        load_minari("test/pointmaze/umaze-v0", download=False)


def _assert_same(ours, back):
    for key, value in ours.items():
        if key.startswith("metadata/"):
            assert back[key] == value, key
        else:
            np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_round_trip_locomotion_is_lossless():
    from test_data_d4rl import hopper_like

    ours = hopper_like(n=60)
    ours["metadata/algorithm"] = "SAC"
    export_minari(ours, "ractd/hopper/roundtrip-v0", task=get_task("hopper-medium"))
    back = load_minari("ractd/hopper/roundtrip-v0", download=False)
    _assert_same(ours, back)
    with pytest.raises(RactdError, match="already exists"):
        export_minari(ours, "ractd/hopper/roundtrip-v0")


def test_round_trip_generated_maze_is_lossless():
    task = get_task("maze2d-umaze")
    data, meta = generate_maze_arrays(task, 1500, seed=0, progress=False)
    data.update({f"metadata/{k}": v for k, v in meta.items()})
    export_minari(data, "ractd/maze2d/roundtrip-v0", task=task)
    back = load_minari("ractd/maze2d/roundtrip-v0", task=task, download=False)
    _assert_same(data, back)
    assert minari.load_dataset("ractd/maze2d/roundtrip-v0").total_steps == 1500


def test_missing_dataset_and_no_network(monkeypatch):
    with pytest.raises(RactdError, match="not in the local store"):
        load_minari("mujoco/hopper/medium-v0", download=False)

    def offline(*a, **k):
        raise ConnectionError("Failed to resolve 'storage.googleapis.com'\nmore")

    monkeypatch.setattr(minari, "download_dataset", offline)
    with pytest.raises(RactdError) as e:
        load_minari("mujoco/hopper/medium-v0")
    assert "\n" not in str(e.value) and "MINARI_DATASETS_PATH" in str(e.value)
