"""How a training step runs on this machine: chosen once when a stage is set up (TrainConfig.accel and
TrainConfig.autocast), recorded in its checkpoint's config, and exact up to float rounding unless bf16 is chosen.

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

import contextlib
import dataclasses
import logging
import math
import time
from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ractd import RactdError
from ractd.engine import cpu_flags
from ractd.timing import seconds_per_call

log = logging.getLogger(__name__)

ACCELS = ("auto", "eager", "gemm", "nhwc", "compile")
AUTOCASTS = ("auto", "fp32", "bf16")
OPTIMIZER_IMPLS = ("fused", "foreach", "for-loop")

# A layer with fewer multiply-adds per call than this keeps the native convolution without being measured: its
# share of a step is too small for the choice to matter (and tiny test networks stay deterministic).
CALIBRATE_MIN_MACS = 2**25
# Calibration rows: the step's batch, at most this many (a paper-budget batch of 1024 or 4800 would make each
# layer's measurement take seconds; the matrix products only grow more favourable with more rows).
CALIBRATE_MAX_ROWS = 256
MARGIN = 0.9  # the GEMM form replaces a native convolution only if its slowest round is <= MARGIN x native's best
# A U-Net form (layout, Mish) replaces the native one only if the whole network's best round with it is <=
# FORM_MARGIN x the native network's best. Best against best, not the engines' slowest-against-best: the forms
# compute the same numbers up to rounding (a wrong pick costs time, never a score), and on a machine busy with
# other work the rounds' spread (10-20%) would keep the native form whatever it measured.
FORM_MARGIN = 0.95
FORMS_MIN_MACS = 2**28  # a U-Net of fewer convolution multiply-adds per call keeps the native forms unmeasured
LAYOUTS = ("ncl", "nhwc")
MISH_FORMS = ("native", "exp")


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


def autocast_context(precision: str, device: torch.device | str):
    """The context a step's forward pass runs in: torch.autocast(bfloat16) for "bf16", nothing for "fp32"."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


# ---------------------------------------------------------------------------------------------- GEMM convolutions

def conv1d_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                padding: int) -> torch.Tensor:
    """F.conv1d(x, weight, bias, stride, padding) (groups 1, dilation 1, zero padding) as one matrix product of
    the input windows (im2col) with the weight; differentiable. x (batch, c_in, length)."""
    n, c_in, length = x.shape
    c_out, _, k = weight.shape
    if k == 1 and stride == 1 and padding == 0:
        cols, l_out = x.transpose(1, 2).reshape(n * length, c_in), length
    else:
        if padding:
            x = F.pad(x, (padding, padding))
        win = x.unfold(2, k, stride)                                   # (n, c_in, l_out, k)
        l_out = win.shape[2]
        cols = win.permute(0, 2, 1, 3).reshape(n * l_out, c_in * k)   # column c * k + j: channel c, tap j
    w = weight.reshape(c_out, c_in * k).t()
    y = cols @ w if bias is None else torch.addmm(bias, cols, w)
    return y.reshape(n, l_out, c_out).transpose(1, 2)


def conv_transpose1d_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                          padding: int) -> torch.Tensor:
    """F.conv_transpose1d(x, weight, bias, stride, padding) (groups 1, dilation 1, no output padding) as one
    matrix product (every input position times every tap) and the taps' overlap-add; differentiable."""
    n, c_in, length = x.shape
    _, c_out, k = weight.shape
    y = x.transpose(1, 2).reshape(n * length, c_in) @ weight.permute(0, 2, 1).reshape(c_in, k * c_out)
    y = y.reshape(n, length, k, c_out)
    full_len = (length - 1) * stride + k
    full = y.new_zeros(n, full_len, c_out)
    for j in range(k):  # input position i, tap j -> output position i * stride + j
        idx = torch.arange(j, j + (length - 1) * stride + 1, stride, device=x.device)
        full = full.index_add(1, idx, y[:, :, j])
    out = full[:, padding:full_len - padding]
    if bias is not None:
        out = out + bias
    return out.transpose(1, 2)


