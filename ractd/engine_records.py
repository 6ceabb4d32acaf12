"""The engines' calibration records (ractd.engine): one JSON file, <cache_dir>/engines/calibration.json, holding
{version, entries: {key: record}}, a record per (network shape, bucket, threads, precision, machine) key with
the engine chosen and what was measured. Written atomically; an unreadable file is ignored with a warning and
rewritten; a file of another CACHE_VERSION is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import platform

import torch

log = logging.getLogger("ractd.engine")  # the records' warnings are the engine's

CACHE_VERSION = 2


def calibration_path():
    from ractd.paths import cache_dir

    return cache_dir() / "engines" / "calibration.json"


def read_calibration(path) -> dict:
    """The cache's entries {key: record}; a missing file is empty, an unreadable one is ignored with a warning."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError(f"not a version-{CACHE_VERSION} engine calibration")
        return data["entries"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:
        log.warning("ignoring the engine calibration cache %s (%s); measuring again", path,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return {}


def write_calibration(path, key: str, record: dict) -> None:
    """Add one record to the cache, atomically (read, merge, replace: a concurrent writer's record may be lost,
    to be measured again, but the file is never partial)."""
    from ractd.io import atomic_write_json

    entries = read_calibration(path)
    entries[key] = record
    atomic_write_json(path, {"version": CACHE_VERSION, "entries": entries})


def load_now() -> float:
    """The 1-minute load average, as a record stores it."""
    return round(os.getloadavg()[0], 2)


def measure_again(record) -> bool:
    """Whether a cached record is no answer: absent, or measured on a busy machine (load >= CPUs) that is quieter
    now."""
    cpus = os.cpu_count() or 1
    return not isinstance(record, dict) or float(record.get("load", 0.0)) >= cpus > os.getloadavg()[0]


def store_record(path, key: str, record: dict, what: str) -> None:
    """write_calibration, a failure only warned about: the choice stands, measured again next time."""
    try:
        write_calibration(path, key, record)
    except OSError as e:
        log.warning("cannot write the %s cache: %s", what, e)


def machine(openvino=None) -> str:
    """What a record was measured on: architecture, CPU model, torch and OpenVINO versions (openvino: the
    imported module, None where it is not installed)."""
    return (f"{platform.machine()}:{cpu_name()}:torch{torch.__version__}:"
            f"ov{getattr(openvino, '__version__', 'none')}")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo; the platform's processor string where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"

