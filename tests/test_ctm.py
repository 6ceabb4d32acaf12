"""CTM student and Eq. (5)-(9): parametrization, time sampling, gradient paths, multi-step sampling."""


import numpy as np
import pytest
import torch

from ractd import ctm, edm
from ractd.config import UNetConfig
from ractd.nets.mlp import MLPNet, ResidualMLP
from ractd.nets.unet1d import ConditionalUnet1D, load_teacher_into_student


def _models(sigma=1.0, variant="one_step"):
    torch.manual_seed(0)
    teacher = edm.Denoiser(MLPNet(2, 4, global_cond_dim=3, hidden=32)).requires_grad_(False)
    student = ctm.Student(MLPNet(2, 4, global_cond_dim=3, hidden=32, n_times=2))
    reward = ResidualMLP(3, 2, (16, 16)).requires_grad_(False)
    cfg = ctm.DistillConfig(sigma=sigma, reward_variant=variant)
    return teacher, student, reward, cfg


def test_G_identity_at_equal_times_and_boundary():
    _, student, _, _ = _models()
    x = torch.randn(5, 4, 2)
    cond = torch.randn(5, 3)
    t = torch.tensor([80.0, 5.0, 1.0, 0.3, 0.05])
    np.testing.assert_allclose(student(x, t, t, cond).detach().numpy(), x.numpy(), rtol=1e-6, atol=1e-6)
    sm = torch.full((5,), edm.SIGMA_MIN)
    np.testing.assert_allclose(student(x, sm, sm, cond).detach().numpy(), x.numpy(), atol=1e-7)


def test_exact_student_two_jumps_equal_one_jump_on_gaussian_flow():
    """A Student whose network F is chosen so that g is the exact CTM target for N(0, sd^2) data: through
    Student's own preconditioning and G formula, G(G(x,t,u),u,s) = G(x,t,s) = the exact ODE flow."""
    sd = 0.5

    def flow(x, t, s):
        return x * torch.sqrt((sd**2 + s**2) / (sd**2 + t**2))

    class ExactF(torch.nn.Module):  # invert g = c_skip x + c_out F for the g that makes G the exact flow
        def forward(self, x_in, times, cond=None):
            t, s = (torch.exp(c / 250.0)[:, None, None] for c in times)
            c_skip, c_out, c_in = edm.boundary_scalings(t)
            x = x_in / c_in
            r = s / t
            g = (flow(x, t, s) - r * x) / (1 - r)
            return (g - c_skip * x) / c_out

    G = ctm.Student(ExactF())
    x = torch.randn(6, 1, 3, dtype=torch.float64) * 80
    t = torch.full((6,), 80.0, dtype=torch.float64)
    u = torch.full((6,), 3.0, dtype=torch.float64)
    s = torch.full((6,), 0.1, dtype=torch.float64)
    np.testing.assert_allclose(G(G(x, t, u), u, s).numpy(), G(x, t, s).numpy(), rtol=1e-10)
    np.testing.assert_allclose(G(x, t, s).numpy(), flow(x, 80.0, torch.tensor(0.1, dtype=torch.float64)).numpy(), rtol=1e-10)


def test_ctm_time_sampling_ordering_and_one_heun_step():
    t, u, s = ctm.sample_ctm_indices(1_000_000, 80, generator=torch.Generator().manual_seed(0))
    assert torch.all(t <= u) and torch.all(u <= s) and torch.all(u <= t + 1)
    assert t.min() == 0 and t.max() == 79 and s.max() == 80
    grid = ctm.ctm_grid(80)
    assert grid.shape == (81,) and grid[80] == grid[79]
    # s | t uniform on {t..80}: for t = 0 its mean is 40
    np.testing.assert_allclose(s[t == 0].double().mean().item(), 40.0, atol=1.0)


def _term_loss(term, teacher, student, reward, variant, x0, cond, state):
    """One loss term alone, built from scratch through the library's own entry points."""
    if term == "ctm":
        return ctm.ctm_loss(student, teacher, x0, cond, ctm.DistillConfig())[0].mean()
    if term == "dsm":
        return ctm.dsm_loss(student, x0, cond, ctm.DistillConfig()).mean()
    # Eq. (9) with alpha = beta = 0: only sigma * L_Reward can carry a gradient to the student
    cfg = ctm.DistillConfig(alpha=0.0, beta=0.0, sigma=1.0, reward_variant=variant)
    return ctm.ractd_loss(student, teacher, reward, x0, cond, state, cfg)["loss"]


