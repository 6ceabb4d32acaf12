"""Benchmark of the evaluation path's engines (ractd.engine; issue 17), every ratio measured within one run.

    python bench/bench_engine.py [--sizes small,paper] [--threads 1,2] [--teacher-batches 1,100]
                                 [--rounds 3] [--skip-student] [--skip-teacher]

1. The one-step student's policy call obs -> action chunk (hopper shapes: obs 11, action 3, horizon 16; random
   weights; U-Net presets small [64,128,256] and paper [512,1024,2048]) at batch 1 and 100, with 1 and 2
   threads. Modes, each from the same noise:
     released   a released-code-style call: Chi et al.'s U-Net applies Mish + Linear of the conditioning in every
                FiLM block and embeds the times on every call (our reconstruction of its per-call work on our
                weights; the issue measured our eager at 0.93-1.03x the released code itself)
     eager      ractd's library path: ctm.sample_student on the ConditionalUnet1D (engine none)
     exported   the exported ONNX policy on OpenVINO fp32 (ractd.export; what issue 17's table measured)
     default    the new default: ractd.policy.student_sampler(engine=EngineConfig()) -- folded times, the engine
                chosen by the calibration for the bucket (printed), calibration done before timing (cached)
   Printed: ms per call, each mode / released and / eager, and max |default - eager| (fp32: rounding).
2. The teacher's evaluation per env step: Heun-80 (158 U-Net calls), DDIM-10 and DDPM-100 policies on the small
   U-Net at the given live batches: the library path (engine none: today's) vs the default engine path, seconds
   per env step (one sampler call for the whole batch) and after / before.

Timing: modes take turns for --rounds rounds, each keeps its best round (bench_inference.interleaved), so load
drifting over the run hits all modes alike; paper size at batch 100 takes seconds per call and uses 1 round of
1 call per mode (stated in the output). The default run takes about 10 minutes on the 2-CPU machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import ACT, H, OBS, PRESET, RELEASED_MS, interleaved, normalizers, student_for  # noqa: E402

from ractd import ctm, ddpm, edm  # noqa: E402
from ractd.config import UNET_PRESETS  # noqa: E402
from ractd.engine import EngineConfig, bucket  # noqa: E402
from ractd.export import ExportedPolicy, build_policy_graph, export_graph  # noqa: E402
from ractd.nets.unet1d import ConditionalUnet1D  # noqa: E402
from ractd.policy import ddim_sampler, ddpm_sampler, heun_sampler, student_sampler  # noqa: E402


def released_style(student: ctm.Student):
    """G(x_T, sigma_max, sigma_min) with the released code's per-call work: time embedding of both times, and in
    every FiLM block its own Mish + Linear of concat(emb(t), emb(s), cond) (Chi et al.'s cond_encoder)."""
    net = student.net
    blocks = net.film_blocks()

    def F(x, times, cond):
        c = torch.cat([net.time_embed(t) for t in times] + [cond], dim=-1)
        return net.body(x, [b.film(c) for b in blocks])

    class Released(torch.nn.Module):
        def forward(self, x, times, cond):
            return F(x, times, cond)

    return ctm.Student(Released(), student.sigma_data, student.sigma_min, student.scalings)


def policy_fn(sample_fn, on, an):
    """obs (B, 1, OBS), noise (B, H, ACT) -> unnormalized chunk through sample_fn(x_T, cond)."""
    def run(obs, noise):
        with torch.inference_mode():
            cond = on.normalize(torch.from_numpy(obs)).reshape(len(obs), -1)
            return an.unnormalize(sample_fn(torch.from_numpy(noise) * edm.SIGMA_MAX, cond)).numpy()
    return run


def default_fn(student, on, an, engine_cfg):
    """The default engine path: the student sampler's FastStudent, fed the given noise (as the rollouts' samplers
    draw it per row)."""
    from ractd.engine import FastStudent

    fast = FastStudent(student, H, [(edm.SIGMA_MAX, student.sigma_min)], engine_cfg)
    return fast, policy_fn(lambda x, c: ctm.sample_student(fast.bind(c), x, c), on, an)


def student_table(sizes, threads_list, rounds, tmp: Path) -> None:
    print("\n1. one-step student policy call (hopper shapes), ms per call and ratios; calibration before timing")
    print(f"{'size':6} {'batch':>5} {'thr':>3} {'released':>9} {'eager':>9} {'exported':>9} {'default':>9} "
          f"{'engine':12} {'eager/rel':>9} {'expo/rel':>9} {'dflt/rel':>9} {'dflt/eager':>10} {'max|diff|':>9} "
          f"{'rel quoted':>10}")
    meta = {"task": "hopper-medium", "kind": "locomotion", "k": 1, "obs_dim": OBS, "horizon": H, "dim": ACT}
    for size in sizes:
        on, an = normalizers()
        student = student_for(PRESET[size])
        onnx_path = export_graph(build_policy_graph(student, on, an), meta, tmp / f"{size}.onnx")
        released = released_style(student)
        for threads in threads_list:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            fast, default = default_fn(student, on, an, EngineConfig(threads=threads))
            modes = {"released": policy_fn(lambda x, c: ctm.sample_student(released, x, c), on, an),
                     "eager": policy_fn(lambda x, c: ctm.sample_student(student, x, c), on, an),
                     "exported": ExportedPolicy(onnx_path, "openvino", threads=threads).act,
                     "default": default}
            for batch in (1, 100):
                rng = np.random.default_rng(0)
                obs = rng.uniform(-3, 3, (batch, 1, OBS)).astype(np.float32)
                noise = rng.standard_normal((batch, H, ACT)).astype(np.float32)
                t1 = time.perf_counter()
                chosen = fast.folded.selector.choice(batch)  # calibrates (or reads the cache) outside the timing
                calib_s = time.perf_counter() - t1
                ref = modes["eager"](obs, noise)
                diff = float(np.abs(modes["default"](obs, noise) - ref).max())
                for fn in modes.values():
                    fn(obs, noise)  # warm-up
                slow = size == "paper" and batch > 1
                best = interleaved(modes, obs, noise, 1 if slow else rounds,
                                   round_s=0.0 if slow else (0.3 if size == "small" else 1.0))
                r = best["released"]
                quoted = f"{best['default'] * 1e3 / RELEASED_MS[size]:10.2f}" if batch == 1 and threads == 2 else ""
                print(f"{size:6} {batch:5d} {threads:3d} " + " ".join(f"{best[m] * 1e3:9.2f}" for m in modes)
                      + f" {chosen:12} {best['eager'] / r:9.2f} {best['exported'] / r:9.2f} {best['default'] / r:9.2f}"
                      f" {best['default'] / best['eager']:10.2f} {diff:9.1e} {quoted:>10}"
                      + ("   (1 round of 1 call)" if slow else "")
                      + (f"   (calibrated in {calib_s:.1f} s)" if calib_s > 0.5 else ""), flush=True)
            print(f"# {size}, {threads} threads: engine set up in {time.perf_counter() - t0:.1f} s including "
                  f"calibration; measured ms per bucket: "
                  + "; ".join(f"b{b}: {rec['ms']}" for b, rec in sorted(fast.folded.selector.measured.items())),
                  flush=True)
            del modes, fast, default


def teacher_table(batches, threads_list, rounds, samplers) -> None:
    print("\n2. the teacher's evaluation per env step (one sampler call for the live batch), small U-Net, hopper "
          "shapes: today's library path (engine none) vs the default engine path")
    print(f"{'sampler':9} {'calls':>5} {'batch':>5} {'thr':>3} {'before s':>9} {'after s':>9} {'after/before':>12} "
          f"{'engine':12} {'max|diff|':>9}")
    torch.manual_seed(0)
    net = ConditionalUnet1D(ACT, OBS, UNET_PRESETS["small"], n_times=1).eval().requires_grad_(False)
    teacher, eps_model = edm.Denoiser(net).eval(), ddpm.EpsModel(net).eval()
    builders = {"heun-80": (lambda e: heun_sampler(teacher, (H, ACT), 80, engine=e), 158),
                "ddim-10": (lambda e: ddim_sampler(eps_model, (H, ACT), 10, engine=e), 10),
                "ddpm-100": (lambda e: ddpm_sampler(eps_model, (H, ACT), 100, engine=e), 100)}
    for name in samplers:
        build, calls = builders[name]
        for threads in threads_list:
            torch.set_num_threads(threads)
            cfg = EngineConfig(threads=threads)
            before, after = build(None), build(cfg)
            for batch in batches:
                cond = torch.randn(batch, OBS, generator=torch.Generator().manual_seed(batch))
                gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]  # noqa: E731
                diff = float((after(cond, gens()) - before(cond, gens())).abs().max())  # also calibrates + warms
                modes = {"before": lambda o, n: before(cond, gens()), "after": lambda o, n: after(cond, gens())}
                best = interleaved(modes, None, None, rounds, round_s=0.0 if batch > 10 else 0.5)
                chosen = after.folded.selector.choice(batch)
                print(f"{name:9} {calls:5d} {batch:5d} {threads:3d} {best['before']:9.3f} {best['after']:9.3f} "
                      f"{best['after'] / best['before']:12.2f} {chosen:12} {diff:9.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,paper")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--teacher-batches", default="1,100")
    ap.add_argument("--teacher-samplers", default="heun-80,ddim-10,ddpm-100")
    ap.add_argument("--teacher-threads", default="1,2")
    ap.add_argument("--skip-student", action="store_true")
    ap.add_argument("--skip-teacher", action="store_true")
    args = ap.parse_args()
    import openvino

    from ractd.engine import calibration_path

    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, OpenVINO {openvino.__version__}; {os.cpu_count()} CPUs; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; calibration cache {calibration_path()}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_student:
            student_table(args.sizes.split(","), [int(t) for t in args.threads.split(",")], args.rounds, Path(tmp))
        if not args.skip_teacher:
            teacher_table([int(b) for b in args.teacher_batches.split(",")],
                          [int(t) for t in args.teacher_threads.split(",")], args.rounds,
                          args.teacher_samplers.split(","))
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}; "
          f"{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
