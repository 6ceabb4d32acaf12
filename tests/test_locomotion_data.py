"""Locomotion dataset generation (ractd.data.generate_locomotion) at the tiny scale.

The oracle for "episodes are split exactly as the env reported them" is the env itself: every recorded
transition is replayed from its stored MuJoCo state (infos/qpos, infos/qvel) with its stored action, and the
env's own next observation, reward and termination flag must match the file.
"""

import dataclasses
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import stable_baselines3  # noqa: F401  (the dev extra installs it; a missing install must fail, not skip)
import torch

from ractd import RactdError
from ractd.data import generate_locomotion as gl
from ractd.data.d4rl import load_d4rl_hdf5, read_metadata
from ractd.tasks import get_task

HOPPER_MR = get_task("hopper-medium-replay")


def _generate(tmp: Path, task, **kw) -> Path:
    """Generate at tiny scale with caches and cwd under `tmp` (usable from module-scoped fixtures)."""
    with pytest.MonkeyPatch.context() as mp:
        (tmp / "cwd").mkdir(parents=True, exist_ok=True)
        mp.chdir(tmp / "cwd")
        mp.setenv("RACTD_CACHE_DIR", str(tmp / "cache"))
        kw.setdefault("artifacts", None)  # SAC, whatever behavior artifacts the package holds
        return gl.generate_locomotion(task, scale="tiny", seed=kw.pop("seed", 0), out=tmp / "data.hdf5", **kw)