def _gemm_supported(m: nn.Module) -> bool:
    return (type(m) in (nn.Conv1d, nn.ConvTranspose1d) and m.groups == 1 and m.dilation == (1,)
            and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
            and getattr(m, "output_padding", (0,)) == (0,))


def _gemm_call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fn = conv1d_gemm if type(m) is nn.Conv1d else conv_transpose1d_gemm
    return fn(x, m.weight, m.bias, m.stride[0], m.padding[0])


class _ConvForward:
    """A conv module's forward as chosen per call kind: the GEMM form with gradients enabled if `grad`, without
    if `nograd`, else the module's own. Set as the instance's `forward` (the module's class, parameters and
    state_dict stay as they are)."""

    def __init__(self, module: nn.Module, grad: bool, nograd: bool):
        self.module, self.grad, self.nograd = module, grad, nograd

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.grad if torch.is_grad_enabled() else self.nograd:
            return _gemm_call(m, x)
        return type(m).forward(m, x)


def set_conv_impls(net: nn.Module, choice: dict[str, tuple[bool, bool]]) -> None:
    """Run the conv layers of `net` named in `choice` ({name: (GEMM with gradients, GEMM without)}) in the GEMM
    form; every other conv layer (and a layer whose pair is (False, False)) runs natively."""
    for name, m in net.named_modules():
        if not _gemm_supported(m):
            continue
        grad, nograd = choice.get(name, (False, False))
        if isinstance(m.__dict__.get("forward"), _Conv2dForward):
            if grad or nograd:
                raise RactdError(f"layer {name} runs in the nhwc layout: GEMM convolutions need the ncl one")
            continue
        m.__dict__.pop("forward", None)
        if grad or nograd:
            m.__dict__["forward"] = _ConvForward(m, grad, nograd)


def conv_impls(net: nn.Module) -> dict[str, tuple[bool, bool]]:
    """The layers of `net` running in the GEMM form: {name: (with gradients, without)}."""
    out = {}
    for name, m in net.named_modules():
        f = m.__dict__.get("forward")
        if isinstance(f, _ConvForward):
            out[name] = (f.grad, f.nograd)
    return out


@contextlib.contextmanager
def native_convs(*models: nn.Module | None):
    """Within: every conv layer of `models` runs natively, in the ncl layout with torch's Mish (evaluation code
    such as ractd.engine exports or copies the network and expects its own modules); the GEMM choices and the
    forms are restored after."""
    saved = [(m, conv_impls(m), forms(m)) for m in models if m is not None]
    for m, _, _ in saved:
        set_forms(m)
        set_conv_impls(m, {})
    try:
        yield
    finally:
        for m, choice, form in saved:
            set_conv_impls(m, choice)
            set_forms(m, *form)


# ---------------------------------------------------------------------------------------------- CPU forms

class _MishExp(torch.autograd.Function):
    """Mish(x) = x tanh(softplus(x)) from one exp (torch's CPU Mish evaluates softplus, log1p and tanh: about 2x
    the time of this form, forward and backward, on a (256, 64, 16) activation). With n = e^x:
    tanh(softplus(x)) = ((1 + n)^2 - 1) / ((1 + n)^2 + 1) = n (n + 2) / (n (n + 2) + 2), and
    d Mish / dx = tanh(softplus(x)) + x sigmoid(x) (1 - tanh(softplus(x))^2) with sigmoid(x) = n / (n + 1).
    x is clamped at 20 inside the exp: there tanh(softplus(x)) is 1 in float32 (Mish(x) = x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n, tsp = _mish_terms(x)
        ctx.save_for_backward(x, n, tsp)
        return x * tsp

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, n, tsp = ctx.saved_tensors
        d = tsp * tsp
        return d.neg_().add_(1.0).mul_(n / (n + 1.0)).mul_(x).add_(tsp).mul_(grad)


def _mish_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e^min(x, 20), tanh(softplus(x)))."""
    n = torch.exp(torch.clamp(x, max=20.0))
    q = n.add(2.0).mul_(n)
    return n, q.div_(q + 2.0)


