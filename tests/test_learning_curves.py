"""Held-out episodes (ractd.holdout) and the learning-curve study: the split takes whole episodes (a split of
windows would leak, and the check sees it), nested fractions and one held-out set, held-out losses that are a
function of the weights alone, the "stopped falling" rule, and the study end to end on a tiny dataset."""

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ractd import holdout
from ractd.data.d4rl import load_dataset
from ractd.io import atomic_parquet
from ractd.paths import cache_dir
from ractd.data.generate_maze import generate_maze
from ractd.data.generate_random import random_locomotion_dataset
from ractd.data.windows import locomotion_windows, maze_segments
from ractd.tasks import get_task
from ractd.train import BUILDERS, TrainConfig, load_teacher_into_student, prepare
from ractd_repro.studies import learning_curves as lc

HOPPER = dict(task="hopper-medium-replay", scale="tiny", preset="tiny", batch=16)
MAZE = dict(task="maze2d-umaze", scale="tiny", preset="tiny", batch=8)


@pytest.fixture
def hopper_tiny():
    """A random-action hopper dataset (1500 steps, extra timeouts: about 60 short episodes)."""
    random_locomotion_dataset("hopper-medium-replay", 1500, 0, cut_prob=0.01)
    return load_dataset(get_task("hopper-medium-replay"), scale="tiny")


def _rows_read(windows: dict, idx: np.ndarray) -> set[int]:
    """The dataset rows the locomotion windows `idx` read (past states and action chunks)."""
    return set(windows["obs_idx"][idx].ravel().tolist()) | set(windows["action_idx"][idx].ravel().tolist())


def _leaks(windows: dict, train_idx, val_idx) -> bool:
    return bool(_rows_read(windows, train_idx) & _rows_read(windows, val_idx))


def test_the_split_holds_out_whole_episodes_and_a_window_split_would_leak(hopper_tiny):
    cfg = TrainConfig(**HOPPER, holdout=0.2)
    prep = prepare(cfg, hopper_tiny)
    train_idx, val_idx = holdout.split(cfg, prep)
    w = locomotion_windows(hopper_tiny, horizon=prep.task.horizon, materialize=False)
    assert len(val_idx) > 0 and not set(prep.episode[train_idx]) & set(prep.episode[val_idx])
    assert not _leaks(w, train_idx, val_idx)
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(len(prep.cond)))
    # the planted split: the same number of held-out windows drawn at random -- windows share transitions
    perm = np.random.default_rng(0).permutation(len(prep.cond))
    assert _leaks(w, np.sort(perm[len(val_idx):]), np.sort(perm[:len(val_idx)]))
    n_eps = len(prep.episode_lengths)
    assert len(set(prep.episode[val_idx])) == round(0.2 * n_eps)
    assert int(prep.episode_lengths.sum()) == len(hopper_tiny["rewards"])


def test_fractions_are_nested_and_the_heldout_episodes_the_same_for_every_stage_and_seed(hopper_tiny):
    prep = prepare(TrainConfig(**HOPPER), hopper_tiny)
    parts = {f: holdout.split(TrainConfig(**HOPPER, holdout=0.1, data_fraction=f), prep) for f in (0.25, 0.5, 1.0)}
    for small, big in ((0.25, 0.5), (0.5, 1.0)):
        assert set(parts[small][0]) < set(parts[big][0])
        np.testing.assert_array_equal(parts[small][1], parts[big][1])
    for other in (dict(seed=3), dict(stage="student"), dict(stage="ddpm")):
        np.testing.assert_array_equal(holdout.split(TrainConfig(**HOPPER, holdout=0.1, **other), prep)[1],
                                      parts[1.0][1])
    held = set(prep.episode[parts[1.0][1]])
    bc_prep = prepare(TrainConfig(**HOPPER, stage="bc"), hopper_tiny)  # BC's pairs: one per transition
    _, bc_val = holdout.split(TrainConfig(**HOPPER, stage="bc", holdout=0.1), bc_prep)
    assert set(bc_prep.episode[bc_val]) == held


