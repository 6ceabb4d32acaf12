"""Overlapped rollouts (env stepping of one half of the seeds while the network acts for the other half)
give the same per-seed records as sequential rollouts for the same seeds."""

import numpy as np
import pytest
import torch

from ractd import ctm
from ractd.config import UNET_PRESETS
from ractd.data.windows import Normalizer
from ractd.nets.unet1d import ConditionalUnet1D
from ractd.policy import LocomotionPolicy, student_sampler
from ractd.rollout import rollout_locomotion

TASK = "hopper-medium"
SAME = ("seed", "length", "terminated", "truncated", "batch_size", "task")


def tiny_policy(obs_history=2):
    torch.manual_seed(0)
    student = ctm.Student(ConditionalUnet1D(3, 11 * obs_history, UNET_PRESETS["tiny"], n_times=2)).eval()
    # actions in [-0.6, 0.6]: the random policy's hopper falls after 58 steps for one of the seeds below
    return LocomotionPolicy(student_sampler(student, (16, 3)), Normalizer(-3 * np.ones(11), 3 * np.ones(11)),
                            Normalizer(-0.6 * np.ones(3), 0.6 * np.ones(3)), obs_history=obs_history)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_overlapped_rollouts_give_the_sequential_records(mode):
    seeds = [11, 3, 7, 0, 5]  # odd count: halves of 3 and 2
    ref = rollout_locomotion(TASK, tiny_policy(), seeds, max_steps=60, progress=False)
    got = rollout_locomotion(TASK, tiny_policy(), seeds, max_steps=60, progress=False, overlap=mode)
    assert len({r["length"] for r in ref}) > 1, "the test wants episodes that end at different steps"
    assert any(r["terminated"] for r in ref) and any(r["truncated"] for r in ref)
    for a, b in zip(got, ref):
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
        # half-size batches may round the network's last bits differently; Hopper amplifies little in 60 steps
        np.testing.assert_allclose(a["return"], b["return"], rtol=1e-5)
        np.testing.assert_allclose(a["normalized_score"], b["normalized_score"], rtol=1e-5, atol=1e-6)


def test_overlap_with_one_seed_and_bad_mode():
    ref = rollout_locomotion(TASK, tiny_policy(1), [4], max_steps=10, progress=False)
    got = rollout_locomotion(TASK, tiny_policy(1), [4], max_steps=10, progress=False, overlap=True)
    assert got[0]["return"] == ref[0]["return"] and got[0]["length"] == ref[0]["length"]
    with pytest.raises(ValueError, match="overlap"):
        rollout_locomotion(TASK, tiny_policy(1), [4], max_steps=10, progress=False, overlap="fork")
