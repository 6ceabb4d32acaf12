"""How the project connects to Ray: `ensure_ray` (an existing cluster at --address / $RAY_ADDRESS / "auto", else a new
local instance), the address it resolves (`resolve_address`: an address nothing answers is a one-line RactdError
within seconds) and the GPU decision of a Ray Train worker group (`resolve_use_gpu`). ractd_ray.train, .search and
.pool connect through it.
"""

from __future__ import annotations

import logging
import os

from ractd import RactdError
from ractd.errors import one_line
from ractd_ray import console

log = logging.getLogger(__name__)


def _gcs_reachable(address: str, timeout: float = 5.0) -> bool:
    """Whether something accepts TCP connections at host:port (a Ray GCS would)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def resolve_address(address: str | None) -> str:
    """The address ensure_ray connects to: `address`, else $RAY_ADDRESS, else "local" (a new local instance, never
    a cluster some earlier `ray start` left on the machine); "auto" becomes the running cluster Ray's record names.
    An address nothing answers is a RactdError (one line) after a few seconds, not a wait on a dead GCS."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or "local"
    if address == "local" or "://" in address:  # ray://host:10001 (Ray Client) is checked by ray.init itself
        return address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address("auto")
        if not found:
            raise RactdError("--address auto: no running Ray cluster on this machine (start one with `ray start "
                             "--head`, or leave --address out for a local Ray)")
        address = found
    if not _gcs_reachable(address):
        raise RactdError(f"no Ray cluster answers at {address} (is `ray start --head` running there?)")
    return address


def ensure_ray(address: str | None = None, **init_kwargs) -> bool:
    """The one way the project connects to Ray: `address` (or $RAY_ADDRESS; "auto" = the running cluster of this
    machine) names an existing cluster, else a new local instance is started (address="local"). Returns True
    if this call started or connected (the caller shuts it down). An unreachable address: RactdError.

    A local instance gets its dashboard on a free port, and every Ray process of the job learns that address
    ($RAY_API_SERVER_ADDRESS): Ray Train's PlacementGroupCleaner finds the controller through the state API,
    which otherwise refuses to guess when several Ray instances run on one machine, and the workers of a Tune
    trial stopped early by ASHA would keep their CPUs (the next trial then waits forever). Attached to a
    running cluster, the job uses that cluster's own dashboard (nothing is pointed at a port of ours).
    """
    import ray

    if ray.is_initialized():
        return False
    address = resolve_address(address)
    env = {}
    port = None
    if address == "local":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        env.update(console.local_env())
        init_kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
    elif "://" not in address:  # the job's processes find the same cluster
        env["RAY_ADDRESS"] = address
    if address != "local":  # resources are the cluster's; ray.init refuses them when it connects
        for key in ("num_cpus", "num_gpus", "resources", "object_store_memory"):
            init_kwargs.pop(key, None)
    if env:
        runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
        init_kwargs["runtime_env"] = runtime_env
    init_kwargs.setdefault("logging_level", logging.WARNING)
    try:
        ctx = ray.init(address=address, **init_kwargs)
    except (ConnectionError, TimeoutError) as e:
        raise RactdError(f"cannot connect to the Ray cluster at {address}: {one_line(e, last=True)}") from None
    if port is not None and getattr(ctx, "dashboard_url", None) and not ctx.dashboard_url.endswith(f":{port}"):
        log.warning("Ray's dashboard is at %s, not port %d: trials stopped early may not release their workers",
                    ctx.dashboard_url, port)
    return True


def resolve_use_gpu(use_gpu: bool | str, num_workers: int) -> bool:
    """use_gpu "auto" | "yes" | "no" | bool -> bool: ractd_ray.resources.decide_gpu (auto: when a node type of the
    cluster has a GPU, which the request then brings up; yes where none can: RactdError)."""
    from ractd_ray.resources import decide_gpu

    if isinstance(use_gpu, bool):
        return use_gpu
    return decide_gpu({True: "yes", False: "no"}.get(use_gpu, use_gpu), f"Ray Train ({num_workers} workers)")
