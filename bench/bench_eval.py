"""Evaluation benchmark (not a test): 100 seeds x 1000 steps of hopper with the small one-step student.

    python bench/bench_eval.py [--seeds 100] [--steps 1000] [--sequential-seeds 5] [--preset small]

Four ways to produce the same 100 episodes, timed in one run on this machine:
  (a) the released code's loop: one seed after another, one network call per env step at batch 1
      (here `ractd.rollout.rollout_locomotion(task, policy, [seed])`, which is that loop). Measured on
      --sequential-seeds seeds and extrapolated linearly to all seeds (every episode has the same length, see
      below), and reported as such;
  (b) one process, all seeds batched: one `rollout_locomotion` call over the 100 seeds (one network call per
      env step for the whole batch);
  (c) the Ray actor pool (ractd_ray.pool) with 1 actor, and (d) with 2 actors (blocks of 50 seeds), each
      writing the episodes to a results store. The pool's time counts actor start-up, shipping the weights
      and writing the store; `ray.init` is timed separately.
Every variant runs with one torch thread per process (per actor), the setting the rollout module recommends
on shared CPUs.

The student is a randomly initialised small U-Net (preset --preset, 4.5 M parameters) saved as a checkpoint:
the network cost per call is what matters here, not its score. A random policy makes Hopper fall within ~40
steps, so Hopper-v5 is made with terminate_when_unhealthy=False (in this process and, through Ray's
worker_process_setup_hook, in every actor) and every episode runs the full --steps steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def never_unhealthy() -> None:
    """Make Hopper-v5 ignore its health check (random policies fall at once); run in every process."""
    import gymnasium as gym

    gym.envs.registry["Hopper-v5"].kwargs["terminate_when_unhealthy"] = False
    torch.set_num_threads(1)


def random_student_checkpoint(path: Path, preset: str) -> Path:
    """A student checkpoint with random weights that ractd.evaluate.policy_from_checkpoint can load."""
    from ractd import ctm
    from ractd.checkpoint import save_checkpoint
    from ractd.config import to_dict, unet_preset
    from ractd.data.windows import Normalizer
    from ractd.nets.unet1d import ConditionalUnet1D
    from ractd.tasks import get_task
    from ractd.train import TrainConfig

    task = get_task("hopper-medium-replay")
    cfg = TrainConfig.for_stage("student", "cpu", task=task.name, preset=preset).resolved()
    torch.manual_seed(0)
    student = ctm.Student(ConditionalUnet1D(3, 11, unet_preset(preset), n_times=2))
    obs = Normalizer(-2 * np.ones(11, np.float32), 2 * np.ones(11, np.float32))
    act = Normalizer(-np.ones(3, np.float32), np.ones(3, np.float32))
    save_checkpoint(path, {"config": to_dict(cfg), "model": student.state_dict(), "ema": None,
                           "normalizers": {"obs": obs.state_dict(), "action": act.state_dict()},
                           "shapes": {"x": [task.horizon, 3], "cond": 11, "state": 11, "action": 3},
                           "meta": {"dataset_fingerprint": "random-weights"}, "step": 0})
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--sequential-seeds", type=int, default=5, help="seeds of the batch-1 loop (extrapolated)")
    p.add_argument("--preset", default="small")
    args = p.parse_args()

    import ray

    from ractd.rollout import rollout_locomotion
    from ractd_ray.pool import PoolConfig, RolloutPool
    from ractd_repro.jobs import load_policy, make_job
    from ractd_repro.store import ResultsStore

    never_unhealthy()
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval-"))
    ckpt = random_student_checkpoint(tmp / "student.pt", args.preset)
    job = dataclasses.replace(make_job("hopper-medium-replay", "ctd", ckpt, "bench"), max_steps=args.steps)
    policy = load_policy(job)
    seeds = list(range(args.seeds))
    n_params = sum(p.numel() for p in torch.load(ckpt, weights_only=False)["model"].values()) / 1e6
    print(f"hopper, {args.seeds} seeds x {args.steps} steps, random one-step student ({args.preset}, "
          f"{n_params:.1f} M parameters), torch threads 1 per process")

    t0 = time.perf_counter()
    seq = [rollout_locomotion("hopper-medium-replay", policy, [s], max_steps=args.steps, progress=False)[0]
           for s in seeds[:args.sequential_seeds]]
    t_seq = (time.perf_counter() - t0) / len(seq) * args.seeds
    assert all(r["length"] == args.steps for r in seq)
    per_action = np.mean([r["time_per_action"] for r in seq])

    t0 = time.perf_counter()
    batched = rollout_locomotion("hopper-medium-replay", policy, seeds, max_steps=args.steps, progress=False)
    t_batch = time.perf_counter() - t0
    assert all(r["length"] == args.steps for r in batched)

    t0 = time.perf_counter()
    from ractd_ray.train import ensure_ray

    ensure_ray("local", num_cpus=2, log_to_driver=False, configure_logging=False,
               runtime_env={"worker_process_setup_hook": never_unhealthy})
    t_init = time.perf_counter() - t0
    t_pool = {}
    for actors in (1, 2):
        store = ResultsStore(tmp / f"store-{actors}")
        pool = RolloutPool(PoolConfig(actors=actors))
        t0 = time.perf_counter()
        summary = pool.evaluate([job], seeds, store, progress=False)
        t_pool[actors] = time.perf_counter() - t0
        pool.shutdown()
        rows = store.episodes()
        assert summary["episodes_run"] == args.seeds and all(r["length"] == args.steps for r in rows)
    ray.shutdown()

    lines = [
        ("(a) sequential per-seed loop, batch 1 "
         f"(measured on {len(seq)} seeds, extrapolated x{args.seeds / len(seq):g})", t_seq),
        ("(b) one process, all seeds batched", t_batch),
        ("(c) Ray actor pool, 1 actor", t_pool[1]),
        ("(d) Ray actor pool, 2 actors", t_pool[2]),
    ]
    print(f"batch-1 policy time per action: {1000 * per_action:.2f} ms; ray.init: {t_init:.1f} s (not counted)")
    for name, t in lines:
        print(f"{name:78s} {t:8.1f} s   {t_seq / t:6.1f}x vs (a)   {t_batch / t:5.2f}x vs (b)")


if __name__ == "__main__":
    main()
