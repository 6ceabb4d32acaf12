"""Rollout benchmark (not a test): batched seeded rollouts vs raw env stepping; student vs teacher latency.

    python bench/bench_rollout.py [--task hopper-medium] [--seeds 100] [--steps 200] [--preset small]
                                  [--threads N] [--latency-reps 20]

1. Throughput. The same N envs (a list of `rollout.make_env(task)`) are stepped for --steps steps
   (a) with seeded random actions, no network (the ceiling), (b) as gymnasium.vector.SyncVectorEnv with
   random actions (the alternative to a plain list), and (c) by `rollout_locomotion` with a randomly
   initialised CTM student of U-Net preset --preset, 1 step, one batched network call per env step
   (timed as a whole call, so env creation and resets, ~0.5 s for 100 Hopper envs, count against it).
   A random network makes Hopper fall within ~40 steps, after which the batch would shrink; to measure a
   full batch of N for the whole run, the envs here are made with terminate_when_unhealthy=False (the only
   change; reported). Prints env-steps/s of each and the ratio (c)/(a) (target >= 0.7), plus the time of
   the bare network forward at batch N and the zero-overhead bound it implies,
   N / (N / raw + t_net), so that what the rollout code adds is separated from what the network costs.
2. Latency at batch 1, same U-Net preset and horizon: student 1-step (1 network call) vs teacher Heun over
   80 bins (158 calls) through `LocomotionPolicy.act`. Prints seconds per action and the ratio (the paper
   reports 142x on its GPU).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ractd import ctm, edm, rollout
from ractd.config import unet_preset
from ractd.data.windows import Normalizer
from ractd.nets.unet1d import ConditionalUnet1D, accelerate
from ractd.policy import LocomotionPolicy, heun_sampler, student_sampler
from ractd.tasks import get_task


def _make_env(task, steps, **kw):
    import gymnasium as gym

    return gym.make(task.env_id, max_episode_steps=steps, disable_env_checker=True, **kw)


def raw_steps_per_s(task, n, steps, vector=False) -> float:
    """Random-action stepping of n envs for `steps` steps (no termination): env-steps/s."""
    import gymnasium as gym

    rng = np.random.default_rng(0)
    if vector:
        env = gym.vector.SyncVectorEnv([lambda: _make_env(task, steps, terminate_when_unhealthy=False)
                                        for _ in range(n)])
        env.reset(seed=list(range(n)))
        acts = rng.uniform(-1, 1, size=(steps, *env.action_space.shape))
        t0 = time.perf_counter()
        for t in range(steps):
            env.step(acts[t])
        dt = time.perf_counter() - t0
        env.close()
        return n * steps / dt
    envs = [_make_env(task, steps, terminate_when_unhealthy=False) for _ in range(n)]
    for i, e in enumerate(envs):
        e.reset(seed=i)
    acts = rng.uniform(-1, 1, size=(steps, n, *envs[0].action_space.shape))
    t0 = time.perf_counter()
    for t in range(steps):
        for i, e in enumerate(envs):
            e.step(acts[t, i])
    dt = time.perf_counter() - t0
    for e in envs:
        e.close()
    return n * steps / dt


ACCELERATE = {"mode": "none"}  # set from --accelerate in main()


def policy_for(model_kind, task, preset, obs_dim, act_dim, horizon=16, device="cpu"):
    cfg = unet_preset(preset)
    torch.manual_seed(0)
    if model_kind == "student":
        model = ctm.Student(ConditionalUnet1D(act_dim, obs_dim, cfg, n_times=2)).eval().to(device)
        sampler = student_sampler(model, (horizon, act_dim), n_steps=1)
    else:
        model = edm.Denoiser(ConditionalUnet1D(act_dim, obs_dim, cfg, n_times=1)).eval().to(device)
        sampler = heun_sampler(model, (horizon, act_dim), n_bins=edm.N_BINS)
    model.net = accelerate(model.net, ACCELERATE["mode"])
    return LocomotionPolicy(sampler, Normalizer(-5 * np.ones(obs_dim), 5 * np.ones(obs_dim)),
                            Normalizer(-np.ones(act_dim), np.ones(act_dim)))


def net_forward_s(preset, n, obs_dim, act_dim, horizon=16, device="cpu", reps=5) -> float:
    """Seconds of one bare student network forward at batch n (no sampler, no env)."""
    torch.manual_seed(0)
    student = ctm.Student(ConditionalUnet1D(act_dim, obs_dim, unet_preset(preset), n_times=2)).eval().to(device)
    student.net = accelerate(student.net, ACCELERATE["mode"])
    x, c = torch.randn(n, horizon, act_dim, device=device), torch.randn(n, obs_dim, device=device)
    with torch.inference_mode():
        student(x, edm.SIGMA_MAX, edm.SIGMA_MIN, c)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            student(x, edm.SIGMA_MAX, edm.SIGMA_MIN, c)
        _sync(device)
    return (time.perf_counter() - t0) / reps


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def rollout_steps_per_s(task, n, steps, preset, obs_dim, act_dim, device="cpu") -> tuple[float, float]:
    """(env-steps/s, seconds per batched policy call) of rollout_locomotion with a 1-step student."""
    policy = policy_for("student", task, preset, obs_dim, act_dim, device=device)
    orig = rollout.make_env
    rollout.make_env = lambda t, s=None: _make_env(t, s or t.max_episode_steps, terminate_when_unhealthy=False)
    try:
        t0 = time.perf_counter()
        recs = rollout.rollout_locomotion(task, policy, list(range(n)), max_steps=steps, progress=False)
        dt = time.perf_counter() - t0
    finally:
        rollout.make_env = orig
    total = sum(r["length"] for r in recs)
    return total / dt, float(np.mean([r["time_per_action"] for r in recs]))


def latency(kind, task, preset, obs_dim, act_dim, reps, device="cpu") -> float:
    policy = policy_for(kind, task, preset, obs_dim, act_dim, device=device)
    policy.reset(1)
    gens = [torch.Generator().manual_seed(0)]
    obs = np.zeros((1, obs_dim), np.float32)
    policy.act(obs, gens)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        policy.act(obs, gens)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium")
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--latency-reps", type=int, default=20)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--device", default="cpu", help="where the networks run (envs always on CPU)")
    ap.add_argument("--accelerate", default="none", choices=["none", "jit"],
                    help="ractd.nets.unet1d.accelerate mode for the networks")
    args = ap.parse_args()
    ACCELERATE["mode"] = args.accelerate
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    env = _make_env(task, 10)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    print(f"task {task.name} ({task.env_id}), {args.seeds} seeds x {args.steps} steps, U-Net preset "
          f"{args.preset}, torch threads {torch.get_num_threads()}, device {args.device}")

    raw = raw_steps_per_s(task, args.seeds, args.steps)
    vec = raw_steps_per_s(task, args.seeds, args.steps, vector=True)
    t_net = net_forward_s(args.preset, args.seeds, obs_dim, act_dim, device=args.device)
    bound = args.seeds / (args.seeds / raw + t_net)
    ours, call = rollout_steps_per_s(task, args.seeds, args.steps, args.preset, obs_dim, act_dim, args.device)
    print(f"raw env stepping (list, random actions): {raw:9.0f} env-steps/s")
    print(f"raw env stepping (SyncVectorEnv):        {vec:9.0f} env-steps/s")
    print(f"bare network forward at batch {args.seeds}: {t_net * 1e3:.1f} ms -> zero-overhead bound "
          f"{bound:.0f} env-steps/s ({bound / raw:.2f} of raw)")
    print(f"rollout_locomotion, student 1-step:      {ours:9.0f} env-steps/s "
          f"(batched policy call {call * 1e3:.1f} ms per step for {args.seeds} seeds)")
    print(f"ratio rollout / raw: {ours / raw:.2f} (target >= 0.7); rollout / zero-overhead bound: "
          f"{ours / bound:.2f}")

    if not args.skip_latency:
        student = latency("student", task, args.preset, obs_dim, act_dim, args.latency_reps, args.device)
        teacher = latency("teacher", task, args.preset, obs_dim, act_dim, max(1, args.latency_reps // 10),
                          args.device)
        print(f"batch-1 latency per action: student 1-step {student * 1e3:.2f} ms, teacher Heun-80 "
              f"{teacher * 1e3:.1f} ms, ratio {teacher / student:.0f}x (paper: 142x)")


if __name__ == "__main__":
    main()
