"""Samplers (per-row noise, library equivalence, start scale), locomotion conditioning, maze planner."""

import numpy as np
import pytest
import torch
from torch import nn

from ractd import ctm, ddpm, edm
from ractd.config import UNET_PRESETS
from ractd.data.windows import Normalizer, locomotion_windows
from ractd.nets.unet1d import ConditionalUnet1D
from ractd.policy import (
    LocomotionPolicy,
    MazePlanner,
    make_sampler,
    rowwise_randn,
    student_sampler,
)

H, D, C = 4, 2, 3  # horizon, data dim, cond dim


def _net(n_times):
    return ConditionalUnet1D(D, C, UNET_PRESETS["tiny"], n_times=n_times).eval()


def _models():
    return {
        "heun": (edm.Denoiser(_net(1)), {"n_bins": 6}),
        "euler": (edm.Denoiser(_net(1)), {"n_bins": 6}),
        "ddpm": (ddpm.EpsModel(_net(1), T=10), {"n_steps": 5}),
        "ddim": (ddpm.EpsModel(_net(1), T=10), {"n_steps": 3}),
        "student": (ctm.Student(_net(2)), {"n_steps": 3}),
    }


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("kind", ["heun", "euler", "ddpm", "ddim", "student"])
def test_each_row_depends_only_on_its_generator(kind):
    model, opts = _models()[kind]
    sample = make_sampler(kind, model, (H, D), **opts)
    cond = torch.randn(3, C)
    batch = sample(cond, _gens([10, 11, 12]))
    alone = sample(cond[1:2], _gens([11]))
    assert batch.shape == (3, H, D)
    np.testing.assert_allclose(alone[0].numpy(), batch[1].numpy(), rtol=1e-5, atol=1e-6)
    assert batch.abs().max() <= 1.0
    # A different generator gives a different sample (the noise really comes from the row's generator).
    other = sample(cond[1:2], _gens([99]))
    assert not np.allclose(other[0].numpy(), batch[1].numpy(), atol=1e-4)


def test_samplers_match_library_samplers_at_batch_one():
    """The re-stated DDPM / multi-step student loops and the wrapped Heun equal the library functions."""
    cond = torch.randn(1, C)
    models = _models()

    teacher, _ = models["heun"]
    g = torch.Generator().manual_seed(3)
    ref = edm.sample_heun(teacher.bind(cond), edm.prior_sample((1, H, D), generator=g), edm.karras_sigmas(6))
    got = make_sampler("heun", teacher, (H, D), n_bins=6)(cond, _gens([3]))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)

    model, _ = models["ddpm"]
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn((1, H, D), generator=g)
    ref = ddpm.sample_ddpm(model.bind(cond), x_T, model.alphas_cumprod, 5, generator=g)
    got = make_sampler("ddpm", model, (H, D), n_steps=5)(cond, _gens([4]))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)

    student, _ = models["student"]
    g = torch.Generator().manual_seed(5)
    x_T = edm.prior_sample((1, H, D), generator=g)
    ref = ctm.sample_student(student, x_T, cond, n_steps=3, generator=g)
    got = make_sampler("student", student, (H, D), n_steps=3)(cond, _gens([5]))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)


class _ZeroNet(nn.Module):
    def forward(self, x, times, cond=None):
        return torch.zeros_like(x)


def test_student_start_scale_is_explicit():
    """With F = 0 the one-step jump is linear in x_T, so init_scaled multiplies the sample by sigma_max."""
    student = ctm.Student(_ZeroNet())
    student.register_parameter("dummy", nn.Parameter(torch.zeros(())))  # device/dtype probe
    cond = torch.zeros(2, C)
    scaled = student_sampler(student, (H, D), init_scaled=True)(cond, _gens([1, 2]))
    unit = student_sampler(student, (H, D), init_scaled=False)(cond, _gens([1, 2]))
    x_T = rowwise_randn(_gens([1, 2]), (H, D))
    sig = torch.tensor(edm.SIGMA_MAX)
    c_skip = edm.boundary_scalings(sig)[0]
    r = edm.SIGMA_MIN / edm.SIGMA_MAX
    np.testing.assert_allclose(unit.numpy(), ((r + (1 - r) * c_skip) * x_T).numpy(), rtol=1e-5)
    np.testing.assert_allclose(scaled.numpy(), edm.SIGMA_MAX * unit.numpy(), rtol=1e-5)


def test_make_sampler_rejects_unknown_kind():
    with pytest.raises(ValueError, match="heun, euler, ddpm, ddim, student"):
        make_sampler("dpm", _net(1), (H, D))


class _Recorder:
    """A sampler returning fixed normalized chunks and recording its conditioning."""

    def __init__(self, chunk):
        self.chunk, self.conds = torch.as_tensor(chunk, dtype=torch.float32), []

    def __call__(self, cond, generators):
        self.conds.append(cond.clone())
        return self.chunk[: len(generators)]


