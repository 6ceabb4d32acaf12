"""EDM teacher: noise schedule, preconditioning, Eq. (4) loss and ODE samplers.

Conventions (released code, Consistency-Policy lineage; REFERENCE.md):
    forward noising      x_sigma = x_0 + sigma * eps
    schedule             80 Karras bins, bin 0 = sigma_max = 80, bin 79 = sigma_min = 0.02, rho = 7
    denoiser             D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), cond)
    c_noise(sigma)       250 ln(sigma)

Samplers are plain functions over a sigma tensor taking a `denoise(x, sigma) -> D` callable, in the
k-diffusion style, so they can be tested against exact (Gaussian / Gaussian-mixture) denoisers.
Tensors carrying data are (batch, horizon, dim); sigma is a scalar tensor or (batch,).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import nn

SIGMA_MIN = 0.02
SIGMA_MAX = 80.0
RHO = 7.0
SIGMA_DATA = 0.5
N_BINS = 80
P_MEAN = -1.2
P_STD = 1.2

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Scalings = Literal["boundary", "edm"]


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to x until it has `ndim` dims (broadcast a (batch,) over data)."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def karras_sigmas(
    n: int = N_BINS, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
    dtype: torch.dtype = torch.float32, device=None,
) -> torch.Tensor:
    """The Karras et al. (2022) schedule, descending: (n,) with sigmas[0] = sigma_max, sigmas[-1] = sigma_min.

    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho. Computed in float64.
    """
    if n < 2:
        raise ValueError(f"karras_sigmas needs n >= 2 bins, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).to(dtype=dtype, device=device)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Network time input: 250 ln(sigma) (released code)."""
    return 250.0 * torch.log(sigma)


def boundary_scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
    """Consistency-model scalings with D(x, sigma_min) = x exactly: (c_skip, c_out, c_in).

    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2).
    """
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def edm_scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """Plain EDM scalings (Karras et al. 2022, Table 1): (c_skip, c_out, c_in).

    With F = 0, D(x, sigma) = c_skip x = sd^2 / (sigma^2 + sd^2) x, the Bayes denoiser of N(0, sd^2 I) data.
    """
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def scalings(sigma: torch.Tensor, kind: Scalings, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
    """Dispatch to boundary_scalings (default of the released code) or edm_scalings."""
    if kind == "boundary":
        return boundary_scalings(sigma, sigma_data, sigma_min)
    if kind == "edm":
        return edm_scalings(sigma, sigma_data)
    raise ValueError(f"unknown scalings {kind!r}; expected 'boundary' or 'edm'")


def _as_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (batch,) tensor on x's device and dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma


class Denoiser(nn.Module):
    """The preconditioned teacher denoiser D_phi(x, sigma, cond) = c_skip x + c_out F(c_in x, c_noise, cond).

    net: a network F(x, times, cond) with times a tuple of (batch,) noise inputs, e.g. ConditionalUnet1D.
    x: (batch, horizon, dim); sigma: scalar or (batch,); cond: (batch, cond_dim) or None.
    """

    def __init__(self, net: nn.Module, scalings: Scalings = "boundary", sigma_data: float = SIGMA_DATA,
                 sigma_min: float = SIGMA_MIN):
        super().__init__()
        self.net = net
        self.scalings = scalings
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = _as_batch(sigma, x)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in
                               scalings(sigma, self.scalings, self.sigma_data, self.sigma_min))
        F_x = self.net(c_in * x, (c_noise(sigma),), cond)
        return c_skip * x + c_out * F_x

    def bind(self, cond: torch.Tensor | None) -> Denoise:
        """A `denoise(x, sigma)` callable with the conditioning fixed, for the samplers."""
        return lambda x, sigma: self(x, sigma, cond)


# ---------------------------------------------------------------------------------------------- Eq. (4)

