"""Checkpoints: model, EMA, optimizer, scheduler, normalizers, RNG state and the resolved config, together.

One file per checkpoint (torch.save of a dict), written atomically (temp file in the same folder, then
os.replace), with the resolved config also saved as config.json beside it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ractd import RactdError


def atomic_write_bytes(path: Path, write) -> Path:
    """Call write(file_object) on a temp file next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: Path, payload: dict) -> Path:
    """Write payload (must contain "config": dict) atomically to path, and config.json beside it."""
    atomic_write_bytes(path, lambda f: torch.save(payload, f))
    text = json.dumps(payload["config"], indent=2, sort_keys=True).encode()
    atomic_write_bytes(Path(path).parent / "config.json", lambda f: f.write(text))
    return Path(path)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Atomically copy a written checkpoint file (e.g. latest -> best) without serializing it again."""
    import shutil

    with open(src, "rb") as f:
        return atomic_write_bytes(dst, lambda out: shutil.copyfileobj(f, out, 1 << 24))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RactdError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt or foreign file
        raise RactdError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
