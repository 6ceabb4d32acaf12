"""ractd_repro.studies.bc_fractions: what BC on the best share of the trajectories keeps, and its store."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from ractd.tasks import get_task
from ractd_repro.studies import bc_fractions

TASK = get_task("hopper-medium")
SCORES = (-1.0, 3.0, 50.0, 80.0)  # normalized returns of four trajectories, the worst first


def _dataset(scores=SCORES, length=30, seed=0) -> dict:
    """Hopper-shaped trajectories of `length` steps whose returns normalize to `scores` (the rewards of each
    trajectory sum to its raw return), in a shuffled order: the best ones are not simply the last ones."""
    rng = np.random.default_rng(seed)
    order = [2, 0, 3, 1][:len(scores)]
    lo, hi = TASK.ref_min_score, TASK.ref_max_score
    n = length * len(scores)
    rewards = np.concatenate([np.full(length, (lo + scores[k] / 100 * (hi - lo)) / length) for k in order])
    timeouts = np.zeros(n, bool)
    timeouts[length - 1::length] = True
    return {"observations": rng.normal(size=(n, 11)).astype(np.float32),
            "next_observations": rng.normal(size=(n, 11)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(n, 3)).astype(np.float32), "rewards": rewards.astype(np.float32),
            "terminals": np.zeros(n, bool), "timeouts": timeouts}


@pytest.mark.parametrize("fraction, kept, worst, random_kept", [(1.0, 4, -1.0, 2), (0.75, 3, 3.0, 1),
                                                                 (0.5, 2, 50.0, 0), (0.1, 1, 80.0, 0)])
def test_composition_is_the_hand_counted_one(fraction, kept, worst, random_kept):
    c = bc_fractions.composition(TASK, _dataset(), fraction, random_level=5.0)
    assert c["trajectories"] == kept and c["of"] == 4
    assert c["worst_kept"] == pytest.approx(worst, abs=1e-3)
    assert c["random_kept"] == random_kept


def test_random_level_is_a_normalized_threshold():
    assert bc_fractions.composition(TASK, _dataset(), 1.0, random_level=3.1)["random_kept"] == 2  # the 3.0 one counts
    assert bc_fractions.composition(TASK, _dataset(), 1.0, random_level=2.9)["random_kept"] == 1


def _rows():
    rows = []
    for f, scores, rk in ((1.0, [2.0, 2.4], 2), (0.5, [30.0, 34.0], 0)):
        rows += [{"task": "halfcheetah-medium-replay", "fraction": f, "seed": i, "normalized_score": s,
                  "trajectories": int(70 * f), "of": 70, "worst_kept": -1.0 if f == 1 else 20.0, "random_kept": rk,
                  "random_level": 5.0} for i, s in enumerate(scores)]
    return rows


def test_summary_and_evidence_from_hand_rows():
    s = bc_fractions.summary_rows(_rows())
    assert [r["fraction"] for r in s] == [0.5, 1.0]
    assert s[0]["mean"] == pytest.approx(32.0) and s[0]["se"] == pytest.approx(2.0)  # sd 2 * sqrt(2) over sqrt(2) seeds
    text = bc_fractions.evidence(_rows(), "halfcheetah-medium-replay")
    # the whole dataset first, then the smaller shares; each with its random-level trajectories
    assert text.index("1: 2.2 ± 0.2 (2 of 70 kept at the random level)") < text.index("0.5: 32.0 ± 2.0 (0 of 35")
    assert text.endswith("The steepest fall between neighbouring shares: 32.0 at 0.5 (0 of 35 at the random level) "
                         "to 2.2 at 1 (2 of 70)")
    flat = [dict(r, normalized_score=2.0 + r["seed"] + r["fraction"] / 10) for r in _rows()]  # 2.55 to 2.6: noise
    assert "steepest" not in bc_fractions.evidence(flat, "halfcheetah-medium-replay")
    assert bc_fractions.evidence(_rows(), "hopper-medium") == ""


def test_the_study_trains_evaluates_and_resumes(tmp_path, capsys):
    from ractd.data.d4rl import write_d4rl_hdf5
    from ractd.data.d4rl import local_dataset_path

    write_d4rl_hdf5(local_dataset_path(TASK, "tiny"), _dataset(length=40))
    argv = ["--task", "hopper-medium", "--scale", "tiny", "--fractions", "0.5", "1", "--seeds", "2", "--steps", "20",
            "--out", str(tmp_path / "store")]
    assert bc_fractions.main(argv) == 0
    store = tmp_path / "store" / "scores.parquet"
    rows = pq.read_table(store).to_pylist()
    assert sorted((r["fraction"], r["seed"]) for r in rows) == [(0.5, 0), (0.5, 1), (1.0, 0), (1.0, 1)]
    half = [r for r in rows if r["fraction"] == 0.5]
    assert {(r["trajectories"], r["random_kept"]) for r in half} == {(2, 0)}
    assert len({r["checkpoint"] for r in rows}) == 2  # one BC per fraction
    mtime = store.stat().st_mtime_ns
    assert bc_fractions.main(argv) == 0  # every seed stored: nothing redone
    assert store.stat().st_mtime_ns == mtime
    assert bc_fractions.main(["--report", "--out", str(tmp_path / "store")]) == 0
    assert "2 of 4" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--fractions", "0"], "fraction"), (["--seeds", "1"], "--seeds"),
                                           (["--task", "maze2d-umaze"], "locomotion")])
def test_bad_input_is_one_line(argv, message, capsys, tmp_path):
    assert bc_fractions.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
