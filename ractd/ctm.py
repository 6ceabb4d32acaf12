"""CTM student and the reward-aware distillation losses, Eq. (5)-(9).

Names follow the paper and REFERENCE.md: noise levels t >= u >= s >= sigma_min, where t is where the noisy
sample starts, u where the teacher's Heun step ends and s the student's jump target (the paper's k).

    g_theta(x, t, s) = c_skip(t) x + c_out(t) F_theta(c_in(t) x, c_noise(t), c_noise(s), cond)
    G_theta(x, t, s) = (s / t) x + (1 - s / t) g_theta(x, t, s)            (so G(x, t, t) = x)

The stop-gradient target sg(theta) is the current student weights detached (CTM's EMA decay 0), applied with
torch.func.functional_call: gradients flow through its *input* to theta, never into its weights.
Data tensors are (batch, horizon, dim), noise levels (batch,).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from ractd import edm
from ractd.edm import append_dims

RewardVariant = Literal["one_step", "ctm"]


class Student(nn.Module):
    """The CTM student G_theta(x, t, s, cond); net is a 2-time network (e.g. ConditionalUnet1D(n_times=2)).

    scalings: the preconditioning of g_theta at t, the same `edm.scalings` code as the teacher's Denoiser
    ("boundary" or "edm"); distillation builds the student with its teacher's scalings, so a warm-started
    student's g_theta(x, t, s) equals the teacher's D_phi(x, t) for every s.
    """

    def __init__(self, net: nn.Module, sigma_data: float = edm.SIGMA_DATA, sigma_min: float = edm.SIGMA_MIN,
                 scalings: edm.Scalings = "boundary"):
        super().__init__()
        if scalings not in ("boundary", "edm"):
            raise ValueError(f"unknown scalings {scalings!r}; expected 'boundary' or 'edm'")
        self.net, self.sigma_data, self.sigma_min, self.scalings = net, sigma_data, sigma_min, scalings

    def g(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The student's denoiser output g_theta(x, t, s), preconditioned at t exactly as the teacher's D."""
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in
                               edm.scalings(t, self.scalings, self.sigma_data, self.sigma_min))
        return c_skip * x + c_out * self.net(c_in * x, (edm.c_noise(t), edm.c_noise(s)), cond)

    def forward(self, x: torch.Tensor, t, s, cond: torch.Tensor | None = None) -> torch.Tensor:
        t, s = edm._as_batch(t, x), edm._as_batch(s, x)
        ratio = append_dims(s / t, x.ndim)
        return ratio * x + (1 - ratio) * self.g(x, t, s, cond)

    def many(self, calls: list[tuple], cond: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Several calls [(x, t, s, jump)] sharing `cond` -> [G_theta(x, t, s) if jump else g_theta(x, t, s)],
        from ONE network call over their stacked rows. Rows are independent (GroupNorm normalizes each sample),
        so each output equals its own call up to float rounding; the matrix products are larger and fewer."""
        sizes = [c[0].shape[0] for c in calls]
        x = torch.cat([c[0] for c in calls])
        t = torch.cat([edm._as_batch(c[1], c[0]) for c in calls])
        s = torch.cat([edm._as_batch(c[2], c[0]) for c in calls])
        g = self.g(x, t, s, None if cond is None else torch.cat([cond] * len(calls)))
        outs = []
        for (x_i, t_i, s_i, jump), g_i in zip(calls, g.split(sizes)):
            if jump:
                ratio = append_dims(edm._as_batch(s_i, x_i) / edm._as_batch(t_i, x_i), x_i.ndim)
                g_i = ratio * x_i + (1 - ratio) * g_i
            outs.append(g_i)
        return outs


def stopgrad(model: nn.Module):
    """A callable with model's current weights detached: sg(theta). Inputs keep their gradient path."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    return lambda *args: functional_call(model, {**params, **buffers}, args)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Distillation loss options (Eq. 5-9).

    alpha, beta, sigma: Eq. (9) weights of L_CTM, L_DSM, L_Reward (Table 9 per task; sigma = 0 is CTD).
    n_bins: Karras bins of the CTM time grid (80). distance: pseudo-Huber form (see edm.pseudo_huber).
    reward_variant: "one_step" (default, the paper: a_hat from one student step from x_T) or "ctm" (the
        released code: a_hat = first action of the CTM prediction at the sampled t).
    reward_clamp: clamp a_hat into [-1, 1] (the normalized data range) before R_psi, so the student cannot
        chase an unbounded reward model outside the data (REFERENCE.md calibration). Default True.
    init_scaled: x_T ~ N(0, sigma_max^2 I) (True, the ODE's prior) or N(0, I) (False, released code).
    dsm_top_fraction: the DSM half-batch samples noise bins from this top fraction of the schedule (0.7).
    dsm_form: "denoiser" (default; CTM paper, Kim et al. 2023): d(g_theta(x_sigma, sigma, sigma), x_0), which
        trains the student's denoiser output and leaves the jump G(., ., sigma_min) to the CTM term;
        "jump" (released code, REFERENCE.md): d(G_theta(x_sigma, sigma, sigma_min), x_0). Chosen on a
        measurement (study ractd_repro.studies.dsm_forms --toy, store docs/results/dsm/toy/; docs/design.md):
        with "jump" the DSM term regresses the one-step jump from high noise onto the posterior mean, and the
        CTD student loses the bandit's minor mode, which "denoiser" keeps as the teacher does.
    dsm_weighting: the weight of Eq. (7) per sample (edm.loss_weight): "lambda" (default: EDM's lambda(sigma), the
        released code) | "sqrt_lambda" | "none" (Eq. (7) as printed: "the same as ... Equation 4", which has no
        weight). Under lambda the DSM term logs two orders of magnitude above the CTM term; on maze2d-umaze (3 training
        seeds, 100 seeds each; study dsm_forms) the weights' balance changed, the score did not, so the default
        stays the released code's.
    term_decay: the decay per step of TermBalance's running means (0.99: about the last 100 steps).
    term_scale: "raw" (default, the paper and the released code: Eq. (9) adds the terms as they come) or
        "balanced": L_CTM and L_DSM each divided by a running mean of its own value (TermBalance, decay
        `term_decay`), so both enter at magnitude ~1 and alpha, beta are their relative weights -- App. B.3's "keep
        the individual loss terms within the same order of magnitude" made exact. The reward term is left as
        it is: -R_psi is not a distance (a constant added to R_psi changes its value, not its gradient) and
        R_psi already predicts the return-to-go normalized to [-1, 1], so sigma weighs a unit-scale term either
        way. Under "raw" the default DSM form logs orders of magnitude above the CTM term.
        "gradient": every term, the reward's included, divided by a running mean of the norm of its own gradient
        on the student (measured every `term_every` steps), so alpha, beta and sigma are the terms' relative pulls.
        Default "raw" by measurement (study ractd_repro.studies.term_balance on hopper-medium-replay, store
        docs/results/balance/; docs/design.md): a term's value is not its pull, "balanced" inverts the terms'
        pulls and no sigma recovered the reward's effect, and "gradient" at its best sigma scored below "raw"
        RACTD on each of 3 training seeds.
    term_every: steps between gradient measurements under "gradient" (each costs one more backward pass).
    """

    alpha: float = 1.0
    beta: float = 1.0
    sigma: float = 0.0
    n_bins: int = edm.N_BINS
    distance: Literal["per_sample", "elementwise"] = "per_sample"
    reward_variant: RewardVariant = "one_step"
    reward_clamp: bool = True
    init_scaled: bool = True
    dsm_top_fraction: float = 0.7
    dsm_form: Literal["jump", "denoiser"] = "denoiser"
    dsm_weighting: edm.Weighting = "lambda"
    term_scale: Literal["raw", "balanced", "gradient"] = "raw"
    term_decay: float = 0.99
    term_every: int = 10


def grad_norm(value: torch.Tensor, params, retain_graph: bool = False) -> float:
    """||d value / d params||, over the parameters value depends on (the others count as zero)."""
    grads = torch.autograd.grad(value, params, retain_graph=retain_graph, allow_unused=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


class TermBalance:
    """Running magnitudes of Eq. (9)'s terms for DistillConfig.term_scale "balanced" and "gradient".

    "balanced": balance(name, value) returns value / m, m an exponential moving average (decay `decay` per step,
    started at the first value) of the term's detached batch means, this one included, so the returned term
    has magnitude ~1.
    "gradient": by_gradient(student, terms) feeds the norm of each term's gradient on the student, measured every
    `every` steps; the average decays by decay ** every per measurement (the same ~1 / (1 - decay) steps).
    Kept in the student's checkpoint (state_dict) so a resumed run continues the same scales. Each Ray Train
    rank keeps its own (their batches differ by noise only).
    """

    def __init__(self, decay: float = 0.99, every: int = 1):
        if not 0 <= decay < 1:
            raise ValueError(f"term balance decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"term balance interval must be >= 1, got {every}")
        self.decay, self.every, self.calls = decay, every, 0
        self.magnitude: dict[str, float] = {}

    def update(self, name: str, v: float, decay: float | None = None) -> float:
        m = self.magnitude.get(name)
        d = self.decay if decay is None else decay
        m = v if m is None else d * m + (1.0 - d) * v
        self.magnitude[name] = m
        return m

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return value / max(self.update(name, abs(float(value.detach()))), 1e-12)

    def by_gradient(self, student: nn.Module, terms: dict) -> dict:
        """One step of "gradient": every `every` steps (and whenever a term has no magnitude yet) measure each
        term's gradient norm on the student's trainable parameters (graphs kept for the step's backward); return
        each term over its running norm."""
        if self.calls % self.every == 0 or any(n not in self.magnitude for n in terms):
            params = [p for p in student.parameters() if p.requires_grad]
            for name, value in terms.items():
                self.update(name, grad_norm(value, params, retain_graph=True), self.decay ** self.every)
        self.calls += 1
        return {k: v / max(self.magnitude[k], 1e-12) for k, v in terms.items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "every": self.every, "calls": self.calls, "magnitude": dict(self.magnitude)}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.every = float(state["decay"]), int(state.get("every", 1))
        self.calls = int(state.get("calls", 0))
        self.magnitude = {k: float(v) for k, v in state["magnitude"].items()}


def sample_ctm_indices(n: int, n_bins: int, device=None, generator=None):
    """Eq. (5)-(6) time sampling over bin indices (bin 0 = sigma_max): (t, u, s) each (n,) long.

    t ~ U{0..N-1}, s ~ U{t..N}, u ~ U{t..s}, then u = min(u, t + 1) so the teacher makes one Heun step.
    Index N is sigma_min again (the grid is the N bins plus a repeated sigma_min), which reproduces the
    released code's distribution where s can reach bin 80.
    """
    t = torch.randint(0, n_bins, (n,), device=device, generator=generator)
    s = t + (torch.rand(n, device=device, generator=generator) * (n_bins + 1 - t)).long()
    u = t + (torch.rand(n, device=device, generator=generator) * (s - t + 1)).long()
    return t, torch.minimum(u, t + 1), s


def ctm_grid(n_bins: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The N Karras bins followed by sigma_min once more: (N + 1,)."""
    sig = edm.karras_sigmas(n_bins, dtype=dtype, device=device)
    return torch.cat([sig, sig[-1:]])


def _randn(x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise like x0: from torch's global stream (training), or from `generator` (a CPU one) moved to x0's device."""
    if generator is None:
        return torch.randn_like(x0)
    return torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)


def ctm_draw(x0: torch.Tensor, cfg: DistillConfig = DistillConfig(), generator: torch.Generator | None = None):
    """Eq. (5)-(6)'s random draws: (t, u, s) noise levels (sample_ctm_indices on ctm_grid) and x_t = x0 + t eps;
    from torch's global stream, or from `generator` (a CPU generator; ractd.holdout's fixed draws)."""
    grid = ctm_grid(cfg.n_bins, x0.dtype, x0.device)
    idx = sample_ctm_indices(x0.shape[0], cfg.n_bins, device=None if generator is not None else x0.device,
                             generator=generator)
    t, u, s = (grid[i.to(x0.device)] for i in idx)
    return t, u, s, x0 + append_dims(t, x0.ndim) * _randn(x0, generator)


@torch.no_grad()
def ctm_target(G_sg, teacher: edm.Denoiser, x_t: torch.Tensor, t: torch.Tensor, u: torch.Tensor, s: torch.Tensor,
               sig_min: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """Eq. (6)'s target G_sg(G_sg(Solver_phi(x_t, t, u), u, s), s, sigma_min), without gradients."""
    x_u = edm.heun_step(teacher.bind(cond), x_t, t, u)                   # Solver(x_t, t, u; phi)
    x_tu_s = G_sg(x_u, u, s, cond)                                       # Eq. (6), x_k^(t,u)
    return G_sg(x_tu_s, s, sig_min, cond)


def ctm_loss(student: Student, teacher: edm.Denoiser, x0: torch.Tensor, cond: torch.Tensor | None,
             cfg: DistillConfig = DistillConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (5)-(6): d(G_sg(G_theta(x_t, t, s), s, sigma_min), G_sg(G_sg(Solver_phi(x_t, t, u), u, s), s, sigma_min)).

    Returns (per-sample loss (batch,), the CTM prediction x_hat at sigma_min (batch, horizon, dim)), the
    latter for the released code's reward variant.
    """
    return ctm_loss_at(student, teacher, cond, cfg, *ctm_draw(x0, cfg))


def ctm_loss_at(student: Student, teacher: edm.Denoiser, cond: torch.Tensor | None, cfg: DistillConfig,
                t: torch.Tensor, u: torch.Tensor, s: torch.Tensor,
                x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (5)-(6) at given draws (ctm_draw's t, u, s, x_t): (per-sample loss, CTM prediction); see ctm_loss."""
    sig_min = torch.full_like(t, student.sigma_min)
    G_sg = stopgrad(student)
    x_hat_s = student(x_t, t, s, cond)                                   # Eq. (6), x_hat_k^(t)
    pred = G_sg(x_hat_s, s, sig_min, cond)
    target = ctm_target(G_sg, teacher, x_t, t, u, s, sig_min, cond)
    return edm.pseudo_huber(pred, target, form=cfg.distance), pred  # Eq. (5)


def dsm_draw(x0: torch.Tensor, cfg: DistillConfig = DistillConfig(), sigma_min: float = edm.SIGMA_MIN,
             generator: torch.Generator | None = None):
    """Eq. (7)'s random draws: (sigma (batch,) clamped to [sigma_min (the student's), sigma_max], x_sigma = x0 +
    sigma eps); see dsm_loss. From torch's global stream, or from `generator` (a CPU generator) as ctm_draw."""
    n = x0.shape[0]
    sig = edm.karras_sigmas(cfg.n_bins, dtype=x0.dtype, device=x0.device)
    n_top = max(1, int(cfg.dsm_top_fraction * cfg.n_bins))
    half = n // 2
    on = None if generator is not None else x0.device
    top = sig[torch.randint(0, n_top, (half,), device=on, generator=generator).to(x0.device)]
    lognormal = edm.sample_sigma_lognormal(n - half, device=on, generator=generator).to(x0.device, x0.dtype)
    sigma = torch.cat([top, lognormal]).clamp(sigma_min, edm.SIGMA_MAX)
    return sigma, x0 + append_dims(sigma, x0.ndim) * _randn(x0, generator)


def dsm_levels(student: Student, sigma: torch.Tensor, cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(t, s, jump) of Eq. (7)'s student call on x_sigma: "jump" G_theta(x_sigma, sigma, sigma_min),
    "denoiser" g_theta(x_sigma, sigma, sigma)."""
    if cfg.dsm_form == "jump":
        return sigma, torch.full_like(sigma, student.sigma_min), True
    if cfg.dsm_form == "denoiser":
        return sigma, sigma, False
    raise ValueError(f"unknown DSM form {cfg.dsm_form!r}; expected 'jump' or 'denoiser'")


def dsm_distance(student: Student, out: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                 cfg: DistillConfig) -> torch.Tensor:
    """Eq. (7)'s weighted distance w(sigma) d(out, x_0), (batch,)."""
    weight = edm.loss_weight(sigma, cfg.dsm_weighting, student.sigma_data)
    return weight * edm.pseudo_huber(out, x0, form=cfg.distance)  # Eq. (7)


def dsm_loss(student: Student, x0: torch.Tensor, cond: torch.Tensor | None,
             cfg: DistillConfig = DistillConfig()) -> torch.Tensor:
    """Eq. (7): w(sigma) d(x_0, G_theta(x_0 + sigma eps, sigma, sigma_min)); (batch,). w = cfg.dsm_weighting.

    Half the batch draws sigma uniformly from the top `dsm_top_fraction` bins of the schedule
    (sigma in [~0.79, 80] for 0.7), the other half ln sigma ~ N(-1.2, 1.2^2) (released code).
    """
    return dsm_loss_at(student, x0, cond, cfg, *dsm_draw(x0, cfg, student.sigma_min))


def dsm_loss_at(student: Student, x0: torch.Tensor, cond: torch.Tensor | None, cfg: DistillConfig,
                sigma: torch.Tensor, x_sigma: torch.Tensor) -> torch.Tensor:
    """Eq. (7) at given draws (dsm_draw's sigma, x_sigma), (batch,); see dsm_loss."""
    t, s, jump = dsm_levels(student, sigma, cfg)
    out = student(x_sigma, t, s, cond) if jump else student.g(x_sigma, t, s, cond)
    return dsm_distance(student, out, x0, sigma, cfg)


def one_step(student: Student, x_T: torch.Tensor, cond: torch.Tensor | None, sigma_max: float = edm.SIGMA_MAX) -> torch.Tensor:
    """x_hat_0^(T) = G_theta(x_T, T, sigma_min): the one-step sample (unclamped, with gradients)."""
    return student(x_T, sigma_max, student.sigma_min, cond)


def reward_loss(reward_model: nn.Module, state: torch.Tensor, a_hat: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Eq. (8): -R_psi(s_n, a_hat_n), per sample (batch,). state (batch, obs_dim), a_hat (batch, act_dim)."""
    if clamp:
        a_hat = a_hat.clamp(-1.0, 1.0)
    return -reward_model(state, a_hat)  # Eq. (8)


def ractd_loss(student: Student, teacher: edm.Denoiser, reward_model: nn.Module | None, x0: torch.Tensor,
               cond: torch.Tensor | None, state: torch.Tensor | None, cfg: DistillConfig = DistillConfig(),
               balance: TermBalance | None = None, batched: bool = True) -> dict:
    """Eq. (9): L = alpha L_CTM + beta L_DSM + sigma L_Reward.

    x0: (batch, horizon, act_dim) normalized action chunks; cond: the student's conditioning vector;
    state: (batch, obs_dim) the current normalized state fed to R_psi (needed when sigma > 0).
    Returns {"loss": scalar to backpropagate, "ctm", "dsm", "reward": detached scalars for logging}.
    The teacher and the reward model must be frozen (requires_grad False); no gradient reaches them.
    cfg.term_scale "balanced" divides L_CTM and L_DSM by their running values in `balance`, "gradient" every
    term by the running norm of its gradient (`balance` required for both); the logged terms stay unscaled.
    batched: the student's independent calls with gradients (Eq. (6)'s G_theta(x_t, t, s), Eq. (7)'s call and
    the one-step a_hat) run as one network call over their stacked rows (`Student.many`), the random draws in
    the same order as the unbatched path (False: ctm_loss, dsm_loss and one_step one after another, the
    reference); the same loss up to float rounding (with dropout > 0, other dropout masks).
    """
    if cfg.sigma > 0 and (reward_model is None or state is None):
        raise ValueError("reward weight sigma > 0 needs a reward model and the current state")
    if cfg.sigma > 0 and cfg.reward_variant not in ("one_step", "ctm"):
        raise ValueError(f"unknown reward variant {cfg.reward_variant!r}; expected 'one_step' or 'ctm'")
    one_step_reward = cfg.sigma > 0 and cfg.reward_variant == "one_step"  # paper: a_hat from one step from x_T
    if batched:
        l_ctm, pred, l_dsm, x_hat_T = _batched_terms(student, teacher, x0, cond, cfg, one_step_reward)
    else:
        l_ctm, pred = ctm_loss(student, teacher, x0, cond, cfg)
        l_dsm = dsm_loss(student, x0, cond, cfg)
        x_hat_T = one_step(student, _prior(x0, cfg), cond) if one_step_reward else None
    terms = {"ctm": l_ctm.mean(), "dsm": l_dsm.mean()}
    weights = {"ctm": cfg.alpha, "dsm": cfg.beta}
    if cfg.sigma > 0:
        a_hat = x_hat_T[:, 0] if one_step_reward else pred[:, 0]  # "ctm": the released code's CTM prediction
        terms["reward"] = reward_loss(reward_model, state, a_hat, clamp=cfg.reward_clamp).mean()
        weights["reward"] = cfg.sigma
    logged = {k: v.detach() for k, v in terms.items()}  # the unscaled terms
    if cfg.term_scale != "raw":
        if balance is None:
            raise ValueError(f"term_scale {cfg.term_scale!r} needs a TermBalance (the running term magnitudes)")
        if cfg.term_scale == "balanced":    # the distance terms by their values; -R_psi as it is
            terms.update({k: balance(k, terms[k]) for k in ("ctm", "dsm")})
        elif cfg.term_scale == "gradient":  # every term by the norm of its gradient
            terms = balance.by_gradient(student, terms)
        else:
            raise ValueError(f"unknown term scale {cfg.term_scale!r}; expected 'raw', 'balanced' or 'gradient'")
    return {**logged, "loss": sum(weights[k] * terms[k] for k in terms)}  # Eq. (9)


def _prior(x0: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    return edm.prior_sample(x0.shape, scaled=cfg.init_scaled, device=x0.device, dtype=x0.dtype)


def _batched_terms(student: Student, teacher: edm.Denoiser, x0: torch.Tensor, cond: torch.Tensor | None,
                   cfg: DistillConfig, one_step_reward: bool):
    """ractd_loss's (L_CTM per sample, CTM prediction, L_DSM per sample, one-step sample or None) with the
    student's calls with gradients stacked into one network call."""
    t, u, s, x_t = ctm_draw(x0, cfg)                   # the draws in ctm_loss, dsm_loss, one_step's order
    sigma, x_sigma = dsm_draw(x0, cfg, student.sigma_min)
    d_t, d_s, d_jump = dsm_levels(student, sigma, cfg)
    calls = [(x_t, t, s, True), (x_sigma, d_t, d_s, d_jump)]
    if one_step_reward:
        x_T = _prior(x0, cfg)
        calls.append((x_T, torch.full_like(t, edm.SIGMA_MAX), torch.full_like(t, student.sigma_min), True))
    outs = student.many(calls, cond)
    sig_min = torch.full_like(t, student.sigma_min)
    G_sg = stopgrad(student)
    pred = G_sg(outs[0], s, sig_min, cond)                               # Eq. (6), from x_hat_k^(t)
    target = ctm_target(G_sg, teacher, x_t, t, u, s, sig_min, cond)
    l_ctm = edm.pseudo_huber(pred, target, form=cfg.distance)            # Eq. (5)
    return l_ctm, pred, dsm_distance(student, outs[1], x0, sigma, cfg), (outs[2] if one_step_reward else None)


def default_t_mids(n_steps: int, dtype=torch.float32) -> list[float]:
    """Re-noising levels of n-step student sampling: n_steps - 1 sigmas at evenly spaced bins of the
    80-bin schedule, descending (none for n_steps = 1)."""
    sig = edm.karras_sigmas(edm.N_BINS, dtype=dtype)
    idx = torch.linspace(0, edm.N_BINS - 1, n_steps + 1)[1:-1].round().long()
    return sig[idx].tolist()


@torch.no_grad()
def sample_student(student: Student, x_T: torch.Tensor, cond: torch.Tensor | None, n_steps: int = 1,
                   clamp: bool = True, sigma_max: float = edm.SIGMA_MAX, t_mids: list[float] | None = None,
                   generator: torch.Generator | None = None, noise=None) -> torch.Tensor:
    """One-step (n_steps = 1) or multi-step student sampling (paper Table 5, Song et al. 2023).

    Multi-step: jump T -> sigma_min, re-noise to t_1 (x = x_0 + t_1 eps), jump t_1 -> sigma_min, ...
    t_mids default: default_t_mids(n_steps). The re-noising eps comes from noise() if given (a callable
    returning a tensor shaped like x_T, e.g. drawn row by row from per-seed generators), else from
    torch.randn with `generator`.
    """
    t_mids = default_t_mids(n_steps, x_T.dtype) if t_mids is None else list(t_mids)
    if len(t_mids) != n_steps - 1:
        raise ValueError(f"{n_steps}-step sampling needs {n_steps - 1} intermediate noise levels, got {len(t_mids)}")
    x = student(x_T, sigma_max, student.sigma_min, cond)
    if clamp:
        x = x.clamp(-1.0, 1.0)
    for t_i in t_mids:
        eps = noise() if noise is not None else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = student(x + t_i * eps, t_i, student.sigma_min, cond)
        if clamp:
            x = x.clamp(-1.0, 1.0)
    return x
