"""Checkpoints: model, EMA, optimizer, scheduler, normalizers, RNG state and the resolved config, together.

One file per checkpoint (torch.save of a dict), written atomically (ractd.io: temp file in the same folder,
fsync, os.replace, fsync of the folder), with the resolved config also saved as config.json beside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ractd import RactdError
from ractd.io import atomic_torch_save, atomic_write, atomic_write_json


def save_checkpoint(path: Path, payload: dict) -> Path:
    """Write payload (must contain "config": dict) atomically to path, and config.json beside it."""
    atomic_torch_save(path, payload)
    atomic_write_json(Path(path).parent / "config.json", payload["config"], indent=2, sort_keys=True)
    return Path(path)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Atomically copy a written checkpoint file (e.g. latest -> best) without serializing it again."""
    with open(src, "rb") as f:
        return atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 24))


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by save_checkpoint (on CPU); a missing or unreadable file is a RactdError."""
    path = Path(path)
    if not path.is_file():
        raise RactdError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt or foreign file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RactdError(f"cannot read checkpoint {path}: {reason}") from None
