"""The sweep and the evaluation on a Ray cluster whose nodes share no disk (ractd_ray/testcluster.py): a head with no
CPUs, two worker nodes each with a private tmpfs over the cache directory, storage on S3 (moto's server).

Every command runs as a user runs it on the head: `python tune/search.py ...`, `python eval/reproduce_tables.py
...` with RAY_ADDRESS and RACTD_STORAGE_PATH=s3://... in the environment. The tests run in file order on one
cluster (module fixture): the end-to-end sweep writes the sweep the later tests reuse.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("ray")

from ractd_ray.testcluster import REPO, MultiNodeCluster, skip_reason

pytestmark = pytest.mark.ray

TASK = "maze2d-umaze"
# the README's quick commands at a test budget: tiny U-Nets, a 20-step teacher, 12-step students checkpointed
# every 4 steps, one 20-step objective rollout per checkpoint (the flags given override --quick's)
TINY = ["--quick", "--preset", "tiny", "--steps", "12", "--ckpt-every", "4", "--teacher-steps", "20", "--batch", "16",
        "--num-samples", "2", "--select-seeds", "1", "--select-max-steps", "20"]
SEARCH = [sys.executable, str(REPO / "tune" / "search.py"), "--task", TASK, *TINY]
TABLES = [sys.executable, str(REPO / "eval" / "reproduce_tables.py"), "--quick", "--actors", "2", "--quiet"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = skip_reason()
    if reason and os.environ.get("RACTD_REQUIRE_MULTINODE"):  # .ci/run: a skip here would hide a broken cloud path
        pytest.fail(f"the multi-node tests cannot run: {reason}")
    if reason:
        pytest.skip(reason)
    c = MultiNodeCluster(tmp_path_factory.mktemp("multinode"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _ok(proc, what: str):
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _check_store(store: Path, seeds: int) -> list[dict]:
    """Every evaluated (method, seed) stored exactly once, every method on seeds 0..seeds-1; the sweep's CTD and
    RACTD among them."""
    episodes = [r for r in pq.read_table(store / "episodes").to_pylist() if r["method"] not in ("data", "behavior")]
    keys = [(r["method"], r["seed"]) for r in episodes]
    assert len(keys) == len(set(keys))
    methods = {m for m, _ in keys}
    assert {"ctd", "ractd"} <= methods
    for m in methods:
        assert sorted(s for k, s in keys if k == m) == list(range(seeds)), m
    return episodes


def _sweep_dir(c: MultiNodeCluster, name: str) -> Path:
    return c.cache / "runs" / "sweeps" / name


def test_sweep_then_tables_end_to_end_on_three_nodes(cluster):
    """Both user commands from the head: the dataset exists only on the head's disk, the teacher and every trial
    train on worker nodes, the best student and the trials' records reach the head through S3, and the
    evaluation (actors on worker nodes) takes the sweep's teacher, best student and CTD point."""
    c = cluster
    t0 = time.monotonic()
    search = c.run(SEARCH, timeout=900)
    t_search = time.monotonic() - t0
    _ok(search, "tune/search.py")
    out = _sweep_dir(c, f"{TASK}-small")  # --quick: maze2d-umaze's small dataset
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] in ("completed", "stopped") for r in rows)
    for r in rows:  # each trial's best student is in S3, its run folder on no disk of the head
        assert r["checkpoint"].startswith(f"s3://{c.bucket}/{c.prefix}/sweeps/{TASK}-small-")
        assert r["stored_bytes"] > 0
        assert not (out / "trials" / r["trial_id"] / "student" / "config.json").exists()  # no worker wrote here
    best = json.loads((out / "best_config.json").read_text())
    top = max(rows, key=lambda r: r["select_score"])
    assert best["trial_id"] == top["trial_id"] and best["trial_checkpoint_stored"] == top["checkpoint"]
    final = Path(best["trial_checkpoint"]).parent / "latest" / "checkpoint.pt"  # fetched for ractd-final
    assert torch.load(final, weights_only=False)["step"] == 12
    ck = torch.load(out / "best" / "checkpoint.pt", weights_only=False)
    assert ck["config"]["stage"] == "student" and ck["select_score"] == pytest.approx(best["score"])
    search_json = json.loads((out / "search.json").read_text())
    assert search_json["shared"]["trained"] == ["teacher"]
    assert search_json["shared"]["stored"].startswith(f"s3://{c.bucket}/")
    assert any(k.endswith("/shared/ractd/teacher/best.pt") for k in c.objects("shared"))
    assert "python eval/reproduce_tables.py" in search.stdout  # item 4: the sweep names its evaluation

    t0 = time.monotonic()
    tables = c.run(TABLES + ["--seeds", "4"], timeout=900)
    t_tables = time.monotonic() - t0
    _ok(tables, "eval/reproduce_tables.py")
    used = [line for line in tables.stdout.splitlines() if line.startswith(f"{TASK}: from the sweep")]
    assert used and all(m in used[0] for m in ("ctd", "ractd", "teacher"))  # item 4: says what it took
    # what the sweep lacks (behavior cloning) was trained by Ray Train on a worker node, into S3 (run storage)
    assert any(k.endswith("/ractd/bc/best.pt") for k in c.objects("runs"))
    _check_store(c.cache / "results" / "quick" / "store", 4)
    print(f"\nmulti-node quick commands (test budget): search {t_search:.0f} s, tables {t_tables:.0f} s")


