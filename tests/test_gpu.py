"""GPU checks (deselected by default; run with `python -m pytest -m gpu` on a CUDA machine)."""

import numpy as np
import pytest
import torch

from ractd import ctm, edm
from ractd.config import UNET_PRESETS
from ractd.nets.unet1d import ConditionalUnet1D

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker was selected but CUDA is not available")
    return torch.device("cuda")


def test_unet_matches_cpu_on_cuda(cuda):
    net = ConditionalUnet1D(3, 11, UNET_PRESETS["small"]).eval()
    x, t, c = torch.randn(8, 16, 3), torch.rand(8) * 100, torch.randn(8, 11)
    with torch.no_grad():
        ref = net(x, (t,), c)
        out = net.to(cuda)(x.to(cuda), (t.to(cuda),), c.to(cuda)).cpu()
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-3)


def test_distillation_step_on_cuda(cuda):
    cfg = UNET_PRESETS["small"]
    teacher = edm.Denoiser(ConditionalUnet1D(3, 11, cfg)).to(cuda).requires_grad_(False)
    student = ctm.Student(ConditionalUnet1D(3, 11, cfg, n_times=2)).to(cuda)
    out = ctm.ractd_loss(student, teacher, None, torch.rand(32, 16, 3, device=cuda) * 2 - 1,
                         torch.randn(32, 11, device=cuda), None)
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters() if p.requires_grad)