def mish_exp(x: torch.Tensor) -> torch.Tensor:
    """torch.nn.functional.mish(x) up to float rounding, computed from one exp (_MishExp); differentiable."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _MishExp.apply(x)
    return _mish_terms(x)[1].mul_(x)


class _Conv2dForward:
    """A Conv1d / ConvTranspose1d's forward in the nhwc layout: the input (batch, c_in, 1, length) in channels-last
    memory, the same convolution as a 2D one over it (the weight viewed (.., .., 1, k)), which oneDNN runs faster
    than the 1D one on CPU at the U-Nets' shapes (calibrate_forms); a 3D input runs the module's own forward."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if x.ndim != 4:
            return type(m).forward(m, x)
        fn = F.conv2d if type(m) is nn.Conv1d else F.conv_transpose2d
        return fn(x, m.weight.unsqueeze(2), m.bias, (1, m.stride[0]), (0, m.padding[0]))


def set_forms(net: nn.Module, layout: str = "ncl", mish: str = "native") -> None:
    """Run every ConditionalUnet1D inside `net` in `layout` ("ncl": torch's 1D convolutions; "nhwc": activations
    (batch, channels, 1, horizon) in channels-last memory, 2D convolutions) with `mish` ("native": torch's Mish;
    "exp": mish_exp). Parameters and state_dict stay as they are; ("ncl", "native") is the network as built."""
    from ractd.nets.unet1d import ConditionalUnet1D

    if layout not in LAYOUTS or mish not in MISH_FORMS:
        raise RactdError(f"unknown U-Net form ({layout!r}, {mish!r}); layouts {LAYOUTS}, Mish forms {MISH_FORMS}")
    for unet in [m for m in net.modules() if isinstance(m, ConditionalUnet1D)]:
        if layout == "nhwc" and conv_impls(unet):
            raise RactdError("the nhwc layout needs native convolutions: this U-Net has GEMM layers")
        unet.layout = layout
        for m in unet.modules():
            f = m.__dict__.get("forward")
            if _gemm_supported(m) and not isinstance(f, _ConvForward):
                m.__dict__.pop("forward", None)
                if layout == "nhwc":
                    m.__dict__["forward"] = _Conv2dForward(m)
            elif type(m) is nn.Mish:
                m.__dict__.pop("forward", None)
                if mish == "exp":
                    m.__dict__["forward"] = mish_exp


def forms(net: nn.Module) -> tuple[str, str]:
    """(layout, Mish form) of the first ConditionalUnet1D inside `net`; ("ncl", "native") when it has none."""
    from ractd.nets.unet1d import ConditionalUnet1D

    for unet in net.modules():
        if isinstance(unet, ConditionalUnet1D):
            mish = any(m.__dict__.get("forward") is mish_exp for m in unet.modules() if type(m) is nn.Mish)
            return getattr(unet, "layout", "ncl"), "exp" if mish else "native"
    return "ncl", "native"


FORMS = (("ncl", "native"), ("ncl", "exp"), ("nhwc", "native"), ("nhwc", "exp"))


def _net_signature(net: nn.Module, example: tuple) -> str:
    c = net.cfg
    return (f"unet(in{net.input_dim},cond{net.global_cond_dim},t{net.n_times},{list(c.down_dims)},k{c.kernel_size},"
            f"g{c.n_groups},e{c.time_embed_dim})@h{example[0].shape[1]}")


