"""The sweep's command line -> its stages' training configs (ractd_repro.sweep.SearchConfig)."""

import pytest

from ractd.train import BUDGETS
from ractd_repro.spec import TABLES_SWEEPS

search = pytest.importorskip("ractd_ray.search")


def _config(*argv):
    return search.config_from_args(search.build_parser().parse_args(list(argv)))


def test_teacher_batch_sets_the_shared_teachers_batch_and_nothing_else():
    scfg = _config("--task", "hopper-medium", "--teacher-batch", "48", "--batch", "32")
    teacher, reward, student = (scfg.stage_config(s) for s in ("teacher", "reward", "student"))
    assert (teacher.batch, student.batch) == (48, 32)
    assert reward.batch == BUDGETS["cpu"]["reward"]["batch"]
    default = _config("--task", "hopper-medium")
    assert default.stage_config("teacher").batch == BUDGETS["cpu"]["teacher"]["batch"] != 48


def test_a_negative_teacher_batch_is_refused_in_one_line():
    from ractd import RactdError

    with pytest.raises(RactdError, match="teacher_batch=-1"):
        _config("--task", "maze2d-large", "--teacher-batch", "-1").validate()


@pytest.mark.parametrize("task", sorted(TABLES_SWEEPS))
def test_every_tables_sweep_parses_and_validates(task):
    scfg = _config("--task", task, *TABLES_SWEEPS[task].split()).validate()
    assert scfg.stage_config("student").batch == 128
    if task == "maze2d-large":  # its own teacher: a quarter of the batch, four times the steps
        assert (scfg.stage_config("teacher").batch, scfg.stage_config("teacher").steps) == (64, 12000)
