"""Inference benchmark (not a test): the one-step student policy per execution mode, and 100-seed rollouts
with env stepping overlapped with inference. Everything is measured in one run and printed side by side.

    python bench/bench_inference.py [--sizes small,paper] [--threads 2] [--seeds 100] [--steps 1000]
                                    [--skip-latency] [--skip-rollout]

1. Latency of one policy call obs -> action chunk (normalize, one student jump G(x_T, sigma_max,
   sigma_min) from given noise, clamp, unnormalize), hopper shapes (obs 11, action 3, horizon 16),
   U-Net presets small ([64,128,256]) and paper (UNET_PRESETS["mujoco"], [512,1024,2048]), random weights,
   batch 1 and 100. Modes:
     eager        ctm.sample_student on the ConditionalUnet1D, torch.inference_mode (the project's baseline)
     eager-fused  the export graph run by torch: FusedUnet with the student's two fixed times folded into
                  the FiLM bias, all FiLM Linears one matrix product (ractd.export.build_policy_graph)
     jit          ractd.nets.unet1d.accelerate(net, "jit") (TorchScript-frozen FusedUnet) + sample_student
     ts           the exported TorchScript file (ractd.export, engine torch)
     ov / ort     the exported ONNX file on OpenVINO / ONNX Runtime, fp32
     *-bf16       the same in bf16 (torch: to_precision; OpenVINO: INFERENCE_PRECISION_HINT bf16)
   Timing: the modes take turns for --rounds rounds and each keeps its best round (see interleaved()).
   Printed: ms per call, ms per action (batch 100), each mode / eager, and max |action - eager action| on the
   same noise (fp32 modes: rounding only; bf16: the behavioural cost).
0. Profile (torch profiler) of one batch-1 U-Net call: op time by kind vs Python/dispatch.
2. Rollouts: --seeds seeds x --steps steps of hopper-medium with the small student (random weights; envs made
   with terminate_when_unhealthy=False so the batch stays full, as in bench_rollout.py): env-steps/s and wall
   time of rollout_locomotion, sequential vs overlapped (thread / process), per engine, against raw
   random-action stepping of the same envs.
3. With --checkpoint (a trained locomotion student): fp32 vs bf16 behaviour -- the distance between their
   first actions on dataset states for the same noise, and the normalized score on --behaviour-seeds seeds
   with its standard error (issue 11: bf16 may become a default only if the score is unchanged within one SEM).

Numbers: none are kept here; run it. The released code's per-call work is measured beside the engines by
bench/bench_engine.py (its "released" mode), in the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ractd import ctm, edm
from ractd.config import UNET_PRESETS
from ractd.data.windows import Normalizer
from ractd.export import ExportedPolicy, build_policy_graph, export_graph
from ractd.nets.unet1d import (
    ConditionalUnet1D,
    accelerate,
    count_parameters,
    to_precision,
)
from ractd.timing import time_call

PRESET = {"small": "small", "paper": "mujoco"}
OBS, ACT, H = 11, 3, 16


def interleaved(modes: dict, obs, noise, rounds: int, round_s: float) -> dict:
    """Seconds per call of each mode: the best over `rounds` rounds of the mean per call within a round
    (>= round_s s or 1 call), the modes taking turns round by round, so that load from other processes
    drifting over time hits every mode alike and the minimum approaches the unloaded time."""
    from ractd.timing import best_seconds_per_call

    return best_seconds_per_call({m: (lambda fn=fn: fn(obs, noise)) for m, fn in modes.items()}, rounds, round_s)


def normalizers():
    return Normalizer(-5 * np.ones(OBS), 5 * np.ones(OBS)), Normalizer(-np.ones(ACT), np.ones(ACT))


def student_for(preset: str) -> ctm.Student:
    torch.manual_seed(0)
    return ctm.Student(ConditionalUnet1D(ACT, OBS, UNET_PRESETS[preset], n_times=2)).eval().requires_grad_(False)


def torch_policy_fn(student, on, an):
    """obs (B, 1, OBS), noise -> chunk with sample_student (what ractd.policy's student sampler runs)."""
    def run(obs, noise):
        with torch.inference_mode():
            cond = on.normalize(torch.from_numpy(obs)).reshape(len(obs), -1)
            x = ctm.sample_student(student, torch.from_numpy(noise) * edm.SIGMA_MAX, cond)
            return an.unnormalize(x).numpy()
    return run


def graph_fn(graph):
    def run(obs, noise):
        with torch.inference_mode():
            return graph(torch.from_numpy(obs), torch.from_numpy(noise)).numpy()
    return run


def latency(sizes, threads, tmp: Path, ort_max_batch: int, rounds: int) -> None:
    torch.set_num_threads(threads)
    meta = {"task": "hopper-medium", "kind": "locomotion", "k": 1, "obs_dim": OBS, "horizon": H, "dim": ACT}
    print(f"\n1. one-step student policy call, {threads} threads (torch / OpenVINO / ONNX Runtime)")
    print(f"{'size':6} {'params':>7} {'mode':12} {'batch':>5} {'ms/call':>9} {'ms/action':>10} "
          f"{'vs eager':>9} {'max|diff|':>9}")
    for size in sizes:
        on, an = normalizers()
        student = student_for(PRESET[size])
        t0 = time.perf_counter()
        graph = build_policy_graph(student, on, an, init_scaled=True)
        onnx_path = export_graph(graph, meta, tmp / f"{size}.onnx", "onnx")
        ts_path = export_graph(graph, meta, tmp / f"{size}.ts", "torchscript")
        ts16_path = export_graph(graph, meta, tmp / f"{size}-bf16.ts", "torchscript", precision="bf16")
        export_s = time.perf_counter() - t0
        jit_student = ctm.Student(accelerate(student.net, "jit", horizon=H))
        bf16_student = to_precision(student_for(PRESET[size]), "bf16")
        modes = {
            "eager": torch_policy_fn(student, on, an),
            "eager-fused": graph_fn(graph),
            "jit": torch_policy_fn(jit_student, on, an),
            "ts": ExportedPolicy(ts_path, threads=threads).act,
            "ov": ExportedPolicy(onnx_path, "openvino", threads=threads).act,
            "ort": ExportedPolicy(onnx_path, "onnxruntime", threads=threads).act,
            "eager-bf16": torch_policy_fn(bf16_student, on, an),
            "ts-bf16": ExportedPolicy(ts16_path, threads=threads).act,
            "ov-bf16": ExportedPolicy(onnx_path, "openvino", "bf16", threads=threads).act,
        }
        print(f"# {size}: exported ONNX {onnx_path.stat().st_size / 1e6:.0f} MB, TorchScript "
              f"{ts_path.stat().st_size / 1e6:.0f} MB, bf16 TorchScript {ts16_path.stat().st_size / 1e6:.0f} MB "
              f"in {export_s:.1f} s", flush=True)
        for batch in (1, 100):
            rng = np.random.default_rng(0)
            obs = rng.uniform(-3, 3, (batch, 1, OBS)).astype(np.float32)
            noise = rng.standard_normal((batch, H, ACT)).astype(np.float32)
            ref = modes["eager"](obs, noise)
            live = {m: fn for m, fn in modes.items()
                    if not (m == "ort" and batch > ort_max_batch and size == "paper")}
            diffs = {m: float(np.abs(fn(obs, noise) - ref).max()) for m, fn in live.items()}  # also warms up
            slow = size == "paper" and batch > 1  # seconds per call: fewer rounds
            best = interleaved(live, obs, noise, 2 if slow else rounds, round_s=0.5 if size == "small" else 1.5)
            for mode, s in best.items():
                print(f"{size:6} {count_parameters(student) / 1e6:6.1f}M {mode:12} {batch:5d} {s * 1e3:9.2f} "
                      f"{s * 1e3 / batch:10.3f} {s / best['eager']:9.2f} {diffs[mode]:9.1e}", flush=True)
        del modes, graph, jit_student, bf16_student, student


# ---------------------------------------------------------------------------------------------- profile

CATEGORIES = (("conv", ("conv", "mkldnn_convolution")), ("group_norm", ("group_norm",)), ("mish", ("mish",)),
              ("linear", ("addmm", "mm", "linear", "matmul")))


def profile_batch1(size: str, reps: int = 30) -> None:
    """Where the time of one batch-1 U-Net call goes, by the torch profiler: op self time per category and
    the rest of the wall time (Python and op dispatch between the ops), for eager, FusedUnet and jit."""
    from torch.profiler import ProfilerActivity, profile

    from ractd.nets.unet1d import FusedUnet

    torch.set_num_threads(1)
    student = student_for(PRESET[size])
    net = student.net
    x, c = torch.randn(1, H, ACT), torch.randn(1, OBS)
    t, s = torch.full((1,), 1000.0), torch.full((1,), -900.0)
    fixed = FusedUnet(net, (1000.0, -900.0))
    jit = accelerate(net, "jit", horizon=H)
    calls = {"eager": lambda: net(x, (t, s), c), "fused": lambda: fixed(x, c), "jit": lambda: jit(x, (t, s), c)}
    print(f"\n0. profile of one {size} U-Net call at batch 1, 1 thread: ms of op self time by kind (profiled, so "
          f"inflated by the profiler); 'other' = wall time not inside any op (Python, dispatch), 0 when the "
          f"profiler's overhead exceeds it; op calls counts nested aten calls")
    print(f"{'mode':6} {'wall ms':>8} " + " ".join(f"{k:>10}" for k, _ in CATEGORIES) + f" {'other ops':>10} "
          f"{'other':>7} {'op calls':>8}")
    for mode, fn in calls.items():
        with torch.inference_mode():
            for _ in range(5):
                fn()
            wall = time_call(fn, min_time=1.0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(reps):
                    fn()
        events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::", "prepacked::"))]
        total = sum(e.self_cpu_time_total for e in events) / reps / 1e3
        cat = {k: 0.0 for k, _ in CATEGORIES}
        n_ops = 0
        for e in events:
            name = e.key.split("::")[1]
            for k, keys in CATEGORIES:
                if any(key in name for key in keys):
                    cat[k] += e.self_cpu_time_total / reps / 1e3
                    break
            n_ops += e.count
        others = total - sum(cat.values())
        print(f"{mode:6} {wall * 1e3:8.2f} " + " ".join(f"{v:10.2f}" for v in cat.values())
              + f" {others:10.2f} {max(0.0, wall * 1e3 - total):7.2f} {n_ops // reps:8d}", flush=True)


# ---------------------------------------------------------------------------------------------- rollouts

def raw_steps_per_s(task, n, steps, env_kwargs) -> float:
    from ractd.rollout import make_env

    envs = [make_env(task, steps, **env_kwargs) for _ in range(n)]
    for i, e in enumerate(envs):
        e.reset(seed=i)
    acts = np.random.default_rng(0).uniform(-1, 1, size=(steps, n, ACT))
    t0 = time.perf_counter()
    for t in range(steps):
        for i, e in enumerate(envs):
            e.step(acts[t, i])
    dt = time.perf_counter() - t0
    for e in envs:
        e.close()
    return n * steps / dt


def rollout_policy(kind: str, path: Path, student, threads: int):
    from ractd.policy import LocomotionPolicy, student_sampler

    if kind in ("ov", "ort"):
        return ExportedPolicy(path, {"ov": "openvino", "ort": "onnxruntime"}[kind], threads=threads).rollout_policy()
    net = accelerate(student.net, "jit", horizon=H) if kind == "jit" else student.net
    on, an = normalizers()
    return LocomotionPolicy(student_sampler(ctm.Student(net), (H, ACT)), on, an)


def rollouts(seeds: int, steps: int, configs: list[str], tmp: Path) -> None:
    from ractd.rollout import rollout_locomotion

    task = "hopper-medium"
    env_kwargs = {"terminate_when_unhealthy": False}
    student = student_for("small")
    on, an = normalizers()
    meta = {"task": task, "kind": "locomotion", "k": 1, "obs_dim": OBS, "horizon": H, "dim": ACT}
    path = export_graph(build_policy_graph(student, on, an), meta, tmp / "rollout.onnx")
    torch.set_num_threads(1)
    raw = raw_steps_per_s(task, seeds, steps, env_kwargs)
    print(f"\n2. rollouts: {seeds} seeds x {steps} steps of {task}, small student (random weights), full batch")
    print(f"raw env stepping (random actions, one core): {raw:8.0f} env-steps/s, {seeds * steps / raw:6.1f} s")
    print(f"{'engine':6} {'overlap':8} {'threads':>7} {'env-steps/s':>12} {'of raw':>7} {'wall s':>8} "
          f"{'policy ms/step':>14}")
    for config in configs:
        kind, overlap, threads = config.split(":")
        threads = int(threads)
        torch.set_num_threads(threads)
        policy = rollout_policy(kind, path, student, threads)
        t0 = time.perf_counter()
        recs = rollout_locomotion(task, policy, list(range(seeds)), max_steps=steps, progress=False,
                                  overlap=False if overlap == "none" else overlap, env_kwargs=env_kwargs)
        wall = time.perf_counter() - t0
        total = sum(r["length"] for r in recs)
        per_step = float(np.mean([r["time_per_action"] for r in recs]))
        print(f"{kind:6} {overlap:8} {threads:7d} {total / wall:12.0f} {total / wall / raw:7.2f} {wall:8.1f} "
              f"{per_step * 1e3:14.1f}", flush=True)
    torch.set_num_threads(1)
    print(f"raw env stepping again at the end: {raw_steps_per_s(task, seeds, steps, env_kwargs):8.0f} env-steps/s "
          f"(load drift)")


# ---------------------------------------------------------------------------------------------- behaviour

def behaviour(checkpoint: str, seeds: int, tmp: Path, threads: int) -> None:
    """fp32 vs bf16 (OpenVINO) of a trained locomotion student: action distance on dataset states (same noise)
    and the normalized score on `seeds` seeds, each with its standard error."""
    from ractd.data.d4rl import load_dataset
    from ractd.export import export_checkpoint
    from ractd.rollout import rollout_locomotion, summarize
    from ractd.train import load_stage_model

    _, cfg, _ = load_stage_model(Path(checkpoint))
    path = export_checkpoint(checkpoint, tmp / "behaviour.onnx")
    fp32 = ExportedPolicy(path, "openvino", "fp32", threads=threads)
    bf16 = ExportedPolicy(path, "openvino", "bf16", threads=threads)
    if fp32.meta["kind"] != "locomotion":
        print(f"\n3. behaviour: {checkpoint} is a maze planner; this measures locomotion students")
        return
    data = load_dataset(cfg.task, source=cfg.source, scale=cfg.scale)
    rng = np.random.default_rng(0)
    states = np.asarray(data["observations"], np.float32)[rng.choice(len(data["observations"]), 2000)]
    obs = np.repeat(states[:, None], fp32.k, axis=1)  # an episode start's padded history
    noise = rng.standard_normal((len(obs), fp32.horizon, fp32.dim)).astype(np.float32)
    a32, a16 = fp32.act(obs, noise)[:, 0], bf16.act(obs, noise)[:, 0]
    d = np.linalg.norm(a32 - a16, axis=1)
    print(f"\n3. behaviour of {checkpoint} ({cfg.task}), fp32 vs bf16 on OpenVINO")
    print(f"first action on {len(obs)} dataset states, same noise: ||a_fp32 - a_bf16|| mean {d.mean():.4f}, "
          f"95th pct {np.quantile(d, 0.95):.4f}, max {d.max():.4f} (||a_fp32|| mean "
          f"{np.linalg.norm(a32, axis=1).mean():.3f})")
    scores = {}
    for name, ex in (("fp32", fp32), ("bf16", bf16)):
        recs = rollout_locomotion(cfg.task, ex.rollout_policy(), list(range(seeds)), progress=False)
        scores[name] = np.array([r["normalized_score"] for r in recs])
        summ = summarize(recs)
        print(f"{name}: normalized score {summ['score_mean']:.1f} +- {summ['score_sem']:.1f} (SEM, {seeds} seeds)")
    diff = scores["bf16"] - scores["fp32"]
    print(f"paired difference bf16 - fp32: {diff.mean():.2f} +- {diff.std(ddof=1) / np.sqrt(len(diff)):.2f} (SEM)")


# torch with 2 threads on a 2-CPU machine that others also load slows down several-fold (OpenMP spin-waits),
# hence one network thread by default; add e.g. ov:none:2 on a quiet machine.
DEFAULT_ROLLOUTS = "ov:none:1,ov:thread:1,ov:process:1,jit:none:1,jit:thread:1,jit:process:1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,paper")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for the latency table")
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--rollouts", default=DEFAULT_ROLLOUTS,
                    help="comma list of engine:overlap:threads, engine in eager|jit|ov|ort, overlap none|thread|process")
    ap.add_argument("--ort-max-batch", type=int, default=1,
                    help="skip ONNX Runtime above this batch at paper size (it takes ~9 s per call at 100)")
    ap.add_argument("--rounds", type=int, default=5, help="latency: interleaved rounds per mode (best kept)")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-rollout", action="store_true")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--checkpoint", default="", help="a trained locomotion student: also measure fp32 vs bf16 "
                    "behaviour (action distance on dataset states, score on --behaviour-seeds seeds)")
    ap.add_argument("--behaviour-seeds", type=int, default=100)
    args = ap.parse_args()
    import onnxruntime
    import openvino

    print(f"torch {torch.__version__}, OpenVINO {openvino.__version__}, ONNX Runtime {onnxruntime.__version__}; "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_profile:
            for size in args.sizes.split(","):
                profile_batch1(size)
        if not args.skip_latency:
            latency(args.sizes.split(","), args.threads, Path(tmp), args.ort_max_batch, args.rounds)
        if not args.skip_rollout:
            rollouts(args.seeds, args.steps, args.rollouts.split(","), Path(tmp))
        if args.checkpoint:
            behaviour(args.checkpoint, args.behaviour_seeds, Path(tmp), threads=1)
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