def _tiny_dataset():
    rng = np.random.default_rng(0)
    n = 12
    data = {
        "observations": rng.normal(size=(n, 3)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": np.zeros(n, bool),
        "timeouts": np.zeros(n, bool),
    }
    data["timeouts"][4] = True  # episodes [0, 5) and [5, 12)
    return data


def test_conditioning_equals_training_windows():
    data = _tiny_dataset()
    h = 3
    win = locomotion_windows(data, horizon=4, obs_history=h)
    obs_norm = Normalizer.fit(data["observations"])
    expected = obs_norm.normalize(win["obs"]).reshape(len(win["obs"]), -1)
    rec = _Recorder(np.zeros((2, 4, 2)))
    policy = LocomotionPolicy(rec, obs_norm, Normalizer.fit(data["actions"]), obs_history=h)
    policy.reset(2)
    obs = data["observations"]
    ep0, ep1 = list(range(0, 5)), list(range(5, 12))  # env 0 runs episode 0, env 1 episode 1
    gens = _gens([0, 1])
    for k in range(len(ep1)):
        live = np.array([k < len(ep0), True])
        o = np.stack([obs[ep0[min(k, len(ep0) - 1)]], obs[ep1[k]]])
        policy.act(o, gens, live)
    for k, cond in enumerate(rec.conds):
        rows = ([ep0[k]] if k < len(ep0) else []) + [ep1[k]]
        assert cond.shape == (len(rows), h * 3)
        np.testing.assert_allclose(cond.numpy(), expected[rows], rtol=1e-6, atol=1e-6)


def test_first_action_is_the_unnormalized_first_chunk_step():
    act_norm = Normalizer(min=[-2.0, 0.0], max=[2.0, 10.0])
    chunk = np.array([[[0.5, -1.0], [1.0, 1.0]], [[-1.0, 0.0], [0.0, 0.2]]], dtype=np.float32)
    policy = LocomotionPolicy(_Recorder(chunk), Normalizer(min=[-1.0], max=[1.0]), act_norm)
    policy.reset(2)
    full = policy.act_chunk(np.zeros((2, 1)), _gens([0, 1]))
    np.testing.assert_allclose(full, [[[1.0, 0.0], [2.0, 10.0]], [[-2.0, 5.0], [0.0, 6.0]]], atol=1e-6)
    policy.reset(2)
    a = policy.act(np.zeros((2, 1)), _gens([0, 1]), active_mask=np.array([False, True]))
    np.testing.assert_allclose(a[1], [1.0, 0.0], atol=1e-6)  # the only live row gets the first chunk row
    assert np.isnan(a[0]).all()


def test_maze_conditioning_layout_and_unnormalized_plan():
    norm = Normalizer(min=[0, 0, -5, -5], max=[4, 4, 5, 5])
    plan_n = np.zeros((1, 8, 4), dtype=np.float32)
    rec = _Recorder(plan_n)
    planner = MazePlanner(rec, norm, horizon=8)
    plan = planner.plan(np.array([[1.0, 3.0, 1.0, -2.5]]), np.array([[3.0, 1.0]]), _gens([0]))
    np.testing.assert_allclose(rec.conds[0].numpy(), [[-0.5, 0.5, 0.2, -0.5, 0.5, -0.5, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(plan, np.broadcast_to([2.0, 2.0, 0.0, 0.0], (1, 8, 4)), atol=1e-6)


def test_maze_track_pd_rule():
    plan = np.zeros((2, 3, 4))
    plan[:, 1] = [1.0, 2.0, 0.5, 0.0]
    plan[:, 2] = [1.2, 2.0, 0.3, 0.1]
    obs = np.array([[0.9, 2.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    a = MazePlanner.track(plan, obs, 0)  # waypoint 1: a = (wp_xy - xy) + (wp_vel - vel), clipped
    np.testing.assert_allclose(a, [[0.6, -0.1], [1.0, 1.0]], atol=1e-12)
    a_end = MazePlanner.track(plan, obs, 5)  # past the plan: last state, zero velocity
    np.testing.assert_allclose(a_end, [[0.3, -0.1], [1.0, 1.0]], atol=1e-12)


def _maze_models():
    torch.manual_seed(0)
    teacher = edm.Denoiser(ConditionalUnet1D(4, 8, UNET_PRESETS["tiny"], n_times=1).eval())
    student = ctm.Student(ConditionalUnet1D(4, 8, UNET_PRESETS["tiny"], n_times=2).eval())
    return teacher, student


def test_start_pinned_teacher_plan_begins_at_the_start_and_the_rest_adapts():
    """StartPinned (maze2d inpainting): the Heun plan's first state is the given start (the ODE carries x[:, 0]
    to it), and the later states differ from the unpinned plan's (the network saw the pinned state)."""
    from ractd.policy import StartPinned

    teacher, _ = _maze_models()
    cond = torch.rand(3, 8, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    free = make_sampler("heun", teacher, (8, 4), n_bins=12)(cond, _gens([1, 2, 3]))
    pinned = make_sampler("heun", StartPinned(teacher, 4), (8, 4), n_bins=12)(cond, _gens([1, 2, 3]))
    # with D[:, 0] pinned the first state's ODE is linear: x - start shrinks by u / t at every Heun step, exactly
    x_T = rowwise_randn(_gens([1, 2, 3]), (8, 4)) * edm.SIGMA_MAX
    expect = cond[:, :4] + (x_T[:, 0] - cond[:, :4]) * edm.SIGMA_MIN / edm.SIGMA_MAX
    np.testing.assert_allclose(pinned[:, 0].numpy(), expect.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(free[:, 0].numpy() - cond[:, :4].numpy()).max() > 0.05  # an untrained net does not plan from it
    assert np.abs(pinned[:, 1:].numpy() - free[:, 1:].numpy()).max() > 1e-3


def test_start_pinned_one_step_student_changes_only_the_first_state():
    from ractd.policy import StartPinned

    _, student = _maze_models()
    wrapped = StartPinned(student, 4)
    assert wrapped.sigma_min == student.sigma_min and wrapped.sigma_data == student.sigma_data
    cond = torch.rand(2, 8) * 1.6 - 0.8
    free = make_sampler("student", student, (8, 4), n_steps=1)(cond, _gens([5, 6]))
    pinned = make_sampler("student", wrapped, (8, 4), n_steps=1)(cond, _gens([5, 6]))
    np.testing.assert_allclose(pinned[:, 0].numpy(), cond[:, :4].numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(pinned[:, 1:].numpy(), free[:, 1:].numpy(), rtol=0, atol=1e-7)
