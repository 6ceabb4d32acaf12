"""The Ray cluster files (cluster.yaml, cluster-local.yaml): checked offline, their AWS roles, and a live check.

`validate_cluster_config(path)` does what `ray up` does to a cluster file before it touches a cloud account:
fill in the provider's defaults (`ray.autoscaler.sdk.fillout_defaults`) and validate the result against the
autoscaler schema shipped in the Ray wheel (`ray/autoscaler/ray-schema.json`, JSON Schema draft-07: unknown
keys are errors, node resources are non-negative integers), then the few cross-field rules `ray up` checks
outside the schema, then this project's own (shared storage, installed extras, instance profiles the head can
pass). No network access, no AWS credentials, no Ray instance. A file with CHANGE-ME values left is refused
(--template: checked as the repository's template, with its placeholders).

    python -m ractd_ray.cluster validate cluster.yaml cluster-local.yaml
    python -m ractd_ray.cluster iam cluster.yaml [--apply]     # once per AWS account: ractd_ray.aws
    python -m ractd_ray.cluster check                          # on the head of a running cluster: ractd_ray.check
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import jsonschema
import ray.autoscaler
import yaml
from ray.autoscaler.sdk import fillout_defaults

from ractd import RactdError, storage
from ractd.errors import Parser, fail

STORAGE_ENV = storage.STORAGE_ENV
"""Environment variable naming the shared storage for Tune and Train results (s3://bucket/prefix or a path on
a shared file system); the cluster files set it on every node (ractd.storage decides with it)."""

REQUIRED_EXTRAS = {
    "ray": "Ray Tune / Train, Optuna: tune/search.py and eval/reproduce_tables.py",
    "locomotion": "stable-baselines3: --source auto generates locomotion datasets on the head",
}
"""Extras of this project the nodes must install for the README's commands to run on the cluster."""

PLACEHOLDER = "CHANGE-ME"
"""Marker of the values a user must edit in the cluster files before `ray up`."""


def schema_path() -> Path:
    """The autoscaler's JSON schema, as shipped in the installed Ray wheel."""
    return Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def _where(error: jsonschema.ValidationError) -> str:
    """Dotted key path of a schema error, e.g. available_node_types.gpu_v100.resources.GPU."""
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise RactdError(f"{path}: cannot read cluster file ({e.strerror or e})") from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise RactdError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(cfg, dict):
        raise RactdError(f"{path}: a cluster file must be a YAML mapping, got {type(cfg).__name__}")
    provider = cfg.get("provider")
    if not isinstance(provider, dict) or not isinstance(provider.get("type"), str):
        raise RactdError(f"{path}: provider.type is missing (e.g. aws, gcp, local)")
    return cfg