@pytest.mark.parametrize("variant", ["one_step", "ctm"])
@pytest.mark.parametrize("term", ["ctm", "dsm", "reward"])
def test_each_loss_term_alone_reaches_student_and_not_teacher(term, variant):
    """Each term, alone, must move the student (Consistency Policy issue #4: a CTM loss under no_grad trained
    nothing). The teacher is left trainable here on purpose: no gradient may reach it (its Heun step is the
    CTM target, under no_grad)."""
    teacher, student, reward, _ = _models(variant=variant)
    teacher.requires_grad_(True)
    x0, cond, state = torch.rand(16, 4, 2) * 2 - 1, torch.randn(16, 3), torch.randn(16, 3)
    loss = _term_loss(term, teacher, student, reward, variant, x0, cond, state)
    loss.backward()
    grad_norm = sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None)
    assert grad_norm > 1e-8, f"{term} term sends no gradient to the student"
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in teacher.parameters()), term
    assert all(p.grad is None for p in reward.parameters()), term


def test_ctm_target_has_no_gradient_and_stopgrad_keeps_input_path():
    teacher, student, _, cfg = _models()
    sg = ctm.stopgrad(student)
    x = torch.randn(4, 4, 2, requires_grad=True)
    t = torch.full((4,), 2.0)
    out = sg(x, t, torch.full((4,), 0.5), torch.randn(4, 3))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.parameters())


def test_reward_loss_is_negative_reward_and_clamps():
    reward = ResidualMLP(3, 2, (8,))
    state, a = torch.randn(5, 3), torch.randn(5, 2) * 5
    np.testing.assert_allclose(ctm.reward_loss(reward, state, a, clamp=False).detach().numpy(),
                               (-reward(state, a)).detach().numpy())
    np.testing.assert_allclose(ctm.reward_loss(reward, state, a).detach().numpy(),
                               (-reward(state, a.clamp(-1, 1))).detach().numpy())


def test_sigma_zero_has_no_reward_term_and_needs_no_reward_model():
    teacher, student, _, _ = _models()
    out = ctm.ractd_loss(student, teacher, None, torch.rand(8, 4, 2), torch.randn(8, 3), None, ctm.DistillConfig())
    assert "reward" not in out and out["loss"].requires_grad
    with pytest.raises(ValueError, match="reward model"):
        ctm.ractd_loss(student, teacher, None, torch.rand(8, 4, 2), torch.randn(8, 3), None, ctm.DistillConfig(sigma=1))


@pytest.mark.parametrize("scalings", ["boundary", "edm"])
def test_warm_started_unet_student_starts_as_teacher_denoiser(scalings):
    cfg = UNetConfig(down_dims=(16, 32), time_embed_dim=16, n_groups=4)
    teacher = edm.Denoiser(ConditionalUnet1D(3, 5, cfg), scalings=scalings).eval()
    student = ctm.Student(ConditionalUnet1D(3, 5, cfg, n_times=2), scalings=scalings).eval()
    load_teacher_into_student(student.net, teacher.net)
    x, cond = torch.randn(4, 8, 3), torch.randn(4, 5)
    t = torch.tensor([80.0, 3.0, 0.5, 0.03])
    with torch.no_grad():
        np.testing.assert_allclose(student.g(x, t, torch.full((4,), 0.7), cond).numpy(),
                                   teacher(x, t, cond).numpy(), atol=1e-5)


def test_student_built_by_distillation_takes_its_teachers_scalings():
    from ractd.tasks import get_task
    from ractd.train import Prepared, build_student

    prep = Prepared(get_task("maze2d-umaze"), np.zeros((1, 8, 4), np.float32), np.zeros((1, 8), np.float32), {})
    from ractd.train import TrainConfig

    for kind in ("boundary", "edm"):
        cfg = TrainConfig(task="maze2d-umaze", stage="student", preset="tiny", scalings=kind)
        assert build_student(cfg, prep).scalings == kind


def test_multistep_sampling_renoises_and_clamps():
    _, student, _, _ = _models()
    x_T = torch.randn(6, 4, 2) * 80
    cond = torch.randn(6, 3)
    one = ctm.sample_student(student, x_T, cond, n_steps=1)
    g = torch.Generator().manual_seed(0)
    three = ctm.sample_student(student, x_T, cond, n_steps=3, generator=g)
    assert one.shape == three.shape and one.abs().max() <= 1 and three.abs().max() <= 1
    assert (one - three).abs().max() > 0
    with pytest.raises(ValueError, match="2 intermediate"):
        ctm.sample_student(student, x_T, cond, n_steps=3, t_mids=[1.0])


