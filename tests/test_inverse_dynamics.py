"""Inverse dynamics model a = f(s_t, s_{t+1}) on generated maze2d data, and the maze planner's tracker option.

Oracles: the dataset's own actions (on a trajectory the model never saw), and the env itself: a plan simulated
in PointMaze from known actions is tracked closed loop, and the executed actions must be those actions.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from ractd import RactdError, rollout
from ractd.data.d4rl import load_d4rl_hdf5
from ractd.data.generate_maze import generate_maze
from ractd.inverse_dynamics import (
    InverseDynamics,
    InverseDynamicsConfig,
    train_inverse_dynamics,
    transition_pairs,
)
from ractd.maze import d4rl_to_pointmaze, maze_map
from ractd.policy import MazePlanner
from ractd.tasks import get_task

UMAZE = get_task("maze2d-umaze")
# Small enough for the default suite (~5 s on one core); measured on tiny umaze data (seed 0 train, seed 1 test):
# held-out MAE 0.05 against 0.66 for the zero predictor.
FAST = InverseDynamicsConfig(steps=1000, hidden=(64, 64), lr=3e-3)
MAE_BOUND = 0.1  # action units (actions lie in [-1, 1]); the zero predictor's error is ~0.66


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("idm")
    train = load_d4rl_hdf5(generate_maze(UMAZE, scale="tiny", seed=0, out=tmp / "train.hdf5"), kind="auto")
    test = load_d4rl_hdf5(generate_maze(UMAZE, scale="tiny", seed=1, out=tmp / "test.hdf5"), kind="auto")
    with torch.random.fork_rng(devices=[]):
        model = train_inverse_dynamics(train, FAST, out=tmp / "idm.pt")
    return model, test, tmp / "idm.pt"


def test_recovers_dataset_actions_on_an_unseen_trajectory(trained):
    model, test, _ = trained
    s, s_next, a = transition_pairs(test)
    mae = np.abs(model.predict(s, s_next) - a).mean()
    zero = np.abs(a).mean()
    assert zero > 0.5  # the bound below is far from trivial
    assert mae < MAE_BOUND, f"inverse dynamics MAE {mae:.3f} (zero predictor {zero:.3f})"
    assert model.metrics["val_mae"] < MAE_BOUND and model.metrics["val_mae_zero"] > 0.5


def test_pairs_never_cross_an_episode_boundary():
    obs = np.arange(12, dtype=np.float32).reshape(6, 2)
    data = {"observations": obs, "actions": obs[:, :1] * 10, "terminals": np.array([0, 0, 1, 0, 0, 0], bool),
            "timeouts": np.array([0, 0, 0, 0, 1, 0], bool)}
    s, s_next, a = transition_pairs(data)
    # episodes [0, 3), [3, 5), [5, 6): pairs (0, 1), (1, 2), (3, 4)
    np.testing.assert_array_equal(s[:, 0], [0, 2, 6])
    np.testing.assert_array_equal(s_next[:, 0], [2, 4, 8])
    np.testing.assert_array_equal(a[:, 0], [0, 20, 60])


def test_checkpoint_round_trip(trained, tmp_path):
    model, test, path = trained
    loaded = InverseDynamics.load(path)
    s, s_next, _ = transition_pairs(test)
    np.testing.assert_array_equal(loaded.predict(s[:50], s_next[:50]), model.predict(s[:50], s_next[:50]))
    assert loaded.config == FAST and loaded.metrics == model.metrics
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(RactdError, match="no inverse dynamics checkpoint"):
        InverseDynamics.load(tmp_path / "missing.pt")


def test_track_uses_the_pd_rules_waypoint(trained):
    model, test, _ = trained
    s = test["observations"][:3].astype(np.float64)
    plan = np.stack([test["observations"][i:i + 5] for i in (10, 20, 30)]).astype(np.float64)  # (3, 5, 4)
    np.testing.assert_array_equal(model.track(plan, s, 1), model.predict(s, plan[:, 2]))
    end = plan[:, -1].copy()
    end[:, 2:] = 0.0
    np.testing.assert_array_equal(model.track(plan, s, 4), model.predict(s, end))


def test_track_plan_reads_consecutive_planned_states_then_the_pd_rule(trained):
    """Open loop (the paper's Sec. 4.2): the action of step t is f(plan[t], plan[t + 1]), whatever is observed;
    past the plan's end the PD rule steers to its last state."""
    model, test, _ = trained
    s = test["observations"][:3].astype(np.float64)
    plan = np.stack([test["observations"][i:i + 5] for i in (10, 20, 30)]).astype(np.float64)  # (3, 5, 4)
    np.testing.assert_array_equal(model.track_plan(plan, s, 1), model.predict(plan[:, 1], plan[:, 2]))
    np.testing.assert_array_equal(model.track_plan(plan, s + 1.0, 1), model.track_plan(plan, s, 1))
    np.testing.assert_array_equal(model.track_plan(plan, s, 4), MazePlanner.track(plan, s, 4))


class _SimulatedPlans:
    """Sampler whose plan is the env's own response to known actions from the conditioning's start state."""

    def __init__(self, norm, horizon, seed=0):
        self.norm, self.horizon = norm, horizon
        self.actions = np.random.default_rng(seed).uniform(-0.3, 0.3, size=(8, horizon - 1, 2))
        self.shape = maze_map(UMAZE).shape

    def __call__(self, cond, generators):
        starts = self.norm.unnormalize(cond[:, :4].numpy().astype(np.float64))
        env = rollout.make_env(UMAZE)
        env.reset(seed=0)
        plans = []
        for b, start in enumerate(starts):
            env.unwrapped.point_env.set_state(d4rl_to_pointmaze(start[:2], self.shape),
                                              d4rl_to_pointmaze(start[2:], self.shape, vector=True))
            states = [start]
            for a in self.actions[b]:
                o = env.step(d4rl_to_pointmaze(a, self.shape, vector=True))[0]
                states.append(rollout.env_obs_to_d4rl(o["observation"], self.shape))
            plans.append(np.stack(states))
        env.close()
        return torch.from_numpy(self.norm.normalize(np.stack(plans)).astype(np.float32))


class _Counting:
    """Delegates track() / track_plan() to an InverseDynamics and keeps every action they returned; counts only
    the rule the tracker names, so a planner calling the other one fails the test."""

    def __init__(self, model, tracker="inverse_dynamics"):
        self.model, self.tracker, self.actions = model, tracker, []

    def _keep(self, rule, plan, obs, t):
        a = getattr(self.model, rule)(plan, obs, t)
        if rule == {"inverse_dynamics": "track", "inverse_dynamics_plan": "track_plan"}[self.tracker]:
            self.actions.append(a)
        return a

    def track(self, plan, obs, t):
        return self._keep("track", plan, obs, t)

    def track_plan(self, plan, obs, t):
        return self._keep("track_plan", plan, obs, t)


@pytest.mark.parametrize("tracker", ["inverse_dynamics", "inverse_dynamics_plan"])
def test_rollout_with_the_inverse_dynamics_tracker_executes_the_plans_actions(trained, tracker):
    model, _, _ = trained
    steps = 20
    sampler = _SimulatedPlans(model.obs_normalizer, horizon=steps + 1)
    counting = _Counting(model, tracker)
    planner = MazePlanner(sampler, model.obs_normalizer, steps + 1, tracker=tracker, inverse_dynamics=counting)
    seeds = [0, 1, 2]
    records = rollout.rollout_maze(UMAZE, planner, seeds, max_steps=steps, progress=False)
    assert [r["seed"] for r in records] == seeds and all(r["length"] == steps for r in records)
    assert len(counting.actions) == steps
    executed = np.stack(counting.actions, axis=1)  # (seeds, steps, 2)
    err = np.abs(executed - sampler.actions[:len(seeds)]).mean()
    assert err < MAE_BOUND, f"tracked actions differ from the plan's by {err:.3f}"
    # The PD rule on the same plans acts differently: the option really switches the tracker.
    pd = MazePlanner(sampler, model.obs_normalizer, steps + 1)
    assert pd.tracker == "pd" and pd.track == MazePlanner.track


def test_tracker_option_is_validated(trained):
    model, _, _ = trained
    with pytest.raises(RactdError, match="unknown maze tracker"):
        MazePlanner(None, model.obs_normalizer, 8, tracker="pid")
    for tracker in ("inverse_dynamics", "inverse_dynamics_plan"):
        with pytest.raises(RactdError, match="need an inverse_dynamics model"):
            MazePlanner(None, model.obs_normalizer, 8, tracker=tracker)
    with pytest.raises(RactdError, match="only they take one"):
        MazePlanner(None, model.obs_normalizer, 8, tracker="pd", inverse_dynamics=model)


def test_cli_trains_from_the_task_dataset_and_rejects_bad_input(tmp_path, capsys):
    from ractd.inverse_dynamics import main

    generate_maze(UMAZE, scale="tiny", seed=0)  # the local tiny dataset the CLI loads by task name
    out = tmp_path / "idm.pt"
    assert main(["maze2d-umaze", "--scale", "tiny", "--steps", "50", "--hidden", "16", "8", "--out", str(out)]) == 0
    loaded = InverseDynamics.load(out)
    assert loaded.config == InverseDynamicsConfig(steps=50, hidden=(16, 8))
    assert str(out) in capsys.readouterr().out
    assert main(["hopper-medium"]) == 2
    assert capsys.readouterr().err.strip() == ("error: hopper-medium is not a maze task; the inverse dynamics "
                                               "tracker is for maze2d")
    assert main(["maze2d-umaze", "--scale", "tiny", "--steps", "0"]) == 2
    assert "steps, batch_size, lr must be positive" in capsys.readouterr().err


def _plans_bench():
    from ractd_repro.studies import inverse_dynamics_plans

    return inverse_dynamics_plans


def test_tracking_on_dataset_windows_replays_exactly_and_inverse_dynamics_tracks_feasible_paths(trained):
    """ractd_repro.studies.inverse_dynamics_plans's oracle: from a window's first state, the dataset's own actions reproduce
    the window (zero error: the env and the frame conversions are the data's); the inverse dynamics model, closed
    loop, tracks the same feasible path within 0.05 and closer than the PD rule does."""
    model, test, _ = trained
    bench = _plans_bench()
    windows, actions = bench.dataset_windows(test, 20, 8)
    assert windows.shape == (8, 21, 4) and actions.shape == (8, 20, 2)
    replay = bench.tracking_error(UMAZE, windows[:, 0], windows, lambda p, o, t: actions[:, t])
    assert replay.max() < 1e-6
    tracked = bench.tracking_error(UMAZE, windows[:, 0], windows, model.track)
    assert tracked.mean() < 0.05, tracked.mean()
    pd_err = bench.tracking_error(UMAZE, windows[:, 0], windows, MazePlanner.track)
    assert tracked.mean() < pd_err.mean()  # the PD rule lags a moving waypoint (0.115 vs 0.002 on small data)
