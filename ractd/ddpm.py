"""DDPM-trained baseline (epsilon prediction) with DDPM and DDIM samplers (paper Tables 3 and 11).

Variance-preserving forward process x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t in {0..T-1}, with the
squared-cosine schedule of Diffusion Policy / Diffuser (T = 100 by default). Sampling uses a sub-sequence of
timesteps, evenly spaced from T-1 down to 0 (so a 1-step DDIM starts at pure noise t = T-1); x_0 predictions
are clamped to [-1, 1] when clamp=True, as the released code does. Data tensors are (batch, horizon, dim).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ractd.edm import append_dims

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # eps(x_t, t) with t a (batch,) long tensor


def cosine_alphas_cumprod(T: int = 100, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """abar_t, (T,), float64, from the squared-cosine schedule (Nichol & Dhariwal 2021), betas capped."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


class EpsModel(nn.Module):
    """eps_theta(x_t, t, cond) = net(x_t, (t,), cond): the network sees the integer timestep as its time input."""

    def __init__(self, net: nn.Module, T: int = 100):
        super().__init__()
        self.net, self.T = net, T
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(T).float())

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, (t.to(x.dtype),), cond)

    def bind(self, cond: torch.Tensor | None) -> EpsFn:
        return lambda x, t: self(x, t, cond)


def ddpm_loss(model: EpsModel, x0: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """Epsilon-prediction loss ||eps - eps_theta(x_t, t)||^2 (mean over elements), t ~ U{0..T-1}; (batch,)."""
    t = torch.randint(0, model.T, (x0.shape[0],), device=x0.device)
    return ddpm_loss_at(model, x0, cond, t, torch.randn_like(x0))


def ddpm_loss_at(model: EpsModel, x0: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor,
                 eps: torch.Tensor) -> torch.Tensor:
    """ddpm_loss at given draws: timesteps t (batch,) and noise eps like x0; (batch,)."""
    abar = append_dims(model.alphas_cumprod[t], x0.ndim)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    return (model(x_t, t, cond) - eps).pow(2).flatten(1).mean(1)


def timesteps(T: int, n_steps: int) -> list[int]:
    """n_steps timesteps evenly spaced from T-1 down to 0, descending (n_steps = T gives every step)."""
    if not 1 <= n_steps <= T:
        raise ValueError(f"n_steps must be in [1, {T}], got {n_steps}")
    ts = torch.linspace(T - 1, 0, n_steps, dtype=torch.float64).round().long().tolist()
    return ts


def _x0_from_eps(x: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    return (x - (1 - abar).sqrt() * eps) / abar.sqrt()


@torch.no_grad()
def sample_ddpm(eps_fn: EpsFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, n_steps: int | None = None,
                clamp: bool = True, generator: torch.Generator | None = None, noise=None) -> torch.Tensor:
    """Ancestral DDPM sampling over `timesteps(T, n_steps)` (100 or 15 steps in the paper's tables).

    For a respaced pair (t, t'), the effective beta is 1 - abar_t / abar_t' and the posterior
    q(x_t' | x_t, x_0) is used with the predicted (optionally clamped) x_0. x: (batch, ...) ~ N(0, I).
    Step noise comes from noise() if given (a callable returning a tensor shaped like x), else from
    torch.randn with `generator`.
    """
    T = len(alphas_cumprod)
    ts = timesteps(T, n_steps or T)
    abars = alphas_cumprod.to(x.device, torch.float64)
    for i, t in enumerate(ts):
        abar_t = abars[t]
        abar_prev = abars[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=torch.float64)
        beta = 1 - abar_t / abar_prev
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = _x0_from_eps(x, eps, abar_t.to(x.dtype))
        if clamp:
            x0 = x0.clamp(-1.0, 1.0)
        coef_x0 = (abar_prev.sqrt() * beta / (1 - abar_t)).to(x.dtype)
        coef_xt = ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)).to(x.dtype)
        mean = coef_x0 * x0 + coef_xt * x
        if i + 1 < len(ts):
            var = (beta * (1 - abar_prev) / (1 - abar_t)).to(x.dtype)
            z = noise() if noise is not None else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + var.sqrt() * z
        else:
            x = mean
    return x


@torch.no_grad()
def sample_ddim(eps_fn: EpsFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, n_steps: int,
                clamp: bool = True, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021) over `timesteps(T, n_steps)` (10 / 15 / 1 steps in the paper's tables).

    eta = 0 is the deterministic sampler; eta = 1 recovers DDPM's variance.
    """
    T = len(alphas_cumprod)
    ts = timesteps(T, n_steps)
    abars = alphas_cumprod.to(x.device, torch.float64)
    for i, t in enumerate(ts):
        abar_t = abars[t]
        abar_prev = abars[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=torch.float64)
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = _x0_from_eps(x, eps, abar_t.to(x.dtype))
        if clamp:
            x0 = x0.clamp(-1.0, 1.0)
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
        x = abar_prev.sqrt().to(x.dtype) * x0 + (1 - abar_prev - sigma**2).clamp_min(0).sqrt().to(x.dtype) * eps
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma.to(x.dtype) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x
