"""Ray Train / Ray Tune costs on this machine, each printed from one run.

1. Distillation steps/s of the student (the task's CPU preset, tiny hopper data) with 1 and 2 Ray Train workers
   at the same global batch, and in one plain process (no Ray) for reference.
2. Gradient all-reduce time per step across 2 workers (gloo, CPU) for the small and the paper-size student
   (ractd.config.UNET_PRESETS["mujoco"]): one flattened (bucketed) all-reduce (ractd_ray.collectives.GradAllReduce)
   against one all-reduce per parameter.
3. Ray's overhead in a sweep: bench/sweep_overhead.py (the overhead ratio, the per-trial start-up and where it
   goes), with --trials and --trial-steps.

    python bench/bench_ray.py [--steps 40] [--batch 128] [--trial-steps 400] [--trials 3] [--skip-paper]

Everything is written into a temporary cache folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def random_hopper(n_steps: int = 3000, seed: int = 0) -> Path:
    """A D4RL-format hopper dataset from uniform random actions (for timing only)."""
    from ractd.data.generate_random import random_locomotion_dataset

    return random_locomotion_dataset("hopper-medium-replay", n_steps, seed)


def _steps_per_s(stage_dir: Path) -> float:
    """Mean training speed over the checkpoints after the first (the first includes warm-up)."""
    lines = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(m["steps_per_s"] for m in lines[1:])


def bench_distill(root: Path, steps: int, batch: int) -> dict:
    from ractd.train import RunContext, TrainConfig, train
    from ractd_ray.train import RayTrainConfig, fit_stage

    task = "hopper-medium-replay"
    teacher = TrainConfig.for_stage("teacher", task=task, scale="tiny", source="local", steps=2, batch=16,
                                    run_dir=str(root / "teacher-run"))
    train(teacher, RunContext(progress=False))
    every = max(1, steps // 4)
    student = TrainConfig.for_stage("student", task=task, scale="tiny", source="local", steps=steps, batch=batch,
                                    ckpt_every=every, report_every=every, select_seeds=0,
                                    teacher_ckpt=str(root / "teacher-run" / "teacher" / "best.pt"))
    student = replace(student, distill=replace(student.distill, sigma=0.0))  # CTD: no reward model needed
    out = {}
    torch.set_num_threads(1)
    local = replace(student, run_dir=str(root / "local"))
    train(local, RunContext(progress=False))
    out["process"] = _steps_per_s(root / "local" / "student")
    for n in (1, 2):
        cfg = replace(student, run_dir=str(root / f"ray{n}"))
        t0 = time.perf_counter()
        res = fit_stage(cfg, RayTrainConfig(num_workers=n, use_gpu=False, storage_path=str(root / "ray"),
                                            name=f"distill{n}", progress=False))
        out[f"workers{n}"] = _steps_per_s(root / f"ray{n}" / "student")
        out[f"workers{n}_fit_s"] = time.perf_counter() - t0
        out[f"workers{n}_train_s"] = res["train_time_s"]
    return out


def _allreduce_loop(config):
    import ray.train
    import torch.distributed as dist

    from ractd import ctm
    from ractd.config import unet_preset
    from ractd.nets.unet1d import ConditionalUnet1D
    from ractd_ray.collectives import GradAllReduce, PerParameterAllReduce

    torch.set_num_threads(1)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    model = ctm.Student(ConditionalUnet1D(3, 11, unet_preset(config["preset"]), n_times=2))
    gen = torch.Generator().manual_seed(rank)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    out = {"params": sum(p.numel() for p in model.parameters()),
           "tensors": sum(1 for p in model.parameters() if p.requires_grad)}
    reducers = {f"flat {mb:g} MiB": GradAllReduce(world, bucket_mb=mb) for mb in config["bucket_mb"]}
    reducers["per-parameter"] = PerParameterAllReduce(world)
    for name, reducer in reducers.items():
        times = []
        for i in range(config["repeats"] + 1):
            dist.barrier()
            t0 = time.perf_counter()
            reducer(model)
            dist.barrier()
            if i:  # the first call allocates the flat buffer
                times.append(time.perf_counter() - t0)
        out[name] = (statistics.median(times), reducer.calls // (config["repeats"] + 1))
    return out


def bench_allreduce(root: Path, preset: str, repeats: int, bucket_mb: list[float]) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    result = TorchTrainer(_allreduce_loop,
                          train_loop_config={"preset": preset, "repeats": repeats, "bucket_mb": bucket_mb},
                          scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
                          run_config=ray.train.RunConfig(name=f"allreduce-{preset}", storage_path=str(root / "ray"))
                          ).fit()
    if result.error is not None:
        raise result.error
    return result.return_value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="distillation steps per speed measurement")
    p.add_argument("--batch", type=int, default=128, help="global distillation batch")
    p.add_argument("--repeats", type=int, default=5, help="all-reduce repetitions (median reported)")
    p.add_argument("--bucket-mb", type=float, nargs="+", default=[16.0, 64.0, 256.0, 1024.0],
                   help="bucket sizes of the flattened all-reduce to compare")
    p.add_argument("--trials", type=int, default=3, help="sweep trials")
    p.add_argument("--trial-steps", type=int, default=400, help="distillation steps per sweep trial")
    p.add_argument("--skip-paper", action="store_true", help="skip the paper-size all-reduce (needs ~6 GB)")
    p.add_argument("--parts", default="distill,allreduce,sweep", help="measurements to run (comma-separated)")
    args = p.parse_args()
    parts = set(args.parts.split(","))

    root = Path(tempfile.mkdtemp(prefix="ractd-bench-ray-"))
    os.environ["RACTD_CACHE_DIR"] = str(root / "cache")
    import ray

    from ractd_ray.train import ensure_ray

    try:
        random_hopper()
        t0 = time.perf_counter()
        ensure_ray()
        print(f"ray.init: {time.perf_counter() - t0:.1f} s")
        if "distill" in parts:
            d = bench_distill(root, args.steps, args.batch)
            print(f"distillation, small student, global batch {args.batch}, steps/s: one process {d['process']:.2f}, "
                  f"1 worker {d['workers1']:.2f}, 2 workers {d['workers2']:.2f} (2 vs 1 worker: "
                  f"{d['workers2'] / d['workers1']:.2f}x; 1 worker vs one process: {d['workers1'] / d['process']:.2f}x)")
            print(f"  fit wall vs training time: 1 worker {d['workers1_fit_s']:.1f} s vs {d['workers1_train_s']:.1f} s, "
                  f"2 workers {d['workers2_fit_s']:.1f} s vs {d['workers2_train_s']:.1f} s")
        if "allreduce" in parts:
            for preset in ["small"] + ([] if args.skip_paper else ["mujoco"]):
                a = bench_allreduce(root, preset, args.repeats, args.bucket_mb)
                per_param = a["per-parameter"][0]
                timings = ", ".join(f"{k} {v[0] * 1e3:.1f} ms ({v[1]} calls, {per_param / v[0]:.2f}x)"
                                    for k, v in a.items() if isinstance(v, (tuple, list)))
                print(f"all-reduce per step, 2 workers (gloo), {preset} student ({a['params'] / 1e6:.1f} M parameters,"
                      f" {a['tensors']} tensors): {timings} (x = speed-up over per-parameter)")
        ray.shutdown()
        if "sweep" in parts:  # bench/sweep_overhead.py's measurement (it can run alone)
            import sweep_overhead

            sweep_overhead.report(sweep_overhead.overhead(sweep_overhead.run_sweep(
                root, args.trials, args.trial_steps, batch=64, preset="tiny")))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
