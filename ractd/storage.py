"""Run storage: the one place that decides where results that must outlive a node go, and moves files there.

On one machine that is a local folder; on a cluster it is $RACTD_STORAGE_PATH, a URI every node reaches
(s3://bucket/prefix on cluster.yaml, a folder on NFS on cluster-local.yaml). Ray Tune and Ray Train keep their
state there (their RunConfig(storage_path=...)), and so do the files of ours that another node or a later
process needs: a stage's best.pt and metrics.jsonl, a trial's summary, the shared teacher and reward model.
A file on a node's own disk is read only on that node; everything else goes through here.

An S3-compatible store (MinIO, Ceph, moto) is named the way its users name it to every AWS client: the
standard AWS_ENDPOINT_URL (and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION) environment
variables, which pyarrow, boto3 and so Ray all read; the URI stays s3://bucket/prefix.

Writes are atomic: a local file through ractd.io.atomic_write; an S3 object appears only when its upload
completes. pyarrow.fs does the I/O (pyarrow is a core dependency; no Ray here).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ractd import RactdError

STORAGE_ENV = "RACTD_STORAGE_PATH"
"""Environment variable naming the shared storage (s3://bucket/prefix, or a folder every node mounts)."""

_CHUNK = 1 << 24


def configured() -> str | None:
    """$RACTD_STORAGE_PATH without a trailing slash, or None when unset (one machine)."""
    value = os.environ.get(STORAGE_ENV, "").strip()
    return value.rstrip("/") or None


def is_uri(location: str) -> bool:
    return "://" in str(location)


def location(sub: str, local: str | os.PathLike) -> str:
    """Where the files of `sub` (e.g. "sweeps/<name>-<id>") live: $RACTD_STORAGE_PATH/<sub> on a cluster, else
    the local folder `local` (absolute). The single decision Tune, Train and the evaluation share."""
    root = configured()
    if root:
        return f"{root}/{sub.strip('/')}"
    return str(Path(local).expanduser().resolve())


def folder_location(kind: str, folder: str | os.PathLike) -> str:
    """The storage of a run folder (location): $RACTD_STORAGE_PATH/<kind>/<folder's name>-<id> on a cluster, the
    id a digest of the folder's absolute path (two folders that share a name do not share state), else
    <folder>/ray. kind: "sweeps" (a sweep's Tune and Train state), "runs" (a Ray Train run's)."""
    import hashlib

    folder = Path(folder).expanduser().resolve()
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    return location(f"{kind}/{folder.name}-{digest}", folder / "ray")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_uri(base):
        return "/".join([base.rstrip("/")] + [str(p).strip("/") for p in parts])
    return str(Path(base, *parts))


def _fs(loc: str):
    """(pyarrow filesystem, path inside it) of a URI or a local path."""
    import pyarrow.fs as pafs

    loc = str(loc)
    if not is_uri(loc):
        return pafs.LocalFileSystem(), str(Path(loc).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(loc)
    except Exception as e:  # an unknown scheme, a malformed URI
        raise RactdError(f"storage {loc}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _fail(what: str, loc: str, e: Exception) -> RactdError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return RactdError(f"cannot {what} {loc}: {reason}")


def exists(loc: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(loc)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError as e:
        raise _fail("reach", loc, e) from None


def size(loc: str) -> int:
    """Bytes of a stored file (-1 when it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = _fs(loc)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else -1


def read_bytes(loc: str) -> bytes:
    fs, path = _fs(loc)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, FileNotFoundError) as e:
        raise _fail("read", loc, e) from None


def read_text(loc: str) -> str:
    return read_bytes(loc).decode("utf-8")


def write_bytes(loc: str, data: bytes) -> str:
    """Write `data` to `loc` atomically; returns loc."""
    if not is_uri(loc):
        from ractd.io import atomic_write

        atomic_write(loc, data)
        return loc
    fs, path = _fs(loc)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise _fail("write", loc, e) from None
    return loc


def upload(local: str | os.PathLike, loc: str) -> str:
    """Copy the local file `local` to `loc` (streamed; atomic at the destination); returns loc."""
    if not is_uri(loc):
        if Path(local).resolve() == Path(loc).resolve():
            return loc
        from ractd.io import atomic_write

        with open(local, "rb") as src:
            atomic_write(loc, lambda out: shutil.copyfileobj(src, out, _CHUNK))
        return loc
    fs, path = _fs(loc)
    try:
        with open(local, "rb") as src, fs.open_output_stream(path) as out:
            shutil.copyfileobj(src, out, _CHUNK)
    except OSError as e:
        raise _fail("write", loc, e) from None
    return loc


def download(loc: str, local: str | os.PathLike) -> Path:
    """Copy the stored file `loc` to the local path `local` (atomically); returns the local path."""
    from ractd.io import atomic_write

    local = Path(local)
    if not is_uri(loc) and Path(loc).resolve() == local.resolve():
        if not local.is_file():
            raise RactdError(f"cannot read {loc}: no such file")
        return local
    fs, path = _fs(loc)
    try:
        with fs.open_input_stream(path) as src:
            atomic_write(local, lambda out: shutil.copyfileobj(src, out, _CHUNK))
    except (OSError, FileNotFoundError) as e:
        raise _fail("read", loc, e) from None
    return local


def total_bytes(loc: str) -> int:
    """Bytes of every file under the folder `loc` (0 if it does not exist): what a run wrote to storage."""
    import pyarrow.fs as pafs

    fs, path = _fs(loc)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sum(i.size for i in infos if i.type == pafs.FileType.File)


def list_dir(loc: str) -> list[str]:
    """Names of the entries directly under the folder `loc` ([] if it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = _fs(loc)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def run_files(storage_path: str, name: str) -> str:
    """Where a training run's own files go in storage, beside Ray Train's: <storage_path>/<name>/ractd/ (each
    stage's best.pt and metrics.jsonl under <stage>/, a sweep trial's summary.json; ractd_ray.train writes them,
    ractd_repro.sweep reads a sweep's)."""
    return join(storage_path, name, "ractd")
