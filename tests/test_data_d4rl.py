"""D4RL HDF5 source: the exact D4RL key schema round-trips; each broken file has its own one-line error."""

import io
import urllib.error

import h5py
import numpy as np
import pytest

from ractd import RactdError
from ractd.data.d4rl import (
    d4rl_cache_path,
    download_d4rl,
    load_d4rl_hdf5,
    load_dataset,
    local_dataset_path,
    read_metadata,
    write_d4rl_hdf5,
)
from ractd.tasks import TASKS, get_task


def hopper_like(n=50, seed=0):
    """Arrays with D4RL v2 hopper's exact keys, dtypes and shapes."""
    rng = np.random.default_rng(seed)
    terminals = np.zeros(n, bool)
    timeouts = np.zeros(n, bool)
    terminals[19] = True
    timeouts[39] = True
    return {
        "observations": rng.normal(size=(n, 11)).astype(np.float32),
        "next_observations": rng.normal(size=(n, 11)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
        "infos/action_log_probs": rng.normal(size=n).astype(np.float32),
        "infos/qpos": rng.normal(size=(n, 6)).astype(np.float32),
        "infos/qvel": rng.normal(size=(n, 6)).astype(np.float64),
    }


def write_raw_d4rl(path, data, tamper=None):
    """Write with plain h5py, the way D4RL's own files are laid out (not through our writer)."""
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
        f.create_dataset("metadata/algorithm", data="SAC")
        f.create_dataset("metadata/iteration", data=np.int64(1000000))
        f.create_dataset("metadata/policy/fc0/weight", data=np.ones((4, 3), np.float32))
        if tamper:
            tamper(f)
    return path


def test_reads_d4rl_schema(tmp_path):
    data = hopper_like()
    path = write_raw_d4rl(tmp_path / "hopper_medium-v2.hdf5", data)
    out = load_d4rl_hdf5(path, kind="locomotion")
    for k, v in data.items():
        np.testing.assert_array_equal(out[k], v)
        assert out[k].dtype == v.dtype
    assert out["metadata/algorithm"] == "SAC"
    assert out["metadata/iteration"] == 1000000
    np.testing.assert_allclose(out["metadata/policy/fc0/weight"], np.ones((4, 3)))
    assert read_metadata(path)["algorithm"] == "SAC"


def test_writer_round_trip_is_atomic(tmp_path):
    data = hopper_like()
    path = write_d4rl_hdf5(tmp_path / "sub" / "x.hdf5", data, metadata={"task": "hopper-medium", "seed": 3,
                                                                         "scale": 0.5, "tags": ["a", "b"]})
    out = load_d4rl_hdf5(path)
    for k, v in data.items():
        np.testing.assert_array_equal(out[k], v)
    assert (out["metadata/task"], out["metadata/seed"], out["metadata/tags"]) == ("hopper-medium", 3, ["a", "b"])
    np.testing.assert_allclose(out["metadata/scale"], 0.5)
    assert [p.name for p in path.parent.iterdir()] == ["x.hdf5"]  # no temp file left behind


def _error(path, kind="locomotion"):
    with pytest.raises(RactdError) as e:
        load_d4rl_hdf5(path, kind=kind)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_distinct_one_line_errors(tmp_path):
    data = hopper_like()
    good = write_raw_d4rl(tmp_path / "good.hdf5", data)
    blob = good.read_bytes()
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(blob[: len(blob) // 3])
    wrong = write_raw_d4rl(tmp_path / "wrong.hdf5", {**data, "actions": data["actions"][:-1]})
    nan_obs = data["observations"].copy()
    nan_obs[7, 2] = np.nan
    nan = write_raw_d4rl(tmp_path / "nan.hdf5", {**data, "observations": nan_obs})
    inf = write_raw_d4rl(tmp_path / "inf.hdf5", {**data, "infos/qvel": np.full((50, 6), np.inf)})
    missing_key = write_raw_d4rl(tmp_path / "nokey.hdf5", {k: v for k, v in data.items() if k != "rewards"})
    msgs = {
        "missing": _error(tmp_path / "absent.hdf5"),
        "truncated": _error(truncated),
        "wrong": _error(wrong),
        "nan": _error(nan),
        "inf": _error(inf),
        "key": _error(missing_key),
        "maze_key": _error(good, kind="maze"),
    }
    assert "not found" in msgs["missing"]
    assert "HDF5" in msgs["truncated"] or "corrupt" in msgs["truncated"]
    assert "'actions'" in msgs["wrong"] and "shape" in msgs["wrong"]
    assert "NaN" in msgs["nan"] and "'observations'" in msgs["nan"] and "1 NaN" in msgs["nan"]
    assert "'infos/qvel'" in msgs["inf"]
    assert "'rewards'" in msgs["key"] and "'infos/goal'" in msgs["maze_key"]
    assert len(set(msgs.values())) == len(msgs)


def test_bad_flags_and_dtypes(tmp_path):
    data = hopper_like()
    bad_flags = write_raw_d4rl(tmp_path / "f.hdf5", {**data, "terminals": np.full(50, 2.0)})
    assert "'terminals'" in _error(bad_flags)
    int_obs = write_raw_d4rl(tmp_path / "i.hdf5", {**data, "observations": np.zeros((50, 11), np.int32)})
    assert "dtype" in _error(int_obs)
    as_float = write_raw_d4rl(tmp_path / "ok.hdf5", {**data, "terminals": data["terminals"].astype(np.float32)})
    np.testing.assert_array_equal(load_d4rl_hdf5(as_float)["terminals"], data["terminals"])


def test_load_dataset_sources(tmp_path):
    task = get_task("hopper-medium")
    with pytest.raises(RactdError, match="python -m ractd.data generate hopper-medium"):
        load_dataset(task)
    local = write_d4rl_hdf5(local_dataset_path(task, "tiny"), hopper_like(seed=1))
    np.testing.assert_array_equal(load_dataset("hopper-medium", scale="tiny")["observations"],
                                  hopper_like(seed=1)["observations"])
    # A file in d4rl's cache takes precedence over a local one, and d4rl's file name is used.
    assert d4rl_cache_path(task).name == "hopper_medium-v2.hdf5"
    d4rl_cache_path(task).parent.mkdir(parents=True)
    write_raw_d4rl(d4rl_cache_path(task), hopper_like(seed=2))
    np.testing.assert_array_equal(load_dataset(task, scale="tiny")["observations"], hopper_like(seed=2)["observations"])
    np.testing.assert_array_equal(load_dataset(task, source="local", scale="tiny")["observations"],
                                  hopper_like(seed=1)["observations"])
    assert local.is_file()
    with pytest.raises(RactdError, match="Minari has no dataset"):
        load_dataset("hopper-medium-replay", source="minari")


def test_download_without_network_says_what_to_do(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    task = get_task("walker2d-medium-replay")
    with pytest.raises(RactdError) as e:
        download_d4rl(task)
    msg = str(e.value)
    assert "\n" not in msg and str(d4rl_cache_path(task)) in msg
    assert "python -m ractd.data generate walker2d-medium-replay" in msg
    assert list(d4rl_cache_path(task).parent.iterdir()) == []  # the partial file is gone


def test_download_writes_into_d4rl_cache(tmp_path, monkeypatch):
    blob = write_raw_d4rl(tmp_path / "src.hdf5", hopper_like()).read_bytes()

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(blob))}

    seen = []
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout=None: seen.append(url) or Response(blob))
    task = get_task("hopper-medium")
    path = download_d4rl(task)
    assert path == d4rl_cache_path(task) and seen == [task.d4rl_url]
    np.testing.assert_array_equal(load_d4rl_hdf5(path)["actions"], hopper_like()["actions"])
    assert download_d4rl(task) == path and len(seen) == 1  # cached: no second download


def test_normalized_scores_match_d4rl_references():
    refs = {"hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3), "halfcheetah": (-280.178953, 12135.0),
            "maze2d-umaze": (23.85, 161.86), "maze2d-medium": (13.13, 277.39), "maze2d-large": (6.7, 273.99)}
    for name, task in TASKS.items():
        lo, hi = refs.get(name, refs.get(task.env_name))
        np.testing.assert_allclose(task.normalized_score(np.array([lo, hi, (lo + hi) / 2])), [0.0, 100.0, 50.0],
                                   atol=1e-9)
    np.testing.assert_allclose(get_task("hopper-medium").normalized_score(1000.0),
                               100 * (1000 + 20.272305) / (3234.3 + 20.272305))
