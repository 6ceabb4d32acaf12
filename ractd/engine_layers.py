"""The "layers" engine of ractd.engine: every convolution (and Mish) of the U-Net body in its own form, the one
measured fastest for that layer on its own input at the bucket's batch.

Why. Which form runs a convolution fastest depends on its width, its length and the batch: on the 2-CPU AMD EPYC
(1 thread, fp32, batch 100, kernel 5) a 2048-channel layer at length 4 took 193 ms as torch's Conv1d, 201 ms as an
im2col matrix product (ractd.nets.gemm) and 85 ms in Winograd's form F(4, 5) (ractd.nets.winograd: 2.5x fewer
multiply-adds), while a 64-channel layer at length 16 took 0.63, 1.02 and 0.77 ms, and at batch 1 a 256-channel
layer at length 4 0.40, 0.08 and 0.09 ms. A whole-network engine takes one form for all of them; this one takes
each layer's best. All three forms are fp32 and compute the convolution (exact up to float rounding: Winograd's
transforms round a few times more than the convolution, ractd.nets.winograd says how much), so the engine is a
candidate at precision fp32 only.

Measurement (`measure_layers`). One forward of the body at the bucket's batch records each convolution's input;
layers of the same signature (kind, channels, kernel, stride, padding, length) are measured once, their forms
taking turns for `rounds` rounds (ractd.timing.seconds_per_call, best and worst round kept), each form's output
checked against the native one's. A form replaces the native convolution only if its slowest round is at most
`margin` x the native's fastest (the engines' rule). The choice per layer name goes into the bucket's calibration
record (ractd.engine), so a process that finds the record builds the engine without measuring again.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ractd.accel_layers import layer_inputs, mish_exp
from ractd.nets import gemm, winograd
from ractd.timing import seconds_per_call

FORMS = ("native", "gemm", "winograd", "exp")
_KINDS = (nn.Conv1d, nn.ConvTranspose1d, nn.Mish)


class MishExp(nn.Module):
    """nn.Mish from one exp (ractd.accel_layers.mish_exp; equal up to float rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish_exp(x)


def forms_for(m: nn.Module) -> list[str]:
    """The forms a module can run in: native always; gemm and winograd for the convolutions they compute; exp for
    Mish."""
    out = ["native"]
    if type(m) is nn.Mish:
        return out + ["exp"]
    if type(m) in (nn.Conv1d, nn.ConvTranspose1d) and gemm._supported(m):
        out.append("gemm")
    if winograd.supported(m):
        out.append("winograd")
    return out


def _layers(body: nn.Module) -> dict[str, nn.Module]:
    """The modules the engine chooses a form for: convolutions and Mish."""
    return {name: m for name, m in body.named_modules() if type(m) in _KINDS}


def make_form(m: nn.Module, form: str) -> nn.Module:
    """The module `m` computed in `form` (native: `m` itself)."""
    if form == "native":
        return m
    if form == "gemm":
        cls = gemm.GemmConv1d if type(m) is nn.Conv1d else gemm.GemmConvTranspose1d
        return cls(m, torch.float32)
    if form == "winograd":
        return winograd.WinogradConv1d(m)
    if form == "exp":
        return MishExp()
    raise ValueError(f"unknown layer form {form!r}; expected one of {', '.join(FORMS)}")


def _inputs(body: nn.Module, example: tuple) -> dict[str, torch.Tensor]:
    """{layer name: its input} from one forward of body(*example)."""
    return layer_inputs(body, example, _layers(body), lambda x: x.detach().clone())


def _signature(m: nn.Module, x: torch.Tensor) -> tuple:
    if type(m) is nn.Mish:
        return ("Mish", *x.shape[1:])
    return (type(m).__name__, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], x.shape[2])


def _describe(sig: tuple) -> str:
    if sig[0] == "Mish":
        return f"Mish{tuple(sig[1:])}"
    return "{}({}->{}, k{}, s{}, p{}) at length {}".format(*sig)


def measure_layers(body: nn.Module, example: tuple, rounds: int, round_s: float, margin: float,
                   ) -> tuple[dict[str, str], list[dict]]:
    """({layer name: form} for the layers not run natively, the measurements per layer signature)."""
    choice: dict[str, str] = {}
    by_sig: dict[tuple, dict] = {}
    layers = _layers(body)
    for name, x in _inputs(body, example).items():
        m = layers[name]
        sig = _signature(m, x)
        if sig not in by_sig:
            by_sig[sig] = _measure(m, x, rounds, round_s, margin)
        if by_sig[sig]["form"] != "native":
            choice[name] = by_sig[sig]["form"]
    records = [{"layer": _describe(sig), **rec} for sig, rec in by_sig.items()]
    return choice, records


def _measure(m: nn.Module, x: torch.Tensor, rounds: int, round_s: float, margin: float) -> dict:
    with torch.inference_mode():
        runs = {form: make_form(m, form) for form in forms_for(m)}
        ref = m(x)
        tol = 1e-3 * (1.0 + float(ref.abs().max()))
        diffs = {form: float((run(x) - ref).abs().max()) for form, run in runs.items()}
        runs = {form: run for form, run in runs.items() if diffs[form] <= tol}

        def call(run):
            return lambda: run(x)

        best, worst = seconds_per_call({form: call(run) for form, run in runs.items()}, rounds, round_s, warmup=1)
    fast = {f: t for f, t in best.items() if f != "native" and worst[f] <= margin * best["native"]}
    return {"form": min(fast, key=fast.get) if fast else "native", "rows": int(x.shape[0]),
            "ms": {f: round(t * 1e3, 4) for f, t in best.items()}, "max_abs_diff": diffs}


def layered_copy(body: nn.Module, choice: dict[str, str]) -> nn.Module:
    """A deep copy of `body` (eval mode) with the layers named in `choice` in their forms."""
    out = copy.deepcopy(body).eval()
    modules = dict(out.named_modules())
    for name, form in choice.items():
        if name not in modules or form not in forms_for(modules[name]):
            raise ValueError(f"layer {name!r} cannot run in form {form!r}")
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else out, attr, make_form(modules[name], form))
    return out
