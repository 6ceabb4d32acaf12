"""Benchmark of the evaluation path's engines (ractd.engine; issue 17), every ratio measured within one run.

    python bench/bench_engine.py [--sizes small,paper] [--threads 1,2] [--teacher-batches 1,100]
                                 [--rounds 3] [--skip-student] [--skip-teacher]

1. The one-step student's policy call obs -> action chunk (hopper shapes: obs 11, action 3, horizon 16; random
   weights; U-Net presets small [64,128,256] and paper [512,1024,2048]) at batch 1 and 100, with 1 and 2
   threads. Modes, each from the same noise:
     released   a released-code-style call: Chi et al.'s U-Net applies Mish + Linear of the conditioning in every
                FiLM block and embeds the times on every call (our reconstruction of its per-call work on our
                weights)
     eager      ractd's library path: ctm.sample_student on the ConditionalUnet1D (engine none)
     exported   the exported ONNX policy on OpenVINO fp32 (ractd.export; what issue 17's table measured)
     fp32       ractd.policy.student_sampler(engine=EngineConfig(precision="fp32")) -- folded times, the engine
                chosen by the calibration for the bucket (printed), calibration done before timing (cached)
     bf16       the same with precision bf16 (gemm-bf16 / OpenVINO bf16 among the candidates)
   The default path is the one EngineConfig()'s precision resolves to on this CPU (auto: bf16 with AMX-BF16;
   marked "<- default"). Printed: ms per call, each mode / released, and max |mode - eager| (fp32: rounding;
   bf16: its rounding, whose effect on scores the study ractd_repro.studies.bf16_scores measures).
2. The teacher's evaluation per env step: Heun-80 (158 U-Net calls), DDIM-10 and DDPM-100 policies on the small
   U-Net at the given live batches: the library path (engine none: today's) vs the engine path at fp32 and at
   bf16, seconds per env step (one sampler call for the whole batch) and after / before.

Timing: modes take turns for --rounds rounds, each keeps its best round (bench_inference.interleaved), so load
drifting over the run hits all modes alike; paper size at batch 100 takes seconds per call and uses 2 rounds of
1 call per mode (stated in the output). The default run takes about 10 minutes on the 2-CPU machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_inference import (
    ACT,
    OBS,
    PRESET,
    H,
    interleaved,
    normalizers,
    student_for,
)

from ractd import ctm, ddpm, edm
from ractd.config import UNET_PRESETS
from ractd.engine import EngineConfig, resolve_precision
from ractd.export import ExportedPolicy, build_policy_graph, export_graph
from ractd.nets.unet1d import ConditionalUnet1D
from ractd.policy import ddim_sampler, ddpm_sampler, heun_sampler


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


def layer_forms(record: dict) -> str:
    """The layers engine's forms in a calibration record, counted: ' (layers: 12 winograd, 5 exp, ...)'."""
    forms = list((record.get("layers") or {}).values())
    if not forms:
        return ""
    return " (layers: " + ", ".join(f"{forms.count(f)} {f}" for f in sorted(set(forms))) + "; the rest native)"


