"""Atomic file writes: the one helper every result file, checkpoint and dataset goes through.

`atomic_write(path, content)` writes into a new temporary file in the same folder (so the final rename never
crosses a file system), flushes and fsyncs it, `os.replace`s it onto `path`, then fsyncs the folder so the
rename itself is durable. A reader therefore sees the old file or the complete new one, never a partial file;
if writing fails (an exception in the writer, a full disk, Ctrl-C) the temporary file is removed and an
existing file at `path` is left untouched.

The temporary file is created with mode 0o666 through os.open, so the kernel applies the process umask
exactly as for a plain open(path, "w"): the written file gets the usual permissions (tempfile.mkstemp would
give 0600), and no process-wide umask is read or changed.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import IO, Callable, Union

Writer = Callable[[IO[bytes]], object]


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, exclusively created temp file next to `path`: (fd open for read/write, its path)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename inside it is durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, content: Union[bytes, bytearray, memoryview, Writer]) -> Path:
    """Write `content` to `path` atomically (see the module doc); returns the path.

    content: bytes, or a callable `write(f)` given the temporary file open for binary reading and writing
    ("w+b", so h5py.File(f, "w") and pyarrow.parquet.write_table(table, f) work on it); `f.name` is the
    temporary file's path, for a writer that wants to validate what it wrote before it takes `path`'s name.
    The parent folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with open(fd, "w+b") as f:
            f.raw.name = str(tmp)  # open(fd) names the file by its descriptor; give writers the real path
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_json(path, obj, **dumps_kwargs) -> Path:
    """json.dumps(obj, **dumps_kwargs) written atomically as UTF-8 (default: indent=2, sort_keys=True)."""
    dumps_kwargs.setdefault("indent", 2)
    dumps_kwargs.setdefault("sort_keys", True)
    return atomic_write(path, json.dumps(obj, **dumps_kwargs).encode("utf-8"))


def atomic_torch_save(path, obj) -> Path:
    """torch.save(obj) written atomically to `path` (streamed into the temporary file, not buffered)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_npz(path, arrays: dict) -> Path:
    """np.savez(**arrays) written atomically to `path` (keys must be valid argument names)."""
    import numpy as np

    return atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_parquet(path, rows) -> Path:
    """A table (a pandas DataFrame, or a list of row dicts) written atomically to `path` as Parquet: the results
    stores of the bench studies, rewritten after each new row."""
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    return atomic_write(path, lambda f: df.to_parquet(f))


def read_rows(path, required: bool = False) -> list[dict]:
    """The rows of a Parquet table (atomic_parquet's) as dicts; [] when the file is missing, unless `required`
    (then a RactdError naming it: e.g. a --report of a study that has not run)."""
    path = Path(path)
    if not path.is_file():
        if required:
            from ractd import RactdError

            raise RactdError(f"no results in {path}")
        return []
    import pandas as pd

    return pd.read_parquet(path).to_dict("records")
