"""How a training step runs on this machine: chosen once when a stage is set up (TrainConfig.accel and
TrainConfig.autocast), recorded in its checkpoint's config, and exact up to float rounding unless bf16 is chosen.

The layers' forms and their calibrations live in ractd.accel_layers (their names are importable from here).

Why. A training step is the U-Net's forward and backward passes plus the optimizer and EMA updates over every
parameter. On CPU torch's default AdamW loops over the parameters one tensor at a time, several memory passes
each, a large share of the step at the paper's U-Net size (248 M parameters); and the U-Net's convolutions on
short horizons (16, 8, 4) and wide channels run far from the machine's matrix-product speed as oneDNN
convolutions, where the same convolution as one matrix product (im2col) does not (ractd.nets.gemm says the same
for inference). Which is faster depends on the layer's width and on the CPU, so it is measured per layer, as
ractd.engine measures its engines. bench/bench_training.py prints every figure.

What a step uses (`Plan`, from `plan_for`):

    optimizer   AdamW / Adam in torch's fused implementation where torch has one for the device (one pass over
                the parameters), else foreach; the same update as the for-loop reference up to float rounding
    EMA         ema <- lerp(ema, model, 1 - decay) over all parameters at once (torch._foreach_lerp_)
    grad norm   the total gradient norm for the non-finite guard, read without clip_grad_norm_'s scaling pass
    convs       accel "gemm": each Conv1d / ConvTranspose1d of the U-Nets runs as a matrix product (autograd
                through im2col) where `calibrate_convs` measured that form faster than the native convolution,
                separately for calls with gradients (forward + backward) and without (the frozen teacher, the
                student's stop-gradient target); "eager": native convolutions; "compile": native convolutions,
                the U-Nets compiled by torch.compile (inductor) -- it pays only after many steps: its
                compilation takes minutes on CPU (bench/bench_training.py prints the step count where it pays)
    forms       accel "nhwc" (CPU): the U-Nets' activations (batch, channels, 1, horizon) in channels-last memory
                and every convolution as the same 2D one over them (`set_forms`), which oneDNN runs faster than
                its 1D convolutions at these shapes, forward and backward; and, with it or alone, Mish from one
                exp (`mish_exp`: torch's CPU Mish evaluates softplus, log1p and tanh, about twice the time)
    autocast    "bf16": the forward pass under torch.autocast(bfloat16) (fp32 weights, optimizer and EMA;
                bf16 matrix products); "fp32": none. A behavioural change, not a rounding difference.
    student     ractd.ctm.ractd_loss stacks its independent student calls into one network call (always).

Resolution ("auto"). accel auto: "gemm" when the calibration finds a layer faster as a matrix product, else the
forms measured fastest on the whole network (`calibrate_forms`: "nhwc" when that layout wins, the Mish form
recorded beside it), else "eager"; never "compile" on its own (its compilation time is minutes, measured by the
bench, not guessed here); on CUDA "eager" (cuDNN) -- "compile" when asked. autocast auto: bf16 on a CUDA
device that supports it and on a CPU that multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16), fp32 elsewhere.
On CUDA TF32 matrix products are allowed with autocast bf16 (the fp32 parts that remain). The resolved names go
into the checkpoint's config; `Plan.record()` (the optimizer, the GEMM layers, the forms, the calibrations) into
its meta.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Iterable

import torch
from torch import nn

from ractd import RactdError
from ractd.accel_layers import (  # noqa: F401 -- the layer forms' names, used through ractd.accel
    CALIBRATE_MAX_ROWS, FORMS, LAYOUTS, MARGIN, MISH_FORMS, _conv_inputs, _gemm_call, _MishExp, autocast_context,
    calibrate_convs, calibrate_forms, conv1d_gemm, conv_impls, conv_transpose1d_gemm, forms, mish_exp, native_convs,
    set_conv_impls, set_forms)
from ractd.engine import cpu_flags
from ractd.timing import seconds_per_call

log = logging.getLogger(__name__)

ACCELS = ("auto", "eager", "gemm", "nhwc", "compile")
AUTOCASTS = ("auto", "fp32", "bf16")
OPTIMIZER_IMPLS = ("fused", "foreach", "for-loop")


# ---------------------------------------------------------------------------------------------- resolution

def bf16_hardware(device: torch.device | str) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a CUDA device with bf16 support, or a CPU with
    AMX-BF16 or AVX512-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False  # not measured on other devices: fp32
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_autocast(autocast: str, device: torch.device | str) -> str:
    """fp32 / bf16 as given; auto: bf16 where the device multiplies bf16 in hardware (`bf16_hardware`), else fp32."""
    if autocast not in AUTOCASTS:
        raise RactdError(f"autocast={autocast!r}: expected one of {', '.join(AUTOCASTS)}")
    if autocast != "auto":
        return autocast
    return "bf16" if bf16_hardware(device) else "fp32"


def optimizer_impl(device: torch.device | str) -> str:
    """"fused" where torch has a fused AdamW for `device` (CPU and CUDA in torch >= 2.4), else "foreach"."""
    device = torch.device(device)
    try:
        p = torch.zeros(1, device=device, requires_grad=True)
        torch.optim.AdamW([p], fused=True)
        return "fused"
    except (RuntimeError, TypeError, ValueError):
        return "foreach"


def set_optimizer_impl(opt: torch.optim.Optimizer, impl: str) -> torch.optim.Optimizer:
    """Run `opt` (Adam / AdamW) as `impl`: fused, foreach or for-loop (torch's CPU default). Called after the
    optimizer is built and again after `load_state_dict`, which restores the saved groups' own flags. The
    update is the same up to float rounding; the state (step, moments) is the same state."""
    if impl not in OPTIMIZER_IMPLS:
        raise RactdError(f"unknown optimizer implementation {impl!r}; expected one of {', '.join(OPTIMIZER_IMPLS)}")
    for group in opt.param_groups:
        group["fused"] = True if impl == "fused" else None
        group["foreach"] = impl == "foreach"
    if impl == "fused":  # what the constructor sets with fused=True (the step's state dtype follows the flag)
        opt._step_supports_amp_scaling = True
    return opt


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, foreach: bool = True) -> None:
    """ema <- decay * ema + (1 - decay) * model over the parameters and floating buffers: one foreach lerp
    (foreach=False: the per-tensor loop, the reference)."""
    pairs = list(zip(ema.parameters(), model.parameters()))
    pairs += [(b_ema, b) for b_ema, b in zip(ema.buffers(), model.buffers()) if b.is_floating_point()]
    if not pairs:
        return
    if foreach:
        torch._foreach_lerp_([a for a, _ in pairs], [b for _, b in pairs], 1.0 - decay)
    else:
        for a, b in pairs:
            a.lerp_(b, 1.0 - decay)


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The total 2-norm of the gradients (as clip_grad_norm_(params, inf) returns it, without its pass that
    scales every gradient by 1)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)


# ---------------------------------------------------------------------------------------------- the plan

@dataclasses.dataclass
class Plan:
    """How a stage's steps run (see the module doc): accel and autocast are the resolved names written into the
    checkpoint's config; the rest goes into its meta (`record`)."""

    accel: str = "eager"
    autocast: str = "fp32"
    optimizer: str = "for-loop"
    gemm_layers: dict[str, tuple[bool, bool]] = dataclasses.field(default_factory=dict)
    calibration: list[dict] = dataclasses.field(default_factory=list)
    setup_s: float = 0.0
    layout: str = "ncl"
    mish: str = "native"
    forms_calibration: dict = dataclasses.field(default_factory=dict)

    def context(self, device):
        """The forward pass's context (autocast)."""
        return autocast_context(self.autocast, device)

    def record(self) -> dict:
        return {"accel": self.accel, "autocast": self.autocast, "optimizer": self.optimizer,
                "gemm_layers": {k: list(v) for k, v in sorted(self.gemm_layers.items())},
                "calibration": self.calibration, "setup_s": round(self.setup_s, 3), "layout": self.layout,
                "mish": self.mish, "forms_calibration": self.forms_calibration}


def _u_nets(*models: nn.Module | None) -> list[nn.Module]:
    """The ConditionalUnet1D inside each model (Denoiser / Student / EpsModel .net), skipping the others."""
    from ractd.nets.unet1d import ConditionalUnet1D

    return [m.net for m in models if m is not None and isinstance(getattr(m, "net", None), ConditionalUnet1D)]


def unet_example(net: nn.Module, batch: int, horizon: int, device) -> tuple:
    """Zero inputs (x, times, cond) of a U-Net call at `batch` rows."""
    x = torch.zeros(batch, horizon, net.input_dim, device=device)
    times = tuple(torch.ones(batch, device=device) for _ in range(net.n_times))
    cond = torch.zeros(batch, net.global_cond_dim, device=device) if net.global_cond_dim else None
    return x, times, cond


def plan_for(accel: str, autocast: str, model: nn.Module, teacher: nn.Module | None, batch: int, horizon: int,
             device) -> Plan:
    """Resolve `accel` and `autocast` for training `model` (the frozen `teacher` called without gradients, if
    any) at `batch` rows, and apply the choice to the networks (GEMM layers; torch.compile; TF32 on CUDA with
    bf16). The optimizer implementation is `optimizer_impl(device)`; the caller builds the optimizer with it."""
    if accel not in ACCELS:
        raise RactdError(f"accel={accel!r}: expected one of {', '.join(ACCELS)}")
    t0 = time.perf_counter()
    device = torch.device(device)
    requested = accel
    plan = Plan(autocast=resolve_autocast(autocast, device), optimizer=optimizer_impl(device))
    nets = _u_nets(model, teacher)
    if accel == "auto":
        accel = "gemm" if device.type == "cpu" and nets else "eager"
    if accel == "gemm" and nets and device.type == "cpu":
        # the model's own net is measured; the teacher's layers have the same shapes (only its time input differs)
        example = unet_example(nets[0], batch, horizon, device)
        choice, plan.calibration = calibrate_convs(nets[0], example, plan.autocast)
        if any(g for g, _ in choice.values()) and not confirm(nets[0], example, choice, plan.autocast,
                                                               plan.calibration):
            choice = {}
        for net in nets:
            set_conv_impls(net, choice if net is nets[0] else {k: (False, v[1]) for k, v in choice.items()})
        plan.gemm_layers = choice
        accel = "gemm" if choice else "eager"
    elif accel == "gemm":
        accel = "eager"  # the GEMM form is for CPUs; cuDNN is the GPU's convolution
    if accel in ("eager", "nhwc") and requested in ("auto", "nhwc") and nets and device.type == "cpu":
        # no GEMM layer chosen: the U-Net forms (channels-last 2D convolutions, Mish from one exp), auto: as
        # measured on the whole network; an explicit "nhwc" takes both unmeasured
        layout, mish = "nhwc", "exp"
        if requested == "auto":
            example = unet_example(nets[0], batch, horizon, device)
            (layout, mish), plan.forms_calibration = calibrate_forms(nets[0], example, plan.autocast)
        for net in nets:
            set_forms(net, layout, mish)
        plan.layout, plan.mish = layout, mish
        accel = "nhwc" if layout == "nhwc" else "eager"
    elif accel == "nhwc":
        accel = "eager"  # a CPU form; cuDNN is the GPU's convolution
    if accel == "compile":
        for net in nets:
            net.compile(dynamic=False)
    if device.type == "cuda" and plan.autocast == "bf16":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    plan.accel = accel
    plan.setup_s = time.perf_counter() - t0
    return plan


def confirm(net: nn.Module, example: tuple, choice: dict, precision: str, record: list | None = None,
            margin: float = MARGIN) -> bool:
    """Whether the whole network's forward + backward at the example's rows (at most CALIBRATE_MAX_ROWS) with the
    layers of `choice` as GEMMs is faster than with native convolutions: its slowest round <= margin x the native
    one's best (the layer measurements add up only if the layers keep their speed inside the network). Appends
    what it measured to `record`."""
    x, times, cond = example
    rows = min(x.shape[0], CALIBRATE_MAX_ROWS)
    x = torch.randn((rows, *x.shape[1:]), generator=torch.Generator(device=x.device).manual_seed(1), device=x.device)
    times = tuple(t[:rows] * 3 for t in times)
    cond = None if cond is None else cond[:rows]
    params = [p for p in net.parameters() if p.requires_grad]

    def step(gemm: bool):
        def run():
            set_conv_impls(net, choice if gemm else {})
            with autocast_context(precision, x.device):
                out = net(x, times, cond)
            torch.autograd.grad(out.float().square().mean(), params)
        return run

    t0 = time.perf_counter()
    step(False)()
    rounds = 3 if time.perf_counter() - t0 < 1.0 else 2
    best, worst = seconds_per_call({"native": step(False), "gemm": step(True)}, rounds, 0.2, warmup=1)
    set_conv_impls(net, {})
    ok = worst["gemm"] <= margin * best["native"]
    if record is not None:
        record.append({"network": True, "rows": rows, "grad_ms": {k: round(v * 1e3, 3) for k, v in best.items()},
                       "worst_ms": {k: round(v * 1e3, 3) for k, v in worst.items()}, "confirmed": ok})
    return ok


def compile_pays_after(compile_s: float, eager_s: float, compiled_s: float) -> float:
    """Steps after which compiling (compile_s seconds once) has paid for itself at the measured step times;
    inf when the compiled step is not faster."""
    gain = eager_s - compiled_s
    return compile_s / gain if gain > 0 else math.inf
