"""What a head writes outlives it: with $RACTD_STORAGE_PATH set, the sweep's records (ractd_repro.records.SweepFolder),
any folder a head writes (records.Mirror: the evaluation's store) and the datasets (ractd_repro.sweep.ensure_dataset)
have a twin in storage, and a head that lacks them -- a new head, its disk empty -- fetches them.

Storage here is a local folder (what cluster-local.yaml's NFS gives) and, for the mirror, S3 on moto's server; the
three-node version with the head killed is tests/test_multinode.py.
"""

import json
import shutil

import pytest

from ractd import RactdError, storage
from ractd.tasks import get_task
from ractd_repro import records
from ractd_repro.records import Mirror, SweepFolder, TrialRecord


@pytest.fixture
def cluster_storage(monkeypatch, tmp_path):
    root = tmp_path / "shared-storage"
    monkeypatch.setenv(storage.STORAGE_ENV, str(root))
    return root


def _lose_head(folder):
    """The head's disk is gone: the new head has the same paths, none of the files."""
    shutil.rmtree(folder, ignore_errors=True)


def test_mirror_push_then_pull_on_a_new_head(tmp_path):
    root, stored = tmp_path / "out", str(tmp_path / "stored")
    (root / "store" / "episodes").mkdir(parents=True)
    (root / "store" / "episodes" / "part-a.parquet").write_bytes(b"a" * 10)
    (root / "store" / "episodes" / ".part-b.parquet.123.tmp").write_bytes(b"half")  # an atomic write in flight
    (root / "table1.md").write_text("| x |")
    m = Mirror(root, stored)
    assert sorted(p.name for p in m.push()) == ["part-a.parquet", "table1.md"]
    assert m.push() == []  # nothing new
    (root / "store" / "episodes" / "part-c.parquet").write_bytes(b"c")
    assert [p.name for p in m.push("store")] == ["part-c.parquet"]
    assert storage.size(storage.join(stored, "store", "episodes", "part-c.parquet")) == 1
    assert not storage.exists(storage.join(stored, "store", "episodes", ".part-b.parquet.123.tmp"))

    _lose_head(root)
    fresh = Mirror(root, stored)
    assert sorted(p.name for p in fresh.pull()) == ["part-a.parquet", "part-c.parquet", "table1.md"]
    assert (root / "store" / "episodes" / "part-a.parquet").read_bytes() == b"a" * 10
    assert fresh.push() == []  # what it fetched is not sent back
    assert Mirror(root, None).pull() == [] and Mirror(root, None).push() == []  # one machine: no twin


def test_mirror_on_s3(monkeypatch, tmp_path, s3_bucket):
    monkeypatch.setenv(storage.STORAGE_ENV, f"s3://{s3_bucket}/runs")
    out = tmp_path / "results" / "quick"
    (out / "episodes").mkdir(parents=True)
    (out / "episodes" / "part-1.parquet").write_bytes(b"123")
    m = records.mirror_of("results", out)
    assert m.stored.startswith(f"s3://{s3_bucket}/runs/results/quick-")
    assert [p.name for p in m.push()] == ["part-1.parquet"]
    _lose_head(out)
    assert [p.name for p in records.mirror_of("results", out).pull()] == ["part-1.parquet"]
    assert (out / "episodes" / "part-1.parquet").read_bytes() == b"123"


def _sweep(folder: SweepFolder, tmp_path):
    """A finished sweep's records, its trial's best.pt and final checkpoint and the shared teacher in storage."""
    trial_store = storage.join(folder.state, "train", "t1", "ractd")
    storage.write_bytes(storage.join(trial_store, "student", "best.pt"), b"student")
    storage.write_bytes(storage.join(folder.state, "train", "t1", "student-000000012", "checkpoint.pt"), b"final")
    shared_store = storage.join(folder.state, "shared-models")
    storage.write_bytes(storage.join(shared_store, "teacher", "best.pt"), b"teacher")
    teacher_local = tmp_path / "cache" / "runs" / "shared" / "maze2d-umaze-k" / "teacher" / "best.pt"
    teacher_local.parent.mkdir(parents=True)
    teacher_local.write_bytes(b"teacher")
    rec = TrialRecord("t1", 1.0, 1.0, 0.0, select_score=50.0, status="completed",
                      checkpoint=storage.join(trial_store, "student", "best.pt"))
    folder.write_search({"task": "maze2d-umaze"}, {"fingerprint": "abc"}, {"stored": shared_store})
    best = records.write_results([rec], folder, task="maze2d-umaze", scale="small", budget="quick",
                                 dataset={"fingerprint": "abc"},
                                 shared={"teacher": str(teacher_local), "reward": "", "stored": shared_store})
    return best, teacher_local


