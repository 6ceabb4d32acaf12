"""U-Net and reward MLP: shapes, conditioning paths, warm start, presets, clear shape errors."""

import numpy as np
import pytest
import torch

from ractd.config import UNET_PRESETS, UNetConfig
from ractd.nets.mlp import MLPNet, ResidualMLP
from ractd.nets.unet1d import (
    ConditionalUnet1D,
    count_parameters,
    load_teacher_into_student,
)

CFG = UNetConfig(down_dims=(16, 32, 64), time_embed_dim=16, n_groups=4)


def _inputs(b=3, h=16, d=3, c=11):
    return torch.randn(b, h, d), torch.randn(b) * 100, torch.randn(b) * 100, torch.randn(b, c)


def test_unet_output_shape_teacher_and_student():
    x, t, s, cond = _inputs()
    teacher = ConditionalUnet1D(3, 11, CFG)
    assert teacher(x, (t,), cond).shape == x.shape
    student = ConditionalUnet1D(3, 11, CFG, n_times=2)
    assert student(x, (t, s), cond).shape == x.shape
    net = ConditionalUnet1D(4, 0, CFG)
    assert net(torch.randn(2, 32, 4), (t[:2],)).shape == (2, 32, 4)


def test_every_conditioning_input_changes_output():
    x, t, s, cond = _inputs()
    student = ConditionalUnet1D(3, 11, CFG, n_times=2).eval()
    base = student(x, (t, s), cond)
    for changed in [(x, (t + 50, s), cond), (x, (t, s + 50), cond), (x, (t, s), cond + 1)]:
        assert (student(*changed) - base).abs().max() > 1e-4


def test_warm_start_student_equals_teacher():
    x, t, s, cond = _inputs()
    teacher = ConditionalUnet1D(3, 11, CFG).eval()
    student = ConditionalUnet1D(3, 11, CFG, n_times=2).eval()
    load_teacher_into_student(student, teacher)
    with torch.no_grad():
        np.testing.assert_allclose(student(x, (t, s), cond).numpy(), teacher(x, (t,), cond).numpy(), atol=1e-5)
        np.testing.assert_allclose(student(x, (t, s + 300), cond).numpy(), teacher(x, (t,), cond).numpy(), atol=1e-5)


def test_dropout_option_is_active_in_train_mode():
    x, t, _, cond = _inputs()
    net = ConditionalUnet1D(3, 11, UNetConfig(down_dims=(16, 32), time_embed_dim=16, n_groups=4, dropout=0.5))
    net.train()
    assert (net(x, (t,), cond) - net(x, (t,), cond)).abs().max() > 0
    net.eval()
    np.testing.assert_array_equal(net(x, (t,), cond).detach().numpy(), net(x, (t,), cond).detach().numpy())


@pytest.mark.parametrize("bad", ["x_dim", "horizon", "cond", "time"])
def test_wrong_shapes_name_the_expected_shape(bad):
    x, t, _, cond = _inputs()
    net = ConditionalUnet1D(3, 11, CFG)
    if bad == "x_dim":
        args, msg = (torch.randn(3, 16, 4), (t,), cond), r"\(batch, horizon, 3\)"
    elif bad == "horizon":
        args, msg = (torch.randn(3, 10, 3), (t,), cond), "multiple of 4"
    elif bad == "cond":
        args, msg = (x, (t,), torch.randn(3, 7)), r"\(batch, 11\)"
    else:
        args, msg = (x, (t, t), cond), "1 time input"
    with pytest.raises(ValueError, match=msg):
        net(*args)


def test_mujoco_preset_has_248M_parameters_for_hopper():
    net = ConditionalUnet1D(3, 11, UNET_PRESETS["mujoco"])
    np.testing.assert_allclose(count_parameters(net), 248e6, rtol=0.02)
    assert UNET_PRESETS["mujoco"].down_dims == (512, 1024, 2048)
    assert UNET_PRESETS["maze2d-large"].down_dims == (256, 512, 1024, 2048)


def test_reward_mlp_shapes_bound_and_errors():
    r = ResidualMLP(11, 3, (32, 64, 128, 256))
    assert r(torch.randn(5, 11), torch.randn(5, 3)).shape == (5,)
    rb = ResidualMLP(11, 3, bounded=True)
    assert rb(torch.randn(5, 11) * 100, torch.randn(5, 3) * 100).abs().max() <= 1
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        r(torch.randn(5, 11), torch.randn(5, 4))


def test_mlp_net_interface():
    net = MLPNet(2, 1, global_cond_dim=3, n_times=2)
    x = torch.randn(4, 1, 2)
    out = net(x, (torch.randn(4), torch.randn(4)), torch.randn(4, 3))
    assert out.shape == x.shape
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        net(x, (torch.randn(4), torch.randn(4)), torch.randn(4, 2))


@pytest.mark.parametrize("n_times", [1, 2])
def test_jit_accelerated_net_computes_the_same_numbers_at_any_batch(n_times):
    from ractd.nets.unet1d import accelerate

    net = ConditionalUnet1D(3, 11, CFG, n_times=n_times).eval()
    fast = accelerate(net, "jit")
    for b in (1, 7):
        x, t, s, cond = _inputs(b=b)
        times = (t, s)[:n_times]
        with torch.inference_mode():
            np.testing.assert_allclose(fast(x, times, cond).numpy(), net(x, times, cond).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(batch, horizon, 3\)"):
        fast(torch.randn(2, 16, 4), times[:1] * n_times, torch.randn(2, 11))