def calibrate_forms(net: nn.Module, example: tuple, precision: str = "fp32",
                    margin: float | None = None) -> tuple[tuple[str, str], dict]:
    """Measure the whole U-Net's forward + backward at the example's rows (at most CALIBRATE_MAX_ROWS) in every
    form of FORMS, taking turns: ((layout, mish) chosen, the record). A form other than the native one is chosen
    when its best round is <= margin (default FORM_MARGIN) x the native form's best (the fastest such) and its
    output matches the native one. A U-Net under FORMS_MIN_MACS stays native, unmeasured. Cached
    per machine like calibrate_convs (<cache_dir>/engines/training_forms.json; a record measured on a busy
    machine is measured again on a quieter one)."""
    import os

    from ractd.engine_records import machine, read_calibration, write_calibration
    from ractd.paths import cache_dir

    x, times, cond = example
    rows = min(x.shape[0], CALIBRATE_MAX_ROWS)
    shapes, modules = _conv_inputs(net, example), dict(net.named_modules())
    macs = sum(rows * shape[2] * modules[name].in_channels * modules[name].out_channels
               * modules[name].kernel_size[0] // modules[name].stride[0] for name, shape in shapes.items())
    if macs < FORMS_MIN_MACS:
        return FORMS[0], {"choice": list(FORMS[0]), "rows": rows, "skipped": "too small to matter"}
    path = cache_dir() / "engines" / "training_forms.json"
    key = f"{_net_signature(net, example)}|rows{rows}|th{torch.get_num_threads()}|{precision}|{machine()}"
    rec = read_calibration(path).get(key)
    cpus = os.cpu_count() or 1
    if isinstance(rec, dict) and not float(rec.get("load", 0.0)) >= cpus > os.getloadavg()[0]:
        return tuple(rec["choice"]), rec
    gen = torch.Generator(device=x.device).manual_seed(2)
    x = torch.randn((rows, *x.shape[1:]), generator=gen, device=x.device)
    times = tuple(torch.rand(rows, generator=gen, device=x.device) * 4 - 2 for _ in times)
    cond = None if cond is None else torch.randn((rows, *cond.shape[1:]), generator=gen, device=x.device)
    params = [p for p in net.parameters() if p.requires_grad]
    saved = forms(net)
    outs = {}

    def step(form):
        def run():
            set_forms(net, *form)
            with autocast_context(precision, x.device):
                out = net(x, times, cond)
            if params:
                torch.autograd.grad(out.float().square().mean(), params)
            outs.setdefault(form, out.detach().float())
        return run

    try:
        t0 = time.perf_counter()
        step(FORMS[0])()
        rounds = 3 if time.perf_counter() - t0 < 1.0 else 2
        best, worst = seconds_per_call({"/".join(f): step(f) for f in FORMS}, rounds, 0.2, warmup=1)
    finally:
        set_forms(net, *saved)
    ref = outs[FORMS[0]]
    tol = (5e-2 if precision == "bf16" else 1e-4) * (1.0 + float(ref.abs().max()))
    diffs = {"/".join(f): float((o - ref).abs().max()) for f, o in outs.items()}
    native = best["/".join(FORMS[0])]
    margin = FORM_MARGIN if margin is None else margin
    ok = [f for f in FORMS[1:] if best["/".join(f)] <= margin * native and diffs["/".join(f)] <= tol]
    choice = min(ok, key=lambda f: best["/".join(f)]) if ok else FORMS[0]
    rec = {"choice": list(choice), "rows": rows, "load": round(os.getloadavg()[0], 2),
           "best_ms": {k: round(v * 1e3, 3) for k, v in best.items()},
           "worst_ms": {k: round(v * 1e3, 3) for k, v in worst.items()}, "max_abs_diff": diffs}
    if x.device.type == "cpu":
        try:
            write_calibration(path, key, rec)
        except OSError as e:
            log.warning("cannot write the training forms' calibration cache: %s", e)
    return choice, rec


def _conv_inputs(net: nn.Module, example: tuple) -> dict[str, tuple]:
    """{conv layer name: its input shape} from one no-grad forward of net(*example)."""
    shapes: dict[str, tuple] = {}

    def hook(name):
        def record(module, args):  # returns None: the call's inputs stay as they are
            shapes.setdefault(name, tuple(args[0].shape))
        return record

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in net.named_modules() if _gemm_supported(m)]
    try:
        with torch.no_grad():
            net(*example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _signature(m: nn.Module, shape: tuple) -> tuple:
    return (type(m).__name__, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], shape[2])


