"""The paper-size student on one CUDA GPU: distillation speed with one Ray Train GPU worker, and per-action latency.

    python bench/gpu.py [--task walker2d-medium] [--steps 300] [--batch 0] [--train-budget-s 240]
    python bench/gpu.py --device cpu --tiny        # the same path at toy size on CPU (tests/test_gpu_bench.py)

What it measures, in one run (under 10 minutes on one H200 by construction: --train-budget-s bounds the
distillation, whose length is chosen from a measured in-process speed):
1. the task's paper U-Net preset (ractd.tasks: `paper_preset`, ractd.config.UNET_PRESETS; --tiny: "tiny") as
   teacher and student; the teacher and the reward model are stand-ins trained for 2 steps (their weights do not
   change the cost of a distillation step), on a generated random-action dataset of the task's env
   (ractd.data.generate_random: 3000 steps; no download);
2. in-process distillation steps/s (ractd.train.train, no Ray) over a few steps, used to size the Ray run;
3. the student distilled for --steps (at most what fits into --train-budget-s) with one Ray Train GPU worker
   (ractd_ray.train.fit_stage, use_gpu): steps/s of the last quarter (after warm-up), the worker's peak GPU memory
   (torch.cuda.max_memory_allocated), training and fit() wall time;
4. per-action latency of the distilled student at batch 1 and 100 (CUDA-synchronized: torch.cuda.synchronize
   around each timed call, and CUDA events for the GPU's own time): the policy's sampler
   (ractd.policy.student_sampler: per-row noise from CPU generators, one jump G(x_T, sigma_max, sigma_min), clamp),
   the network's jump alone (noise already on the GPU), the jump replayed from a CUDA graph, and the jump under
   bf16 autocast (eager and graph). Goal: <= 1 ms per action at batch 1.

Writes its numbers as JSON to $OUT/gpu_bench.json when $OUT is set (else prints the JSON), after one line per
figure. Without CUDA (and without --device cpu) it fails with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


class BenchError(Exception):
    """A one-line failure of the bench (printed as `error: ...`, exit code 2)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, reps: int, warmup: int = 5) -> dict:
    """Median wall time per call (synchronized before and after each call) and, on CUDA, the median GPU time
    between CUDA events around each call, in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    wall, gpu = [], []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            _sync(device)
            t0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            _sync(device)
            wall.append((time.perf_counter() - t0) * 1e3)
            gpu.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            wall.append((time.perf_counter() - t0) * 1e3)
    out = {"wall_ms": statistics.median(wall), "wall_ms_min": min(wall)}
    if gpu:
        out["gpu_ms"] = statistics.median(gpu)
    return out


def make_data(task: str, n_steps: int) -> None:
    from ractd.data.generate_random import random_locomotion_dataset
    from ractd.tasks import get_task

    if get_task(task).kind != "locomotion":
        raise BenchError(f"{task}: the bench distills a locomotion student (walker2d-medium, hopper-..., ...)")
    random_locomotion_dataset(task, n_steps, 0, scale="tiny")


def stand_ins(root: Path, task: str, preset: str, device: str) -> dict:
    """A teacher and a reward model of the right shapes, trained 2 steps (library, no Ray): their paths."""
    from ractd.train import RunContext, TrainConfig, train

    run = root / "upstream"
    common = dict(task=task, scale="tiny", source="local", run_dir=str(run), batch=16, ckpt_every=2,
                  report_every=2)
    for stage in ("reward", "teacher"):
        kw = dict(preset=preset) if stage == "teacher" else {}
        train(TrainConfig.for_stage(stage, "paper", steps=2, **common, **kw), RunContext(device=device, progress=False))
    return {"teacher_ckpt": str(run / "teacher" / "best.pt"), "reward_ckpt": str(run / "reward" / "best.pt")}


def student_config(root: Path, task: str, preset: str, steps: int, batch: int, upstream: dict, name: str):
    from ractd.train import TrainConfig

    # one checkpoint, at the end (a paper-size checkpoint with its optimizer state is ~3 GB to write and persist);
    # the library's steps/s of its last report interval is the speed after warm-up
    return TrainConfig.for_stage("student", "paper", task=task, scale="tiny", source="local", preset=preset,
                                 steps=steps, batch=batch, warmup=min(500, steps // 2), ckpt_every=steps,
                                 report_every=max(1, steps // 4), select_seeds=0, run_dir=str(root / name),
                                 **upstream)


def in_process_speed(root: Path, cfg, device: str, steps: int) -> float:
    """Distillation steps/s in this process (the library's loop, no Ray) after one warm-up step."""
    from ractd.train import RunContext, train

    marks = []
    ctx = RunContext(device=device, progress=False, on_step=lambda s: (_sync(torch.device(device)),
                                                                         marks.append(time.perf_counter())))
    train(replace(cfg, steps=steps + 1, ckpt_every=steps + 1, report_every=steps + 1,
                  run_dir=str(root / "calibrate")), ctx)
    return steps / (marks[-1] - marks[0])


def ray_distill(cfg, use_gpu: bool) -> dict:
    import ray

    from ractd_ray.train import RayTrainConfig, ensure_ray, fit_stage

    ensure_ray(num_cpus=max(2, os.cpu_count() or 2), **({"num_gpus": 1} if use_gpu else {}))
    try:
        out = fit_stage(cfg, RayTrainConfig(num_workers=1, use_gpu=use_gpu, cpus_per_worker=1, progress=False,
                                            stage_lines=False, storage_path=str(Path(cfg.run_dir) / "ray"),
                                            name="gpu-bench"))
    finally:
        ray.shutdown()
    return {"steps": out["step"], "steps_per_s": out["metrics"]["steps_per_s"], "train_time_s": out["train_time_s"],
            "fit_time_s": out["fit_time_s"], "peak_gpu_bytes": out.get("max_memory_allocated"),
            "best": out["best"] if Path(out["best"]).is_file() else str(Path(cfg.run_dir) / "student" / "best.pt")}


def latency(best: str, device: torch.device, batches: list[int], reps: int) -> dict:
    """Per-call and per-action latency of the distilled student (see the module doc, 4.)."""
    from ractd import edm
    from ractd.policy import student_sampler
    from ractd.train import load_stage_model

    student, cfg, ck = load_stage_model(Path(best))
    student = student.to(device)
    shape_tail = tuple(ck["shapes"]["x"])
    out = {"params": sum(p.numel() for p in student.parameters())}
    for b in batches:
        cond = torch.randn(b, ck["shapes"]["cond"], device=device)
        gens = [torch.Generator().manual_seed(i) for i in range(b)]
        sampler = student_sampler(student, shape_tail)
        x_T = torch.randn(b, *shape_tail, device=device) * edm.SIGMA_MAX
        t = torch.full((b,), edm.SIGMA_MAX, device=device)
        s = torch.full((b,), student.sigma_min, device=device)

        def jump():
            with torch.inference_mode():
                return student(x_T, t, s, cond).clamp(-1.0, 1.0)

        def jump_bf16():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                return student(x_T, t, s, cond).float().clamp(-1.0, 1.0)

        row = {"policy": time_calls(lambda: sampler(cond, gens), device, reps),
               "jump": time_calls(jump, device, reps), "jump_bf16": time_calls(jump_bf16, device, reps)}
        if device.type == "cuda":
            for name, fn in (("graph", jump), ("graph_bf16", jump_bf16)):
                try:
                    row[name] = time_calls(cuda_graph(fn, device), device, reps)
                except Exception as e:  # a graph that cannot be captured is a result, not a crash
                    row[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
        for r in row.values():
            if "wall_ms" in r:
                r["per_action_ms"] = r["wall_ms"] / b
        out[f"batch{b}"] = row
    return out


def cuda_graph(fn, device: torch.device):
    """fn (no arguments, fixed input tensors) captured into a CUDA graph: returns its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run(args) -> dict:
    from ractd.tasks import get_task

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, or "
                         "--device cpu --tiny for the CPU smoke run")
    task = get_task(args.task)
    preset = "tiny" if args.tiny else task.paper_preset
    from ractd.train import BUDGETS

    batch = args.batch or (64 if args.tiny else BUDGETS["paper"]["student"]["batch"])
    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="ractd-gpu-bench-"))
    os.environ["RACTD_CACHE_DIR"] = str(root / "cache")
    result = {"task": task.name, "preset": preset, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "data": "random-action dataset of the task's env, 3000 steps (generated)"}
    try:
        make_data(task.name, 1000 if args.tiny else 3000)
        upstream = stand_ins(root, task.name, preset, str(device))
        probe = student_config(root, task.name, preset, 4, batch, upstream, "probe")
        while True:  # the largest batch up to the requested one that fits the GPU's memory
            try:
                speed = in_process_speed(root, replace(probe, batch=batch), str(device), args.probe_steps)
                break
            except torch.cuda.OutOfMemoryError:
                if batch <= 64:
                    raise BenchError("out of GPU memory even at batch 64") from None
                batch //= 2
                result["batch_reduced"] = True
                torch.cuda.empty_cache()
        steps = max(8, min(args.steps, int(speed * args.train_budget_s)))
        result.update(batch=batch, in_process_steps_per_s=speed, steps_requested=args.steps)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ray_out = ray_distill(student_config(root, task.name, preset, steps, batch, upstream, "ray"),
                              use_gpu=device.type == "cuda")
        result["ray_worker"] = {k: v for k, v in ray_out.items() if k != "best"}
        result["latency"] = latency(ray_out["best"], device, [1, 100], args.reps)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - t_start
    return result


def summary_lines(r: dict) -> list[str]:
    w = r["ray_worker"]
    peak = w.get("peak_gpu_bytes")
    lines = [f"student {r['preset']} ({r['latency']['params'] / 1e6:.1f} M parameters) on {r['gpu'] or r['device']}, "
             f"batch {r['batch']}: in-process {r['in_process_steps_per_s']:.2f} steps/s; one Ray Train worker "
             f"{w['steps_per_s']:.2f} steps/s over {w['steps']} steps (training {w['train_time_s']:.1f} s, fit "
             f"{w['fit_time_s']:.1f} s), peak GPU memory "
             + (f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a (CPU)")]
    for b in (1, 100):
        row = r["latency"][f"batch{b}"]
        cells = []
        for name, v in row.items():
            if "error" in v:
                cells.append(f"{name} failed ({v['error']})")
            else:
                gpu = f", GPU {v['gpu_ms']:.3f} ms" if "gpu_ms" in v else ""
                cells.append(f"{name} {v['wall_ms']:.3f} ms/call = {v['per_action_ms']:.4f} ms/action{gpu}")
        lines.append(f"batch {b}: " + "; ".join(cells))
    best1 = min(v["per_action_ms"] for v in r["latency"]["batch1"].values() if "per_action_ms" in v)
    lines.append(f"fastest per-action latency at batch 1: {best1:.3f} ms (goal <= 1 ms: "
                 f"{'met' if best1 <= 1.0 else 'not met'}); whole bench {r['wall_s']:.0f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="walker2d-medium", help="a locomotion task (its paper_preset is the size)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the smoke run)")
    p.add_argument("--tiny", action="store_true", help="the tiny preset, batch 64: a toy-size run of the same path")
    p.add_argument("--steps", type=int, default=300, help="distillation steps with Ray Train (at most what fits "
                                                          "into --train-budget-s at the in-process speed)")
    p.add_argument("--batch", type=int, default=0, help="global batch (0 = the paper budget's student batch, 4800; "
                                                        "halved until it fits the GPU's memory)")
    p.add_argument("--train-budget-s", type=float, default=180.0, help="seconds of distillation at most")
    p.add_argument("--probe-steps", type=int, default=3, help="in-process steps timed to size the Ray run")
    p.add_argument("--reps", type=int, default=50, help="timed calls per latency figure (median)")
    args = p.parse_args(argv)
    try:
        r = run(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(r):
        print(line)
    text = json.dumps(r, indent=2, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else v)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_bench.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