def student_table(sizes, threads_list, rounds, tmp: Path) -> None:
    print("\n1. one-step student policy call (hopper shapes), ms per call and ratios; calibration before timing")
    default = resolve_precision(EngineConfig().precision)
    print(f"default precision on this CPU: {default} (EngineConfig().precision = {EngineConfig().precision!r})")
    print(f"{'size':6} {'batch':>5} {'thr':>3} {'released':>9} {'eager':>9} {'exported':>9} {'fp32':>9} {'bf16':>9} "
          f"{'fp32 engine':14} {'bf16 engine':14} {'eager/rel':>9} {'expo/rel':>9} {'fp32/rel':>9} {'bf16/rel':>9} "
          f"{'|fp32-eager|':>12} {'|bf16-eager|':>12}")
    meta = {"task": "hopper-medium", "kind": "locomotion", "k": 1, "obs_dim": OBS, "horizon": H, "dim": ACT}
    for size in sizes:
        on, an = normalizers()
        student = student_for(PRESET[size])
        onnx_path = export_graph(build_policy_graph(student, on, an), meta, tmp / f"{size}.onnx")
        released = released_style(student)
        for threads in threads_list:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            fast32, path32 = default_fn(student, on, an, EngineConfig(threads=threads, precision="fp32"))
            fast16, path16 = default_fn(student, on, an, EngineConfig(threads=threads, precision="bf16"))
            modes = {"released": policy_fn(lambda x, c: ctm.sample_student(released, x, c), on, an),
                     "eager": policy_fn(lambda x, c: ctm.sample_student(student, x, c), on, an),
                     "exported": ExportedPolicy(onnx_path, "openvino", threads=threads).act,
                     "fp32": path32, "bf16": path16}
            for batch in (1, 100):
                rng = np.random.default_rng(0)
                obs = rng.uniform(-3, 3, (batch, 1, OBS)).astype(np.float32)
                noise = rng.standard_normal((batch, H, ACT)).astype(np.float32)
                t1 = time.perf_counter()
                chosen32 = fast32.folded.selector.choice(batch)  # calibrates (or reads the cache) outside the timing
                chosen16 = fast16.folded.selector.choice(batch)
                calib_s = time.perf_counter() - t1
                ref = modes["eager"](obs, noise)
                d32 = float(np.abs(modes["fp32"](obs, noise) - ref).max())
                d16 = float(np.abs(modes["bf16"](obs, noise) - ref).max())
                for fn in modes.values():
                    fn(obs, noise)  # warm-up
                slow = size == "paper" and batch > 1
                best = interleaved(modes, obs, noise, 2 if slow else rounds,
                                   round_s=0.0 if slow else (0.3 if size == "small" else 1.0))
                r = best["released"]
                mark = {"fp32": "", "bf16": ""}
                mark[default] = "*"
                print(f"{size:6} {batch:5d} {threads:3d} " + " ".join(f"{best[m] * 1e3:9.2f}" for m in modes)
                      + f" {chosen32:14} {chosen16:14} {best['eager'] / r:9.2f} {best['exported'] / r:9.2f}"
                      f" {best['fp32'] / r:8.2f}{mark['fp32'] or ' '} {best['bf16'] / r:8.2f}{mark['bf16'] or ' '}"
                      f" {d32:12.1e} {d16:12.1e}"
                      + ("   (2 rounds of 1 call)" if slow else "")
                      + (f"   (calibrated in {calib_s:.1f} s)" if calib_s > 0.5 else ""), flush=True)
            for label, fast in (("fp32", fast32), ("bf16", fast16)):
                print(f"# {size}, {threads} threads, {label}: calibration ms per bucket (best; worst): "
                      + "; ".join(f"b{b}: {rec['ms']}; {rec.get('worst_ms')}{layer_forms(rec)}"
                                  for b, rec in sorted(fast.folded.selector.measured.items())), flush=True)
            print(f"# {size}, {threads} threads: set up in {time.perf_counter() - t0:.1f} s including calibration "
                  f"(* = the default path)", flush=True)
            del modes, fast32, fast16, path32, path16


def teacher_table(batches, threads_list, rounds, samplers) -> None:
    print("\n2. the teacher's evaluation per env step (one sampler call for the live batch), small U-Net, hopper "
          "shapes: today's library path (engine none) vs the default engine path")
    print(f"{'sampler':9} {'calls':>5} {'batch':>5} {'thr':>3} {'before s':>9} {'fp32 s':>9} {'bf16 s':>9} "
          f"{'fp32/before':>11} {'bf16/before':>11} {'fp32 engine':14} {'bf16 engine':14} {'|fp32-before|':>13} "
          f"{'|bf16-before|':>13}")
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
            before = build(None)
            after = {p: build(EngineConfig(threads=threads, precision=p)) for p in ("fp32", "bf16")}
            for batch in batches:
                cond = torch.randn(batch, OBS, generator=torch.Generator().manual_seed(batch))
                gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]
                ref = before(cond, gens())
                diff = {p: float((a(cond, gens()) - ref).abs().max()) for p, a in after.items()}  # also calibrates
                modes = {"before": lambda o, n: before(cond, gens()),
                         **{p: (lambda o, n, a=a: a(cond, gens())) for p, a in after.items()}}
                best = interleaved(modes, None, None, rounds, round_s=0.0 if batch > 10 else 0.5)
                chosen = {p: a.folded.selector.choice(batch) for p, a in after.items()}
                print(f"{name:9} {calls:5d} {batch:5d} {threads:3d} {best['before']:9.3f} {best['fp32']:9.3f} "
                      f"{best['bf16']:9.3f} {best['fp32'] / best['before']:11.2f} {best['bf16'] / best['before']:11.2f}"
                      f" {chosen['fp32']:14} {chosen['bf16']:14} {diff['fp32']:13.1e} {diff['bf16']:13.1e}",
                      flush=True)


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
