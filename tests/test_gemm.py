"""ractd.nets.gemm: convolutions as one matrix product compute torch's convolutions (fp32: up to summation order;
bf16: to bf16 rounding), for every kernel, stride and padding the U-Net uses and a few it does not."""

import numpy as np
import pytest
import torch
from torch import nn

from ractd.config import UNetConfig
from ractd.nets.gemm import GemmConv1d, GemmConvTranspose1d, gemm_copy
from ractd.nets.unet1d import ConditionalUnet1D


@pytest.mark.parametrize("k, stride, pad", [(5, 1, 2), (1, 1, 0), (3, 2, 1), (4, 1, 0), (3, 3, 2)])
@pytest.mark.parametrize("length", [16, 7])
def test_gemm_conv1d_is_the_conv(k, stride, pad, length):
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 10, k, stride=stride, padding=pad).eval()
    x = torch.randn(4, 6, length)
    with torch.no_grad():
        ref = conv(x)
        out = GemmConv1d(conv, torch.float32)(x)
        low = GemmConv1d(conv, torch.bfloat16)(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    err = float((low - ref).abs().max() / ref.abs().max())
    assert 0 < err < 3e-2  # bf16 rounding: not exact, not wrong


@pytest.mark.parametrize("k, stride, pad", [(4, 2, 1), (3, 1, 1), (5, 3, 0)])
def test_gemm_conv_transpose1d_is_the_transposed_conv(k, stride, pad):
    torch.manual_seed(1)
    conv = nn.ConvTranspose1d(6, 5, k, stride=stride, padding=pad).eval()
    x = torch.randn(3, 6, 8)
    with torch.no_grad():
        ref = conv(x)
        out = GemmConvTranspose1d(conv, torch.float32)(x)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_gemm_copy_of_a_unet_is_the_unet_and_leaves_the_original_alone():
    torch.manual_seed(2)
    net = ConditionalUnet1D(3, 5, UNetConfig(down_dims=(16, 32, 64), time_embed_dim=16, n_groups=4)).eval()
    x = torch.randn(2, 16, 3)
    films = [torch.randn(2, b.film[1].out_features) for b in net.film_blocks()]  # what the engines pass
    copy = gemm_copy(net)
    kinds = {type(m).__name__ for m in copy.modules()}
    assert "Conv1d" not in kinds and "ConvTranspose1d" not in kinds and "GemmConvTranspose1d" in kinds
    assert any(type(m) is nn.Conv1d for m in net.modules())
    with torch.no_grad():
        np.testing.assert_allclose(copy.body(x, films).numpy(), net.body(x, films).numpy(), rtol=1e-4, atol=1e-5)
