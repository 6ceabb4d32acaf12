"""DDPM baseline: schedule, epsilon loss, DDPM and DDIM samplers against the exact mixture epsilon."""

import numpy as np
import torch
from scipy import stats
from torch import nn

from ractd import ddpm
from ractd.analytic import GaussianMixture

MIX = GaussianMixture([0.3, 0.7], [[[-0.5, 0.3]], [[0.5, -0.2]]], [0.1, 0.15])
ABAR = ddpm.cosine_alphas_cumprod(100)


def exact_eps(x, t):
    return MIX.eps(x, ABAR[t])


def _check(samples, tol_w=0.03, tol_mean=0.03, tol_std=0.15):
    comp = MIX.component(samples)
    for k in range(2):
        sel = samples[comp == k].flatten(1)
        np.testing.assert_allclose((comp == k).double().mean().item(), MIX.weights[k].item(), atol=tol_w)
        np.testing.assert_allclose(sel.mean(0).numpy(), MIX.means[k].flatten().numpy(), atol=tol_mean)
        np.testing.assert_allclose(sel.std(0).numpy(), MIX.stds[k].item(), rtol=tol_std)


def test_schedule_and_timesteps():
    assert ABAR.shape == (100,)
    assert torch.all(ABAR[1:] < ABAR[:-1])
    assert ABAR[-1] < 1e-3 and ABAR[0] > 0.999
    assert ddpm.timesteps(100, 100) == list(range(99, -1, -1))
    assert ddpm.timesteps(100, 1) == [99]
    ts = ddpm.timesteps(100, 10)
    assert ts[0] == 99 and ts[-1] == 0 and len(set(ts)) == 10


def test_ddim_with_exact_eps_reproduces_mixture():
    x = torch.randn(4000, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _check(ddpm.sample_ddim(exact_eps, x, ABAR, n_steps=100, clamp=False))


def test_ddpm_with_exact_eps_matches_in_distribution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 1, 2, dtype=torch.float64, generator=g)
    out = ddpm.sample_ddpm(exact_eps, x, ABAR, n_steps=100, clamp=False, generator=g)
    _check(out)
    ref, _ = MIX.sample(4000, generator=torch.Generator().manual_seed(2))
    for d in range(2):  # two-sample KS per coordinate
        assert stats.ks_2samp(out[:, 0, d].numpy(), ref[:, 0, d].numpy()).pvalue > 0.001


def test_few_step_ddim_is_worse_than_many_step():
    x = torch.randn(2000, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref, _ = MIX.sample(2000, generator=torch.Generator().manual_seed(4))
    def w1(s):
        return sum(stats.wasserstein_distance(s[:, 0, d].numpy(), ref[:, 0, d].numpy()) for d in range(2))
    one = w1(ddpm.sample_ddim(exact_eps, x, ABAR, n_steps=1, clamp=False))
    many = w1(ddpm.sample_ddim(exact_eps, x, ABAR, n_steps=100, clamp=False))
    assert many < 0.5 * one, (one, many)


def test_ddpm_loss_trains_network():
    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, times, cond=None):
            return self.lin(x)

    model = ddpm.EpsModel(Lin())
    loss = ddpm.ddpm_loss(model, torch.randn(16, 1, 2))
    assert loss.shape == (16,)
    loss.mean().backward()
    assert model.net.lin.weight.grad.abs().sum() > 0
