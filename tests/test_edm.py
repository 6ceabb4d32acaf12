"""EDM schedule, preconditioning, Eq. (4) and the ODE samplers against exact denoisers."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ractd import edm
from ractd.analytic import GaussianMixture


class ZeroNet(nn.Module):
    def forward(self, x, times, cond=None):
        return torch.zeros_like(x)


class RandomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x, times, cond=None):
        return self.lin(x) + times[0][:, None, None] * 1e-3


MIX = GaussianMixture([0.3, 0.7], [[[-0.5, 0.3]], [[0.5, -0.2]]], [0.1, 0.15])


def test_karras_schedule_endpoints_and_formula():
    s = edm.karras_sigmas()
    assert s.shape == (80,)
    np.testing.assert_allclose(s[0].item(), 80.0, rtol=1e-6)
    np.testing.assert_allclose(s[-1].item(), 0.02, rtol=1e-5)
    i = 40
    expected = (80 ** (1 / 7) + i / 79 * (0.02 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s[i].item(), expected, rtol=1e-6)
    assert torch.all(s[1:] < s[:-1])


def test_c_noise():
    np.testing.assert_allclose(edm.c_noise(torch.tensor(2.0)).item(), 250 * math.log(2.0), rtol=1e-6)


def test_edm_scalings_zero_net_is_bayes_denoiser_of_gaussian():
    den = edm.Denoiser(ZeroNet(), scalings="edm")
    x = torch.randn(64, 4, 3, dtype=torch.float64)
    for sigma in [0.02, 0.3, 1.0, 80.0]:
        bayes = GaussianMixture([1.0], torch.zeros(1, 4, 3), [0.5]).denoise(x, sigma)
        np.testing.assert_allclose(den(x, sigma).numpy(), bayes.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(den(x, sigma).numpy(), (0.25 / (sigma**2 + 0.25) * x).numpy(), rtol=1e-12)


def test_boundary_scalings_identity_at_sigma_min():
    den = edm.Denoiser(RandomNet(), scalings="boundary")
    x = torch.randn(8, 5, 3)
    out = den(x, torch.full((8,), edm.SIGMA_MIN))
    np.testing.assert_array_equal(out.detach().numpy(), x.numpy())
    # ... and it is not the identity elsewhere
    assert (den(x, 1.0) - x).abs().max() > 1e-3


def test_pseudo_huber_forms():
    p, q = torch.randn(4, 16, 3), torch.randn(4, 16, 3)
    c = edm.pseudo_huber_c(48)
    np.testing.assert_allclose(c, 0.00054 * math.sqrt(48))
    per = edm.pseudo_huber(p, q)
    manual = torch.sqrt(((p - q) ** 2).sum((1, 2)) + c**2) - c
    np.testing.assert_allclose(per.numpy(), manual.numpy(), rtol=1e-6)
    elem = edm.pseudo_huber(p, q, form="elementwise")
    manual_e = (torch.sqrt((p - q) ** 4 + c**2) - c).mean((1, 2))
    np.testing.assert_allclose(elem.numpy(), manual_e.numpy(), rtol=1e-6)
    np.testing.assert_allclose(edm.pseudo_huber(p, p).numpy(), 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="pseudo-Huber form"):
        edm.pseudo_huber(p, q, form="bogus")


def test_eq4_weight_and_lognormal_sigma():
    sigma = torch.tensor([0.1, 0.5, 2.0])
    np.testing.assert_allclose(edm.edm_weight(sigma).numpy(), ((sigma**2 + 0.25) / (sigma * 0.5) ** 2).numpy())
    g = torch.Generator().manual_seed(0)
    ln = torch.log(edm.sample_sigma_lognormal(200_000, generator=g))
    np.testing.assert_allclose(ln.mean().item(), -1.2, atol=0.01)
    np.testing.assert_allclose(ln.std().item(), 1.2, atol=0.01)


def test_eq4_forms_weight_the_network_output_as_documented():
    """With D - x0 = c_out(sigma) delta (the network output F off by delta), lambda x elementwise is
    ~ lambda c_out^2 delta^2 = delta^2 at every sigma (EDM scalings; while |D - x0| >> sqrt(c)): a uniform
    weight on F. lambda x per-sample is ~ lambda c_out ||delta||, which grows like 1/sigma for sigma << sigma_d;
    sqrt(lambda) x per-sample is ~ ||delta|| (uniform)."""
    sigma = torch.tensor([0.01, 0.04, 0.2, 1.0, 5.0, 40.0], dtype=torch.float64)
    x0 = torch.zeros(6, 16, 4, dtype=torch.float64)
    _, c_out, _ = edm.edm_scalings(sigma)

    def value(form, delta):
        D = x0 + edm.append_dims(c_out, 3) * delta
        weighting, distance = edm.EQ4_FORMS[form]
        return (edm.loss_weight(sigma, weighting) * edm.pseudo_huber(D, x0, form=distance)).numpy()

    np.testing.assert_allclose(value("released", 20.0)[1:], 400.0, rtol=0.02)
    per_sample = value("lambda_per_sample", 1.0)
    np.testing.assert_allclose(per_sample[0] / per_sample[1], 4.0, rtol=0.05)  # ~ 1/sigma at small sigma
    assert per_sample[0] / per_sample[-1] > 20
    sqrt_l = value("sqrt_lambda_per_sample", 1.0)
    np.testing.assert_allclose(sqrt_l[1:], 8.0, rtol=0.02)  # sqrt(lambda) c_out ||delta|| = ||delta|| = 8
    np.testing.assert_allclose(value("paper", 1.0), 8.0 * c_out.numpy(), atol=0.01)  # no weight: ~ c_out
    with pytest.raises(ValueError, match="weighting"):
        edm.loss_weight(sigma, "bogus")


def test_eq4_clamps_sigma_to_sigma_min():
    """ln sigma ~ N(p_mean, 0): a p_mean below sigma_min is clamped to sigma_min, where the boundary denoiser is
    the identity (c_out = 0): no gradient. Unclamped, c_out < 0 and the net is trained on a sign-flipped target."""
    den = edm.Denoiser(RandomNet())
    x0 = torch.randn(10, 4, 3)
    loss = edm.edm_loss(den, x0, p_mean=math.log(0.005), p_std=0.0)
    assert torch.isfinite(loss).all()
    loss.mean().backward()
    np.testing.assert_allclose(den.net.lin.weight.grad.abs().sum().item(), 0.0, atol=1e-12)


def test_eq4_loss_is_per_sample_positive_and_trains_the_net():
    den = edm.Denoiser(RandomNet())
    x0 = torch.randn(10, 4, 3)
    loss = edm.edm_loss(den, x0)
    assert loss.shape == (10,)
    assert torch.all(loss > 0)
    loss.mean().backward()
    assert den.net.lin.weight.grad.abs().sum() > 0


def _heun_samples(n_bins, n=4000, seed=0, sampler=edm.sample_heun):
    g = torch.Generator().manual_seed(seed)
    x = edm.prior_sample((n, 1, 2), generator=g, dtype=torch.float64)
    return sampler(MIX.denoise, x, edm.karras_sigmas(n_bins, dtype=torch.float64), clamp=False), x


def _check_mixture(samples, mix, tol_w=0.03, tol_mean=0.02, tol_std=0.1):
    comp = mix.component(samples)
    for k in range(len(mix.weights)):
        sel = samples[comp == k].flatten(1)
        np.testing.assert_allclose((comp == k).double().mean().item(), mix.weights[k].item(), atol=tol_w)
        np.testing.assert_allclose(sel.mean(0).numpy(), mix.means[k].flatten().numpy(), atol=tol_mean)
        np.testing.assert_allclose(sel.std(0).numpy(), mix.stds[k].item(), rtol=tol_std)


def test_heun80_reproduces_gaussian_mixture():
    samples, _ = _heun_samples(80)
    _check_mixture(samples, MIX)


def test_heun_is_second_order_and_euler_first_order():
    g = torch.Generator().manual_seed(1)
    x = edm.prior_sample((128, 1, 2), generator=g, dtype=torch.float64)
    ref = edm.sample_heun(MIX.denoise, x, edm.karras_sigmas(1281, dtype=torch.float64), clamp=False)
    def err(sampler, n):
        out = sampler(MIX.denoise, x, edm.karras_sigmas(n, dtype=torch.float64), clamp=False)
        return (out - ref).abs().mean().item()
    heun = [err(edm.sample_heun, n) for n in (41, 81, 161)]
    euler = [err(edm.sample_euler, n) for n in (321, 641)]
    for a, b in zip(heun, heun[1:]):
        assert 3.0 < a / b < 5.5, heun
    for a, b in zip(euler, euler[1:]):
        assert 1.6 < a / b < 2.6, euler


def test_heun_on_gaussian_matches_closed_form_flow():
    gauss = GaussianMixture([1.0], torch.zeros(1, 1, 3), [0.5])
    x = torch.randn(16, 1, 3, dtype=torch.float64) * 80
    sig = edm.karras_sigmas(80, dtype=torch.float64)
    out = edm.sample_heun(gauss.denoise, x, sig, clamp=False)
    exact = x * math.sqrt((0.25 + 0.02**2) / (0.25 + 80.0**2))
    np.testing.assert_allclose(out.numpy(), exact.numpy(), rtol=2e-3)


def test_heun_step_matches_sampler_and_clamp():
    sig = edm.karras_sigmas(5, dtype=torch.float64)
    x = torch.randn(8, 1, 2, dtype=torch.float64) * 80
    y = x
    for i in range(4):
        y = edm.heun_step(MIX.denoise, y, sig[i], sig[i + 1])
    np.testing.assert_allclose(y.numpy(), edm.sample_heun(MIX.denoise, x, sig, clamp=False).numpy(), rtol=1e-10)
    big = GaussianMixture([1.0], torch.full((1, 1, 2), 3.0), [0.1])  # data outside [-1, 1]
    out = edm.sample_heun(big.denoise, x, sig, clamp=True)
    assert out.abs().max() <= 1.0
