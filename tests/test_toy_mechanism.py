"""The paper's mechanism (Fig. 3) in miniature, trained on CPU: a bandit whose high-reward mode is the 30%
minority. Teacher (Heun-80) and CTD student keep the data's mode shares; the RACTD student moves to the
high-reward mode; the one-step CTD student matches the teacher in distribution."""

import numpy as np
import pytest
import torch
from scipy import stats

from ractd import ctm, edm, toy

CFG = toy.ToyConfig(teacher_steps=2000, reward_steps=600, distill_steps=1000)


@pytest.fixture(scope="module")
def trained():
    return toy.run(CFG, sigma=0.1, variant="one_step")


def test_teacher_and_ctd_keep_the_minority_mode(trained):
    data = trained["data"]
    np.testing.assert_allclose(data, 0.3, atol=0.02)
    for name in ("teacher", "ctd"):
        assert 0.5 * data <= trained[name] <= 1.5 * data, (name, trained[name], data)


def test_ractd_student_selects_the_high_reward_mode(trained):
    assert trained["ractd"] >= 0.8, trained["ractd"]


def test_one_step_ctd_matches_teacher_heun80_in_distribution(trained):
    """Two-sample statistic on the state-free projection z = (a - 0.2 s) . (1, 1) / sqrt(2), where the modes
    sit at +-0.85 (gap 1.7): Wasserstein-1(teacher z, CTD z) < 0.25, i.e. under 15% of the mode gap, and the
    high-mode shares within 0.1. A student collapsed onto one mode or onto the mean between the modes scores
    W1 ~ 0.5-0.8; at this training budget a correct one (measured: W1 0.16-0.19) has somewhat wider modes
    than the teacher, which is why KS (D ~ 0.25) is not the statistic used here."""
    m = trained["models"]
    s = trained["eval_state"]
    g = torch.Generator().manual_seed(5)
    x_T = edm.prior_sample((len(s), 1, 2), generator=g)
    teacher = edm.sample_heun(m["teacher"].bind(s), x_T, edm.karras_sigmas())
    student = ctm.sample_student(m["ctd"], edm.prior_sample((len(s), 1, 2), generator=g), s)
    proj = lambda a: ((a[:, 0] - 0.2 * s).sum(1) / np.sqrt(2)).numpy()
    z_t, z_s = proj(teacher), proj(student)
    assert stats.wasserstein_distance(z_t, z_s) < 0.25
    np.testing.assert_allclose((z_s > 0).mean(), (z_t > 0).mean(), atol=0.1)
