"""The Ray rollout actor pool on a real local Ray instance: every seed stored once and equal to a direct
ractd.rollout call, a killed actor's block re-dispatched, and a second run (pool or script) runs nothing."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from ractd.evaluate import policy_from_checkpoint  # noqa: E402
from ractd.rollout import rollout_locomotion, rollout_maze  # noqa: E402
from ractd_ray.pool import PoolConfig, RolloutPool  # noqa: E402
from ractd_ray.train import ensure_ray  # noqa: E402
from ractd_repro.jobs import make_job
from ractd_repro.spec import get_study, study_root
from ractd_repro.store import ResultsStore

pytestmark = pytest.mark.ray
SEEDS = list(range(10))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny checkpoints (a hopper one-step student, a maze2d teacher), their jobs, and each seed's episode
    from a direct ractd.rollout call (batch 1); a 2-CPU local Ray instance for the module."""
    from test_pipeline import random_hopper_dataset

    from ractd.data.generate_maze import generate_maze
    from ractd.train import RunContext, TrainConfig, train

    root = tmp_path_factory.mktemp("pool")
    kw = dict(scale="tiny", preset="tiny", steps=4, batch=8, ckpt_every=4, report_every=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RACTD_CACHE_DIR", str(root / "cache"))
        random_hopper_dataset()
        generate_maze("maze2d-umaze", scale="tiny", seed=0, progress=False)
        ctx = RunContext(progress=False)
        train(TrainConfig(task="hopper-medium-replay", stage="teacher", run_dir=str(root / "h"), **kw), ctx)
        student = TrainConfig(task="hopper-medium-replay", stage="student", run_dir=str(root / "h"), select_seeds=0,
                              **kw)
        student = dataclasses.replace(student, distill=dataclasses.replace(student.distill, sigma=0.0))
        hop = train(student, ctx)["best"]
        maze = train(TrainConfig(task="maze2d-umaze", stage="teacher", run_dir=str(root / "m"), **kw), ctx)["best"]
    jobs = [make_job("hopper-medium-replay", "ctd", hop, "test"),
            make_job("maze2d-umaze", "teacher-heun-80", maze, "test")]
    direct = {}
    for job in jobs:
        policy, task, _ = policy_from_checkpoint(job.checkpoint_path, job.sampler, job.nfe, precision=job.precision)
        roll = rollout_locomotion if task.kind == "locomotion" else rollout_maze
        for s in SEEDS:
            direct[(job.method, s)] = roll(task, policy, [s], progress=False)[0]
    with pytest.MonkeyPatch.context() as mp:  # the actors inherit it: their engine calibration cache stays in tmp
        mp.setenv("RACTD_CACHE_DIR", str(root / "cache"))
        ensure_ray("local", num_cpus=2, log_to_driver=False, configure_logging=False)
        yield {"jobs": jobs, "direct": direct, "maze_teacher": Path(maze)}
        ray.shutdown()


def _raw_keys(store: ResultsStore) -> list[tuple]:
    """Every stored row's key, read from the part files without read-time dedupe."""
    keys = []
    for part in store.episodes_dir.glob("part-*.parquet"):
        t = pq.read_table(part).to_pydict()
        keys += list(zip(t["task"], t["method"], t["checkpoint"], t["seed"]))
    return keys


def _check_once_and_equal_direct(store, tiny):
    keys = _raw_keys(store)
    expected = {k for job in tiny["jobs"] for k in job.keys(SEEDS)}
    assert len(keys) == len(set(keys)) == 20 and set(keys) == expected  # every seed once, none twice
    for row in store.episodes():
        d = tiny["direct"][(row["method"], row["seed"])]
        assert row["length"] == d["length"], (row["method"], row["seed"])
        # the same episode up to float rounding of batched vs batch-1 network calls (ractd.rollout's doc)
        np.testing.assert_allclose(row["return"], d["return"], rtol=1e-5, err_msg=f"{row['method']} {row['seed']}")
        np.testing.assert_allclose(row["normalized_score"], d["normalized_score"], rtol=1e-5)


def test_two_actors_store_every_seed_once_equal_to_direct_rollouts(tiny, tmp_path):
    store = ResultsStore(tmp_path / "store")
    pool = RolloutPool(PoolConfig(actors=2, block_size=3))
    try:
        summary = pool.evaluate(tiny["jobs"], SEEDS, store, progress=False)
        assert summary["episodes_run"] == 20 and summary["actors"] == 2 and summary["blocks"] == 8
        _check_once_and_equal_direct(store, tiny)
        rows = store.episodes()
        assert {r["batch_size"] for r in rows} == {3, 1} and all('"ray"' in r["versions"] for r in rows)
        # a second run over the same store runs nothing: counted by the actors themselves
        counts = sum(s["episodes"] for s in ray.get([a.stats.remote() for a in pool.actors]))
        again = pool.evaluate(tiny["jobs"], SEEDS, store, progress=False)
        assert counts == 20 and again["episodes_run"] == 0
        assert sum(s["episodes"] for s in ray.get([a.stats.remote() for a in pool.actors])) == 20
        assert len(_raw_keys(store)) == 20
    finally:
        pool.shutdown()


def test_killed_actor_block_is_redispatched_and_each_seed_stored_once(tiny, tmp_path):
    store = ResultsStore(tmp_path / "store")
    killed = []

    def kill_one(pool, rows):
        if not killed:  # after the first stored block: both actors hold a block, six more are queued
            killed.append(pool.actors[0])
            ray.kill(pool.actors[0])

    pool = RolloutPool(PoolConfig(actors=2, block_size=3))
    try:
        summary = pool.evaluate(tiny["jobs"], SEEDS, store, progress=False, on_block=kill_one)
    finally:
        pool.shutdown()
    _check_once_and_equal_direct(store, tiny)
    assert killed and summary["actor_failures"] >= 1 and summary["redispatched_blocks"] >= 1
    assert summary["episodes_run"] == 20


def test_script_twice_runs_no_episode_twice(tiny, tmp_path, capsys, load_script):
    script = load_script("eval/reproduce_tables.py")
    # the quick study's maze2d teacher is in place; its students and DDPM model are not (and are not trained)
    dst = study_root(get_study("quick"), "maze2d-umaze") / "teacher" / "teacher" / "best.pt"
    dst.parent.mkdir(parents=True)
    shutil.copy(tiny["maze_teacher"], dst)
    argv = ["--quick", "--tasks", "maze2d-umaze", "--seeds", "4", "--no-train-missing", "--actors", "2",
            "--out", str(tmp_path / "out"), "--quiet"]
    assert script.main(argv) == 0
    first = capsys.readouterr().out
    store = ResultsStore(tmp_path / "out" / "store")
    # the teacher's cells: Heun-80 and its one-step Euler (the warm-start control), 4 seeds each; beside them the
    # data's own level (no rollouts: the dataset the command generated, as it says)
    rolled = [k for k in _raw_keys(store) if k[1] not in ("data", "behavior")]
    assert "episodes run: 8" in first and len(rolled) == 8
    assert "maze2d-umaze: dataset " in first and "generated now" in first
    assert "missing maze2d-umaze ctd" in first and "python -m ractd distill --task maze2d-umaze --quick" in first
    table11 = (tmp_path / "out" / "table11.md").read_text()
    assert "EDM Heun-80 (158 network calls)" in table11 and "· n=4 · quick" in table11 and "missing" in table11
    parts = sorted(p.name for p in store.episodes_dir.glob("part-*.parquet"))
    before = len(_raw_keys(store))
    assert script.main(argv) == 0
    assert "episodes run: 0" in capsys.readouterr().out
    assert sorted(p.name for p in store.episodes_dir.glob("part-*.parquet")) == parts
    assert len(_raw_keys(store)) == before  # nothing stored twice
    assert script.main(["--quick", "--tasks", "no-such-task"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task") and "\n" not in err
