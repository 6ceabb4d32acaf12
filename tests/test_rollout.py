"""Batched seeded rollouts: per-seed reproducibility, one network call per step, maze protocol, records."""

import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from ractd import ctm, rollout, timing
from ractd.config import UNET_PRESETS
from ractd.data.windows import Normalizer
from ractd.maze import (
    bfs_next_cell,
    d4rl_to_pointmaze,
    eval_goal,
    maze_map,
    pointmaze_to_d4rl,
)
from ractd.nets.unet1d import ConditionalUnet1D
from ractd.policy import LocomotionPolicy, MazePlanner, student_sampler
from ractd.tasks import get_task

HOPPER = get_task("hopper-medium")
UMAZE = get_task("maze2d-umaze")


class _CountingNet(nn.Module):
    """Wraps a network; counts forward calls and the rows they carried."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls, self.rows = net, 0, 0

    def forward(self, x, times, cond=None):
        self.calls += 1
        self.rows += x.shape[0]
        return self.net(x, times, cond)


def _hopper_policy(net=None):
    torch.manual_seed(0)
    net = net or ConditionalUnet1D(3, 11, UNET_PRESETS["tiny"], n_times=2)
    student = ctm.Student(net).eval()
    return LocomotionPolicy(student_sampler(student, (4, 3)), Normalizer(-2 * np.ones(11), 2 * np.ones(11)),
                            Normalizer(-np.ones(3), np.ones(3)))


class _ActionLog:
    """Delegating policy that keeps every action it returns, per env row."""

    def __init__(self, policy):
        self.policy, self.actions = policy, []

    def reset(self, n):
        self.policy.reset(n)
        self.actions = []

    def act(self, obs, generators, active_mask=None):
        a = self.policy.act(obs, generators, active_mask)
        self.actions.append(a.copy())
        return a


def test_seed_gives_the_same_episode_alone_or_in_a_batch():
    alone_pol, batch_pol = _ActionLog(_hopper_policy()), _ActionLog(_hopper_policy())
    alone = rollout.rollout_locomotion(HOPPER, alone_pol, [3], max_steps=30, progress=False)
    batch = rollout.rollout_locomotion(HOPPER, batch_pol, [0, 1, 2, 3, 4], max_steps=30, progress=False)
    assert [r["seed"] for r in batch] == [0, 1, 2, 3, 4]
    assert alone[0]["length"] == batch[3]["length"] == 30
    a_alone = np.stack([a[0] for a in alone_pol.actions])
    a_batch = np.stack([a[3] for a in batch_pol.actions])
    np.testing.assert_allclose(a_batch, a_alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batch[3]["return"], alone[0]["return"], rtol=1e-6)
    # Different seeds are different episodes (env seeds and sampler noise really are per seed).
    assert not np.allclose(np.stack([a[2] for a in batch_pol.actions]), a_batch, atol=1e-3)


class _StepGuard(gym.Wrapper):
    """Fails if an env is stepped after its episode ended; counts steps."""

    def __init__(self, env, counter):
        super().__init__(env)
        self.counter, self.done = counter, False

    def reset(self, **kw):
        self.done = False
        return self.env.reset(**kw)

    def step(self, action):
        assert not self.done, "env stepped after its episode ended"
        self.counter.append(1)
        out = self.env.step(action)
        self.done = bool(out[2] or out[3])
        return out


def test_one_network_call_per_step_and_finished_episodes_leave_the_batch(monkeypatch):
    make_env, steps = rollout.make_env, []
    monkeypatch.setattr(rollout, "make_env", lambda task, n=None: _StepGuard(make_env(task, n), steps))
    net = _CountingNet(ConditionalUnet1D(3, 11, UNET_PRESETS["tiny"], n_times=2))
    records = rollout.rollout_locomotion(HOPPER, _hopper_policy(net), list(range(6)), max_steps=80,
                                         progress=False)
    lengths = [r["length"] for r in records]
    assert all(r["terminated"] for r in records) and len(set(lengths)) > 1  # the random policy falls
    assert net.calls == max(lengths)   # one (1-step student) network call per env step for all live seeds
    assert net.rows == sum(lengths)    # finished episodes cost no network rows ...
    assert len(steps) == sum(lengths)  # ... and no env steps
    for r in records:
        np.testing.assert_allclose(r["normalized_score"], HOPPER.normalized_score(r["return"]))
        assert r["time_per_action"] > 0 and r["batch_size"] == 6


# ---------------------------------------------------------------------------------------------- maze

MAZE_NORM = Normalizer([-0.5, -0.5, -6.0, -6.0], [4.5, 4.5, 6.0, 6.0])


def _bfs_plan(start, grid, goal_cell, horizon, speed=0.05, dt=0.01):
    """A 'perfect' plan (D4RL coords): along the grid shortest path at `speed` per step, velocity = dpos/dt."""
    nxt = bfs_next_cell(grid)[0][tuple(goal_cell)]
    cell = (int(round(start[0])), int(round(start[1])))
    pts = [np.asarray(start[:2], np.float64)]
    while cell != tuple(goal_cell):
        cell = nxt[cell]
        pts.append(np.array(cell, np.float64))
    pts = np.array(pts)
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    arc = np.minimum(np.arange(horizon) * speed, s[-1])
    pos = np.stack([np.interp(arc, s, pts[:, k]) for k in range(2)], axis=1)
    return np.concatenate([pos, np.gradient(pos, axis=0) / dt], axis=1)


class _PerfectSampler:
    def __init__(self, task, horizon):
        self.grid, self.goal, self.horizon = maze_map(task), task.goal_cell, horizon

    def __call__(self, cond, generators):
        starts = MAZE_NORM.unnormalize(cond[:, :4].numpy().astype(np.float64))
        plans = np.stack([_bfs_plan(s, self.grid, self.goal, self.horizon) for s in starts])
        return torch.from_numpy(MAZE_NORM.normalize(plans).astype(np.float32))


class _Recorder(gym.Wrapper):
    def __init__(self, env, log):
        super().__init__(env)
        self.log = log

    def step(self, action):
        out = self.env.step(action)
        self.log.append(out[0]["observation"].copy())
        return out


def test_maze_tracking_a_perfect_plan_reaches_the_goal_and_scores_sparse_return(monkeypatch):
    make_env, logs = rollout.make_env, []

    def recording_env(task, n=None):
        logs.append([])
        return _Recorder(make_env(task, n), logs[-1])

    monkeypatch.setattr(rollout, "make_env", recording_env)
    planner = MazePlanner(_PerfectSampler(UMAZE, UMAZE.horizon), MAZE_NORM, UMAZE.horizon)
    records = rollout.rollout_maze(UMAZE, planner, [0, 1, 2], progress=False)
    shape, goal = maze_map(UMAZE).shape, eval_goal(UMAZE)
    for r, log in zip(records, logs):
        assert r["length"] == UMAZE.max_episode_steps == len(log) and r["truncated"] and not r["terminated"]
        pos = pointmaze_to_d4rl(np.stack(log)[:, :2], shape)
        assert np.linalg.norm(pos[-1] - goal) < 0.3  # tracked to the goal and stayed there
        expected = float((np.linalg.norm(pos - goal, axis=1) <= 0.5).sum())
        assert r["return"] == expected > 50
        np.testing.assert_allclose(r["normalized_score"], 100 * (expected - 23.85) / (161.86 - 23.85))


def test_maze_reset_and_coordinate_conventions():
    grid = maze_map(UMAZE)
    shape = grid.shape
    env = rollout.make_env(UMAZE)
    starts = []
    for seed in range(20):
        obs = rollout.maze_reset(env, UMAZE, seed, grid)
        point = env.unwrapped.point_env
        # The start obs is the env's MuJoCo state seen in D4RL coordinates.
        raw = np.concatenate([point.data.qpos, point.data.qvel])
        np.testing.assert_allclose(rollout.env_obs_to_d4rl(raw, shape), obs, atol=1e-12)
        starts.append(obs)
    starts = np.array(starts)
    cells = np.round(starts[:, :2]).astype(int)
    assert np.all(np.abs(starts[:, :2] - cells) <= 0.1) and np.all(grid[cells[:, 0], cells[:, 1]] == 0)
    assert len({tuple(c) for c in cells}) > 3  # D4RL: a random free cell per seed
    # Round trip of the conversion used on observations.
    x = np.random.default_rng(0).normal(size=(5, 4))
    pm = np.concatenate([d4rl_to_pointmaze(x[:, :2], shape), d4rl_to_pointmaze(x[:, 2:], shape, vector=True)], 1)
    np.testing.assert_allclose(rollout.env_obs_to_d4rl(pm, shape), x, atol=1e-12)
    # A D4RL-frame action pushes along that D4RL axis: from cell (1, 1), +y is open (cell (1, 2)).
    env.unwrapped.point_env.set_state(d4rl_to_pointmaze([1.0, 1.0], shape), np.zeros(2))
    for _ in range(20):
        o, *_ = env.step(d4rl_to_pointmaze([0.0, 1.0], shape, vector=True))
    d = rollout.env_obs_to_d4rl(o["observation"], shape)
    assert d[1] > 1.1 and abs(d[0] - 1.0) < 0.01 and d[3] > 0
    env.close()


def test_maze_sparse_reward_radius():
    np.testing.assert_array_equal(rollout.maze_sparse_reward([[1.0, 1.5], [1.0, 1.51], [1.3, 1.3]], [1.0, 1.0]),
                                  [1.0, 0.0, 1.0])


# ---------------------------------------------------------------------------------------------- records

def _records():
    return [{"task": "hopper-medium", "seed": s, "return": float(r), "normalized_score": float(sc),
             "length": 10, "time_per_action": t, "terminated": s == 1, "truncated": s != 1, "batch_size": 3}
            for s, r, sc, t in [(0, 1.0, 10.0, 0.01), (1, 2.0, 20.0, 0.02), (2, 3.0, 30.0, 0.03)]]


def test_summarize_save_load_round_trip(tmp_path):
    recs = _records()
    summary = rollout.summarize(recs)
    assert summary["n"] == 3
    np.testing.assert_allclose([summary["score_mean"], summary["score_sem"], summary["return_mean"],
                                summary["time_per_action_mean"]], [20.0, 10.0 / np.sqrt(3), 2.0, 0.02])
    path = tmp_path / "out" / "records.parquet"
    rollout.save_records(recs, path)
    assert rollout.load_records(path) == recs
    assert os.listdir(path.parent) == ["records.parquet"]  # no temporary file left behind
    assert np.isnan(rollout.summarize(recs[:1])["score_sem"])


def test_save_records_is_atomic(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    path = tmp_path / "out" / "records.parquet"
    rollout.save_records(_records()[:1], path)

    def broken(table, where, **kw):
        where.write(b"partial")  # save_records hands pyarrow the open temporary file
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError):
        rollout.save_records(_records(), path)
    assert rollout.load_records(path) == _records()[:1]  # the old file is intact
    assert os.listdir(path.parent) == ["records.parquet"]


class _SetupOnFirstCall:
    """A policy whose every call costs 1 s of a fake clock, its first call also 100 s of one-off set-up inside
    ractd.timing.setup (as an inference engine's build and calibration at a new live batch)."""

    def __init__(self, clock):
        self.clock, self.first = clock, True

    def reset(self, n):
        pass

    def act(self, obs, generators, active_mask=None):
        self.clock[0] += 1.0
        if self.first:
            self.first = False
            with timing.setup():
                self.clock[0] += 100.0
        return np.zeros((len(obs), 3))


class _SetupPlanner(_SetupOnFirstCall):
    def plan(self, obs, goal, generators):
        self.act(obs, generators)
        return None

    def track(self, plan, obs, t):
        return np.zeros((len(obs), 2))


def test_the_time_per_action_leaves_one_off_setup_out(monkeypatch):
    """An engine's build and calibration happen inside the first policy call of a live batch: the recorded time
    per action is the calls' time without them (a table's timed cell never holds a calibration)."""
    import time

    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    recs = rollout.rollout_locomotion(HOPPER, _SetupOnFirstCall(clock), [0, 1], max_steps=5, progress=False)
    assert [r["length"] for r in recs] == [5, 5]
    assert [r["time_per_action"] for r in recs] == [1.0, 1.0]  # 5 calls of 1 s over 5 steps; not (5 + 100) / 5
    recs = rollout.rollout_maze(UMAZE, _SetupPlanner(clock), [0], max_steps=4, progress=False)
    assert recs[0]["time_per_action"] == 1.0 / 4  # the plan's 1 s over 4 steps; tracking costs no clock time


def test_gym_make_drops_mujocos_notes_on_gymnasiums_models_and_passes_other_warnings(tmp_path, monkeypatch, capfd):
    """HalfCheetah's model sets MuJoCo's deprecated 'settotalmass': without the handler every env made printed it
    and appended it to a MUJOCO_LOG.TXT in the working directory. Other MuJoCo warnings still reach stderr."""
    from ractd import tasks

    monkeypatch.chdir(tmp_path)
    env = tasks.gym_make("HalfCheetah-v5")
    env.close()
    tasks._mujoco_warning("Nan, Inf or huge value in QACC at DOF 0")
    err = capfd.readouterr().err
    assert "settotalmass" not in err and "MuJoCo warning: Nan, Inf or huge value in QACC at DOF 0" in err
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
