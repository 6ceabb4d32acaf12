"""The paper's mechanism (Fig. 3) in miniature: a state-conditioned bandit with two action modes.

Dataset: state s ~ U[-1, 1]^2; the action (a 2-D vector) is drawn from the "high" mode (+m) with
probability p_high (the minority, 30%) and from the "low" mode (-m) otherwise, shifted by 0.2 s and with
Gaussian noise; return = 1 for the high mode, 0 for the low one. A teacher trained by Eq. (4) reproduces
the 30/70 split; a CTD student (sigma = 0) too; the RACTD student (sigma > 0) should put most of its one-step
samples on the high mode. All networks are MLPs (ractd.nets.mlp) so it trains on CPU in a minute or two.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ractd import ctm, edm
from ractd.nets.mlp import MLPNet, ResidualMLP

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """p_high: share of the high-reward mode in the data; mode: |mode centre| per coordinate;
    noise: per-coordinate std within a mode; steps are optimizer steps; batch is the batch size."""

    p_high: float = 0.3
    mode: float = 0.6
    noise: float = 0.05
    n_data: int = 20_000
    teacher_steps: int = 3000
    reward_steps: int = 1000
    distill_steps: int = 1500
    batch: int = 256
    lr: float = 1e-3
    hidden: int = 256
    seed: int = 0


def make_bandit(cfg: ToyConfig, n: int, generator: torch.Generator):
    """(state (n, 2), action (n, 1, 2), high (n,) bool, return (n,))."""
    state = torch.rand(n, 2, generator=generator) * 2 - 1
    high = torch.rand(n, generator=generator) < cfg.p_high
    centre = torch.where(high, cfg.mode, -cfg.mode)[:, None]
    action = centre + 0.2 * state + cfg.noise * torch.randn(n, 2, generator=generator)
    return state, action[:, None, :], high, high.float()


def mode_of(action: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """True where an action (n, 1, 2) lies nearer the high mode than the low one."""
    return (action[:, 0] - 0.2 * state).sum(1) > 0


def _adam(params, lr):
    return torch.optim.AdamW(params, lr=lr, betas=(0.95, 0.999), weight_decay=0.0)


def train_teacher(cfg: ToyConfig, state, action) -> edm.Denoiser:
    teacher = edm.Denoiser(MLPNet(2, 1, global_cond_dim=2, hidden=cfg.hidden))
    opt = _adam(teacher.parameters(), cfg.lr)
    for step in range(cfg.teacher_steps):
        idx = torch.randint(0, len(state), (cfg.batch,))
        loss = edm.edm_loss(teacher, action[idx], state[idx]).mean()  # Eq. (4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return teacher.eval().requires_grad_(False)


def train_reward(cfg: ToyConfig, state, action, ret) -> ResidualMLP:
    """R_psi on normalized return-to-go (here 0/1 mapped to [-1, 1]); bounded output."""
    model = ResidualMLP(2, 2, (64, 64), bounded=True)
    opt = _adam(model.parameters(), cfg.lr)
    target = ret * 2 - 1
    for _ in range(cfg.reward_steps):
        idx = torch.randint(0, len(state), (cfg.batch,))
        loss = (model(state[idx], action[idx, 0]) - target[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def distill(cfg: ToyConfig, teacher: edm.Denoiser, reward_model, state, action, dcfg: ctm.DistillConfig,
            history: list | None = None) -> ctm.Student:
    """Eq. (9) distillation with a student warm-started from the teacher (emb(s) weights zero)."""
    net = MLPNet(2, 1, global_cond_dim=2, hidden=cfg.hidden, n_times=2)
    _warm_start_mlp(net, teacher.net)
    student = ctm.Student(net)
    opt = _adam(student.parameters(), cfg.lr * 0.5)
    for step in range(cfg.distill_steps):
        idx = torch.randint(0, len(state), (cfg.batch,))
        out = ctm.ractd_loss(student, teacher, reward_model, action[idx], state[idx], state[idx], dcfg)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if history is not None:
            history.append({k: float(v) for k, v in out.items()})
    return student.eval()


def _warm_start_mlp(student_net: MLPNet, teacher_net: MLPNet) -> None:
    """Copy teacher weights; the first layer's emb(s) columns start at zero."""
    E = teacher_net.time_embed[0].freqs.numel() * 2
    t_state, s_state = teacher_net.state_dict(), student_net.state_dict()
    x_w = teacher_net.input_dim * teacher_net.horizon
    for name, param in s_state.items():
        src = t_state[name]
        if src.shape == param.shape:
            param.copy_(src)
        else:  # first Linear: [x | emb(t) | cond] -> [x | emb(t) | emb(s) | cond]
            param.zero_()
            param[:, : x_w + E] = src[:, : x_w + E]
            param[:, x_w + 2 * E:] = src[:, x_w + E:]
    student_net.load_state_dict(s_state)


@torch.no_grad()
def high_mode_share(sampler, state) -> float:
    """Share of samples on the high mode; sampler(state) -> actions (n, 1, 2)."""
    return mode_of(sampler(state), state).float().mean().item()


def run(cfg: ToyConfig = ToyConfig(), sigma: float = 0.1, variant: ctm.RewardVariant = "one_step",
        init_scaled: bool = True, n_eval: int = 2000) -> dict:
    """Train teacher, reward model, CTD and RACTD students; return the high-mode shares and the models."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    state, action, high, ret = make_bandit(cfg, cfg.n_data, g)
    teacher = train_teacher(cfg, state, action)
    reward_model = train_reward(cfg, state, action, ret)
    ctd = distill(cfg, teacher, None, state, action, ctm.DistillConfig(sigma=0.0, init_scaled=init_scaled))
    ractd = distill(cfg, teacher, reward_model, state, action,
                    ctm.DistillConfig(sigma=sigma, reward_variant=variant, init_scaled=init_scaled))
    s_eval = torch.rand(n_eval, 2, generator=g) * 2 - 1

    def prior(n):
        return edm.prior_sample((n, 1, 2), scaled=init_scaled, generator=g)

    return {
        "data": high.float().mean().item(),
        "teacher": high_mode_share(lambda s: edm.sample_heun(teacher.bind(s), prior(len(s)), edm.karras_sigmas()), s_eval),
        "ctd": high_mode_share(lambda s: ctm.sample_student(ctd, prior(len(s)), s), s_eval),
        "ractd": high_mode_share(lambda s: ctm.sample_student(ractd, prior(len(s)), s), s_eval),
        "models": {"teacher": teacher, "reward": reward_model, "ctd": ctd, "ractd": ractd},
        "eval_state": s_eval,
    }
