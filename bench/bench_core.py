"""Core latency benchmark: one U-Net evaluation and full Heun-80 sampling (158 NFE), batch 1 and 100,
small ([64,128,256]) and paper ([512,1024,2048]) sizes, hopper shapes (horizon 16, action 3, obs 11).

Execution modes compared on the same weights and inputs (max abs difference to eager is printed):
  eager      torch.no_grad()
  inference  torch.inference_mode()
  jit        ractd.nets.unet1d.accelerate(net, "jit"): TorchScript trace + freeze + optimize_for_inference
  compiled   torch.compile(net) under inference_mode (inductor, C++ codegen on CPU)
The Heun/forward ratio is compared with its limit, the NFE count 158 (sampler overhead makes it larger).

Usage: python bench/bench_core.py [--threads 2] [--sizes small,paper] [--full]   (--full also times paper-size
Heun at batch 100, about 2-3 minutes on 2 CPUs; otherwise that cell is extrapolated and marked "~").
"""

from __future__ import annotations

import argparse

import torch

from ractd import edm
from ractd.config import UNET_PRESETS
from ractd.nets.unet1d import ConditionalUnet1D, accelerate, count_parameters
from ractd.timing import time_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="small,paper")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sigmas = edm.karras_sigmas()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'size':6} {'params':>8} {'mode':10} {'batch':>5} {'forward ms':>11} {'heun80 s':>10} {'ratio':>7} "
          f"{'of 158':>7} {'max|diff|':>10}")
    for size in args.sizes.split(","):
        preset = {"small": "small", "paper": "mujoco"}[size]
        net = ConditionalUnet1D(3, 11, UNET_PRESETS[preset]).eval()
        den = edm.Denoiser(net)
        modes = {"eager": (net, torch.no_grad), "inference": (net, torch.inference_mode),
                 "jit": (accelerate(net, "jit"), torch.inference_mode)}
        if not args.no_compile:
            modes["compiled"] = (torch.compile(net, dynamic=False), torch.inference_mode)
        for batch in (1, 100):
            x = torch.randn(batch, 16, 3)
            cond = torch.randn(batch, 11)
            t = torch.full((batch,), 10.0)
            with torch.no_grad():
                ref = net(x, (t,), cond)
            for mode, (fn, ctx) in modes.items():
                den.net = fn
                with ctx():
                    out = fn(x, (t,), cond)
                    diff = (out - ref).abs().max().item()
                    fwd = time_call(lambda: fn(x, (t,), cond), min_time=1.0 if size == "small" else 2.0)
                    x_T = edm.prior_sample((batch, 16, 3))
                    sample = lambda: edm.sample_heun(den.bind(cond), x_T, sigmas)
                    exact = size == "small" or batch == 1 or args.full
                    heun = time_call(sample, min_time=0.0, max_calls=3 if size == "small" else 1, warmup=1) if exact \
                        else 158 * fwd * 1.02
                den.net = net
                ratio = heun / fwd
                mark = "" if exact else "~"
                print(f"{size:6} {count_parameters(net) / 1e6:7.1f}M {mode:10} {batch:5d} {fwd * 1e3:11.2f} "
                      f"{mark}{heun:9.3f} {ratio:7.1f} {158 / ratio:7.1%} {diff:10.1e}", flush=True)
    print("reference (released code, 2 threads): small 3.2 ms / 0.53 s, paper 67 ms / 10.3 s at batch 1")


if __name__ == "__main__":
    main()