# A driver of one Ray Train run (the unit a trial runs) on the cluster: a maze2d teacher of 12 steps checkpointed
# every 4; its step hook logs "<node> <step>" and, after the first checkpoint, slows down so that the test can
# remove the node mid-run. Storage is fit_stage's default (the run storage helper: S3 here).
FIT_DRIVER = r'''
import json, os, sys, time
from pathlib import Path

from ractd.tasks import get_task
from ractd.train import TrainConfig
from ractd_ray.search import ensure_dataset
from ractd_ray.train import RayTrainConfig, ensure_ray, fit_stage

log_path, run_dir = sys.argv[1], sys.argv[2]


class Hook:
    def __call__(self, step):
        with open(log_path, "a") as f:
            f.write(f"{os.environ.get('RACTD_TEST_NODE', '?').split('/')[-1]} {step}\n")
        if step > 4:
            time.sleep(1.5)


ensure_dataset(get_task("maze2d-umaze"), "tiny")
ensure_ray()
cfg = TrainConfig(task="maze2d-umaze", stage="teacher", scale="tiny", source="local", preset="tiny", steps=12,
                  batch=16, ckpt_every=4, report_every=4, warmup=1, run_dir=run_dir)
out = fit_stage(cfg, RayTrainConfig(num_workers=1, max_failures=3, progress=False), on_step=Hook())
print(json.dumps({"step": out["step"], "stored_best": out["stored_best"]}))
'''


def _wait(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc is None or proc.poll() is None, f"the driver ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_node_removed_mid_run_resumes_on_the_other_node_from_s3(cluster, tmp_path):
    """A worker node is killed (SIGKILL of all its processes: a lost spot instance) after the run's first
    checkpoint reached S3; Ray Train restarts the worker on the other node, which resumes from the S3 checkpoint
    (its own disk has nothing: the run folder is under the cache directory, private to each node) and ends at the
    step count; the driver's disk gets best.pt from S3."""
    c = cluster
    log_path, run_dir = tmp_path / "steps.log", c.cache / "runs" / "fit-node-loss"
    script = tmp_path / "fit_driver.py"
    script.write_text(FIT_DRIVER)
    proc = c.popen([sys.executable, str(script), str(log_path), str(run_dir)], stdout=-1, stderr=-1, text=True)
    try:
        def steps():
            return [line.split() for line in log_path.read_text().splitlines()] if log_path.is_file() else []

        _wait(lambda: any(int(s) >= 6 for _, s in steps()), 600, "step 6", proc)
        victim = steps()[-1][0]
        at_kill = max(int(s) for n, s in steps() if n == victim)
        c.kill_node(victim)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["step"] == 12 and result["stored_best"].startswith("s3://")
    survivors = [(n, int(s)) for n, s in steps() if n != victim]
    assert survivors and survivors[0][1] == 5  # resumed after the step-4 checkpoint, on the other node
    assert max(s for _, s in survivors) == 12
    redone = at_kill - 4
    print(f"\nnode {victim} lost at step {at_kill}: {redone} steps redone (checkpoint every 4)")
    ck = torch.load(run_dir / "teacher" / "best.pt", weights_only=False)  # fetched from S3 to the driver's disk
    assert ck["config"]["stage"] == "teacher" and ck["step"] in (4, 8, 12)
    c.start_worker(victim)  # back to three nodes for the next tests


def _nodes_running(c: MultiNodeCluster, marker: bytes) -> list[str]:
    """The worker nodes with a process whose command line holds `marker` (e.g. a Ray Train worker)."""
    found = []
    for n in c.workers:
        for pid in c.node_pids(n):
            try:
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(n)
                    break
            except OSError:
                continue
    return found


def test_node_lost_during_a_tune_trial_the_sweep_completes(cluster):
    """A sweep whose trial's Ray Train worker is on a node that is killed after the trial's first checkpoint: the
    trial goes on elsewhere (Ray Train restarts its worker group from the S3 checkpoint, or Tune retries the trial,
    whose run resumes the same way), the sweep completes, every trial has its record and best student in S3."""
    c = cluster
    out = c.cache / "runs" / "third"
    # 40 steps (10 checkpoints): the trial still trains when its node goes
    proc = c.popen(SEARCH + ["--run-dir", str(out), "--max-concurrent", "1", "--steps", "40"], stdout=-1, stderr=-1,
                   text=True)
    try:
        def checkpointed():
            return [k for k in c.objects("sweeps/third-") if "/train/" in k and "/student-" in k]

        _wait(lambda: checkpointed() and _nodes_running(c, b"RayTrainWorker"), 900, "a trial's first checkpoint",
              proc)
        victim = _nodes_running(c, b"RayTrainWorker")[0]
        c.kill_node(victim)
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] in ("completed", "stopped") for r in rows), rows
    assert all(r["checkpoint"].startswith(f"s3://{c.bucket}/") for r in rows)
    print(f"\nnode {victim} lost during a trial; the sweep completed")
    c.start_worker(victim)


