"""The warm-start control (ractd_repro.methods "teacher-euler-1"): a student warm-started from its teacher
(ractd.nets.unet1d.load_teacher_into_student, what distillation starts from) samples, in one jump
G(x_T, sigma_max, sigma_min), the teacher's one Euler step from sigma_max to sigma_min (2 Karras bins, one network
call): the same policy up to float rounding. So the teacher's one-step Euler is the student at step 0, and claim 9
compares every distilled student with it."""

import numpy as np
import pytest
import torch

from ractd.data.prepared import Prepared
from ractd.nets.unet1d import load_teacher_into_student
from ractd.policy import euler_sampler, student_sampler
from ractd.tasks import get_task
from ractd.train import TrainConfig, build_student, build_teacher
from ractd_repro import claims
from ractd_repro.methods import get_method
from ractd_repro.tables import network_calls


def _pair(task_name: str, horizon: int, width: int, cond_dim: int):
    task = get_task(task_name)
    prep = Prepared(task, np.zeros((1, horizon, width), np.float32), np.zeros((1, cond_dim), np.float32), {})
    teacher = build_teacher(TrainConfig.for_stage("teacher", "quick", task=task_name, preset="tiny"), prep)
    torch.manual_seed(0)
    for p in teacher.parameters():  # a teacher whose output depends on every input, not an initialization
        p.data.normal_(0.0, 0.05)
    student = build_student(TrainConfig.for_stage("student", "quick", task=task_name, preset="tiny"), prep)
    return teacher, student


@pytest.mark.parametrize("task, horizon, width, cond", [("maze2d-umaze", 32, 4, 8), ("hopper-medium", 16, 3, 11)])
def test_the_student_at_step_0_is_the_teachers_one_step_euler(task, horizon, width, cond):
    teacher, student = _pair(task, horizon, width, cond)
    load_teacher_into_student(student.net, teacher.net)
    obs = torch.randn(6, cond)
    a = student_sampler(student, (horizon, width), n_steps=1)(obs, [torch.Generator().manual_seed(i) for i in range(6)])
    b = euler_sampler(teacher, (horizon, width), n_bins=2)(obs, [torch.Generator().manual_seed(i) for i in range(6)])
    assert a.abs().mean() > 1e-2  # a non-trivial output, not two zeros
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    # the control's cost: one network call, as the tables count it
    m = get_method("teacher-euler-1")
    assert (m.model, m.sampler, network_calls(m.sampler, m.nfe)) == ("teacher", "euler", 1)


def test_a_student_not_warm_started_is_not_the_control():
    """Planted: the same student without the warm start (its own initialization) samples something else."""
    teacher, student = _pair("maze2d-umaze", 32, 4, 8)
    obs = torch.randn(6, 8)
    a = student_sampler(student, (32, 4), n_steps=1)(obs, [torch.Generator().manual_seed(i) for i in range(6)])
    b = euler_sampler(teacher, (32, 4), n_bins=2)(obs, [torch.Generator().manual_seed(i) for i in range(6)])
    assert (a - b).abs().max() > 1e-2


def test_claim_9_asks_every_student_to_beat_its_warm_start():
    from ractd_repro.store import episode_rows

    rows = []
    for method, base in (("ctd", 60.0), ("ractd", 70.0), ("teacher-euler-1", 58.0)):
        recs = [{"task": "hopper-medium", "seed": i, "return": 0.0, "normalized_score": base + (i % 5) - 2,
                 "length": 10, "time_per_action": 0.01, "terminated": False, "truncated": True, "batch_size": 10}
                for i in range(100)]
        rows += episode_rows(recs, method=method, sampler="euler" if method.startswith("teacher") else "student",
                             nfe=2 if method.startswith("teacher") else 1, checkpoint=method, checkpoint_path="/x.pt",
                             scale="test", sigma=0.0 if method == "ctd" else 0.3, versions={"ractd": "test"})
    (v,) = [x for x in claims.claims(rows, [], {}) if x["claim"].startswith("9.")]
    assert v["verdict"] == "holds" and "warm start 58.0" in v["evidence"]
    for r in rows:
        if r["method"] == "ctd":
            r["normalized_score"] -= 2.0  # CTD at 58: no longer above its warm start
    (v,) = [x for x in claims.claims(rows, [], {}) if x["claim"].startswith("9.")]
    assert v["verdict"] == "inconclusive" and "CTD +0.0" in v["evidence"]
