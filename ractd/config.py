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


# ------------------------------------------------------------------------------------- command lines from configs

def field_docs(cls: type) -> dict[str, str]:
    """Per-field help parsed from a config dataclass docstring's "name: text" (or "a, b: text") lines."""
    import inspect
    import re

    docs: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    current: list[str] = []
    for line in inspect.getdoc(cls).splitlines():
        m = re.match(r"^([a-z_][a-z0-9_]*(?:\s*,\s*[a-z_][a-z0-9_]*)*)\s*:\s*(.*)$", line.strip())
        keys = [k.strip() for k in m.group(1).split(",")] if m else []
        if m and keys and all(k in names for k in keys) and not line.startswith(" "):
            current = keys
            for k in keys:
                docs[k] = m.group(2).strip()
        elif current and line.startswith(" ") and line.strip():
            for k in current:
                docs[k] += " " + line.strip()
        else:
            current = []
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser, cls: type, defaults: Any, skip: tuple[str, ...] = (), prefix: str = "",
                    aliases: dict[str, list[str]] | None = None) -> list[str]:
    """Add one flag per field of the config dataclass `cls` (nested dataclasses flattened, their fields named
    without the parent's name unless they clash). Flags default to "not given" (argparse.SUPPRESS), so the
    config built from them keeps the dataclass's own defaults; `defaults` (an instance) is shown in --help.
    Returns the dests added (dotted paths for nested fields)."""
    import argparse

    aliases = aliases or {}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    added: list[str] = []
    taken = {a.dest for a in parser._actions}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint, value = hints[f.name], getattr(defaults, f.name)
        if dataclasses.is_dataclass(hint):
            for sub in add_config_args(parser, hint, value, skip, prefix=f"{prefix}{f.name}.", aliases=aliases):
                added.append(sub)
            continue
        dest = prefix + f.name
        flag_name = f.name if f.name not in taken else dest.replace(".", "_")  # a clash: --distill-distance
        flags = [_flag(flag_name)] + aliases.get(dest, [])
        help_text = f"{docs.get(f.name, '')} (default: {value!r})".replace("%", "%%")
        kw: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=help_text)
        if hint is not bool:
            kw["metavar"] = f.name.upper()
        origin = typing.get_origin(hint)
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kw["choices"] = list(typing.get_args(hint))
        elif origin is tuple:
            kw.update(type=typing.get_args(hint)[0], nargs="+")
        elif hint in (int, float, str):
            kw["type"] = hint
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {hint}")
        parser.add_argument(*flags, **kw)
        taken.add(flag_name)
        added.append(dest)
    return added


def replace_from_args(cfg: T, args, dests: list[str]) -> T:
    """A copy of the (possibly nested) config with every flag the user gave (present in `args`) applied."""
    given: dict[str, Any] = {}
    for dest in dests:
        if hasattr(args, dest):
            given[dest] = getattr(args, dest)
    return _apply(cfg, given)


def _apply(cfg, given: dict[str, Any]):
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for dest, value in given.items():
        head, _, rest = dest.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = tuple(value) if isinstance(value, list) else value
    for head, sub in nested.items():
        top[head] = _apply(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **top)
