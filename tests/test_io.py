"""ractd.io.atomic_write: content, no temp file left, old file kept on failure, fsyncs, umask-derived mode."""

import json
import os
import stat

import numpy as np
import pytest
import torch

from ractd import io as rio
from ractd.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint


class _Boom(Exception):
    pass


@pytest.fixture
def d(tmp_path):
    """An empty folder of its own (conftest puts the test's cwd inside tmp_path)."""
    out = tmp_path / "d"
    out.mkdir()
    return out


def _fsync_calls(monkeypatch):
    """Record every os.fsync as 'file' or 'dir' (by what the descriptor refers to), then run the real one."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)

    monkeypatch.setattr(rio.os, "fsync", fsync)
    return calls


def test_bytes_and_writer_content(d):
    p = rio.atomic_write(d / "a" / "b.bin", b"hello")
    assert p == d / "a" / "b.bin" and p.read_bytes() == b"hello"
    rio.atomic_write(p, lambda f: (f.write(b"x" * 10), f.write(b"y")))  # replaces the old content
    assert p.read_bytes() == b"x" * 10 + b"y"
    assert os.listdir(p.parent) == ["b.bin"]


def test_writer_sees_its_temp_file_by_name(d):
    seen = {}

    def writer(f):
        f.write(b"abc")
        f.flush()
        seen["name"], seen["content"] = f.name, open(f.name, "rb").read()

    p = rio.atomic_write(d / "x", writer)
    assert os.path.dirname(seen["name"]) == str(d) and seen["name"] != str(p)
    assert seen["content"] == b"abc"
    assert not os.path.exists(seen["name"])


def test_exception_in_writer_keeps_old_file_and_leaves_no_temp(d):
    p = rio.atomic_write(d / "r.json", b'{"ok": 1}')

    def writer(f):
        f.write(b'{"partial')
        raise _Boom()

    with pytest.raises(_Boom):
        rio.atomic_write(p, writer)
    assert json.loads(p.read_text()) == {"ok": 1}
    assert os.listdir(d) == ["r.json"]
    # Also when the file did not exist before: nothing at all is left.
    with pytest.raises(_Boom):
        rio.atomic_write(d / "new.bin", writer)
    assert os.listdir(d) == ["r.json"]


def test_file_and_directory_are_fsynced(d, monkeypatch):
    calls = _fsync_calls(monkeypatch)
    rio.atomic_write(d / "f", b"1")
    assert calls == ["file", "dir"]  # the data before the rename, the folder (the rename) after it
    calls.clear()
    with pytest.raises(_Boom):
        rio.atomic_write(d / "g", lambda f: (_ for _ in ()).throw(_Boom()))
    assert calls == []  # nothing renamed, nothing to make durable


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_mode_is_what_a_plain_open_gives(d, umask):
    old = os.umask(umask)
    try:
        with open(d / "plain", "wb") as f:
            f.write(b"1")
        rio.atomic_write(d / "atomic", b"1")
        # Also when replacing a file: the new file's mode, not the old one's.
        (d / "old").write_bytes(b"0")
        os.chmod(d / "old", 0o600)
        rio.atomic_write(d / "old", b"1")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(d / "plain").st_mode)
    assert mode == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(d / "atomic").st_mode) == mode
    assert stat.S_IMODE(os.stat(d / "old").st_mode) == mode


def test_importing_the_library_leaves_the_umask_alone():
    """No module may change (even briefly) the process umask at import: run the imports in a fresh interpreter
    whose os.umask is replaced by a recorder."""
    import subprocess
    import sys

    code = ("import os\ncalls = []\nreal = os.umask\nos.umask = lambda m: (calls.append(m), real(m))[1]\n"
            "import ractd.io, ractd.checkpoint, ractd.rollout, ractd.data, ractd.data.generate_maze\n"
            "import ractd.data.generate_locomotion, ractd.data.minari_io\n"
            "assert calls == [], calls\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_thin_helpers_round_trip(d):
    rio.atomic_write_json(d / "a.json", {"b": [1, 2], "a": 0.5})
    assert json.loads((d / "a.json").read_text()) == {"b": [1, 2], "a": 0.5}
    rio.atomic_torch_save(d / "t.pt", {"w": torch.arange(3)})
    assert torch.equal(torch.load(d / "t.pt")["w"], torch.arange(3))
    rio.atomic_npz(d / "z.npz", {"x": np.eye(2), "y": np.arange(4)})
    with np.load(d / "z.npz") as z:
        np.testing.assert_array_equal(z["x"], np.eye(2))
        np.testing.assert_array_equal(z["y"], np.arange(4))
    assert sorted(os.listdir(d)) == ["a.json", "t.pt", "z.npz"]


def test_checkpoint_functions_go_through_atomic_write(d, monkeypatch):
    calls = _fsync_calls(monkeypatch)
    payload = {"config": {"lr": 0.1}, "w": torch.ones(2)}
    save_checkpoint(d / "run" / "latest.pt", payload)
    copy_checkpoint(d / "run" / "latest.pt", d / "run" / "best.pt")
    assert calls == ["file", "dir"] * 3  # latest.pt, config.json, best.pt
    assert json.loads((d / "run" / "config.json").read_text()) == {"lr": 0.1}
    assert torch.equal(load_checkpoint(d / "run" / "best.pt")["w"], torch.ones(2))
    assert sorted(os.listdir(d / "run")) == ["best.pt", "config.json", "latest.pt"]


def test_atomic_parquet_round_trips_rows_and_read_rows_names_a_missing_required_store(tmp_path):
    import pytest

    from ractd import RactdError
    from ractd.io import atomic_parquet, read_rows

    store = tmp_path / "sub" / "results.parquet"
    assert read_rows(store) == []
    with pytest.raises(RactdError, match=r"no results in .*results.parquet"):
        read_rows(store, required=True)
    rows = [{"method": "ctd", "train_seed": 0, "best_mean": 10.5}, {"method": "bc", "train_seed": 1, "best_mean": 2.0}]
    atomic_parquet(store, rows)
    assert read_rows(store, required=True) == rows
    assert [p.name for p in store.parent.iterdir()] == ["results.parquet"]  # no temporary file left