def test_maze_holds_out_whole_segments_for_the_planner_and_bc():
    generate_maze("maze2d-umaze", scale="tiny", seed=0, progress=False)
    data = load_dataset(get_task("maze2d-umaze"), scale="tiny")
    cfg = TrainConfig(**MAZE, holdout=0.25)
    prep = prepare(cfg, data)
    train_idx, val_idx = holdout.split(cfg, prep)
    H = prep.shape_tail[0]
    starts = prep.x.starts
    rows = lambda idx: set((starts[idx][:, None] + np.arange(H)).ravel().tolist())  # noqa: E731
    assert len(val_idx) > 0 and not rows(train_idx) & rows(val_idx)
    perm = np.random.default_rng(0).permutation(len(starts))
    assert rows(perm[len(val_idx):]) & rows(perm[:len(val_idx)])  # a split of windows would share states
    bc_cfg = TrainConfig(**MAZE, stage="bc", holdout=0.25)
    bc_prep = prepare(bc_cfg, data)
    bc_train, bc_val = holdout.split(bc_cfg, bc_prep)
    seg_of = np.zeros(len(data["rewards"]), int)
    for k, (s, e) in enumerate(maze_segments(data)):
        seg_of[s:e] = k
    assert len(bc_val) > 0 and not set(seg_of[bc_train]) & set(seg_of[bc_val])
    # the planner cuts the same segments as BC (on the raw positions: the goal radius is in the maze's units), so
    # its held-out windows lie in BC's held-out segments
    lengths = [e - s for s, e in maze_segments(data)]
    np.testing.assert_array_equal(prep.episode_lengths, lengths)
    assert set(seg_of[starts[val_idx]]) <= set(seg_of[bc_val])


def _held_and_models(cfg: TrainConfig, prep):
    _, val_idx = holdout.split(cfg, prep)
    return holdout.fixed_draws(cfg, prep, val_idx, "cpu"), val_idx


def test_the_heldout_loss_is_a_function_of_the_weights_alone(hopper_tiny):
    cfg = TrainConfig(**HOPPER, holdout=0.2).resolved()
    prep = prepare(cfg, hopper_tiny)
    held, _ = _held_and_models(cfg, prep)
    again, _ = _held_and_models(cfg, prep)
    for k in held.draws:
        torch.testing.assert_close(held.draws[k], again.draws[k], rtol=0, atol=0)
    teacher = BUILDERS["teacher"](cfg, prep)
    rng = torch.get_rng_state()
    first = holdout.teacher_loss(teacher, held, cfg)
    assert first == holdout.teacher_loss(teacher, held, cfg) and math.isfinite(first)
    torch.testing.assert_close(torch.get_rng_state(), rng, rtol=0, atol=0)  # nothing drawn from the global stream
    assert teacher.training  # its mode restored
    with torch.no_grad():
        next(teacher.parameters()).add_(0.05)
    assert holdout.teacher_loss(teacher, held, cfg) != first
    # the student's Eq. (5)-(7) terms with their fixed draws, and DDPM's epsilon loss, alike
    s_cfg = dataclasses.replace(cfg, stage="student")
    s_held, _ = _held_and_models(s_cfg, prep)
    student = BUILDERS["student"](s_cfg, prep)
    load_teacher_into_student(student.net, teacher.net)
    a = holdout.student_losses(student, teacher, s_held, s_cfg)
    assert a == holdout.student_losses(student, teacher, s_held, s_cfg) and math.isfinite(a["val_loss"])
    with torch.no_grad():
        next(student.parameters()).add_(0.05)
    assert holdout.student_losses(student, teacher, s_held, s_cfg)["val_dsm"] != a["val_dsm"]
    d_cfg = dataclasses.replace(cfg, stage="ddpm")
    d_held, _ = _held_and_models(d_cfg, prep)
    eps_model = BUILDERS["ddpm"](d_cfg, prep)
    rng = torch.get_rng_state()
    assert holdout.ddpm_loss(eps_model, d_held) == holdout.ddpm_loss(eps_model, d_held)
    assert holdout.student_losses(student, teacher, s_held, s_cfg) != a
    torch.testing.assert_close(torch.get_rng_state(), rng, rtol=0, atol=0)


