"""Training speed of the library's stages against the released code's training step, every ratio measured within
one run (issue 28).

    python bench/bench_training.py [--stages teacher,reward,student,bc] [--sizes cpu,paper] [--threads 2]
                                   [--modes released,before,eager,nhwc,auto] [--compile] [--rounds 3]
                                   [--paper-rounds 2] [--paper-batch 64] [--reward-variant one_step|ctm]
                                   [--loop-steps 40] [--skip-steps] [--skip-loop] [--profile] [--clock wall|cpu]

1. One optimizer step per stage (teacher, reward, student with its teacher calls and the reward model, bc) and
   U-Net size: "cpu" (the task's CPU preset at the CPU budget's batch) and "paper" (the paper's U-Net, teacher and
   student only, at --paper-batch rows: the paper budget's batches are for GPUs), on hopper shapes (obs 11,
   action 3, horizon 16) with random weights and a synthetic D4RL-format dataset. Modes, on the same weights
   (one model, optimizer and EMA shared by the modes, so the paper size fits in memory):
     released  a reconstruction of the released code's step on our modules (bench/released_training.py): its
               DataLoader of per-sample windows, its loss as it computes it (per-sample Python loops of its CTM time
               sampling, elementwise pseudo-Huber, the target network as a separate copy), Chi et al.'s U-Net call
               pattern (Mish + Linear of the conditioning in every FiLM block), torch's for-loop AdamW, its EMA
               (diffusion_policy's EMAModel: a Python loop over modules and parameters); reward: its horizon-1
               windows; bc: CORL's step (the project's BC recipe)
     before    the project's step before issue 28: for-loop AdamW, clip_grad_norm_, a per-tensor EMA loop, the
               student's network calls one by one, native convolutions, fp32
     eager     ractd.train's step with accel "eager": fused optimizer, foreach EMA, the gradient norm without a
               scaling pass, the student's calls stacked
     nhwc      accel "nhwc": the U-Nets in channels-last memory with 2D convolutions and Mish from one exp
               (ractd.accel.set_forms), fp32
     auto      TrainConfig's defaults (accel auto, autocast auto) as resolved on this machine (printed: the
               convolution layers run as matrix products, the U-Net forms and the precision)
     bf16      (--modes) accel auto under autocast bf16 (without bf16 hardware the products are emulated)
     compile   (--compile; cpu size) accel "compile": printed with its compilation time (from an empty inductor
               cache, as a machine's first run) and the step count after which it pays (accel.compile_pays_after)
   The student's default reward term (a_hat from one step from x_T, the paper's form) costs one more network
   call with gradients than the released code's (the first action of a prediction it already has);
   --reward-variant ctm measures the project's step with the released form.
   Printed: ms per step, each mode / released and / before; the data windows' share of a step.
2. The real loop: ractd.train.train per stage at the CPU preset for --loop-steps steps (data windows, EMA,
   checkpoints every half, reports; student without rollout selection), steps per second from its first step to
   its end, and its set-up time (data, models, the accel calibration).

Timing: ractd.timing.seconds_per_call, the modes taking turns round by round, each keeping its best round; the
paper size runs --paper-rounds rounds of one step per mode. The machine's load is printed at the start and the
end: compare ratios within one run, not times across runs. On a machine busy with other work, --threads 1
--clock cpu times the step's own work (CPU seconds of this process; wall seconds otherwise).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from released_training import ReleasedCase

import ractd.train as T
from ractd import accel, ctm, edm
from ractd.nets.unet1d import count_parameters, load_teacher_into_student
from ractd.timing import seconds_per_call, time_call

TASK = "hopper-medium-replay"
MODES = ("released", "before", "eager", "nhwc", "auto", "bf16", "compile")


def synthetic_data(n: int = 20_000, episode: int = 1000, seed: int = 0) -> dict:
    """A D4RL-format hopper dataset of random numbers (speed does not depend on the values)."""
    rng = np.random.default_rng(seed)
    timeouts = np.zeros(n, bool)
    timeouts[episode - 1::episode] = True
    return {"observations": rng.standard_normal((n, 11)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, 3)).astype(np.float32),
            "rewards": rng.uniform(0, 1, n).astype(np.float32),
            "terminals": np.zeros(n, bool), "timeouts": timeouts}


def make_run(stage: str, size: str, batch: int, data: dict, run_dir: str, reward_variant: str = "one_step") -> T._Run:
    """A ractd.train run of `stage` at `size` (U-Net preset "cpu" | "paper") on `data`, random weights; the student
    gets a random teacher (warm start) and a random reward model. Its plan is "eager" until a mode sets it."""
    distill = dataclasses.replace(T.TrainConfig.distill, reward_variant=reward_variant)
    cfg = T.TrainConfig.for_stage(stage, "cpu", task=TASK, preset=size, batch=batch, run_dir=run_dir,
                                  accel="eager", autocast="fp32", distill=distill).resolved()
    prep = T.prepare(cfg, data)
    torch.manual_seed(0)
    model = T.BUILDERS[stage](cfg, prep)
    teacher = reward_model = None
    if stage == "student":
        teacher = T.build_teacher(cfg, prep).eval().requires_grad_(False)
        load_teacher_into_student(model.net, teacher.net)
        if cfg.distill.sigma > 0:
            reward_model = T.build_reward(cfg, prep).eval().requires_grad_(False)
    ema = copy.deepcopy(model).requires_grad_(False) if stage == "teacher" else None
    opt, sched = T._optimizer(cfg, model)
    plan = accel.Plan(accel="eager", autocast="fp32", optimizer=accel.optimizer_impl("cpu"))
    train_idx, val_idx = T._split(cfg, prep)
    return T._Run(cfg, T.RunContext(progress=False), prep, torch.device("cpu"), model, opt, sched,
                  torch.Generator().manual_seed(0), train_idx, val_idx, ema, teacher, reward_model, None, plan)


def before_step(run: T._Run) -> None:
    """The project's step before issue 28 (ractd.train._step as it was): for-loop AdamW, clip_grad_norm_ for the
    norm, the per-tensor EMA loop, the student's network calls one after another."""
    cfg = run.cfg
    idx = run.train_idx[torch.randint(0, len(run.train_idx), (cfg.batch,), generator=run.gen).numpy()]
    if cfg.stage == "student":
        p = run.prep
        terms = ctm.ractd_loss(run.model, run.teacher, run.reward_model, T._to_torch(p.x, idx, "cpu"),
                               T._to_torch(p.cond, idx, "cpu"), T._to_torch(p.state, idx, "cpu"), cfg.distill,
                               None, batched=False)
    else:
        terms = T._loss_terms(cfg, run.model, run.teacher, run.reward_model, run.prep, idx, run.device)
    run.opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), math.inf))
    if not (math.isfinite(grad_norm) and math.isfinite(float(terms["loss"].detach()))):
        raise RuntimeError("non-finite loss in the benchmark")
    run.opt.step()
    run.sched.step()
    run.step += 1
    if run.ema is not None:
        T.ema_update(run.ema, run.model, T.ema_decay_at(run.step, cfg.ema_decay, cfg.ema_power), foreach=False)


