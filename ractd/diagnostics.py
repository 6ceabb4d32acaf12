"""What a student's training does, measured: `distill_diagnostics` (reported at every checkpoint of the student
stage by ractd.train: clamp-bound use and R_psi of the student's actions against the data's) and
`term_gradient_norms` (the pull of each of Eq. (9)'s terms on the student's parameters; ractd_repro.studies.term_balance).
ractd.train re-exports both and DIAG_TERMS.
"""

from __future__ import annotations

import torch

from ractd import ctm, edm
from ractd.data.prepared import Prepared
from ractd.data.prepared import to_torch as _to_torch
from ractd.train_config import TrainConfig

# the keys distill_diagnostics reports (besides the loss terms); sweeps and docs/results.md read these
DIAG_TERMS = ("at_bound", "out_of_range", "r_student", "r_data", "r_gap")


@torch.no_grad()
def distill_diagnostics(cfg: TrainConfig, student: ctm.Student, reward_model, prep: Prepared, device,
                        n: int = 512) -> dict:
    """What tells reward exploitation from undertraining, on a fixed sample of n dataset states (seeded, the
    same at every checkpoint): the one-step student's unclamped chunk x = G(x_T, T, sigma_min) and its first
    action a = x[:, 0].

    at_bound: share of elements of x at or beyond the clamp bound |x| >= 1 (normalized data range [-1, 1]).
    out_of_range: mean distance of x outside [-1, 1] (0 inside).
    r_student, r_data (locomotion, with a reward model): mean R_psi(s, clamp(a)) against R_psi(s, a_data) of the
        dataset's own action on the same states; r_gap = r_student - r_data.
    """
    g = torch.Generator().manual_seed(12345)
    idx = torch.randint(0, len(prep.cond), (min(n, len(prep.cond)),), generator=g).numpy()
    cond = _to_torch(prep.cond, idx, device)
    shape = (len(idx), *prep.shape_tail)
    x_T = edm.prior_sample(shape, scaled=cfg.distill.init_scaled, generator=g).to(device)
    was_training = student.training
    student.eval()
    try:
        x = ctm.one_step(student, x_T, cond)
    finally:
        student.train(was_training)
    out = {"at_bound": float((x.abs() >= 1.0).float().mean()),
           "out_of_range": float((x.abs() - 1.0).clamp(min=0).mean())}
    if reward_model is not None and prep.state is not None:
        state = _to_torch(prep.state, idx, device)
        r_student = float(reward_model(state, x[:, 0].clamp(-1, 1)).mean())
        r_data = float(reward_model(state, _to_torch(prep.action, idx, device)).mean())
        out.update(r_student=r_student, r_data=r_data, r_gap=r_student - r_data)
    return out


def term_gradient_norms(cfg: TrainConfig, student: ctm.Student, teacher, reward_model, prep: Prepared, device,
                        balance: ctm.TermBalance | None = None, batches: int = 4) -> dict:
    """Eq. (9)'s terms measured where they act: the norm of each weighted term's gradient on the student's
    parameters, averaged over `batches` seeded batches of cfg.batch windows (the same batches for every call).

    g_ctm, g_dsm, g_reward: ||grad(w * L_term)|| with the weights training applies (alpha, beta, sigma; under
    term_scale "balanced" alpha / m_ctm, beta / m_dsm, under "gradient" each weight over its term's running
    gradient norm, from `balance`); g_reward is 0 for sigma = 0, and g_reward_unit is the reward term's
    unweighted (locomotion with a reward model only; a_hat from one student step, the paper's variant).
    The student's requires_grad flags and the global torch RNG are restored.
    A term's logged value says little about its pull: the CTM term compares two student jumps that agree
    closely, so a small value can carry a large gradient.
    """
    d = cfg.distill
    w_ctm, w_dsm = d.alpha, d.beta
    w_rew = d.sigma
    if d.term_scale != "raw":
        need = {"ctm", "dsm"} | ({"reward"} if d.term_scale == "gradient" and d.sigma > 0 else set())
        if balance is None or not need <= set(balance.magnitude):
            raise ValueError(f"term_scale {d.term_scale!r} needs the run's TermBalance magnitudes")
        w_ctm, w_dsm = w_ctm / balance.magnitude["ctm"], w_dsm / balance.magnitude["dsm"]
        if d.term_scale == "gradient" and d.sigma > 0:
            w_rew = d.sigma / balance.magnitude["reward"]
    params = list(student.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    rng = torch.get_rng_state()
    sums: dict[str, float] = {}
    try:
        g = torch.Generator().manual_seed(2024)
        torch.manual_seed(2024)
        for _ in range(batches):
            idx = torch.randint(0, len(prep.cond), (cfg.batch,), generator=g).numpy()
            cond, x0 = _to_torch(prep.cond, idx, device), _to_torch(prep.x, idx, device)
            terms = {"ctm": w_ctm * ctm.ctm_loss(student, teacher, x0, cond, d)[0].mean(),
                     "dsm": w_dsm * ctm.dsm_loss(student, x0, cond, d).mean()}
            if reward_model is not None and prep.state is not None:
                x_T = edm.prior_sample(x0.shape, scaled=d.init_scaled, device=device, dtype=x0.dtype)
                a_hat = ctm.one_step(student, x_T, cond)[:, 0]
                terms["reward_unit"] = ctm.reward_loss(reward_model, _to_torch(prep.state, idx, device), a_hat,
                                                       clamp=d.reward_clamp).mean()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + ctm.grad_norm(value, params) / batches
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        torch.set_rng_state(rng)
    out = {"g_ctm": sums["ctm"], "g_dsm": sums["dsm"]}
    if "reward_unit" in sums:
        out.update(g_reward_unit=sums["reward_unit"], g_reward=w_rew * sums["reward_unit"])
    return out
