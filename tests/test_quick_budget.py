"""The quick-budget study: its runs are the quick sweep's stages, and its paired rule on training seeds."""

import dataclasses
import math

from ractd_repro.studies import quick_budget as qb
from ractd_repro.sweep import SearchConfig, quick_settings


def test_its_runs_are_the_quick_sweeps_teacher_and_table9_trial_with_fewer_teacher_steps(tmp_path):
    teacher, student = qb.stage_configs(600, 1, tmp_path)
    sweep_teacher, sweep_student = SearchConfig(task=qb.TASK, **quick_settings(qb.TASK), seed=1).stage_configs()
    assert (teacher.steps, sweep_teacher.steps) == (600, 1200)
    assert dataclasses.replace(teacher, steps=sweep_teacher.steps, run_dir="") == \
        dataclasses.replace(sweep_teacher, run_dir="")
    assert dataclasses.replace(student, run_dir="", teacher_ckpt="") == \
        dataclasses.replace(sweep_student, run_dir="", teacher_ckpt="")
    assert student.teacher_ckpt == str(tmp_path / "teacher" / "best.pt") and student.steps == 75


def _row(steps, seed, mean, se, policy="student"):
    return {"teacher_steps": steps, "seed": seed, "policy": policy, "mean": mean, "se": se, "n": 100,
            "teacher_time_s": math.nan}


def test_paired_rule_compares_each_budget_with_the_largest_on_the_same_seed():
    rows = [_row(1200, 0, 120.0, 3.0), _row(600, 0, 100.0, 3.0),   # -20 against 2 x 4.24: below
            _row(1200, 1, 120.0, 3.0), _row(600, 1, 113.0, 3.0),   # -7: within 2 SE
            _row(600, 2, 50.0, 1.0),                                # no reference on seed 2: not compared
            _row(1200, 0, 10.0, 1.0, policy="heun")]                # another policy: not this comparison
    got = {p["seed"]: p for p in qb.paired(rows)}
    assert sorted(got) == [0, 1]
    assert math.isclose(got[0]["difference"], -20.0) and math.isclose(got[0]["se"], math.hypot(3.0, 3.0))
    assert got[0]["below"] and not got[1]["below"] and got[0]["reference_steps"] == 1200
    text = "\n".join(qb.report_lines(rows))
    assert "seed 0: -20.0 ± 4.2  BELOW" in text and "seed 1: -7.0 ± 4.2" in text
