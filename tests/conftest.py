"""Shared test setup: every test runs with its caches and working directory in a temporary folder,
so nothing is written into the repository (HalfCheetah writes MUJOCO_LOG.TXT into the cwd)."""

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

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


@pytest.fixture
def s3_bucket(monkeypatch, tmp_path):
    """An S3-compatible endpoint (moto's server on 127.0.0.1) given to every AWS client the way a user of MinIO or
    Ceph gives it (AWS_ENDPOINT_URL and the usual credentials), with a bucket of this test's own (moto's store is one
    per process, so a shared name would see other tests' objects). Yields the bucket's name."""
    boto3 = pytest.importorskip("boto3")
    server = pytest.importorskip("moto.server")
    moto = server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(k, v)
        bucket = "b-" + tmp_path.name.lower().replace("_", "-")[-40:].strip("-")
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield bucket
    finally:
        moto.stop()


@pytest.fixture
def load_script():
    """A command script of the repository (`bench/gpu.py`, `eval/reproduce_tables.py`) loaded as a module, by its
    path relative to the repository root."""
    def load(relative: str):
        path = REPO / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
