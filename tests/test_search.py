"""tune/search.py (ractd_ray.search) on a real local Ray: tiny sweeps on a locomotion and a maze task, shared
teacher / reward model trained once, --resume after an interruption, bad input before Ray starts."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("ray")

import ray
from test_pipeline import random_hopper_dataset

from ractd import RactdError
from ractd.data.d4rl import local_dataset_path, write_d4rl_hdf5
from ractd.tasks import get_task
from ractd_repro.records import trial_times
from ractd_ray.search import (
    SCORE_FLOOR,
    SEARCH_METRIC,
    SIGMA_CHOICES,
    finite_score,
    main,
    startup_trials,
)
from ractd_ray.train import ensure_ray

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
# a tiny budget: tiny U-Nets, 20-step teacher and reward model, 12-step students checkpointed every 4 steps
# (ASHA may stop a trial at step 8), one 20-step objective rollout per checkpoint
TINY = ["--quick", "--preset", "tiny", "--steps", "12", "--ckpt-every", "4", "--teacher-steps", "20",
        "--reward-steps", "20", "--batch", "16", "--num-samples", "2", "--max-concurrent", "1", "--select-seeds", "1",
        "--select-max-steps", "20"]


# ------------------------------------------------------------------------------------------ bad input (no Ray)

@pytest.mark.parametrize("argv, message", [
    (["--task", "hopper-nope"], "unknown task 'hopper-nope'; known tasks: hopper-medium,"),
    (["--task", "maze2d-umaze", "--num-samples", "0"], "num_samples=0: must be a positive integer"),
    (["--task", "maze2d-umaze", "--scale", "huge"], "unknown scale 'huge'; expected one of tiny, small, full"),
    (["--task", "maze2d-umaze", "--sigmas", "0.5"], "maze2d-umaze: --sigmas needs a locomotion task"),
    (["--task", "hopper-medium-replay", "--sigmas", "0.33"], "sigma 0.33 is not on the search grid 0, 0.05,"),
    (["--task", "hopper-medium-replay", "--sigmas", "0", "0.3", "--num-samples", "2"],
     "num_samples=2: fewer than the 3 points the search evaluates first"),
])
def test_bad_input_is_one_line_exit_2_before_ray_starts(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not ray.is_initialized()


def test_dataset_that_fails_validation_is_one_line_exit_2_before_ray_starts(capsys):
    task = get_task("hopper-medium-replay")
    path = random_hopper_dataset()
    from ractd.data.d4rl import load_d4rl_hdf5

    data = load_d4rl_hdf5(path)
    data["observations"][3, 1] = np.nan
    write_d4rl_hdf5(local_dataset_path(task, "tiny"), data)
    assert main(["--task", task.name, *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "NaN" in err and "\n" not in err
    assert not ray.is_initialized()


# ------------------------------------------------------------------------------------------ sweeps

def test_unreachable_address_is_one_line_within_seconds(capsys):
    t0 = time.monotonic()
    assert main(["--task", "maze2d-umaze", "--quick", "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the dataset is generated (and says so) before Ray
    assert err[-1] == "error: no Ray cluster answers at 127.0.0.1:1 (is `ray start --head` running there?)"
    assert time.monotonic() - t0 < 30 and not ray.is_initialized()


def test_no_address_starts_a_local_ray_not_the_machine_cluster(monkeypatch):
    from ractd_ray.connect import resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(RactdError, match="no Ray cluster answers at 127.0.0.1:1"):
        resolve_address(None)


def test_non_finite_score_never_reaches_asha_and_tpe_starts_follow_the_budget():
    assert finite_score({"select_score": float("nan"), "step": 4}) == {"select_score": SCORE_FLOOR, "step": 4}
    assert finite_score({"select_score": None})["select_score"] == SCORE_FLOOR
    assert finite_score({"select_score": 2.5}) == {"select_score": 2.5}
    assert startup_trials(12, 1) == 3 and startup_trials(100, 2) == 10 and startup_trials(12, 5) == 5


def test_a_retry_stopped_by_asha_takes_its_times_from_its_reports_not_the_failed_attempts_summary():
    """A trial whose first attempt failed before training (its driver wrote a failure summary: train time 0) and
    whose retry ASHA stopped (no summary of its own) has the retry's times; a finished trial its summary's; a trial
    whose last attempt failed its failure summary's."""
    failed = {"error": "worker group did not start", "train_time_s": 0.0, "fit_time_s": 31.0}
    reported = {"train_time_s": 5.5, "fit_time_s": 9.0, "startup_train_s": 2.0, "step": 8, "done": True}
    names = ("train_time_s", "fit_time_s", "startup_train_s")

    def times(summary, failed):
        timed = trial_times(summary, reported, failed=failed)
        return [timed(k) for k in names]

    assert times(failed, failed=False) == [5.5, 9.0, 2.0]
    assert times(failed, failed=True) == [0.0, 31.0, 2.0]
    assert times({"train_time_s": 6.0, "fit_time_s": 11.0}, failed=False) == [6.0, 11.0, 2.0]
    assert times({}, failed=False) == [5.5, 9.0, 2.0]
    assert math.isnan(trial_times({}, {}, failed=False)("train_time_s"))  # not recorded: NaN, not 0