def test_sweep_records_and_checkpoints_reach_a_new_head(cluster_storage, tmp_path):
    folder = SweepFolder(tmp_path / "cache" / "runs" / "sweeps" / "maze2d-umaze-small")
    best, teacher_local = _sweep(folder, tmp_path)
    assert best.teacher_stored.endswith("/teacher/best.pt") and best.reward_stored == ""
    stored = folder.mirror.stored
    assert stored == storage.join(folder.state, "records") and str(cluster_storage) in stored
    assert sorted(storage.list_dir(stored)) == ["best_config.json", "search.json", "trials.parquet"]

    _lose_head(tmp_path / "cache")  # the head is lost with its disk; a new one has the same paths
    again = SweepFolder(folder.root)
    assert again.read_search()["dataset"]["fingerprint"] == "abc"
    assert [r.trial_id for r in again.read_trials()] == ["t1"]
    got = again.read_best()
    assert (got.trial_id, got.score) == ("t1", 50.0)
    assert folder.best_checkpoint.read_bytes() == b"student" and got.checkpoint == str(folder.best_checkpoint)
    assert folder.trial_best("t1").read_bytes() == b"student"
    assert SweepFolder.final_beside(folder.trial_best("t1")).read_bytes() == b"final"
    assert teacher_local.read_bytes() == b"teacher"
    assert list(again.completed_students()) == [(1.0, 1.0, 0.0)]


def test_one_machine_has_no_twin(monkeypatch, tmp_path):
    monkeypatch.delenv(storage.STORAGE_ENV, raising=False)
    folder = SweepFolder(tmp_path / "sweep")
    assert folder.mirror.stored is None and folder.state == str((tmp_path / "sweep" / "ray").resolve())
    folder.write_search({}, {}, {})
    assert not (tmp_path / "sweep" / "ray").exists()
    assert SweepFolder(tmp_path / "elsewhere").read_search() is None  # nothing to fetch


def test_dataset_is_stored_then_fetched_not_regenerated(cluster_storage, tmp_path, caplog):
    from ractd.data.d4rl import local_dataset_path
    from ractd_repro.sweep import dataset_mirror, ensure_dataset

    task = get_task("maze2d-umaze")
    first = ensure_dataset(task, "tiny")
    assert first["generated"] and first["fetched"] == "" and first["source"] == "local"
    loc = dataset_mirror(task, "local", "tiny")
    assert loc == str(cluster_storage / "datasets" / "local" / "maze2d-umaze-tiny.hdf5") and storage.exists(loc)

    local_dataset_path(task, "tiny").unlink()  # a new head
    with caplog.at_level("INFO"):
        again = ensure_dataset(task, "tiny", expect=first["fingerprint"])
    assert not again["generated"] and again["fetched"] == loc and again["fingerprint"] == first["fingerprint"]
    assert f"fetched from {loc}" in caplog.text

    local_dataset_path(task, "tiny").unlink()
    shutil.rmtree(cluster_storage / "datasets")  # storage lost it too
    regenerated = ensure_dataset(task, "tiny", seed=0)  # nothing stored: generated again, deterministically
    assert regenerated["generated"] and regenerated["fingerprint"] == first["fingerprint"]
    with pytest.raises(RactdError, match=r"has fingerprint .* the search was started on nope"):
        ensure_dataset(task, "tiny", expect="nope")


def test_summary_json_is_plain(tmp_path):
    """search.json keeps the shape eval/results_doc.py and ractd_repro.document read."""
    folder = SweepFolder(tmp_path / "s")
    folder.write_search({"budget": "quick"}, {"source": "local"}, {"trained": []})
    assert json.loads(folder.search_file.read_text()) == {"config": {"budget": "quick"}, "dataset": {"source": "local"},
                                                          "shared": {"trained": []}}


def test_the_paper_budget_uses_d4rl_files_unless_told_otherwise(monkeypatch, tmp_path):
    """--budget paper with --source auto takes D4RL's file (downloaded when missing), never a generated stand-in,
    and says which data it used; --source local still asks for the generated one."""
    from ractd.data import d4rl
    from ractd_repro.sweep import SearchConfig, describe_dataset, ensure_dataset

    monkeypatch.delenv(storage.STORAGE_ENV, raising=False)
    assert SearchConfig(task="maze2d-umaze", budget="paper").data_source() == "d4rl"
    assert SearchConfig(task="maze2d-umaze", budget="paper", source="local").data_source() == "local"
    assert SearchConfig(task="maze2d-umaze", budget="cpu").data_source() == "auto"

    task = get_task("maze2d-umaze")

    def offline(task, force=False, timeout=30.0):
        raise RactdError(f"cannot download {task.name}: no network")

    monkeypatch.setattr(d4rl, "download_d4rl", offline)
    with pytest.raises(RactdError, match="cannot download maze2d-umaze"):  # not a silently generated dataset
        ensure_dataset(task, "tiny", SearchConfig(task=task.name, budget="paper").data_source())
    assert not d4rl.local_dataset_path(task, "tiny").exists()

    generated = ensure_dataset(task, "tiny", "local")  # a D4RL-format file, placed where d4rl caches its own
    d4rl.d4rl_cache_path(task).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(d4rl.local_dataset_path(task, "tiny"), d4rl.d4rl_cache_path(task))
    monkeypatch.setattr(d4rl, "download_d4rl", lambda task, **kw: d4rl.d4rl_cache_path(task))
    info = ensure_dataset(task, "tiny", "d4rl")
    assert info["source"] == "d4rl" and not info["generated"] and not info["downloaded"]
    assert info["fingerprint"] == generated["fingerprint"]
    assert describe_dataset(info).startswith(f"{d4rl.d4rl_cache_path(task)} (D4RL's file, found on this machine)")
    assert "(generated with D4RL's recipe, generated now)" in describe_dataset(generated)
