"""ractd.storage, the one helper deciding and moving run storage: a local folder on one machine,
$RACTD_STORAGE_PATH (S3 here: moto's server, named by AWS_ENDPOINT_URL as for MinIO or Ceph) on a cluster."""

import os

import pytest

from ractd import RactdError, storage


def test_location_is_local_without_storage_and_under_it_with(monkeypatch, tmp_path):
    monkeypatch.delenv(storage.STORAGE_ENV, raising=False)
    assert storage.configured() is None
    assert storage.location("sweeps/x-1", tmp_path / "ray") == str((tmp_path / "ray").resolve())
    monkeypatch.setenv(storage.STORAGE_ENV, "s3://bucket/prefix/")
    assert storage.location("/sweeps/x-1/", tmp_path) == "s3://bucket/prefix/sweeps/x-1"
    assert storage.join("s3://bucket/p/", "a", "/b.pt") == "s3://bucket/p/a/b.pt"


def _round_trip(base: str, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    loc = storage.join(base, "run", "best.pt")
    assert not storage.exists(loc) and storage.size(loc) == -1 and storage.total_bytes(base) == 0
    storage.upload(src, loc)
    storage.write_bytes(storage.join(base, "run", "summary.json"), b'{"a": 1}')
    assert storage.exists(loc) and storage.size(loc) == 3000
    assert storage.read_text(storage.join(base, "run", "summary.json")) == '{"a": 1}'
    assert storage.total_bytes(base) == 3000 + 8
    got = storage.download(loc, tmp_path / "dst" / "best.pt")
    assert got.read_bytes() == src.read_bytes()
    assert not list((tmp_path / "dst").glob(".*.tmp"))  # atomic: no temporary file left
    with pytest.raises(RactdError, match=r"^cannot read .*missing\.pt"):
        storage.download(storage.join(base, "missing.pt"), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_local_round_trip(tmp_path):
    _round_trip(str(tmp_path / "store"), tmp_path)


def test_s3_round_trip_on_an_s3_compatible_endpoint(tmp_path, s3_bucket):
    import boto3

    _round_trip(f"s3://{s3_bucket}/prefix", tmp_path)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert sorted(keys) == ["prefix/run/best.pt", "prefix/run/summary.json"]
