"""Convolutions as one matrix product each (im2col), for the evaluation engines (ractd.engine "gemm").

Why. On CPU, torch's Conv1d on the U-Net's short horizons (16, 8, 4) and wide channels (512-2048 at paper size)
is far from the machine's matrix-product speed, and in bf16 it does not reach AMX at all: measured on this
project's 2-CPU Xeon (1 thread, batch 100, kernel 5), a 2048-channel layer at horizon 4 took 208 ms as a Conv1d
in fp32, 361 ms as a bf16 Conv1d, 153 ms as an fp32 matrix product and 31 ms as a bf16 one. A Conv1d with kernel
k is the product of the (batch x positions, channels x k) matrix of input windows with the (channels x k, out)
weight matrix; a ConvTranspose1d is the product of the input with a (channels, out x k) matrix followed by an
overlap-add of the k taps.

`gemm_copy(module, dtype)` returns a copy of a module with every Conv1d / ConvTranspose1d (groups 1, dilation 1,
zero padding) replaced by its GEMM form with weights stored once in `dtype`; everything else (GroupNorm, Mish,
FiLM) stays float32. With dtype float32 the result equals the module's up to float rounding (summation order);
with bfloat16 the products run in bf16 (inputs and weights rounded to bf16, the product's result rounded to bf16,
the bias, GroupNorm and Mish in float32): a behavioural change, which the engines use only with precision bf16.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


def _supported(m: nn.Module) -> bool:
    return (m.groups == 1 and m.dilation == (1,) and m.padding_mode == "zeros"
            and isinstance(m.padding, tuple) and getattr(m, "output_padding", (0,)) == (0,))


class GemmConv1d(nn.Module):
    """nn.Conv1d (groups 1, dilation 1, zero padding) as windows @ weight, on (batch, channels, length)."""

    def __init__(self, conv: nn.Conv1d, dtype: torch.dtype):
        super().__init__()
        c_out, c_in, k = conv.weight.shape
        self.k, self.stride, self.pad, self.c_out, self.dtype = k, conv.stride[0], conv.padding[0], c_out, dtype
        # column index c * k + j matches unfold's (channel, tap) order
        self.register_buffer("w", conv.weight.detach().reshape(c_out, c_in * k).t().contiguous().to(dtype))
        b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(c_out)
        self.register_buffer("b", b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.to(self.dtype)
        if self.k == 1 and self.stride == 1:
            cols, length = x.transpose(1, 2).reshape(-1, x.shape[1]), x.shape[2]
        else:
            if self.pad:
                x = F.pad(x, (self.pad, self.pad))
            win = x.unfold(2, self.k, self.stride)                   # (B, C, L_out, k)
            length = win.shape[2]
            cols = win.permute(0, 2, 1, 3).reshape(n * length, -1)  # (B L_out, C k)
        y = torch.addmm(self.b.to(self.dtype), cols, self.w) if self.dtype == torch.float32 else \
            (cols @ self.w).float() + self.b
        return y.reshape(n, length, self.c_out).transpose(1, 2)


class GemmConvTranspose1d(nn.Module):
    """nn.ConvTranspose1d (groups 1, dilation 1, no output padding) as x @ weight then the taps' overlap-add."""

    def __init__(self, conv: nn.ConvTranspose1d, dtype: torch.dtype):
        super().__init__()
        c_in, c_out, k = conv.weight.shape
        self.k, self.stride, self.pad, self.c_out, self.dtype = k, conv.stride[0], conv.padding[0], c_out, dtype
        # (c_in, k * c_out): column j * c_out + o is tap j of output channel o
        self.register_buffer("w", conv.weight.detach().permute(0, 2, 1).reshape(c_in, k * c_out).contiguous().to(dtype))
        b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(c_out)
        self.register_buffer("b", b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, length = x.shape
        y = (x.to(self.dtype).transpose(1, 2).reshape(n * length, -1) @ self.w).float()
        y = y.reshape(n, length, self.k, self.c_out)
        s = self.stride
        full = torch.zeros(n, (length - 1) * s + self.k, self.c_out)
        for j in range(self.k):   # input position i, tap j -> output position i * s + j
            full[:, j:j + (length - 1) * s + 1:s] += y[:, :, j]
        out_len = (length - 1) * s - 2 * self.pad + self.k
        return (full[:, self.pad:self.pad + out_len] + self.b).transpose(1, 2)


def gemm_copy(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A deep copy of `module` (eval mode) with its supported Conv1d / ConvTranspose1d layers in GEMM form."""
    out = copy.deepcopy(module).eval()

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if type(child) is nn.Conv1d and _supported(child):
                setattr(parent, name, GemmConv1d(child, dtype))
            elif type(child) is nn.ConvTranspose1d and _supported(child):
                setattr(parent, name, GemmConvTranspose1d(child, dtype))
            else:
                swap(child)

    swap(out)
    return out
