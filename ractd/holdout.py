"""Held-out episodes (TrainConfig.holdout, data_fraction): the split (`episode_split`) and each stage's loss on the
held-out episodes with fixed draws (`fixed_draws`, `val_losses`), so that one checkpoint's held-out loss compares
with the next's and a learning curve is the model's, not the draws' noise.

The split takes whole episodes (Prepared.episode; maze2d: the segments its windows never cross), never windows: the
windows of one episode overlap (16-step action chunks one step apart, padded at its end), so a split of windows
puts the same transitions on both sides. The permutation of the episodes is seeded by a constant (SPLIT_SEED), not
the training seed: at one holdout share the held-out episodes are the same for every training seed, data_fraction
and stage of one kind of rows (a student's held-out episodes are its teacher's, and BC's are theirs: maze2d BC
and the planner cut the same segments, on the raw positions), and the training episodes of a
smaller data_fraction are a subset of a larger one's.

The held-out losses (none draws from torch's global random stream, so a run's training steps are the same whether
it measures them or not):

- teacher: Eq. (4) as configured (weighting, distance; a reward-aware teacher's reward term left out) on up to
  TrainConfig.holdout_windows held-out windows at N_LEVELS fixed noise levels, the quantiles (k + 1/2) / N_LEVELS
  of the training distribution ln sigma ~ N(P_MEAN, P_STD^2) clamped as training clamps them, one fixed noise
  draw per window and level: a stratified estimate of the expectation the training loss estimates, without its
  sampling noise. val_loss: of the EMA weights (the model best.pt holds and evaluation uses); val_loss_raw: of the
  trained weights (those the logged training loss is of).
- ddpm: the epsilon loss at N_LEVELS timesteps evenly spaced over 0 .. T-1, fixed noise; EMA and raw as above.
- student: Eq. (9)'s distance terms with fixed draws (training's own ctm.ctm_draw and ctm.dsm_draw, from the
  held-out generator): val_ctm, val_dsm, and val_loss = alpha val_ctm + beta val_dsm (the reward term, -R_psi,
  is not a distance to the data and is left out).

Each loss is its training function's form at given draws (edm.edm_loss_at, ddpm.ddpm_loss_at, ctm.ctm_loss_at,
ctm.dsm_loss_at), so that a change to a training loss is a change to its held-out measure.
- bc: its MSE on every held-out pair; reward: the MSE on every held-out row (its validation, replacing val_fraction).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import torch
from torch import nn

from ractd import RactdError, bc, ctm, ddpm, edm
from ractd.data.prepared import Prepared, to_torch
from ractd.train_config import TrainConfig

SPLIT_SEED = 0
N_LEVELS = 8


def episode_split(episode: np.ndarray, n_episodes: int, holdout: float, fraction: float = 1.0,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of rows whose episodes are `episode` (N,) in [0, n_episodes).

    A seeded permutation of the episodes: its first max(1, round(holdout * n_episodes)) are held out (none for
    holdout 0), and the training episodes are the first ceil(fraction * rest) of the others. Rows are returned in
    ascending order; an episode's rows are all on one side."""
    perm = np.random.default_rng(seed).permutation(n_episodes)
    n_val = 0 if holdout <= 0 else max(1, round(holdout * n_episodes))
    if n_val >= n_episodes:
        raise RactdError(f"holdout={holdout}: holding out {n_val} of {n_episodes} episodes leaves none to train on")
    rest = perm[n_val:]
    n_train = max(1, math.ceil(fraction * len(rest) - 1e-9))
    episode = np.asarray(episode)
    return np.flatnonzero(np.isin(episode, rest[:n_train])), np.flatnonzero(np.isin(episode, perm[:n_val]))


