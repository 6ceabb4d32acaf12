"""The sweep and the evaluation on a Ray cluster whose nodes share no disk (tests/multinode.py): a head with no
CPUs, two worker nodes each with a private tmpfs over the cache directory, storage on S3 (moto's server).

Every command runs as a user runs it on the head: `python tune/search.py ...`, `python eval/reproduce_tables.py
...` with RAY_ADDRESS and RACTD_STORAGE_PATH=s3://... in the environment. The tests run in file order on one
cluster (module fixture): the end-to-end sweep writes the sweep the later tests reuse.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("ray")

sys.path.insert(0, str(Path(__file__).parent))
from multinode import REPO, MultiNodeCluster, skip_reason  # noqa: E402

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
    out = _sweep_dir(c, f"{TASK}-tiny")
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] in ("completed", "stopped") for r in rows)
    for r in rows:  # each trial's best student is in S3, its run folder on no disk of the head
        assert r["checkpoint"].startswith(f"s3://{c.bucket}/{c.prefix}/sweeps/{TASK}-tiny-")
        assert r["stored_bytes"] > 0
        assert not (out / "trials" / r["trial_id"] / "student").exists()
    best = json.loads((out / "best_config.json").read_text())
    top = max(rows, key=lambda r: r["select_score"])
    assert best["trial_id"] == top["trial_id"] and best["trial_checkpoint"] == top["checkpoint"]
    ck = torch.load(out / "best" / "checkpoint.pt", weights_only=False)
    assert ck["config"]["stage"] == "student" and ck["select_score"] == pytest.approx(best["score"])
    search_json = json.loads((out / "search.json").read_text())
    assert search_json["shared"]["trained"] == ["teacher"]
    assert search_json["shared"]["stored"].startswith(f"s3://{c.bucket}/")
    assert any(k.endswith("/shared/ractd/teacher/best.pt") for k in c.objects("shared"))
    assert f"python eval/reproduce_tables.py" in search.stdout  # item 4: the sweep names its evaluation

    t0 = time.monotonic()
    tables = c.run(TABLES + ["--seeds", "4"], timeout=900)
    t_tables = time.monotonic() - t0
    _ok(tables, "eval/reproduce_tables.py")
    assert "from the sweep" in tables.stdout and "trained" not in tables.stdout.split("evaluate", 1)[0]
    episodes = pq.read_table(c.cache / "results" / "quick" / "store" / "episodes").to_pylist()
    keys = [(r["method"], r["seed"]) for r in episodes]
    assert len(keys) == len(set(keys)) == 3 * 4
    print(f"\nmulti-node quick commands (test budget): search {t_search:.0f} s, tables {t_tables:.0f} s")
