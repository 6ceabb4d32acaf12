"""Frozen dataclass configs: the single source of truth, saved as JSON beside every checkpoint.

Unknown keys in a loaded config are an error (`from_dict`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypeVar

from ractd import RactdError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Conditional 1D temporal U-Net (Chi et al. 2023) sizes.

    down_dims: channels per resolution level (one downsampling between consecutive levels).
    time_embed_dim: width of the sinusoidal noise-level embedding (paper: diffusion_step_embed_dim).
    kernel_size: Conv1d kernel size (5 in every paper table).
    n_groups: GroupNorm groups.
    dropout: dropout probability inside residual blocks (0 = off).
    """

    down_dims: tuple[int, ...] = (64, 128, 256)
    time_embed_dim: int = 128
    kernel_size: int = 5
    n_groups: int = 8
    dropout: float = 0.0


# Named presets. "mujoco" = paper Table 7; "maze2d-*" = paper Table 6; "small"/"tiny" are CPU sizes.
UNET_PRESETS: dict[str, UNetConfig] = {
    "mujoco": UNetConfig(down_dims=(512, 1024, 2048), time_embed_dim=128),
    "maze2d-umaze": UNetConfig(down_dims=(256, 512, 1024), time_embed_dim=256),
    "maze2d-medium": UNetConfig(down_dims=(512, 1024, 2048), time_embed_dim=256),
    "maze2d-large": UNetConfig(down_dims=(256, 512, 1024, 2048), time_embed_dim=256),
    "small": UNetConfig(down_dims=(64, 128, 256), time_embed_dim=128),
    "small-maze": UNetConfig(down_dims=(32, 64, 128), time_embed_dim=64),
    "tiny": UNetConfig(down_dims=(16, 32), time_embed_dim=16, n_groups=4),
}


def unet_preset(name: str) -> UNetConfig:
    try:
        return UNET_PRESETS[name]
    except KeyError:
        raise RactdError(f"unknown U-Net preset {name!r}; known presets: {', '.join(UNET_PRESETS)}") from None


def to_dict(cfg: Any) -> dict:
    """A dataclass as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: dict) -> T:
    """Build a (possibly nested) frozen dataclass from a dict; unknown keys raise RactdError."""
    if not isinstance(data, dict):
        raise RactdError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RactdError(f"{cls.__name__}: unknown config keys {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
