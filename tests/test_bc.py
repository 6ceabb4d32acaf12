"""The behavior cloning baseline (CORL's BC): it learns a known policy, a corrupted dataset makes it fail, the
command line is its dataclass, it resumes, and maze2d BC is conditioned on (state, goal) like the planner."""

import numpy as np
import pytest
import torch

from ractd.bc import prepare_bc
from ractd.cli import build_parser, eval_config, train_config
from ractd.evaluate import EvalConfig, policy_from_checkpoint
from ractd.policy import BCGoalPolicy, BCPolicy
from ractd.tasks import get_task
from ractd.train import RunContext, TrainConfig, train


def _linear_data(n=4096, shuffle=False, seed=0):
    """Hopper-shaped (11 -> 3) transitions with actions a = s W: a known linear behavior policy."""
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1, 1, (n, 11)).astype(np.float32)
    w = rng.normal(0, 0.3, (11, 3)).astype(np.float32)
    act = obs @ w
    if shuffle:  # the planted defect: actions no longer belong to their states
        act = act[rng.permutation(n)]
    z = np.zeros(n, np.float32)
    return {"observations": obs, "actions": act, "rewards": z, "terminals": z.astype(bool),
            "timeouts": z.astype(bool)}, w


def _rmse_of_trained_policy(tmp_path, data, w, name):
    cfg = TrainConfig.for_stage("bc", "cpu", task="hopper-medium-replay", run_dir=str(tmp_path / name), steps=800,
                                ckpt_every=800)
    best = train(cfg, RunContext(progress=False), data=data)["best"]
    policy, _, _ = policy_from_checkpoint(best, "bc")
    assert isinstance(policy, BCPolicy)
    states = np.random.default_rng(1).uniform(-0.8, 0.8, (400, 11)).astype(np.float32)  # held out, inside the box
    policy.reset(len(states))
    err = policy.act(states, [torch.Generator()] * len(states)) - states @ w
    return float(np.sqrt(np.mean(err ** 2)))


def test_bc_learns_a_known_linear_policy_and_not_from_shuffled_actions(tmp_path):
    data, w = _linear_data()
    rmse = _rmse_of_trained_policy(tmp_path, data, w, "clean")
    spread = float((data["actions"]).std())
    assert rmse < 0.05 * spread, (rmse, spread)  # 5% of the actions' std (about 1% of their range)
    shuffled, _ = _linear_data(shuffle=True)
    rmse_bad = _rmse_of_trained_policy(tmp_path, shuffled, w, "shuffled")
    assert rmse_bad > 10 * rmse, (rmse_bad, rmse)


def test_bc_uses_corls_recipe_and_resumes(tmp_path):
    data, _ = _linear_data(n=512)
    cfg = TrainConfig.for_stage("bc", "quick", task="hopper-medium-replay", run_dir=str(tmp_path), steps=20,
                                ckpt_every=10, report_every=10)
    assert (cfg.batch, cfg.lr, cfg.bc_hidden) == (256, 3e-4, (256, 256))
    first = train(cfg, RunContext(progress=False, stop_at=10), data=data)
    assert first["step"] == 10
    out = train(cfg, RunContext(progress=False), data=data)  # resumes from latest/checkpoint.pt
    assert out["step"] == 20
    from ractd.checkpoint import load_checkpoint

    ck = load_checkpoint(out["checkpoint"])
    assert ck["step"] == 20 and ck["ema"] is None
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-4)  # constant rate, no cosine decay
    assert "betas" in ck["optimizer"]["param_groups"][0] and ck["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    lines = (tmp_path / "bc" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_bc_best_is_the_final_checkpoint_even_when_the_training_loss_rose(tmp_path):
    """CORL reports BC's final policy; selecting by the training loss picked a hopper BC checkpoint scoring 1.1
    beside 10.8 for the final one (bench/training_seeds.py). An absurd learning rate makes the loss rise after the
    first checkpoint, so the loss rule would keep step 10; best.pt must be step 20."""
    import json

    from ractd.checkpoint import load_checkpoint

    data, _ = _linear_data(n=512)
    cfg = TrainConfig.for_stage("bc", "quick", task="hopper-medium-replay", run_dir=str(tmp_path), steps=20,
                                ckpt_every=10, report_every=10, lr=3.0)
    out = train(cfg, RunContext(progress=False), data=data)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "bc" / "metrics.jsonl").read_text().splitlines()]
    assert losses[1] > losses[0], losses  # the premise: by the loss, step 10 was better
    assert load_checkpoint(out["best"])["step"] == 20