def pseudo_huber_c(dim: int) -> float:
    """Eq. (4) distance constant c = 0.00054 sqrt(dim), dim = number of elements of one sample (iCT)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(p: torch.Tensor, q: torch.Tensor, c: float | None = None,
                 form: Literal["per_sample", "elementwise"] = "per_sample") -> torch.Tensor:
    """Eq. (4) distance d(p, q), one value per sample: (batch, ...) x2 -> (batch,).

    form="per_sample" (the iCT definition; the teacher's default, see edm_loss): sqrt(||p - q||^2 + c^2) - c.
    form="elementwise" (the released code): mean over elements of
    sqrt(((p - q)^2)^2 + c^2) - c, which is ~ (p - q)^2 once |p - q| >> sqrt(c).
    c defaults to pseudo_huber_c(elements per sample).
    """
    diff = (p - q).flatten(1)
    if c is None:
        c = pseudo_huber_c(diff.shape[1])
    if form == "per_sample":
        return torch.sqrt(diff.pow(2).sum(1) + c**2) - c  # Eq. (4)
    if form == "elementwise":
        return (torch.sqrt(diff.pow(4) + c**2) - c).mean(1)  # Eq. (4), released-code form
    raise ValueError(f"unknown pseudo-Huber form {form!r}; expected 'per_sample' or 'elementwise'")


def sample_sigma_lognormal(n: int, p_mean: float = P_MEAN, p_std: float = P_STD, device=None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. (4) training noise levels: ln sigma ~ N(p_mean, p_std^2), (n,)."""
    return torch.exp(p_mean + p_std * torch.randn(n, device=device, generator=generator))


def edm_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Eq. (4) loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


Distance = Literal["per_sample", "elementwise"]
Weighting = Literal["lambda", "sqrt_lambda", "none"]

# The Eq. (4) variants compared by ractd_repro.studies.eq4_forms, by name: (weighting, distance). The paper writes
# Eq. (4) without a weight; the released code multiplies lambda(sigma) by its elementwise pseudo-Huber (REFERENCE.md).
EQ4_FORMS: dict[str, tuple[str, str]] = {
    "released": ("lambda", "elementwise"),         # lambda x elementwise: ~ lambda ||D - x0||^2, uniform on F
    "lambda_per_sample": ("lambda", "per_sample"),  # lambda x per-sample: gradient on F ~ lambda c_out ~ 1/sigma
    "sqrt_lambda_per_sample": ("sqrt_lambda", "per_sample"),  # ~ sqrt(lambda) ||D - x0||: ~ ||F - F*||
    "paper": ("none", "per_sample"),                # Eq. (4) as printed: d(x0, D) with no weight
}


def loss_weight(sigma: torch.Tensor, weighting: Weighting = "lambda", sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """The weight of Eq. (4) / Eq. (7) per sample: lambda(sigma), sqrt(lambda(sigma)) or 1."""
    if weighting == "lambda":
        return edm_weight(sigma, sigma_data)
    if weighting == "sqrt_lambda":
        return edm_weight(sigma, sigma_data).sqrt()
    if weighting == "none":
        return torch.ones_like(sigma)
    raise ValueError(f"unknown loss weighting {weighting!r}; expected 'lambda', 'sqrt_lambda' or 'none'")


def edm_loss(denoiser: Denoiser, x0: torch.Tensor, cond: torch.Tensor | None = None,
             distance: Distance = "per_sample", weighting: Weighting = "none",
             p_mean: float = P_MEAN, p_std: float = P_STD, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """Eq. (4): w(sigma) d(x_0, D_phi(x_0 + sigma eps, sigma)) with ln sigma ~ N(p_mean, p_std^2), sigma clamped
    to [sigma_min, sigma_max] (below sigma_min the boundary scalings' c_out is negative).

    Default: Eq. (4) as the paper prints it, d(x0, D) with the per-sample pseudo-Huber and no weight (EQ4_FORMS
    "paper"). Chosen by measurement (ractd_repro.studies.eq4_forms: one teacher per form at equal compute, scored
    by Heun-80 and by held-out denoising error per sigma band; the numbers are in docs/results.md, the reasons in
    docs/design.md): "paper" ties the best form on the score and has the lowest held-out error at large sigma,
    where sampling starts. Under lambda the per-sample form puts a gradient ~ 1/sigma on F (most of it at small
    sigma); the elementwise form is quartic for errors below sqrt(c) and so hardly trains the small-sigma
    denoiser. The others stay options.
    x0: (batch, horizon, dim) clean normalized data. Returns the per-sample loss, (batch,).
    """
    sigma = sample_sigma_lognormal(x0.shape[0], p_mean, p_std, device=x0.device).to(x0.dtype)
    sigma = sigma.clamp(denoiser.sigma_min, sigma_max)
    return edm_loss_at(denoiser, x0, cond, sigma, torch.randn_like(x0), distance, weighting)


def edm_loss_at(denoiser: Denoiser, x0: torch.Tensor, cond: torch.Tensor | None, sigma: torch.Tensor,
                eps: torch.Tensor, distance: Distance = "per_sample", weighting: Weighting = "none") -> torch.Tensor:
    """Eq. (4) at given draws: w(sigma) d(x_0, D_phi(x_0 + sigma eps, sigma)), (batch,); sigma (batch,), eps like
    x0. edm_loss draws them for training, ractd.holdout fixes them for the held-out loss."""
    D_x = denoiser(x0 + append_dims(sigma, x0.ndim) * eps, sigma, cond)
    return loss_weight(sigma, weighting, denoiser.sigma_data) * pseudo_huber(D_x, x0, form=distance)  # Eq. (4)


@torch.no_grad()
def denoising_error(denoiser: Denoiser, x0: torch.Tensor, cond: torch.Tensor | None, sigma: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean squared error per element of D(x0 + sigma eps, sigma) against x0, one value per sample: (batch,).

    A yardstick independent of the loss form (held-out data, fixed sigma), for comparing Eq. (4) variants.
    """
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    sigma = _as_batch(sigma, x0)
    return (denoiser(x0 + append_dims(sigma, x0.ndim) * eps, sigma, cond) - x0).pow(2).flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------- samplers

def prior_sample(shape, sigma_max: float = SIGMA_MAX, scaled: bool = True, generator=None, device=None,
                 dtype=torch.float32) -> torch.Tensor:
    """Starting noise x_T. scaled=True: N(0, sigma_max^2 I), the marginal the ODE assumes.
    scaled=False: N(0, I), the released code's "reduced initial variance" (mode-seeking; see REFERENCE.md)."""
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return x * sigma_max if scaled else x


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def _denoised(denoise: Denoise, x: torch.Tensor, sigma: torch.Tensor, clamp: bool) -> torch.Tensor:
    D_x = denoise(x, sigma.expand(x.shape[0]))
    return D_x.clamp(-1.0, 1.0) if clamp else D_x


def heun_step(denoise: Denoise, x: torch.Tensor, t: torch.Tensor, u: torch.Tensor, clamp: bool = False) -> torch.Tensor:
    """One Heun (2nd-order) step of the probability-flow ODE from sigma t to sigma u > 0.

    t, u: scalar or (batch,) tensors (per-sample steps are allowed, as the CTM target needs).
    """
    t_b, u_b = _as_batch(t, x), _as_batch(u, x)
    h = append_dims(u_b - t_b, x.ndim)
    d_t = to_d(x, t_b, _denoised(denoise, x, t_b, clamp))
    x_e = x + h * d_t                                               # Euler predictor
    d_u = to_d(x_e, u_b, _denoised(denoise, x_e, u_b, clamp))
    return x + h * 0.5 * (d_t + d_u)                                # trapezoidal corrector


@torch.no_grad()
def sample_heun(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Heun over the schedule: len(sigmas) - 1 steps, 2 network calls each (EDM 80 = 158 NFE).

    The last sigma may be 0, in which case the last step is Euler (EDM Algorithm 1); with the released
    schedule it is sigma_min > 0, where the boundary denoiser is the identity. Denoised values are clamped
    to [-1, 1] when clamp=True (the released code; the data is normalized to that range).
    x: (batch, horizon, dim) starting noise at sigmas[0]. Returns the sample at sigmas[-1].
    """
    for i in range(len(sigmas) - 1):
        t, u = sigmas[i], sigmas[i + 1]
        d_t = to_d(x, t.expand(x.shape[0]), _denoised(denoise, x, t, clamp))
        x_next = x + (u - t) * d_t
        if u > 0:
            d_u = to_d(x_next, u.expand(x.shape[0]), _denoised(denoise, x_next, u, clamp))
            x_next = x + (u - t) * 0.5 * (d_t + d_u)
        x = x_next
    return x.clamp(-1.0, 1.0) if clamp else x


@torch.no_grad()
def sample_euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Euler over the schedule: len(sigmas) - 1 network calls."""
    for i in range(len(sigmas) - 1):
        t, u = sigmas[i], sigmas[i + 1]
        x = x + (u - t) * to_d(x, t.expand(x.shape[0]), _denoised(denoise, x, t, clamp))
    return x.clamp(-1.0, 1.0) if clamp else x