def test_the_teacher_levels_are_the_training_distributions_quantiles():
    cfg = TrainConfig(**HOPPER, holdout=0.2)

    class P:  # a Prepared-like holder of 3 windows
        x = np.zeros((3, 16, 3), np.float32)
        cond = np.zeros((3, 11), np.float32)

    held = holdout.fixed_draws(cfg, P, np.arange(3), "cpu", n_levels=4)
    ln = torch.log(held.draws["sigma"].double())
    z = (ln - (-1.2)) / 1.2
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    np.testing.assert_allclose(cdf.numpy(), [0.125, 0.375, 0.625, 0.875], atol=1e-5)


def test_stopped_falling_on_synthetic_curves():
    steps = np.arange(1, 11) * 100
    falling = 10.0 * 0.9 ** np.arange(10)                               # 10% better at every checkpoint
    assert lc.stopped_falling(steps, falling) is None                    # still falling at the end
    flat = np.r_[10.0, 8.0, 6.0, 5.0, 4.99, 4.98, 4.97, 4.975, 4.97, 4.965]  # within 1% from step 400 on
    assert lc.stopped_falling(steps, flat) == 400
    rising = np.r_[10.0, 7.0, 6.0, 6.3, 6.6, 7.0, 7.5, 8.0, 8.5, 9.0]   # best at step 300, then overfitting
    assert lc.stopped_falling(steps, rising) == 300
    assert lc.stopped_falling(steps, np.r_[5.0, np.full(9, np.nan)]) == 100  # a diverged run stopped at once
    assert lc.stopped_falling([100], [1.0]) is None
    assert lc.smallest_sufficient({0.25: 1.10, 0.5: 1.015, 1.0: 1.0}, tolerance=0.02) == 0.5
    assert lc.smallest_sufficient({0.25: 1.10, 0.5: 1.05, 1.0: 1.0}, tolerance=0.02) == 1.0


def _curve_rows(fraction, steps, losses, budget=None):
    rows = [{"stage": "teacher", "preset": "tiny", "batch": 8, "seed": 0, "holdout": 0.1, "fraction": fraction,
             "n_train_transitions": int(100 * fraction), "n_train_episodes": 2, "step": s, "val_loss": v}
            for s, v in zip(steps, losses)]
    return [{**r, "budget": budget} for r in rows] if budget is not None else rows


def test_budgets_are_read_from_runs_of_their_own_and_old_rows_keep_theirs():
    # rows stored before the budget column (fractions at 200 steps) beside a 600-step run of fraction 1
    old = _curve_rows(0.5, [100, 200], [2.0, 1.50]) + _curve_rows(1.0, [100, 200], [2.0, 1.40])
    longer = _curve_rows(1.0, [100, 200, 300, 400, 500, 600], [2.1, 1.8, 1.6, 1.45, 1.35, 1.30], budget=600)
    rows = lc.normalized(old + longer)
    assert {(r["fraction"], r["budget"]) for r in rows} == {(0.5, 200), (1.0, 200), (1.0, 600)}
    # the fraction table compares the fractions at their shared budget, not fraction 1's longer run
    (fractions,) = lc.summary(old + longer).values()
    assert [(r["fraction"], r["final_val_loss"]) for r in fractions] == [(0.5, 1.5), (1.0, 1.4)]
    (budgets,) = lc.budget_summary(old + longer, tolerance=0.02).values()
    assert [(r["budget"], r["final_val_loss"]) for r in budgets] == [(200, 1.4), (600, 1.3)]
    assert [r["sufficient"] for r in budgets] == [False, True]          # 1.4 is 7.7% above 1.3
    (budgets,) = lc.budget_summary(old + longer, tolerance=0.10).values()
    assert [r["sufficient"] for r in budgets] == [True, False]
    text = "\n".join(lc.summary_lines(old + longer))
    assert "budget by measurement: 600 steps, the largest tried" in text and "-7.14%" in text
    # one budget only: no budget table, and the curve's flattening is not read as enough training
    text = "\n".join(lc.summary_lines(old))
    assert "budget by measurement" not in text and "runs of other budgets (--budgets) say that" in text