def _check_rules(path: Path, raw: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Rules `ray up` enforces outside the schema (ray.autoscaler._private.util.validate_config and the local
    provider's preparation), restated so that a bad file fails here rather than half-way through `ray up`."""
    if cfg["provider"]["type"] == "local":
        if raw.get("available_node_types") or raw.get("head_node_type"):
            raise RactdError(f"{path}: available_node_types: not allowed with the local provider "
                             "(Ray builds its one node type from provider.head_ip and provider.worker_ips)")
        if "coordinator_address" not in cfg["provider"]:
            for key in ("head_ip", "worker_ips"):
                if key not in cfg["provider"]:
                    raise RactdError(f"{path}: provider.{key}: required by the local provider")
        return
    types = cfg.get("available_node_types")
    if not types:
        raise RactdError(f"{path}: available_node_types: missing (one head type and the worker types)")
    head = cfg.get("head_node_type")
    if head not in types:
        raise RactdError(f"{path}: head_node_type: {head!r} is not one of available_node_types "
                         f"({', '.join(types)})")
    total_min = sum(t.get("min_workers", 0) for t in types.values())
    if total_min > cfg["max_workers"]:
        raise RactdError(f"{path}: max_workers: {cfg['max_workers']} is below the sum of the node types' "
                         f"min_workers ({total_min})")


def _is_multi_node(raw: dict[str, Any], cfg: dict[str, Any]) -> bool:
    if cfg["provider"]["type"] == "local":
        return bool(cfg["provider"].get("worker_ips"))
    head = cfg.get("head_node_type")
    return any(t.get("max_workers", cfg.get("max_workers", 0)) > 0
               for name, t in (cfg.get("available_node_types") or {}).items() if name != head)


def installed_extras(cfg: dict[str, Any]) -> set[str] | None:
    """The extras of this project the setup commands install (`pip install -e '.[a,b]'`), None if none does."""
    import re

    found = None
    for cmd in [*cfg.get("setup_commands", []), *cfg.get("head_setup_commands", []),
                *cfg.get("worker_setup_commands", [])]:
        for m in re.finditer(r"pip install[^;&|]*?-e\s+['\"]?\.\[([^\]]*)\]", str(cmd)):
            found = (found or set()) | {x.strip() for x in m.group(1).split(",") if x.strip()}
    return found


def _check_project_rules(path: Path, raw: dict[str, Any], cfg: dict[str, Any]) -> None:
    """This project's own rules for a cluster file: a multi-node cluster sets the shared storage
    ($RACTD_STORAGE_PATH: the nodes share no disk), and the nodes install the extras the commands need."""
    if _is_multi_node(raw, cfg) and f"{STORAGE_ENV}=" not in yaml.safe_dump(raw, width=10**6):
        raise RactdError(f"{path}: a multi-node cluster needs shared storage: set {STORAGE_ENV}=s3://... (or a "
                         f"shared folder) on every node, e.g. docker.run_options: --env {STORAGE_ENV}=...")
    _check_profiles(path, cfg)
    extras = installed_extras(cfg)
    if extras is None:
        raise RactdError(f"{path}: setup_commands: no `pip install -e '.[{','.join(REQUIRED_EXTRAS)}]'` of this "
                         f"project")
    missing = [e for e in REQUIRED_EXTRAS if e not in extras]
    if missing:
        raise RactdError(f"{path}: setup_commands: the nodes install .[{','.join(sorted(extras))}] without "
                         + "; ".join(f"{e} ({REQUIRED_EXTRAS[e]})" for e in missing))


def _check_profiles(path: Path, cfg: dict[str, Any]) -> None:
    """Worker node types with an instance profile need a head whose role may pass it: Ray's default head role
    (created when the head names no profile) cannot, and every worker launch is refused (ractd_ray.aws)."""
    types = cfg.get("available_node_types") or {}
    head = types.get(cfg.get("head_node_type"), {})
    workers = [n for n, t in types.items() if n != cfg.get("head_node_type")
               and "IamInstanceProfile" in t.get("node_config", {})]
    if workers and "IamInstanceProfile" not in head.get("node_config", {}):
        raise RactdError(f"{path}: available_node_types.{workers[0]}.node_config.IamInstanceProfile: the head names "
                         f"no instance profile, and Ray's default head role cannot pass the workers' (no "
                         f"iam:PassRole): give the head the profile `python -m ractd_ray.cluster iam` creates")


def validate_cluster_config(path: str | os.PathLike, project_rules: bool = True) -> dict[str, Any]:
    """Load a Ray cluster file, fill in the provider's defaults and validate it against the Ray wheel's schema.

    Returns the filled-in config (what `ray up` would use before contacting the cloud). Raises RactdError with
    one line naming the file and the offending key: unknown keys, wrong types (a resource of 0.5 GPU),
    a head_node_type that is not a node type, available_node_types on the local provider, ...; with
    project_rules, also this project's own rules (_check_project_rules: shared storage, installed extras).
    """
    path = Path(path)
    raw = _load(path)
    try:
        cfg = fillout_defaults(raw)
    except NotImplementedError as e:  # an unknown provider type
        raise RactdError(f"{path}: provider.type: {e}") from None
    schema = json.loads(schema_path().read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(cfg))
    if error is not None:
        raise RactdError(f"{path}: {_where(error)}: {error.message}")
    _check_rules(path, raw, cfg)
    if project_rules:
        _check_project_rules(path, raw, cfg)
    return cfg


def placeholders(path: str | os.PathLike) -> list[int]:
    """Line numbers (1-based) that still hold a CHANGE-ME value (full-line comments do not count)."""
    lines = Path(path).read_text().splitlines()
    return [i for i, line in enumerate(lines, 1) if PLACEHOLDER in line and not line.lstrip().startswith("#")]


def summary(cfg: dict[str, Any]) -> str:
    """One line per node type: instance, worker range and the resources it advertises."""
    provider = cfg["provider"]
    if provider["type"] == "local":
        return (f"  local provider: head {provider.get('head_ip')}, workers {provider.get('worker_ips')} "
                "(resources detected on each machine)")
    rows = []
    for name, t in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            role = "head"
        else:
            role = f"workers {t.get('min_workers', 0)}..{t.get('max_workers', cfg['max_workers'])}"
        instance = t["node_config"].get("InstanceType", t["node_config"].get("machineType", "?"))
        rows.append(f"  {name}: {instance}, {role}, resources {t['resources']}")
    return "\n".join(rows)


def storage_bucket(raw: dict[str, Any]) -> str | None:
    """The S3 bucket of the file's RACTD_STORAGE_PATH, None if it sets no s3:// storage."""
    import re

    m = re.search(rf"{STORAGE_ENV}=s3://([^/\s'\"]+)", yaml.safe_dump(raw, width=10**6))
    return m.group(1) if m else None


def _validate(args) -> int:
    for path in args.paths:
        try:
            cfg = validate_cluster_config(path)
        except RactdError as e:
            return fail(str(e))
        todo = placeholders(path)
        if todo and not args.template:
            return fail(f"{path}: {PLACEHOLDER} left on line(s) {', '.join(map(str, todo))}: edit them before "
                        f"`ray up` (--template checks the file as a template)")
        print(f"{path}: valid ({cfg['provider']['type']} provider, schema {schema_path()})")
        print(summary(cfg))
        if todo:
            print(f"  a template: {PLACEHOLDER} on line(s) {', '.join(map(str, todo))}")
    return 0


def _iam(args) -> int:
    from ractd_ray import aws

    bucket = args.bucket or storage_bucket(_load(Path(args.path)))
    if not bucket or PLACEHOLDER in bucket:
        return fail(f"{args.path}: no S3 bucket in {STORAGE_ENV}=s3://...: set it (or pass --bucket)")
    if not args.apply:
        print(f"# the roles and instance profiles for bucket {bucket}, once per account (or rerun with --apply); "
              f"ACCOUNT_ID is yours: aws sts get-caller-identity")
        print("\n".join(aws.cli_commands("ACCOUNT_ID", bucket)))
        return 0
    made = aws.apply(bucket)
    print(f"account {made['account']}: {aws.HEAD} and {aws.WORKER} are in place; in {args.path}, set "
          f"{PLACEHOLDER}-ACCOUNT-ID to {made['account']}:\n  head:    {made['head_profile']}\n"
          f"  workers: {made['worker_profile']}")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="python -m ractd_ray.cluster",
                    description="Ray cluster files: offline checks, the AWS roles they need, a live check.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("validate", help="fill in Ray's defaults and validate against the autoscaler schema "
                                        "shipped in the installed Ray wheel and this project's rules; exit 2 on the "
                                        "first invalid file, or one with CHANGE-ME values left")
    p.add_argument("paths", nargs="+", metavar="CLUSTER_YAML", help="e.g. cluster.yaml cluster-local.yaml")
    p.add_argument("--template", action="store_true",
                   help="check the file as a template: CHANGE-ME values are listed, not refused")
    p = sub.add_parser("iam", help="the head's and the workers' AWS roles and instance profiles, once per account "
                                   "(ractd_ray.aws): prints the `aws iam` commands, or makes the calls with --apply")
    p.add_argument("path", metavar="CLUSTER_YAML", help="the cluster file whose S3 bucket the roles may use")
    p.add_argument("--bucket", default="", help="the bucket (default: the file's RACTD_STORAGE_PATH)")
    p.add_argument("--apply", action="store_true", help="create them with boto3 (your AWS credentials)")
    p = sub.add_parser("check", help="on a running cluster (a job on its head): node types, storage from a worker "
                                     "node, torch.cuda on a GPU worker (ractd_ray.check)")
    p.add_argument("--address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else the one on this machine)")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto",
                   help="check a GPU worker: auto (when a node type has a GPU), yes, no (default: auto)")
    p.add_argument("--timeout", type=float, default=1200.0,
                   help="seconds to wait for a node to take the probe (an autoscaled GPU node takes minutes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ractd.errors import run_command

    args = build_parser().parse_args(argv)
    if args.command == "validate":
        return _validate(args)
    if args.command == "iam":
        return run_command(lambda: _iam(args))
    from ractd_ray.check import main_check

    return run_command(lambda: main_check(args.address, args.gpu, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