def test_term_balance_is_a_running_mean_of_magnitudes():
    """value / m with m the EMA of |value| started at the first one: decay 0.5 over 2, 4 gives m = 2, then 3."""
    bal = ctm.TermBalance(decay=0.5)
    assert float(bal("ctm", torch.tensor(2.0))) == 1.0
    np.testing.assert_allclose(float(bal("ctm", torch.tensor(4.0))), 4.0 / 3.0)
    np.testing.assert_allclose(float(bal("dsm", torch.tensor(-8.0))), -1.0)  # its own magnitude, sign kept
    again = ctm.TermBalance()
    again.load_state_dict(bal.state_dict())
    assert again.decay == 0.5 and again.magnitude == {"ctm": 3.0, "dsm": 8.0}


def test_balanced_terms_enter_at_unit_magnitude_with_their_own_gradients():
    """Eq. (9) "balanced": on the first step each distance term is divided by its own value, so the loss is
    alpha + beta whatever the terms' sizes (raw here: DSM ~100x CTM), and the gradient equals the raw path's with
    alpha / L_CTM and beta / L_DSM as weights (same noise draws)."""
    teacher, student, _, _ = _models()
    x0, cond = torch.rand(16, 4, 2) * 2 - 1, torch.randn(16, 3)

    def run(cfg, balance=None):
        student.zero_grad()
        torch.manual_seed(3)
        out = ctm.ractd_loss(student, teacher, None, x0, cond, None, cfg, balance)
        out["loss"].backward()
        return out, [p.grad.clone() for p in student.parameters()]

    bal_cfg = ctm.DistillConfig(alpha=2.0, beta=0.5, term_scale="balanced")
    out, grads = run(bal_cfg, ctm.TermBalance())
    np.testing.assert_allclose(float(out["loss"].detach()), 2.5, rtol=1e-6)
    assert float(out["dsm"]) > 10 * float(out["ctm"])  # the raw terms are far apart; logged unscaled
    raw_cfg = ctm.DistillConfig(alpha=2.0 / float(out["ctm"]), beta=0.5 / float(out["dsm"]))
    raw_out, raw_grads = run(raw_cfg)
    np.testing.assert_allclose(float(raw_out["loss"].detach()), 2.5, rtol=1e-5)
    for g, r in zip(grads, raw_grads):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="TermBalance"):
        ctm.ractd_loss(student, teacher, None, x0, cond, None, bal_cfg)


def test_gradient_balance_divides_each_term_by_its_gradient_norm():
    """Eq. (9) "gradient": the measured magnitude of each term is the norm of its own gradient on the student (a
    raw run with the same noise draws, one term weighted, gives it), the step's gradient is sum_k w_k grad L_k /
    ||grad L_k||, and with every = 3 only steps 0, 3, ... re-measure."""
    teacher, student, reward, _ = _models()
    x0, cond, state = torch.rand(16, 4, 2) * 2 - 1, torch.randn(16, 3), torch.randn(16, 3)

    def run(cfg, balance=None, scale=1.0):
        student.zero_grad()
        torch.manual_seed(5)
        out = ctm.ractd_loss(student, teacher, reward, x0 * scale, cond, state * scale, cfg, balance)
        out["loss"].backward()
        return out, [p.grad.clone() for p in student.parameters()]

    norms = {}
    for k, w in (("ctm", (1.0, 0.0, 0.0)), ("dsm", (0.0, 1.0, 0.0)), ("reward", (0.0, 0.0, 1.0))):
        # sigma > 0 keeps the reward term's noise draw in every run; a zero weight removes its gradient only
        cfg = ctm.DistillConfig(alpha=w[0], beta=w[1], sigma=w[2] if k == "reward" else 1e-30)
        _, g = run(cfg)
        norms[k] = float(torch.sqrt(sum(x.pow(2).sum() for x in g)))
    bal = ctm.TermBalance(every=3)
    cfg = ctm.DistillConfig(alpha=2.0, beta=0.5, sigma=0.3, term_scale="gradient")
    out, grads = run(cfg, bal)
    for k in norms:
        np.testing.assert_allclose(bal.magnitude[k], norms[k], rtol=1e-4)
    assert max(norms.values()) > 3 * min(norms.values())  # unequal pulls to begin with
    raw_cfg = ctm.DistillConfig(alpha=2.0 / norms["ctm"], beta=0.5 / norms["dsm"], sigma=0.3 / norms["reward"])
    _, raw_grads = run(raw_cfg)
    for g, r in zip(grads, raw_grads):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-3, atol=1e-7)
    first = dict(bal.magnitude)
    run(cfg, bal, 0.5), run(cfg, bal, 0.5)
    assert bal.magnitude == first and bal.calls == 3  # steps 1, 2 reuse the measurement
    run(cfg, bal, 0.5)
    assert all(bal.magnitude[k] != first[k] for k in first)