def test_the_study_writes_falling_heldout_curves_per_fraction(hopper_tiny, tmp_path, capsys):
    out = tmp_path / "store"
    argv = ["--task", "hopper-medium-replay", "--scale", "tiny", "--preset", "tiny", "--batch", "16", "--steps", "40",
            "--ckpt-every", "20", "--fractions", "0.5", "1.0", "--holdout", "0.2", "--out", str(out)]
    assert lc.main(argv) == 0
    df = pd.read_parquet(out / "curves.parquet")
    assert sorted(df["fraction"].unique()) == [0.5, 1.0] and set(df["step"]) == {20, 40}
    # --budgets: a run of the largest fraction with its own schedule, beside the fractions' (kept as they were)
    assert lc.main(argv + ["--budgets", "60"]) == 0
    both = pd.read_parquet(out / "curves.parquet")
    longer = both[both["budget"] == 60].sort_values("step")
    assert set(longer["fraction"]) == {1.0} and set(longer["step"]) == {20, 40, 60}
    # its own run (a 60-step schedule from step 0), not the 40-step run of fraction 1 extended
    runs = cache_dir() / "bench" / "curves" / "hopper-medium-replay-tiny" / "runs"
    steps = {d.name: json.loads((d / "teacher" / "config.json").read_text())["steps"] for d in runs.iterdir()}
    assert sorted(steps.values()) == [40, 40, 60] and [n for n, v in steps.items() if v == 60][0].endswith("-n60")
    kept = both[both["budget"] == 40].sort_values(["fraction", "step"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[df.columns], df.sort_values(["fraction", "step"]).reset_index(drop=True))
    text = capsys.readouterr().out
    assert "held-out loss per training budget" in text
    atomic_parquet(out / "curves.parquet", df.to_dict("records"))  # the fractions' store again, for what follows
    assert df["fingerprint"].nunique() == 1 and (df["task"] == "hopper-medium-replay").all()
    for fraction, c in df.sort_values("step").groupby("fraction"):
        assert c["val_loss"].iloc[-1] < c["val_loss"].iloc[0], fraction
        assert np.isfinite(c["train_loss"]).all()
    sizes = df.groupby("fraction")["n_train_transitions"].first()
    assert sizes[0.5] < sizes[1.0] and df["n_val_windows"].nunique() == 1
    assert "data size by measurement: fraction" in text and "stopped falling at" in text
    lines = lc.summary_lines([{"stage": "teacher", "preset": "tiny", "batch": 8, "seed": 0, "holdout": 0.1,
                               "fraction": 1.0, "n_train_transitions": 10, "n_train_episodes": 2, "step": s,
                               "val_loss": v} for s, v in ((1, 2.0), (2, 1.0), (3, 0.999))])
    assert any("best held-out loss is at its last checkpoint" in x for x in lines)
    # --report re-reads the store; a re-run resumes (nothing retrained) and keeps one row per checkpoint; --threads
    # sets torch's threads (process-wide: put back after; conftest runs the tests on one thread, so start from two)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert lc.main(argv + ["--report"]) == 0 and lc.main(argv + ["--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert len(pd.read_parquet(out / "curves.parquet")) == len(df)
    # docs/results.md's part renders a committed store: the summary and the curve of each fraction
    assert lc.section(tmp_path / "data") == []
    (tmp_path / "data" / "curves" / "hopper-medium-replay-tiny").mkdir(parents=True)
    (out / "curves.parquet").rename(tmp_path / "data" / "curves" / "hopper-medium-replay-tiny" / "curves.parquet")
    section = "\n".join(lc.section(tmp_path / "data"))
    assert "held-out loss at each checkpoint" in section and "fraction 0.5" in section
    # a store with a second budget names each run's budget in the curves
    rows = lc.normalized(pd.read_parquet(tmp_path / "data" / "curves" / "hopper-medium-replay-tiny" /
                                         "curves.parquet").to_dict("records"))
    longer = [{**r, "budget": 80, "step": 2 * r["step"]} for r in rows if r["fraction"] == 1.0]
    atomic_parquet(tmp_path / "data" / "curves" / "hopper-medium-replay-tiny" / "curves.parquet", rows + longer)
    section = "\n".join(lc.section(tmp_path / "data"))
    assert "fraction 1, 80 steps" in section and "fraction 0.5, 40 steps" in section