class Modes:
    """The modes' step functions on one shared run: each sets the networks' convolution forms, the optimizer's
    implementation and the plan before its step."""

    def __init__(self, run: T._Run, data: dict, modes: list[str], compile_run: T._Run | None):
        self.run = run
        self.nets = accel._u_nets(run.model, run.teacher)
        self.fused = accel.optimizer_impl("cpu")
        self.plans = {"eager": accel.Plan("eager", "fp32", self.fused)}
        self.choices = {"eager": {}}
        for name, acc, autocast in (("nhwc", "nhwc", "fp32"), ("auto", "auto", "auto"), ("bf16", "auto", "bf16")):
            if name in modes:
                for net in self.nets:  # each plan starts from the networks as built
                    accel.set_forms(net)
                    accel.set_conv_impls(net, {})
                self.plans[name] = accel.plan_for(acc, autocast, run.model, run.teacher, run.cfg.batch,
                                                  run.prep.shape_tail[0], "cpu")
                self.choices[name] = self.plans[name].gemm_layers
        self._use({}, "for-loop", self.plans["eager"])
        self.released = ReleasedCase(run, data) if "released" in modes else None
        self.compile_run = compile_run

    def _use(self, choice: dict, impl: str, plan: accel.Plan) -> None:
        for net in self.nets:
            accel.set_forms(net)  # native first: GEMM layers and the nhwc layout exclude each other
            accel.set_conv_impls(net, choice if net is self.nets[0] else {k: (False, v[1]) for k, v in choice.items()})
            accel.set_forms(net, plan.layout, plan.mish)
        accel.set_optimizer_impl(self.run.opt, impl)
        self.run.plan = plan

    def step(self, mode: str):
        run = self.run
        if mode == "released":
            self._use({}, "for-loop", self.plans["eager"])
            return self.released.step
        if mode == "before":
            self._use({}, "for-loop", self.plans["eager"])
            return lambda: before_step(run)
        if mode == "compile":
            return lambda: T._step(self.compile_run)
        self._use(self.choices[mode], self.plans[mode].optimizer, self.plans[mode])
        return lambda: T._step(run)

    def fns(self, modes: list[str]) -> dict:
        """{mode: a step of it}; the mode's settings are applied when the mode changes (outside its steps but the
        first after a change, the same for every mode)."""
        current = {"mode": None, "fn": None}

        def bound(mode):
            def call():
                if current["mode"] != mode:
                    current["mode"], current["fn"] = mode, self.step(mode)
                current["fn"]()
            return call
        return {m: bound(m) for m in modes}