@pytest.fixture(scope="module")
def hopper_mr(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hopper_mr")
    return tmp, _generate(tmp, HOPPER_MR)


def _episode_slices(data) -> list[slice]:
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    starts = np.concatenate([[0], ends[:-1]])
    return [slice(int(a), int(b)) for a, b in zip(starts, ends)]


def _assert_matches_env(data, task, meta) -> None:
    """Replay every transition in the env and check observations, rewards and episode flags."""
    env = gym.make(task.env_id).unwrapped  # no TimeLimit: time limits are checked from episode lengths
    env.reset(seed=0)
    n = len(data["rewards"])
    next_obs, rewards, terminated = [], [], []
    for i in range(n):
        env.set_state(data["infos/qpos"][i], data["infos/qvel"][i])
        np.testing.assert_allclose(env._get_obs(), data["observations"][i], rtol=1e-5, atol=1e-5)
        o, r, term, trunc, _ = env.step(data["actions"][i])
        next_obs.append(o)
        rewards.append(r)
        terminated.append(term)
    env.close()
    np.testing.assert_allclose(np.array(next_obs), data["next_observations"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(rewards), data["rewards"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.array(terminated), data["terminals"])
    # timeouts: at the env's time limit, or the dataset's final transition when the metadata says it was cut
    slices = _episode_slices(data)
    assert slices[-1].stop == n
    for k, sl in enumerate(slices):
        if data["timeouts"][sl.stop - 1] and not data["terminals"][sl.stop - 1]:
            length = sl.stop - sl.start
            if length != task.max_episode_steps:
                assert k == len(slices) - 1 and meta["cut_last_episode"] == 1, (k, length)
        np.testing.assert_array_equal(data["timeouts"][sl][:-1], False)
        # within an episode, s' of one transition is s of the next
        np.testing.assert_array_equal(data["next_observations"][sl][:-1], data["observations"][sl][1:])


def test_medium_replay_schema_and_metadata(hopper_mr):
    _, path = hopper_mr
    data = load_d4rl_hdf5(path, kind="locomotion")
    n = len(data["rewards"])
    assert n == gl.RECIPES["tiny"].medium_max_steps  # tiny never reaches the threshold: forced medium
    assert data["observations"].shape == (n, 11) and data["next_observations"].shape == (n, 11)
    assert data["actions"].shape == (n, 3) and data["infos/action_log_probs"].shape == (n,)
    assert data["infos/qpos"].shape == (n, 6) and data["infos/qvel"].shape == (n, 6)
    assert data["terminals"].dtype == bool and data["timeouts"].dtype == bool
    meta = read_metadata(path)
    assert meta["split"] == "medium-replay" and meta["scale"] == "tiny" and meta["seed"] == 0
    assert meta["medium_reached"] == 0 and meta["medium_policy_step"] == gl.RECIPES["tiny"].medium_max_steps
    assert "stable_baselines3" in meta["versions_json"] and "recipe_json" in meta
    assert meta["n_episodes"] == len(_episode_slices(data))
    np.testing.assert_allclose(meta["return_max"], gl.episode_returns(data).max())
    # warm-up actions are uniform: their log-density is -act_dim * log 2
    warm = gl.RECIPES["tiny"].learning_starts
    np.testing.assert_allclose(data["infos/action_log_probs"][:warm], -3 * np.log(2.0), rtol=1e-6)
    assert np.all(np.abs(data["actions"]) <= 1.0)


def test_medium_replay_episodes_match_env(hopper_mr):
    _, path = hopper_mr
    data = load_d4rl_hdf5(path, kind="locomotion")
    assert data["terminals"].sum() > 10  # an untrained hopper falls over often
    _assert_matches_env(data, HOPPER_MR, read_metadata(path))


def test_same_seed_same_dataset(hopper_mr, tmp_path):
    _, path = hopper_mr
    again = _generate(tmp_path, HOPPER_MR)
    a, b = load_d4rl_hdf5(path), load_d4rl_hdf5(again)
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("metadata/"):
            assert a[k] == b[k], k
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_policies_are_reused_across_tasks(hopper_mr, monkeypatch):
    tmp, _ = hopper_mr

    def no_training(self, until):
        raise AssertionError("the cached medium policy should have been reused")

    monkeypatch.setattr(gl.Trainer, "run", no_training)
    path = _generate(tmp, get_task("hopper-medium"))
    data = load_d4rl_hdf5(path)
    assert len(data["rewards"]) == gl.RECIPES["tiny"].rollout_size
    meta = read_metadata(path)
    assert meta["split"] == "medium" and meta["medium_policy_step"] == gl.RECIPES["tiny"].medium_max_steps
    _assert_matches_env(data, HOPPER_MR, meta)


def test_interrupted_training_resumes_bit_identically(hopper_mr, tmp_path, monkeypatch):
    """Kill training between checkpoints; the rerun resumes and ends with the same expert as an uninterrupted
    run; no dataset and no temporary file is left behind by the interruption."""
    tmp, _ = hopper_mr  # trained to medium, then stopped: continuing it is a resume from train.ckpt too
    monkeypatch.setenv("RACTD_CACHE_DIR", str(tmp / "cache"))
    resumed_from_medium = torch.load(gl.BehaviorCache("Hopper-v5", "tiny", 0, artifacts=None).ensure("expert"))

    monkeypatch.setenv("RACTD_CACHE_DIR", str(tmp_path / "straight"))
    straight = torch.load(gl.BehaviorCache("Hopper-v5", "tiny", 0, artifacts=None).ensure("expert"))

    monkeypatch.setenv("RACTD_CACHE_DIR", str(tmp_path / "crash"))
    on_step = gl.Recorder._on_step

    def crash(self):
        if self.model.num_timesteps == 1200:
            raise KeyboardInterrupt
        return on_step(self)

    monkeypatch.setattr(gl.Recorder, "_on_step", crash)
    out = tmp_path / "out.hdf5"
    with pytest.raises(KeyboardInterrupt):
        gl.generate_locomotion(get_task("hopper-medium-expert"), scale="tiny", seed=0, out=out, artifacts=None)
    cache = gl.BehaviorCache("Hopper-v5", "tiny", 0, artifacts=None)
    assert not out.exists() and not cache.policy_path("expert").exists()
    assert (cache.dir / "train.ckpt").is_file()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(gl.Recorder, "_on_step", on_step)
    gl.generate_locomotion(get_task("hopper-medium-expert"), scale="tiny", seed=0, out=out, artifacts=None)
    crashed = torch.load(cache.policy_path("expert"))
    for k in straight:
        torch.testing.assert_close(crashed[k], straight[k], rtol=0, atol=0)
        torch.testing.assert_close(resumed_from_medium[k], straight[k], rtol=0, atol=0)
    data = load_d4rl_hdf5(out)
    assert len(data["rewards"]) == 2 * gl.RECIPES["tiny"].rollout_size
    assert read_metadata(out)["expert_policy_step"] == gl.RECIPES["tiny"].total_steps


def test_halfcheetah_timeouts_at_time_limit(tmp_path):
    """HalfCheetah never terminates: every episode ends by the env's 1000-step truncation."""
    task = get_task("halfcheetah-medium")
    path = _generate(tmp_path, task)
    data = load_d4rl_hdf5(path)
    meta = read_metadata(path)
    n = gl.RECIPES["tiny"].rollout_size
    assert len(data["rewards"]) == n
    np.testing.assert_array_equal(data["terminals"], False)
    np.testing.assert_array_equal(np.flatnonzero(data["timeouts"]), np.arange(999, n, 1000))
    assert meta["cut_last_episode"] == 0 and meta["n_timeouts"] == n // 1000
    _assert_matches_env(data, task, meta)


def test_random_and_expert_splits(hopper_mr):
    tmp, _ = hopper_mr
    task = gl.locomotion_task("hopper", "random")
    assert task.name == "hopper-random" and task.env_id == "Hopper-v5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RACTD_CACHE_DIR", str(tmp / "cache"))
        data = gl.BehaviorCache("Hopper-v5", "tiny", 0, artifacts=None).rollouts("random", 300)
    assert len(data["rewards"]) == 300
    assert data["timeouts"][-1] or data["terminals"][-1]


def test_errors_are_one_line():
    with pytest.raises(RactdError, match="unknown scale"):
        gl.generate_locomotion(HOPPER_MR, scale="huge")
    with pytest.raises(RactdError, match="not a locomotion task"):
        gl.generate_locomotion(get_task("maze2d-umaze"), scale="tiny")
    with pytest.raises(RactdError, match="unknown locomotion split"):
        gl.locomotion_task("hopper", "expert-replay")


def test_episode_returns_split_on_terminals_and_timeouts():
    data = {"rewards": np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32),
            "terminals": np.array([0, 1, 0, 0, 0], bool), "timeouts": np.array([0, 0, 0, 1, 0], bool)}
    np.testing.assert_allclose(gl.episode_returns(data), [3.0, 7.0, 5.0])


# ---------------------------------------------------------------------------------------------- recipes, info


def test_walker_small_uses_its_own_recipe():
    walker, hopper = gl.recipe_for("Walker2d-v5", "small"), gl.recipe_for("Hopper-v5", "small")
    assert hopper == gl.RECIPES["small"]  # no override: the scale's recipe
    assert walker == dataclasses.replace(gl.RECIPES["small"], **gl.RECIPE_OVERRIDES[("walker2d", "small")])
    assert walker.total_steps > gl.RECIPES["small"].total_steps and walker.key() != hopper.key()
    assert gl.recipe_for("walker2d", "small") == walker and gl.recipe_for("Walker2d-v5", "tiny") == gl.RECIPES["tiny"]


def test_generation_trains_walker_with_the_walker_recipe(monkeypatch):
    """generate_locomotion(walker2d-medium, small) hands the walker recipe to the trainer (stopped before SAC)."""
    seen = {}

    def stop(self, until):
        seen.update(recipe=self.recipe, dir=self.cache.dir, until=until)
        raise KeyboardInterrupt

    monkeypatch.setattr(gl.Trainer, "run", stop)
    with pytest.raises(KeyboardInterrupt):
        gl.generate_locomotion(get_task("walker2d-medium"), scale="small", seed=0, artifacts=None)
    walker = gl.recipe_for("Walker2d-v5", "small")
    assert seen["recipe"] == walker and seen["until"] == "medium"
    assert seen["dir"].name == f"small-seed0-{walker.key()}"


def _info(path, capsys) -> str:
    from ractd.data.__main__ import main

    assert main(["info", str(path)]) == 0
    return capsys.readouterr().out


def _file_with_meta(path: Path, **meta) -> Path:
    from ractd.data.d4rl import write_d4rl_hdf5

    n = 4
    data = {"observations": np.zeros((n, 17), np.float32), "actions": np.zeros((n, 6), np.float32),
            "rewards": np.ones(n, np.float32), "terminals": np.zeros(n, bool),
            "timeouts": np.array([0, 1, 0, 1], bool)}
    base = {"task": "walker2d-medium-expert", "split": "medium-expert", "medium_threshold_return": 1531.9,
            "medium_policy_step": 100000}
    return write_d4rl_hdf5(path, data, {**base, **meta})


def test_info_says_when_medium_was_not_reached(tmp_path, capsys):
    out = _info(_file_with_meta(tmp_path / "a.hdf5", medium_reached=0, medium_policy_eval_return=1200.0,
                                expert_policy_eval_return=3000.0, expert_policy_step=150000), capsys)
    assert "medium       NOT REACHED: policy eval return 1200.0 (step 100000) < threshold 1531.9" in out
    assert "= normalized 33.3" in out
    assert "medium / expert = 0.40 (>= 1/3)" in out


def test_info_says_when_medium_is_below_a_third_of_the_expert(tmp_path, capsys):
    out = _info(_file_with_meta(tmp_path / "b.hdf5", medium_reached=1, medium_policy_eval_return=1600.0,
                                expert_policy_eval_return=5000.0, expert_policy_step=300000), capsys)
    assert "medium       reached: policy eval return 1600.0 (step 100000) >= threshold 1531.9" in out
    assert "medium / expert = 0.32 (NOT >= 1/3" in out
    assert "NOT REACHED" not in out


def test_info_of_a_generated_tiny_file_reports_the_forced_medium(hopper_mr, capsys):
    _, path = hopper_mr
    out = _info(path, capsys)
    meta = read_metadata(path)
    assert meta["medium_reached"] == 0
    assert f"medium       NOT REACHED: policy eval return {meta['medium_policy_eval_return']:.1f} " in out
    assert "medium / expert" not in out  # a medium-replay file records no expert