def split(cfg: TrainConfig, prep: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """`episode_split` of a stage's rows by cfg.holdout and cfg.data_fraction; refused where the rows' episodes are
    unknown or the held-out episodes hold no row (maze2d segments shorter than the horizon give no window)."""
    if prep.episode is None or prep.episode_lengths is None:
        raise RactdError(f"{cfg.task} {cfg.stage}: holdout / data_fraction need the rows' episodes (Prepared.episode)")
    train_idx, val_idx = episode_split(prep.episode, len(prep.episode_lengths), cfg.holdout, cfg.data_fraction)
    if cfg.holdout > 0 and len(val_idx) == 0:
        raise RactdError(f"{cfg.task} {cfg.stage}: the held-out episodes (holdout={cfg.holdout}) give no "
                         f"{'pairs' if cfg.stage == 'bc' else 'windows'}; hold out more")
    return train_idx, val_idx


@dataclasses.dataclass
class HeldOut:
    """The fixed held-out batch of a diffusion stage: rows `idx` (sorted), x0 (n, H, D) and cond (n, C) on the
    device, and the stage's fixed draws (`fixed_draws`)."""

    idx: np.ndarray
    x0: torch.Tensor
    cond: torch.Tensor
    draws: dict


def fixed_draws(cfg: TrainConfig, prep: Prepared, val_idx: np.ndarray, device,
                n_levels: int = N_LEVELS) -> HeldOut | None:
    """The held-out windows and noise a teacher, DDPM or student run measures at every checkpoint, drawn once
    from a generator of their own (seeded by SPLIT_SEED): up to cfg.holdout_windows of val_idx, n_levels noise
    levels. None for the stages with no noise (reward, bc)."""
    if cfg.stage not in ("teacher", "ddpm", "student"):
        return None
    g = torch.Generator().manual_seed(SPLIT_SEED + 1)
    idx = np.asarray(val_idx)
    if len(idx) > cfg.holdout_windows:
        idx = np.sort(idx[torch.randperm(len(idx), generator=g)[:cfg.holdout_windows].numpy()])
    x0, cond = to_torch(prep.x, idx, "cpu"), to_torch(prep.cond, idx, "cpu")
    if cfg.stage == "teacher":
        q = (torch.arange(n_levels, dtype=torch.float64) + 0.5) / n_levels
        z = math.sqrt(2.0) * torch.erfinv(2.0 * q - 1.0)
        draws = {"sigma": torch.exp(edm.P_MEAN + edm.P_STD * z).clamp(edm.SIGMA_MIN, edm.SIGMA_MAX).float(),
                 "eps": torch.randn((n_levels, *x0.shape), generator=g)}
    elif cfg.stage == "ddpm":
        draws = {"eps": torch.randn((n_levels, *x0.shape), generator=g)}  # at n_levels timesteps (ddpm_loss)
    else:  # the training draws (Eq. (5)-(7)), from this generator
        t, u, s, x_t = ctm.ctm_draw(x0, cfg.distill, generator=g)
        sigma, x_sigma = ctm.dsm_draw(x0, cfg.distill, generator=g)
        draws = {"t": t, "u": u, "s": s, "x_t": x_t, "sigma": sigma, "x_sigma": x_sigma}
    return HeldOut(idx, x0.to(device), cond.to(device), {k: v.to(device) for k, v in draws.items()})


@contextlib.contextmanager
def _evaluating(*models: nn.Module | None):
    """Within: the models in eval mode (no dropout: no random draws), no gradients; their modes restored after."""
    saved = [(m, [x.training for x in m.modules()]) for m in models if m is not None]
    for m, _ in saved:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, modes in saved:
            for x, mode in zip(m.modules(), modes):
                x.training = mode


def teacher_loss(denoiser: edm.Denoiser, held: HeldOut, cfg: TrainConfig) -> float:
    """Eq. (4) (cfg.weighting, cfg.distance) of `denoiser` on the held-out windows at the fixed levels and noise."""
    x0, total = held.x0, 0.0
    with _evaluating(denoiser):
        for sigma, eps in zip(held.draws["sigma"], held.draws["eps"]):
            total += float(edm.edm_loss_at(denoiser, x0, held.cond, sigma.expand(x0.shape[0]), eps, cfg.distance,
                                           cfg.weighting).mean())
    return total / len(held.draws["sigma"])


def ddpm_loss(model, held: HeldOut) -> float:
    """The epsilon loss of `model` on the held-out windows at timesteps evenly spaced over 0 .. T-1, fixed noise."""
    x0, total = held.x0, 0.0
    steps = torch.linspace(0, model.T - 1, len(held.draws["eps"])).round().long().to(x0.device)
    with _evaluating(model):
        for t, eps in zip(steps, held.draws["eps"]):
            total += float(ddpm.ddpm_loss_at(model, x0, held.cond, t.expand(x0.shape[0]), eps).mean())
    return total / len(steps)


def student_losses(student: ctm.Student, teacher: edm.Denoiser, held: HeldOut, cfg: TrainConfig) -> dict:
    """Eq. (5)-(7)'s terms of `student` on the held-out windows with the fixed draws: {val_ctm, val_dsm,
    val_loss = alpha val_ctm + beta val_dsm}."""
    d, dr = cfg.distill, held.draws
    with _evaluating(student, teacher):
        l_ctm = float(ctm.ctm_loss_at(student, teacher, held.cond, d, dr["t"], dr["u"], dr["s"], dr["x_t"])[0].mean())
        l_dsm = float(ctm.dsm_loss_at(student, held.x0, held.cond, d, dr["sigma"], dr["x_sigma"]).mean())
    return {"val_ctm": l_ctm, "val_dsm": l_dsm, "val_loss": d.alpha * l_ctm + d.beta * l_dsm}


def row_loss(cfg: TrainConfig, model, prep: Prepared, val_idx: np.ndarray, device, chunk: int = 65536) -> float:
    """The reward model's or BC's MSE over every held-out row (no noise: nothing to fix)."""
    total = 0.0
    with _evaluating(model):
        for i in range(0, len(val_idx), chunk):
            idx = val_idx[i:i + chunk]
            if cfg.stage == "bc":
                total += float(bc.loss_terms(model, prep, idx, device)["loss"]) * len(idx)
            else:
                pred = model(to_torch(prep.state, idx, device), to_torch(prep.action, idx, device))
                total += float((pred - to_torch(prep.rtg, idx, device)).pow(2).sum())
    return total / len(val_idx)


def val_losses(cfg: TrainConfig, model, ema, teacher, prep: Prepared, val_idx: np.ndarray, held: HeldOut | None,
               device) -> dict:
    """The checkpoint's held-out metrics of the stage (module doc): {"val_loss": ..., and the stage's others}."""
    if cfg.stage in ("reward", "bc"):
        return {"val_loss": row_loss(cfg, model, prep, val_idx, device)}
    if cfg.stage == "student":
        return student_losses(model, teacher, held, cfg)
    measure = (lambda m: teacher_loss(m, held, cfg)) if cfg.stage == "teacher" else (lambda m: ddpm_loss(m, held))
    raw = measure(model)
    return {"val_loss": raw if ema is None else measure(ema), "val_loss_raw": raw}