@pytest.fixture(scope="module")
def local_ray():
    ensure_ray("local", num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _checkpoint_scores(trial_dir: Path) -> list[float]:
    lines = (trial_dir / "student" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["select_score"] for line in lines]


def _trial_files(out: Path, trial_id: str) -> dict[str, str]:
    """A trial's records under the sweep's folder (its driver's starts -- a line per attempt --, the summaries
    and failure timings in the run's storage), for a failure message."""
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*"))
            if trial_id in p.parts and p.name in ("driver.log", "summary.json", "timing.json") and p.is_file()}


def _check_times(r: dict, out: Path) -> None:
    """A trial's row records its training time (the library's train() in its worker), its fit() time and when
    its start-up steps were done, whether it ran to its end or ASHA stopped it. (On failure: the row and the
    trial's records, _trial_files.)"""
    assert 0 < r["train_time_s"] < r["fit_time_s"], (r, _trial_files(out, r["trial_id"]))
    stamps = [r[f"startup_{k}_s"] for k in ("fit", "loop", "data", "inputs", "train", "first_step")]
    assert stamps == sorted(stamps) and 0 <= stamps[0] and stamps[-1] < r["fit_time_s"] + stamps[0], \
        (r, _trial_files(out, r["trial_id"]))


def _check_sweep(out: Path, task_name: str, n: int) -> dict:
    """trials.parquet: one row per trial with the weights and scores; best = argmax; best/checkpoint.pt is it."""
    table = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(table) == n and len({r["trial_id"] for r in table}) == n
    task = get_task(task_name)
    for r in table:
        assert r["status"] in ("completed", "stopped")
        _check_times(r, out)
        assert r["alpha"] > 0 and r["beta"] > 0 and r["sigma"] in SIGMA_CHOICES
        assert task.kind == "locomotion" or r["sigma"] == 0.0
        assert math.isfinite(r["select_score"]) and math.isfinite(r["dsm"]) and math.isfinite(r["ctm"])
        # the trial's score is its best checkpoint's, as the library recorded it in the trial's run folder
        assert r["select_score"] == pytest.approx(max(_checkpoint_scores(out / "trials" / r["trial_id"])))
        # the diagnostics of the best checkpoint ride along (a share in [0, 1]; R_psi gap where a reward exists)
        assert 0.0 <= r["at_bound"] <= 1.0 and r["out_of_range"] >= 0.0 and r["best_step"] > 0
        assert task.kind != "locomotion" or r["sigma"] == 0.0 or math.isfinite(r["r_gap"])
        cfg = json.loads((out / "trials" / r["trial_id"] / "student" / "config.json").read_text())
        assert (cfg["distill"]["alpha"], cfg["distill"]["beta"], cfg["distill"]["sigma"]) == \
            pytest.approx((r["alpha"], r["beta"], r["sigma"]))
    w = task.weights  # the first trial is the paper's Table 9 setting
    assert any((r["alpha"], r["beta"], r["sigma"]) == (w.alpha, w.beta, w.sigma) for r in table)
    best = json.loads((out / "best_config.json").read_text())
    top = max(table, key=lambda r: r["select_score"])
    assert best["score"] == pytest.approx(top["select_score"]) and best["trial_id"] == top["trial_id"]
    assert (best["alpha"], best["beta"], best["sigma"]) == (top["alpha"], top["beta"], top["sigma"])
    ck = torch.load(out / "best" / "checkpoint.pt", weights_only=False)
    assert ck["config"]["stage"] == "student" and ck["select_score"] == pytest.approx(best["score"])
    assert (ck["config"]["distill"]["alpha"], ck["config"]["distill"]["sigma"]) == (best["alpha"], best["sigma"])
    return {"table": table, "best": best}


