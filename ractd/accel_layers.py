"""How the U-Nets' layers run in a training step (ractd.accel chooses, per machine, and records the choice): each
convolution natively or as one matrix product (the GEMM form, `calibrate_convs` per layer), the nhwc layout
(activations channels-last, every convolution as the same 2D one) and the Mish form (`calibrate_forms` on the whole
network); `native_convs` gives evaluation code the network as built. Every form computes the same function up to
float rounding (tests/test_accel.py)."""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn
from torch.nn import functional as F

from ractd import RactdError
from ractd.timing import seconds_per_call

log = logging.getLogger(__name__)

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
FORMS = (("ncl", "native"), ("ncl", "exp"), ("nhwc", "native"), ("nhwc", "exp"))


def autocast_context(precision: str, device: torch.device | str):
    """The context a step's forward pass runs in: torch.autocast(bfloat16) for "bf16", nothing for "fp32"."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    x is clamped at 20 inside the exp: there tanh(softplus(x)) is 1 in float32 (Mish(x) = x). The backward
    recomputes n and tanh(softplus(x)) from x rather than keeping them: inside the U-Net's step, keeping three
    activations per Mish instead of one measured slower (memory traffic) than the two recomputed elementwise ops."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _mish_terms(x)[1].mul_(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        n, tsp = _mish_terms(x)
        d = tsp * tsp
        return d.neg_().add_(1.0).mul_(n.div_(n + 1.0)).mul_(x).add_(tsp).mul_(grad)


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
            return unet.layout, "exp" if mish else "native"
    return "ncl", "native"


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
    from ractd.engine_records import load_now, machine, measure_again, read_calibration, store_record
    from ractd.paths import cache_dir

    x, times, cond = example
    rows = min(x.shape[0], CALIBRATE_MAX_ROWS)
    modules = dict(net.named_modules())
    macs = sum(_macs(modules[name], rows, shape[2]) for name, shape in _conv_inputs(net, example).items())
    if macs < FORMS_MIN_MACS:
        return FORMS[0], {"choice": list(FORMS[0]), "rows": rows, "skipped": "too small to matter"}
    path = cache_dir() / "engines" / "training_forms.json"
    key = f"{_net_signature(net, example)}|rows{rows}|th{torch.get_num_threads()}|{precision}|{machine()}"
    rec = read_calibration(path).get(key)
    if not measure_again(rec):
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
    rec = {"choice": list(choice), "rows": rows, "load": load_now(),
           "best_ms": {k: round(v * 1e3, 3) for k, v in best.items()},
           "worst_ms": {k: round(v * 1e3, 3) for k, v in worst.items()}, "max_abs_diff": diffs}
    if x.device.type == "cpu":
        store_record(path, key, rec, "training forms' calibration")
    return choice, rec


def layer_inputs(net: nn.Module, example: tuple, modules: dict[str, nn.Module], keep) -> dict:
    """{name: keep(its first input)} for the named modules, from one no-grad forward of net(*example)."""
    seen: dict = {}

    def hook(name):
        def record(module, args):  # returns None: the call's inputs stay as they are
            seen.setdefault(name, keep(args[0]))
        return record

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            net(*example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _conv_inputs(net: nn.Module, example: tuple) -> dict[str, tuple]:
    """{conv layer name: its input shape} from one no-grad forward of net(*example)."""
    convs = {name: m for name, m in net.named_modules() if _gemm_supported(m)}
    return layer_inputs(net, example, convs, lambda x: tuple(x.shape))


def _signature(m: nn.Module, shape: tuple) -> tuple:
    return (type(m).__name__, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], shape[2])


def _macs(m: nn.Module, rows: int, length: int) -> int:
    """Multiply-adds of one call of conv layer m on `rows` inputs of `length` steps."""
    return rows * length * m.in_channels * m.out_channels * m.kernel_size[0] // m.stride[0]


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
    from ractd.engine_records import load_now, machine, measure_again, read_calibration, store_record
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
            if measure_again(rec):
                if _macs(m, rows, shape[2]) < CALIBRATE_MIN_MACS:
                    rec = {"grad": False, "nograd": False, "rows": rows, "skipped": "too small to matter"}
                else:
                    x = torch.randn((rows, *shape[1:]), generator=gen, device=device)
                    rec = {**_measure_layer(m, x, precision, rounds, round_s, margin), "load": load_now()}
                    if device.type == "cpu":
                        store_record(path, key, rec, "training calibration")
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
