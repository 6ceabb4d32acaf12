"""Convolutions in Winograd's minimal-filtering form F(m, k): fewer multiplications at the same output, for the
evaluation engine "layers" (ractd.engine_layers), which uses it per layer where it measures faster.

Why. A stride-1 Conv1d with kernel k computes m outputs of a tile from its m + k - 1 inputs with m k
multiply-adds per (input channel, output channel) pair. Winograd's algorithm (Toom-Cook, Lavin & Gray 2016)
computes the same m outputs with m + k - 1: transform the input tile (B^T d) and the kernel (G g), multiply them
elementwise, transform back (A^T). Over channels the elementwise product becomes n = m + k - 1 matrix products
(one per transform point), each (rows, C_in) x (C_in, C_out): with the U-Net's kernel 5 and tile 4, 8 products
instead of 20 taps' worth -- 2.5x fewer multiply-adds than the convolution or its im2col product. The transforms
are small matrices (n x n, m x n) applied over the channels, memory-bound and cheap next to the products once the
channels are wide. The U-Net's short horizons suit it: horizon 16 is four tiles, 8 is two, 4 is one.

Exactness. The transforms are exact in real arithmetic (the output equals the convolution's); in float they
round differently: F(4, 5)'s points (0, +-1, +-2, +-1/2, inf) put entries up to 8 in the transforms, so fp32
results differ from the convolution by a few times fp32's rounding of the output's scale (tests/test_winograd.py
bounds it against float64). The transforms are built in float64 from the points (`winograd_matrices`) and the
kernel transform G g is computed in float64 before storing it in float32.

`winograd_conv1d(x, weight, bias, padding, m)` is the function; given the Conv1d's weight it transforms the kernel
on every call and is differentiable in x, weight and bias (a training form; not wired into ractd.accel: at the CPU
size bf16 autocast's native convolutions measured faster). `WinogradConv1d` holds a Conv1d's transformed kernel
once (the inference form) for the Conv1d layers `supported` accepts (stride 1, groups 1, dilation 1, zero padding,
kernel >= 2). fp32 only: with bf16 products the error measured about five times gemm-bf16's (docs/engines.md).
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional as F

TILE = 4                               # outputs per tile (F(4, 5) for the U-Net's kernel 5)
_POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2),
           Fraction(3), Fraction(-3), Fraction(1, 3), Fraction(-1, 3))


def winograd_matrices(m: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A^T (m, n), G (n, k), B^T (n, n)) in float64 with y = A^T [(G g) * (B^T d)] the correlation
    y_i = sum_j g_j d_{i+j} of a length-n tile d with a length-k kernel g (n = m + k - 1 points: the first n - 1
    of 0, 1, -1, 2, -2, 1/2, -1/2, ... and infinity).

    Derivation: linear convolution of polynomials c = g * h (h of length m) is c = V^-1 [(V_k g) * (V_m h)] with
    V_j the n x j Vandermonde matrix of the points (the point at infinity reads a polynomial's leading
    coefficient); correlation is its transpose in h: y = V_m^T diag(V_k g) V^-T d."""
    n = m + k - 1
    if not 2 <= n <= len(_POINTS) + 1:
        raise ValueError(f"Winograd F({m}, {k}): {n} points, at most {len(_POINTS) + 1} supported")
    points = _POINTS[:n - 1]

    def vandermonde(cols: int) -> list[list[Fraction]]:
        rows = [[p ** j for j in range(cols)] for p in points]
        return rows + [[Fraction(int(j == cols - 1)) for j in range(cols)]]   # the point at infinity

    v_full = torch.tensor([[float(v) for v in row] for row in _invert(vandermonde(n))], dtype=torch.float64)
    g = torch.tensor([[float(v) for v in row] for row in vandermonde(k)], dtype=torch.float64)
    a = torch.tensor([[float(v) for v in row] for row in vandermonde(m)], dtype=torch.float64)
    return a.t().contiguous(), g, v_full.t().contiguous()