def test_driver_and_head_lost_mid_sweep_resume_on_a_new_head(cluster):
    """A second sweep of the task, its run folder on the head's own disk (a worker node sees its own empty tmpfs
    at that path), finds the shared teacher in S3 by its key; its driver is killed (SIGKILL) once one trial has
    finished, then the head node is lost with its disk and a new cluster starts on the same S3. `--resume` on the
    new head reads search.json, the dataset and Tune's state from S3 and continues: the finished trial is not run
    again, and the sweep completes."""
    c = cluster
    import shutil

    shutil.rmtree(c.cache / "runs" / "shared", ignore_errors=True)  # only S3 holds the teacher now
    out = c.cache / "runs" / "second"
    # one trial at a time: two concurrent trials can both finish between two polls, and then none is left to resume
    second = SEARCH + ["--run-dir", str(out), "--max-concurrent", "1"]
    proc = c.popen(second, stdout=-1, stderr=-1, text=True)
    try:
        def finished():
            return [k for k in c.objects("sweeps/second-") if k.endswith("/ractd/summary.json")]

        _wait(lambda: finished(), 900, "a finished trial", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = finished()
    assert len(done) == 1
    stamp = c.head(done[0])
    assert json.loads((out / "search.json").read_text())["shared"]["trained"] == []  # fetched from S3
    c.lose_head()
    assert not out.exists() and not (c.cache / "datasets").exists()  # the new head's disk is empty
    resumed = c.run(second + ["--resume"], timeout=900)
    _ok(resumed, "tune/search.py --resume on a new head")
    assert "fetched from s3://" in resumed.stderr + resumed.stdout  # the dataset, not generated again
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] in ("completed", "stopped") for r in rows)
    assert c.head(done[0]) == stamp  # the finished trial did not run again
    assert (out / "best" / "checkpoint.pt").is_file()
    assert any(k.endswith("/records/best_config.json") for k in c.objects("sweeps/second-"))


def test_new_head_evaluates_the_first_sweep_from_storage(cluster):
    """After the head was lost (the test before), the quick evaluation on the new head takes the first sweep's
    records, best student, CTD trial and teacher, the dataset, BC's checkpoint and the results store from S3:
    nothing is trained or rolled out again."""
    c = cluster
    assert not _sweep_dir(c, f"{TASK}-small").exists()
    import shutil

    shutil.rmtree(c.cache)  # what the resumed sweep fetched too (the dataset): the head's disk is empty again
    c.cache.mkdir()
    tables = c.run(TABLES + ["--seeds", "4"], timeout=900)
    _ok(tables, "eval/reproduce_tables.py on a new head")
    lines = tables.stdout.splitlines()
    assert any(line.startswith(f"{TASK}: dataset ") and "fetched from s3://" in line for line in lines)
    used = [line for line in lines if line.startswith(f"{TASK}: from the sweep")]
    assert used and all(m in used[0] for m in ("ctd", "ractd", "teacher"))
    assert not any(line.startswith("trained ") for line in lines)  # nothing trained again:
    assert any(line.startswith("fetched 1 checkpoints an earlier head trained: ") and "/bc" in line for line in lines)
    assert "episodes run: 0" in tables.stdout  # the store came from S3
    _check_store(c.cache / "results" / "quick" / "store", 4)


def test_node_removed_during_evaluation_stores_every_cell_seed_once(cluster, tmp_path):
    """The pool's actors run on the worker nodes; the node of one of them is killed after the first block is
    stored; its blocks go to a fresh actor on the surviving node, and every (cell, seed) is stored exactly once."""
    c = cluster
    seeds = 6
    store = tmp_path / "store"
    proc = c.popen(TABLES + ["--seeds", str(seeds), "--block-size", "1", "--store", str(store), "--out",
                             str(tmp_path / "out")], stdout=-1, stderr=-1, text=True)

    def parts():
        return list((store / "episodes").glob("part-*.parquet")) if (store / "episodes").is_dir() else []

    try:
        _wait(lambda: parts(), 600, "the first stored block", proc)
        actor_nodes = [n for n in c.workers
                       if any(b"RolloutActor" in Path(f"/proc/{p}/cmdline").read_bytes() for p in c.node_pids(n)
                              if Path(f"/proc/{p}/cmdline").exists())]
        assert actor_nodes, "no rollout actor on a worker node"
        at_kill = len(parts())
        c.kill_node(actor_nodes[0])
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    episodes = _check_store(store, seeds)
    assert at_kill < len(episodes)  # the node went while blocks were outstanding
    lost = [line for line in stdout.splitlines() if line.startswith("episodes run:")]
    assert lost and "blocks dispatched again" in lost[0]
    redispatched = int(lost[0].split("blocks dispatched again: ")[1].split(")")[0])
    assert redispatched >= 1, lost[0]  # the dead actor's block went to a fresh actor
    c.start_worker(actor_nodes[0])