def test_train_bc_and_evaluate_bc_parse_to_the_dataclasses():
    p = build_parser()
    for budget, flag in (("cpu", []), ("quick", ["--quick"]), ("paper", ["--paper"])):
        args = p.parse_args(["train-bc", "--task", "maze2d-umaze", *flag])
        assert train_config(args, "bc") == TrainConfig.for_stage("bc", budget, task="maze2d-umaze")
    args = p.parse_args(["train-bc", "--task", "hopper-medium", "--bc-hidden", "32", "32", "--steps", "50"])
    cfg = train_config(args, "bc")
    assert cfg.bc_hidden == (32, 32) and cfg.steps == 50 and cfg.ckpt_every == 50
    with pytest.raises(SystemExit):  # a stage's foreign field is not offered
        p.parse_args(["train-bc", "--task", "hopper-medium", "--sigma", "1"])
    ev = eval_config(p.parse_args(["evaluate", "--task", "maze2d-umaze", "--sampler", "bc"]))
    assert ev == EvalConfig(task="maze2d-umaze", sampler="bc")


def test_maze_bc_is_conditioned_on_state_and_goal_as_trained(tmp_path):
    rng = np.random.default_rng(0)
    n = 64
    obs = rng.uniform(0.5, 3.5, (n, 4)).astype(np.float32)
    goal = rng.uniform(1, 3, (n, 2)).astype(np.float32)
    data = {"observations": obs, "actions": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
            "rewards": np.zeros(n, np.float32), "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool),
            "infos/goal": goal}
    prep = prepare_bc(get_task("maze2d-umaze"), data, goal="controller")
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(len(x), 2)

    policy = BCGoalPolicy(Recorder(), prep.normalizers["obs"], prep.normalizers["action"])
    plan = policy.plan(obs[:5], goal[:5], [torch.Generator()] * 5)
    policy.track(plan, obs[:5], t=0)
    np.testing.assert_allclose(seen[0].numpy(), prep.cond[:5], rtol=0, atol=1e-6)
    # the controller's goal when the data has no infos/goal: the episode's last position
    del data["infos/goal"]
    data["timeouts"][31] = True
    prep2 = prepare_bc(get_task("maze2d-umaze"), data, goal="controller")
    want = prep2.normalizers["obs"].normalize(np.concatenate([obs[[31, 63], :2], np.zeros((2, 2), np.float32)], 1))
    np.testing.assert_allclose(prep2.cond[[0, 40], 4:], want, atol=1e-6)


def test_maze_bc_by_default_sees_the_planners_hindsight_goal_not_the_controllers():
    """Fair to the planner, which is conditioned on its training windows' last state: by default BC's goal of row t
    is the position horizon - 1 rows later in the same segment (the segment's last position near its end), never
    the controller's infos/goal (which the planner never sees)."""
    from ractd.bc import bc_goals

    task = get_task("maze2d-umaze")
    h = task.horizon
    n = 3 * h
    obs = np.zeros((n, 4), np.float32)
    obs[:, 0] = np.arange(n) * 0.01 + 1.0  # positions that name their row
    obs[:, 1] = 1.0
    term = np.zeros(n, bool)
    term[2 * h - 1] = True  # two segments: [0, 2h) and [2h, 3h)
    data = {"observations": obs, "actions": np.zeros((n, 2), np.float32), "rewards": np.zeros(n, np.float32),
            "terminals": term, "timeouts": np.zeros(n, bool), "infos/goal": np.full((n, 2), 9.0, np.float32)}
    goals = bc_goals(data, "hindsight", h)
    rows = np.array([0, h, 2 * h - 1, 2 * h, 3 * h - 1])
    ahead = np.array([h - 1, 2 * h - 1, 2 * h - 1, 3 * h - 1, 3 * h - 1])  # capped at each segment's end
    np.testing.assert_allclose(goals[rows], obs[ahead, :2], atol=0)
    assert not np.any(goals == 9.0)
    prep = prepare_bc(task, data)  # the default is the hindsight goal
    want = prep.normalizers["obs"].normalize(np.concatenate([obs[ahead, :2], np.zeros((5, 2), np.float32)], 1))
    np.testing.assert_allclose(prep.cond[rows, 4:], want, atol=1e-6)
    np.testing.assert_allclose(bc_goals(data, "controller", h), 9.0)


