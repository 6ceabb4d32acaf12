"""Exact denoisers for test oracles and toy problems: isotropic Gaussian mixtures.

Data x_0 ~ sum_k w_k N(mu_k, s_k^2 I) over flattened samples of `dim` elements. Under x = x_0 + sigma eps the
noisy marginal is sum_k w_k N(mu_k, (s_k^2 + sigma^2) I), and the Bayes denoiser is
E[x_0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)), r_k the posterior responsibilities.
Computations run in float64.
"""

from __future__ import annotations

import torch


class GaussianMixture:
    """weights (K,), means (K, *event_shape), stds (K,)."""

    def __init__(self, weights, means, stds):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        self.event_shape = tuple(self.means.shape[1:])
        self.dim = int(self.means[0].numel())

    def sample(self, n: int, generator: torch.Generator | None = None):
        """(samples (n, *event_shape) float64, component index (n,))."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn((n, *self.event_shape), generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k].reshape(-1, *[1] * len(self.event_shape)) * eps, k

    def responsibilities(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Posterior p(k | x) at noise level sigma: (n, K)."""
        x = x.to(torch.float64).flatten(1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        var = self.stds[None, :] ** 2 + sigma**2  # (n or 1, K)
        sq = torch.cdist(x, self.means.flatten(1)) ** 2  # (n, K)
        logp = torch.log(self.weights)[None] - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * torch.pi * var)
        return torch.softmax(logp, dim=1)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """E[x_0 | x_0 + sigma eps = x], same shape and dtype as x; sigma scalar or (n,)."""
        x64 = x.to(torch.float64).flatten(1)
        sigma64 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        r = self.responsibilities(x64, sigma64)  # (n, K)
        shrink = self.stds[None, :] ** 2 / (self.stds[None, :] ** 2 + sigma64**2)  # (n, K)
        mu = self.means.flatten(1)  # (K, D)
        # sum_k r_k (mu_k + shrink_k (x - mu_k)) = sum_k r_k (1 - shrink_k) mu_k + (sum_k r_k shrink_k) x
        out = (r * (1 - shrink)) @ mu + (r * shrink).sum(1, keepdim=True) * x64
        return out.reshape(x.shape).to(x.dtype)

    def eps(self, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
        """Exact E[eps | x_t] for the VP process x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps."""
        abar = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1, *[1] * (x_t.ndim - 1))
        y = x_t.to(torch.float64) / abar.sqrt()  # = x_0 + sigma eps
        sigma = ((1 - abar) / abar).sqrt()
        D = self.denoise(y, sigma.flatten())
        return ((y - D) / sigma).to(x_t.dtype)

    def component(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest mixture mean, (n,)."""
        return torch.cdist(x.to(torch.float64).flatten(1), self.means.flatten(1)).argmin(1)
