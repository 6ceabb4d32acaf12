"""Shared test setup: every test runs with its caches and working directory in a temporary folder,
so nothing is written into the repository (HalfCheetah writes MUJOCO_LOG.TXT into the cwd)."""

import pytest
import torch

# One intra-op thread: the test networks are small, and on a 2-CPU machine shared with other processes
# multi-threaded torch ops slow down several-fold from oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("RACTD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