def test_ten_percent_bc_keeps_the_trajectories_with_the_best_returns():
    """CORL's 10% BC: the top fraction of trajectories by return (at least one), in dataset order, normalizers on
    the kept rows; fraction 1 keeps everything."""
    from ractd.bc import best_trajectories

    lengths, rets = [3, 5, 2, 4, 6, 1, 3, 2, 4, 5], [1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 0.0, 5.0, 4.0, 6.0]
    rew = np.concatenate([np.full(n, r / n) for n, r in zip(lengths, rets)]).astype(np.float32)
    ends = np.cumsum(lengths)
    term = np.zeros(len(rew), bool)
    term[ends - 1] = True
    data = {"observations": np.arange(len(rew), dtype=np.float32)[:, None].repeat(11, 1),
            "actions": np.zeros((len(rew), 3), np.float32), "rewards": rew, "terminals": term,
            "timeouts": np.zeros(len(rew), bool)}
    starts = ends - np.array(lengths)
    np.testing.assert_array_equal(best_trajectories(data, 0.1), np.arange(starts[1], ends[1]))  # return 9
    top3 = np.concatenate([np.arange(starts[k], ends[k]) for k in (1, 3, 5)])  # returns 9, 7, 8 in data order
    np.testing.assert_array_equal(best_trajectories(data, 0.3), top3)
    np.testing.assert_array_equal(best_trajectories(data, 1.0), np.arange(len(rew)))
    np.testing.assert_array_equal(best_trajectories(data, 0.01), np.arange(starts[1], ends[1]))  # at least one
    prep = prepare_bc(get_task("hopper-medium-replay"), data, top_fraction=0.3)
    assert len(prep.x) == len(top3)
    np.testing.assert_allclose(prep.normalizers["obs"].normalize(data["observations"][top3]), prep.cond, atol=1e-6)


def test_the_pool_ships_a_bc_checkpoint_as_the_driver_slims_it(tmp_path):
    """The Ray pool's actors build their policy from the bytes the driver puts in the object store
    (ractd_ray.pool.slim_checkpoint_bytes): for BC (no EMA) those are the trained weights."""
    pytest.importorskip("ray")
    from ractd_ray.pool import slim_checkpoint_bytes
    from ractd_repro.jobs import load_policy, make_job

    data, w = _linear_data(n=512)
    cfg = TrainConfig.for_stage("bc", "quick", task="hopper-medium-replay", run_dir=str(tmp_path), steps=30,
                                ckpt_every=30)
    best = train(cfg, RunContext(progress=False), data=data)["best"]
    job = make_job("hopper-medium-replay", "bc", best, "test")
    assert (job.sampler, job.nfe) == ("bc", 1)
    slim = tmp_path / "slim.pt"
    slim.write_bytes(slim_checkpoint_bytes(best))
    states = np.random.default_rng(2).uniform(-1, 1, (8, 11)).astype(np.float32)
    acts = []
    for policy in (load_policy(job), load_policy(job, slim)):
        policy.reset(8)
        acts.append(policy.act(states, [torch.Generator()] * 8))
    np.testing.assert_array_equal(acts[0], acts[1])