def _invert(rows: list[list[Fraction]]) -> list[list[Fraction]]:
    """The exact inverse of a square rational matrix (Gauss-Jordan over Fractions)."""
    n = len(rows)
    aug = [list(r) + [Fraction(int(i == j)) for j in range(n)] for i, r in enumerate(rows)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if aug[r][col] != 0)
        aug[col], aug[pivot] = aug[pivot], aug[col]
        scale = aug[col][col]
        aug[col] = [v / scale for v in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0:
                f = aug[r][col]
                aug[r] = [v - f * w for v, w in zip(aug[r], aug[col])]
    return [r[n:] for r in aug]


_MATRICES: dict[tuple[int, int, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _matrices(m: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = (m, k, dtype)
    if key not in _MATRICES:
        with torch.inference_mode(False):   # normal tensors: the training form differentiates through them
            _MATRICES[key] = tuple(t.to(dtype) for t in winograd_matrices(m, k))
    return _MATRICES[key]


def transform_kernel(weight: torch.Tensor, m: int = TILE) -> torch.Tensor:
    """A Conv1d weight (C_out, C_in, k) as the n transform points' matrices (n, C_in, C_out): U = G g."""
    _, g, _ = _matrices(m, weight.shape[2], torch.float64 if weight.dtype == torch.float64 else torch.float32)
    return torch.einsum("xk,ock->xco", g.to(weight.dtype), weight)


def _tiles(x: torch.Tensor, k: int, padding: int, m: int) -> tuple[torch.Tensor, int, int]:
    """(the input's tiles (n, B * T, C): position-major, each row a (batch, tile) pair), T, output length."""
    b, c, length = x.shape
    out_len = length + 2 * padding - k + 1
    if out_len < 1:
        raise ValueError(f"Winograd conv: input length {length} too short for kernel {k} with padding {padding}")
    t = -(-out_len // m)
    n = m + k - 1
    xp = F.pad(x, (padding, t * m + k - 1 - length - padding))
    tiles = xp.unfold(2, n, m).permute(3, 0, 2, 1).reshape(n, b * t * c)   # (n, B T C)
    return tiles, t, out_len


def winograd_conv1d(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, padding: int,
                    m: int = TILE, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """conv1d(x, weight, bias, stride=1, padding=padding) on (B, C_in, L) in Winograd form F(m, k).

    kernel: the transformed weight (n, C_in, C_out) when held (inference); otherwise computed from `weight` (the
    training form: differentiable in x, weight and bias)."""
    k = kernel.shape[0] - m + 1 if kernel is not None else weight.shape[2]
    at, _, bt = _matrices(m, k, torch.float32 if x.dtype != torch.float64 else torch.float64)
    b, c, _ = x.shape
    tiles, t, out_len = _tiles(x, k, padding, m)
    n = m + k - 1
    v = (bt @ tiles).view(n, b * t, c)                           # B^T d for every (batch, tile, channel)
    u = transform_kernel(weight, m) if kernel is None else kernel
    prod = torch.bmm(v, u.to(v.dtype))                            # (n, B T, C_out)
    c_out = prod.shape[2]
    y = (at @ prod.reshape(n, -1)).view(m, b, t, c_out)          # A^T [...] -> (m, B, T, C_out)
    y = y.permute(1, 3, 2, 0).reshape(b, c_out, t * m)[:, :, :out_len]
    return y if bias is None else y + bias.to(y.dtype)[:, None]


def supported(conv: nn.Module) -> bool:
    """Whether a module is a Conv1d this form computes: stride 1, groups 1, dilation 1, zero padding, kernel >= 2."""
    return (type(conv) is nn.Conv1d and conv.stride == (1,) and conv.groups == 1 and conv.dilation == (1,)
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple) and conv.kernel_size[0] >= 2)


class WinogradConv1d(nn.Module):
    """A Conv1d (see `supported`) with its kernel transformed once (in float64): (n, C_in, C_out) float32."""

    def __init__(self, conv: nn.Conv1d, m: int = TILE):
        super().__init__()
        self.m, self.pad = m, conv.padding[0]
        w = conv.weight.detach().double()
        self.register_buffer("kernel", transform_kernel(w, m).float().contiguous())
        b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("b", b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return winograd_conv1d(x.float(), None, self.b, self.pad, self.m, kernel=self.kernel)