def calibrate_convs(net: nn.Module, example: tuple, precision: str = "fp32", rounds: int = 3,
                    round_s: float = 0.05, margin: float = MARGIN) -> tuple[dict[str, tuple[bool, bool]], list[dict]]:
    """Measure each conv layer of `net` (its input shape from net(*example)) natively and in the GEMM form, with
    gradients (forward + backward) and without (forward), at the example's batch (at most CALIBRATE_MAX_ROWS
    rows), under `precision`'s autocast: ({name: (GEMM with gradients, GEMM without)} for the layers where the
    GEMM form's slowest round is <= margin x the native form's best, the measurements per layer signature).

    Layers with the same signature (kind, channels, kernel, stride, padding, length) are measured once, and
    once per machine: the measurements are cached in <cache_dir>/engines/training_convs.json (ractd.engine_records;
    a record measured while the machine was busy is measured again on a quieter one). A layer of fewer than
    CALIBRATE_MIN_MACS multiply-adds per call is not measured (native); the GEMM form is used only when its
    output matches the native one."""
    import os

    from ractd.engine_records import machine, read_calibration, write_calibration
    from ractd.paths import cache_dir

    device = next(net.parameters()).device
    path = cache_dir() / "engines" / "training_convs.json"
    cached = read_calibration(path) if device.type == "cpu" else {}
    shapes = _conv_inputs(net, example)
    modules = dict(net.named_modules())
    by_sig: dict[tuple, dict] = {}
    choice: dict[str, tuple[bool, bool]] = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for name, shape in shapes.items():
        m = modules[name]
        sig = _signature(m, shape)
        if sig not in by_sig:
            rows = min(shape[0], CALIBRATE_MAX_ROWS)
            key = f"{sig}|rows{rows}|th{torch.get_num_threads()}|{precision}|{machine()}"
            rec = cached.get(key)
            cpus = os.cpu_count() or 1
            if not isinstance(rec, dict) or float(rec.get("load", 0.0)) >= cpus > os.getloadavg()[0]:
                macs = rows * sig[6] * sig[1] * sig[2] * sig[3] // sig[4]
                if macs < CALIBRATE_MIN_MACS:
                    rec = {"grad": False, "nograd": False, "rows": rows, "skipped": "too small to matter"}
                else:
                    x = torch.randn((rows, *shape[1:]), generator=gen, device=device)
                    rec = {**_measure_layer(m, x, precision, rounds, round_s, margin),
                           "load": round(os.getloadavg()[0], 2)}
                    if device.type == "cpu":
                        try:
                            write_calibration(path, key, rec)
                        except OSError as e:
                            log.warning("cannot write the training calibration cache: %s", e)
            by_sig[sig] = rec
        rec = by_sig[sig]
        if rec["grad"] or rec["nograd"]:
            choice[name] = (rec["grad"], rec["nograd"])
    records = [{"layer": "{}({}->{}, k{}, s{}, p{}) at length {}".format(*sig), **rec} for sig, rec in by_sig.items()]
    return choice, records


def _measure_layer(m: nn.Module, x: torch.Tensor, precision: str, rounds: int, round_s: float,
                   margin: float) -> dict:
    device = x.device
    w = [p for p in m.parameters()]
    x_grad = x.clone().requires_grad_(True)

    def fwd_bwd(gemm: bool):
        def run():
            with autocast_context(precision, device):
                y = _gemm_call(m, x_grad) if gemm else type(m).forward(m, x_grad)
            y.float().sum().backward()
            for t in (x_grad, *w):
                t.grad = None
        return run

    def fwd(gemm: bool):
        def run():
            with torch.no_grad(), autocast_context(precision, device):
                return _gemm_call(m, x) if gemm else type(m).forward(m, x)
        return run

    rec: dict = {"grad": False, "nograd": False, "rows": int(x.shape[0])}
    with torch.no_grad(), autocast_context(precision, device):
        ref, out = type(m).forward(m, x).float(), _gemm_call(m, x).float()
    tol = (5e-2 if precision == "bf16" else 1e-3) * (1.0 + float(ref.abs().max()))
    rec["max_abs_diff"] = float((out - ref).abs().max())
    if not rec["max_abs_diff"] <= tol:
        rec["skipped"] = "GEMM output differs"
        return rec
    for kind, make in (("grad", fwd_bwd), ("nograd", fwd)):
        best, worst = seconds_per_call({"native": make(False), "gemm": make(True)}, rounds, round_s, warmup=1)
        rec[f"{kind}_ms"] = {k: round(v * 1e3, 3) for k, v in best.items()}
        rec[kind] = worst["gemm"] <= margin * best["native"]
    return rec


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
