"""End to end on tiny data: train reward, teacher, student; evaluate 10 seeds; results stored; resume."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ractd import RactdError
from ractd.cli import main
from ractd.data.generate_maze import generate_maze
from ractd.data.generate_random import random_locomotion_dataset
from ractd.tasks import get_task
from ractd.train import RunContext, TrainConfig, train

TINY = ["--scale", "tiny", "--preset", "tiny", "--batch", "16", "--quiet"]


def random_hopper_dataset(n_steps=1500, seed=0):
    """A small D4RL-format dataset from random actions in Hopper-v5 (extra 1% timeouts: more episodes)."""
    return random_locomotion_dataset("hopper-medium-replay", n_steps, seed, cut_prob=0.01)


@pytest.mark.parametrize("task", ["hopper-medium-replay", "maze2d-umaze"])
def test_tiny_end_to_end(task, tmp_path, capsys):
    if task.startswith("hopper"):
        random_hopper_dataset()
    else:
        generate_maze(task, scale="tiny", seed=0, progress=False)
    run = str(tmp_path / "run")
    common = ["--task", task, "--run-dir", run, *TINY, "--steps", "12"]
    if task.startswith("hopper"):
        assert main(["train-reward", *common]) == 0
    assert main(["train-teacher", *common]) == 0
    assert main(["distill", *common, "--sigma", "1.0" if task.startswith("hopper") else "0",
                 "--ckpt-every", "6", "--select-seeds", "2"]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [6, 12] and all("select_score" in m for m in metrics)
    capsys.readouterr()
    assert main(["evaluate", "--task", task, "--run-dir", run, "--seeds", "10", "--max-steps", "15", "--quiet",
                 "--accelerate", "jit"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = pq.read_table(summary["records"]).to_pydict()
    assert len(table["seed"]) == 10 and sorted(table["seed"]) == list(range(10))
    score = np.asarray(table["normalized_score"])
    assert np.isfinite(score).all()
    np.testing.assert_allclose(score, get_task(task).normalized_score(np.asarray(table["return"])), rtol=1e-6)
    # the resolved config sits beside each checkpoint
    cfg = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert cfg["stage"] == "student" and cfg["task"] == task


def test_resume_continues_the_same_run(tmp_path):
    random_hopper_dataset()
    kw = dict(task="hopper-medium-replay", stage="teacher", scale="tiny", preset="tiny", steps=10, batch=8,
              ckpt_every=5, report_every=5)
    straight = train(TrainConfig(run_dir=str(tmp_path / "a"), **kw), RunContext(progress=False))
    first = train(TrainConfig(run_dir=str(tmp_path / "b"), **kw), RunContext(progress=False, stop_at=5))
    assert first["step"] == 5
    reports = []
    second = train(TrainConfig(run_dir=str(tmp_path / "b"), **kw),
                   RunContext(progress=False, report=lambda m, p: reports.append((m["step"], p))))
    assert second["step"] == 10 and [s for s, _ in reports] == [10]
    a = torch.load(straight["checkpoint"], weights_only=False)["model"]
    b = torch.load(second["checkpoint"], weights_only=False)["model"]
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(RactdError, match="different config"):
        train(TrainConfig(run_dir=str(tmp_path / "b"), **{**kw, "lr": 1e-3}), RunContext(progress=False))


def test_cli_bad_task_is_one_line_exit_2(capsys):
    assert main(["train-teacher", "--task", "hopper-nope", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task") and "\n" not in err