def data_ms(run: T._Run) -> float:
    """ms of the step's data part: the batch's window indices and their rows as tensors."""
    p, cfg = run.prep, run.cfg

    def draw():
        idx = run.train_idx[torch.randint(0, len(run.train_idx), (cfg.batch,), generator=run.gen).numpy()]
        arrays = (p.state, p.action, p.rtg) if cfg.stage == "reward" else (p.x, p.cond, p.state)
        return [T._to_torch(a, idx, "cpu") for a in arrays if a is not None]

    return time_call(draw, min_time=0.3) * 1e3


def step_cell(stage: str, size: str, batch: int, data: dict, modes: list[str], rounds: int, round_s: float,
              do_compile: bool, tmp: str, reward_variant: str) -> None:
    t0 = time.perf_counter()
    run = make_run(stage, size, batch, data, tmp, reward_variant)
    compile_run, compile_s = None, None
    if do_compile and run.model.__class__.__name__ in ("Denoiser", "Student"):
        compile_run = make_run(stage, size, batch, data, tmp, reward_variant)
        compile_run.plan = accel.plan_for("compile", "fp32", compile_run.model, compile_run.teacher, batch,
                                          run.prep.shape_tail[0], "cpu")
        accel.set_optimizer_impl(compile_run.opt, compile_run.plan.optimizer)
        t1 = time.perf_counter()
        T._step(compile_run)
        T._step(compile_run)  # the second step compiles no more (the first compiled every graph the step meets)
        compile_s = time.perf_counter() - t1
    active = [m for m in modes if m != "compile" or compile_run is not None]
    bench = Modes(run, data, active, compile_run)
    setup_s = time.perf_counter() - t0
    best, worst = seconds_per_call(bench.fns(active), rounds, round_s, warmup=1)
    rel, before = best.get("released"), best.get("before")
    n_params = count_parameters(run.model)
    for m in active:
        ratio = f"{best[m] / rel:10.2f}" if rel else f"{'':10}"
        ratio_b = f"{best[m] / before:9.2f}" if before else f"{'':9}"
        print(f"{stage:8} {size:6} {n_params / 1e6:7.1f}M {batch:6d} {m:9} {best[m] * 1e3:10.1f} "
              f"{worst[m] * 1e3:10.1f} {ratio} {ratio_b}", flush=True)
    if "auto" in bench.plans:
        p = bench.plans["auto"]
        print(f"#   auto here: accel {p.accel}, autocast {p.autocast}, {p.optimizer} optimizer, "
              f"{len(p.gemm_layers)} of the U-Nets' convolution layers as matrix products, layout {p.layout}, "
              f"Mish {p.mish} (calibrated in {p.setup_s:.1f} s)", flush=True)
        if p.forms_calibration:
            f = p.forms_calibration
            print(f"#   U-Net forms, whole network forward + backward at {f['rows']} rows, ms (best): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in f["best_ms"].items()), flush=True)
    if compile_s is not None and "eager" in best:
        pays = accel.compile_pays_after(compile_s - 2 * best["compile"], best["eager"], best["compile"])
        print(f"#   compile: first two steps {compile_s:.1f} s; pays after "
              f"{'never' if math.isinf(pays) else f'{pays:.0f} steps'} at these step times", flush=True)
    d = data_ms(run)
    ref = best.get("auto", best.get("eager"))
    if ref:
        print(f"#   data windows: {d:.2f} ms per step ({d / (ref * 1e3):.1%} of the auto step); set up in "
              f"{setup_s:.1f} s", flush=True)


def steps_table(args, data: dict, tmp: str) -> None:
    print(f"\n1. one optimizer step, ms (best and worst round), each mode / released and / before; "
          f"{args.threads} threads")
    print(f"{'stage':8} {'size':6} {'params':>8} {'batch':>6} {'mode':9} {'ms/step':>10} {'worst ms':>10} "
          f"{'/released':>10} {'/before':>9}")
    modes = [m for m in args.modes.split(",") if m] + (["compile"] if args.compile else [])
    for size in args.sizes.split(","):
        for stage in args.stages.split(","):
            if size == "paper" and stage not in ("teacher", "student"):
                continue
            batch = args.paper_batch if size == "paper" else T.BUDGETS["cpu"][stage]["batch"]
            rounds, round_s = (args.paper_rounds, 0.0) if size == "paper" else (args.rounds, 1.0)
            n = len([m for m in modes if m != "compile" or (size == "cpu" and stage in ("teacher", "student"))])
            print(f"# {stage} at {size} size, batch {batch}: {n} modes x {rounds} rounds ...", flush=True)
            step_cell(stage, size, batch, data, modes, rounds, round_s, args.compile and size == "cpu", tmp,
                      args.reward_variant)
            torch.manual_seed(0)


def loop_table(args, data: dict, tmp: str) -> None:
    print(f"\n2. the real loop (ractd.train.train, CPU preset, {args.loop_steps} steps, checkpoints every "
          f"{max(1, args.loop_steps // 2)}): steps per second from its first step to its end")
    print(f"{'stage':8} {'accel':8} {'autocast':8} {'setup s':>8} {'steps/s':>8} {'ms/step':>8}")
    run_dir = str(Path(tmp) / "loop")
    order = [s for s in ("reward", "teacher", "student", "bc") if s in args.stages.split(",")]
    if "student" in order:
        order = [s for s in ("reward", "teacher") if s not in order] + order
    for stage in order:
        cfg = T.TrainConfig.for_stage(stage, "cpu", task=TASK, run_dir=run_dir, steps=args.loop_steps,
                                      ckpt_every=max(1, args.loop_steps // 2), report_every=10, select_seeds=0)
        stamps = {}
        t0 = time.perf_counter()
        out = T.train(cfg, T.RunContext(progress=False, on_step=lambda s: stamps.setdefault(s, time.perf_counter())),
                      data=data)
        end = time.perf_counter()
        ck = torch.load(out["checkpoint"], weights_only=False)
        rate = (args.loop_steps - 1) / (end - stamps[1]) if args.loop_steps > 1 else float("nan")
        print(f"{stage:8} {ck['config']['accel']:8} {ck['config']['autocast']:8} {stamps[1] - t0:8.1f} "
              f"{rate:8.2f} {1e3 / rate:8.1f}", flush=True)


def profile(data: dict, tmp: str) -> None:
    """torch.profiler's top operators of the teacher's and the student's auto step (cpu size)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    for stage in ("teacher", "student"):
        run = make_run(stage, "cpu", T.BUDGETS["cpu"][stage]["batch"], data, tmp)
        bench = Modes(run, data, ["auto"], None)
        step = bench.step("auto")
        step()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(3):
                step()
        print(f"\n# profile: {stage} step (auto), 3 steps")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="teacher,reward,student,bc")
    ap.add_argument("--sizes", default="cpu,paper")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="released,before,eager,nhwc,auto", help=f"among {', '.join(MODES[:-1])}")
    ap.add_argument("--compile", action="store_true", help="also accel compile at the cpu size (minutes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--paper-rounds", type=int, default=2)
    ap.add_argument("--paper-batch", type=int, default=64)
    ap.add_argument("--reward-variant", choices=("one_step", "ctm"), default="one_step",
                    help="the student's a_hat (DistillConfig.reward_variant): one_step (the project's default, one "
                         "more network call with gradients) or ctm (the released code's: no extra call)")
    ap.add_argument("--loop-steps", type=int, default=40)
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: the timer reads this process's CPU seconds (with --threads 1, the step's own work: "
                         "other processes on a busy machine do not count)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        import ractd.timing

        ractd.timing.time = type("CpuClock", (), {"perf_counter": staticmethod(time.process_time)})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RACTD_CACHE_DIR"] = str(Path(tmp) / "cache")  # calibrations measured afresh, shown in set-up
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # compile from cold, as a first run does
        flags = accel.cpu_flags()
        print(f"torch {torch.__version__}; {os.cpu_count()} CPUs, {args.threads} threads, {args.clock} clock; "
              f"bf16 hardware: "
              f"{accel.bf16_hardware('cpu')} (amx_bf16 {'amx_bf16' in flags}, avx512_bf16 {'avx512_bf16' in flags}); "
              f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
        data = synthetic_data()
        if args.profile:
            profile(data, tmp)
        if not args.skip_steps:
            steps_table(args, data, tmp)
        if not args.skip_loop:
            loop_table(args, data, tmp)
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}; "
          f"{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