@pytest.mark.slow
def test_locomotion_sweep_shared_models_once_and_resume(local_ray, tmp_path, capsys):
    task = "hopper-medium-replay"
    random_hopper_dataset()
    first = tmp_path / "first"
    assert main(["--task", task, *TINY, "--sigmas", "0", "--run-dir", str(first)]) == 0
    assert "select_score" in capsys.readouterr().out  # the summary table
    table = _check_sweep(first, task, 2)["table"]
    # --sigmas 0: the two trials are the grid's points, Table 9 (sigma = 1) and CTD, not TPE proposals
    assert sorted((r["alpha"], r["beta"], r["sigma"]) for r in table) == [(1.0, 1.0, 0.0), (1.0, 1.0, 1.0)]
    assert table[0]["select_score"] != table[1]["select_score"]  # so that picking the argmax is not vacuous
    search = json.loads((first / "search.json").read_text())
    assert search["dataset"]["source"] == "local" and not search["dataset"]["generated"]
    shared = search["shared"]
    assert sorted(shared["trained"]) == ["reward", "teacher"]
    stamps = {p: os.stat(p).st_mtime_ns for p in (shared["teacher"], shared["reward"])}

    # a second search of the task (on its own local Ray, as from a shell), interrupted (Ctrl-C) once its first
    # trial has finished and the second has started (it starts while the first trains: prestart)
    second = tmp_path / "second"
    proc = subprocess.Popen([sys.executable, str(REPO / "tune" / "search.py"), "--task", task, *TINY,
                             "--run-dir", str(second)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while (len(list((second / "trials").glob("*/driver.log"))) < 2
               or not list((second / "trials").glob("*/summary.json"))):
            assert proc.poll() is None and time.monotonic() < deadline, "the second search ended or hung"
            time.sleep(1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((second / "search.json").read_text())["shared"]["trained"] == []  # trains neither
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps
    done = [d for d in (second / "trials").iterdir() if (d / "summary.json").is_file()]
    assert len(done) == 1
    finished = done[0]
    finished_metrics = (finished / "student" / "metrics.jsonl").read_text()

    assert main(["--task", task, "--resume", "--run-dir", str(second)]) == 0
    result = _check_sweep(second, task, 2)
    assert finished.name in {r["trial_id"] for r in result["table"]}
    assert len((finished / "driver.log").read_text().splitlines()) == 1  # the finished trial did not run again
    assert (finished / "student" / "metrics.jsonl").read_text() == finished_metrics
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps


def _scalars(path: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar in a TensorBoard event file (TFRecord: length, its CRC, the Event, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    data, i, out = path.read_bytes(), 0, []
    while i + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return out


@pytest.mark.slow
def test_maze_sweep_generates_its_dataset_and_trains_no_reward_model(local_ray, tmp_path):
    from ractd_ray.search import build_parser, config_from_args, run_search

    out = tmp_path / "sweep"
    result = run_search(config_from_args(build_parser().parse_args(["--task", "maze2d-umaze", *TINY, "--run-dir",
                                                                    str(out), "--report-every", "2"])))
    assert result["complete"]
    table = _check_sweep(out, "maze2d-umaze", 2)["table"]
    for r in table:  # Tune's TensorBoard files hold the loss at every report, not only at the checkpoints
        events = list((out / "ray" / "tune").glob(f"{r['trial_id']}*/events.out.tfevents.*"))
        losses = _scalars(events[0], "ray/tune/loss") if events else []
        assert len(losses) == r["step"] // 2 and len(losses) > r["step"] // 4, (r["trial_id"], losses)
    # what Tune's searcher learned from each trial (its last result) is the score the sweep ranked it by
    grid = result["result_grid"]
    learned = {Path(r.path).name: r.metrics[SEARCH_METRIC] for r in grid}
    assert learned == pytest.approx({r["trial_id"]: r["select_score"] for r in table})
    assert all(Path(r.metrics["checkpoint_path"], "checkpoint.pt").is_file() for r in grid)  # each trial's
    search = json.loads((out / "search.json").read_text())
    assert search["dataset"]["source"] == "local" and search["dataset"]["generated"]
    assert search["shared"]["trained"] == ["teacher"] and search["shared"]["reward"] == ""
