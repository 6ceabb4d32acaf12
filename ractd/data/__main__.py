"""python -m ractd.data: generate, inspect, download and export datasets.

    python -m ractd.data generate TASK [--scale tiny|small|full] [--seed N] [--out PATH] [--no-noise]
    python -m ractd.data info TASK|PATH [--source auto|d4rl|local|minari] [--scale ...]
    python -m ractd.data download TASK
    python -m ractd.data export TASK|PATH (--minari ID | --hdf5 PATH)
    python -m ractd.data export-behavior ENV [--scale ...] [--seed N] [--out DIR]

Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from ractd import RactdError
from ractd.data.d4rl import SOURCES
from ractd.errors import Parser, run_command
from ractd.maze import REWARD_RADIUS
from ractd.tasks import SCALES


def _generate(args) -> int:
    from ractd.tasks import get_task

    task = get_task(args.task)
    if args.steps is not None and args.steps <= 0:
        raise RactdError(f"--steps must be positive, got {args.steps}")
    if task.kind == "maze":
        from ractd.data.generate_maze import generate_maze

        path = generate_maze(task, scale=args.scale, seed=args.seed, out=args.out, noise=not args.no_noise,
                             n_steps=args.steps)
    else:
        if args.no_noise or args.steps is not None:
            raise RactdError("--no-noise and --steps apply to maze tasks only")
        try:
            from ractd.data.generate_locomotion import generate_locomotion
        except ImportError as e:
            raise RactdError(f"locomotion generation is unavailable ({e})") from None

        path = generate_locomotion(task, scale=args.scale, seed=args.seed, out=args.out)
    print(path)
    return 0


def _resolve(target: str, source: str, scale: str):
    """TASK or PATH → (data, task or None, description of where it came from)."""
    from ractd.data.d4rl import (
        d4rl_cache_path,
        load_d4rl_hdf5,
        load_dataset,
        local_dataset_path,
    )
    from ractd.tasks import TASKS, get_task

    path = Path(target)
    if target not in TASKS and (path.suffix in (".hdf5", ".h5") or path.exists()):
        data = load_d4rl_hdf5(path, kind="auto")
        name = data.get("metadata/task")
        if name not in TASKS:  # D4RL files: infer from the file name (e.g. hopper_medium_replay-v2.hdf5)
            stem = path.name.replace("_", "-")
            name = max((t for t in TASKS if stem.startswith(t)), key=len, default=None)
        return data, (TASKS[name] if name else None), str(path)
    task = get_task(target)
    data = load_dataset(task, source=source, scale=scale)
    where = {"d4rl": d4rl_cache_path(task), "local": local_dataset_path(task, scale)}.get(source)
    if source == "auto":
        where = d4rl_cache_path(task) if d4rl_cache_path(task).is_file() else local_dataset_path(task, scale)
    return data, task, str(where or data.get("metadata/minari_id", source))


def _stats(x) -> str:
    x = np.asarray(x, dtype=np.float64)
    return f"min {x.min():.2f}  median {np.median(x):.2f}  max {x.max():.2f}"


def _definition_lines(meta: dict, task) -> list[str]:
    """Whether a generated locomotion file's behavior policies met their split's definition.

    medium (also behind medium-replay and medium-expert): the first evaluation at >= 1/3 of D4RL's expert
    reference (metadata medium_reached; when it was never reached, the recipe took the policy at its
    medium_max_steps). With an expert in the file: the medium policy's evaluation return against a third of the
    expert's. Empty for files without generation metadata (D4RL downloads, maze data)."""
    if "medium_reached" not in meta or "medium_policy_eval_return" not in meta:
        return []
    med, step = float(meta["medium_policy_eval_return"]), int(meta.get("medium_policy_step", -1))
    thr = float(meta.get("medium_threshold_return", float("nan")))
    norm = f" = normalized {task.normalized_score(thr):.1f}" if task is not None else ""
    if int(meta["medium_reached"]):
        lines = [f"medium       reached: policy eval return {med:.1f} (step {step}) >= threshold {thr:.1f}{norm}"]
    else:
        lines = [f"medium       NOT REACHED: policy eval return {med:.1f} (step {step}) < threshold {thr:.1f}{norm}; "
                 "taken at the recipe's medium_max_steps, so this data is below D4RL's medium definition"]
    if "expert_policy_eval_return" in meta:
        exp = float(meta["expert_policy_eval_return"])
        ok = exp > 0 and med >= exp / 3.0
        ratio = f"{med / exp:.2f}" if exp > 0 else "undefined"
        lines.append(f"expert       policy eval return {exp:.1f} (step {int(meta.get('expert_policy_step', -1))}); "
                     f"medium / expert = {ratio} " + ("(>= 1/3)" if ok else "(NOT >= 1/3: medium is below a third of "
                                                                          "this expert)"))
    return lines


def _info(args) -> int:
    from ractd.data.windows import _bounds_arrays

    data, task, where = _resolve(args.target, args.source, args.scale)
    obs, act, rew = data["observations"], data["actions"], np.asarray(data["rewards"], np.float64)
    term, tout = data["terminals"], data["timeouts"]
    starts, ends = _bounds_arrays(term | tout)
    returns = np.add.reduceat(rew, starts) if len(rew) else np.zeros(0)
    lengths = ends - starts
    print(f"dataset      {where}")
    print(f"task         {task.name if task else 'unknown'}")
    print(f"transitions  {len(rew)}   observation dim {obs.shape[1]}   action dim {act.shape[1]}")
    print(f"episodes     {len(starts)}   ended by terminals {int(term[ends - 1].sum())}   by timeouts "
          f"{int((tout[ends - 1] & ~term[ends - 1]).sum())}   unflagged {int((~(term | tout))[ends - 1].sum())}")
    print(f"flags        terminals {int(term.sum())}   timeouts {int(tout.sum())}")
    print(f"ep. length   {_stats(lengths)}")
    print(f"return       {_stats(returns)}")
    if task is not None:
        norm = task.normalized_score(returns)
        print(f"normalized   {_stats(norm)}   (D4RL refs {task.ref_min_score} / {task.ref_max_score})")
        q = np.percentile(norm, [10, 50, 90])
        print(f"behavior     mean normalized return {norm.mean():.1f}; p10/p50/p90 {q[0]:.1f} / {q[1]:.1f} / "
              f"{q[2]:.1f}" + ("   (per goal segment; maze data reach goals, not eval returns)"
                               if task.kind == "maze" else ""))
        print(f"D4RL         {task.d4rl_name}: {task.dataset_size} transitions (this one: "
              f"{len(rew) / task.dataset_size:.2f}x); BC {task.d4rl_bc[0]:g}, 10% BC {task.d4rl_bc[1]:g} on it "
              f"(CORL, normalized" + ("; not goal-conditioned" if task.kind == "maze" else "") + ")")
    if "infos/goal" in data:
        last = ends - 1
        gap = np.linalg.norm(obs[last, :2] - data["infos/goal"][last], axis=-1)
        print(f"goals        {int((gap <= REWARD_RADIUS).sum())}/{len(last)} episodes end within {REWARD_RADIUS} "
              f"of their goal")
    meta = {k[len('metadata/'):]: v for k, v in data.items() if k.startswith("metadata/")}
    for line in _definition_lines(meta, task):
        print(line)
    if meta:
        print("metadata     " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items()))[:400])
    return 0


def _download(args) -> int:
    from ractd.data.d4rl import download_d4rl

    print(download_d4rl(args.task, force=args.force))
    return 0


def _export(args) -> int:
    from ractd.data.d4rl import write_d4rl_hdf5

    if (args.minari is None) == (args.hdf5 is None):
        raise RactdError("give exactly one of --minari ID or --hdf5 PATH")
    data, task, _ = _resolve(args.target, args.source, args.scale)
    if args.minari:
        from ractd.data.minari_io import export_minari

        export_minari(data, args.minari, task=task, overwrite=args.overwrite)
        print(args.minari)
    else:
        print(write_d4rl_hdf5(args.hdf5, data))
    return 0


def _export_behavior(args) -> int:
    from ractd.data.behavior_artifacts import (
        ARTIFACT_DIR,
        artifact_folder,
        export_artifacts,
    )
    from ractd.data.generate_locomotion import BehaviorCache
    from ractd.tasks import get_task

    task = get_task(f"{args.env}-medium")
    if task.kind != "locomotion":
        raise RactdError(f"{args.env} is not a locomotion env (hopper, walker2d, halfcheetah)")
    cache = BehaviorCache(task.env_id, args.scale, args.seed, artifacts=None)
    meta = export_artifacts(cache, root=args.out or ARTIFACT_DIR)
    diff = max(meta["rebuild_check"]["max_abs_diff"].values())
    print(f"{artifact_folder(task.env_id, args.scale, args.seed, args.out or ARTIFACT_DIR)}: "
          f"{sum(meta['file_bytes'].values())} bytes; replay rebuilt from it: max abs difference {diff}")
    for which, r in meta["returns"].items():
        print(f"  {which:13s} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in r.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ractd.data", description="Datasets for RACTD: generate, inspect, download, export.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate a local dataset (D4RL HDF5) for a task",
                       description="Generate a dataset: maze2d with D4RL's waypoint-controller recipe in "
                                   "PointMaze v3; locomotion with the behavior policies of "
                                   "ractd.data.generate_locomotion.")
    g.add_argument("task", help="task name, e.g. maze2d-umaze or hopper-medium")
    g.add_argument("--scale", choices=SCALES, default="full",
                   help="tiny: 5k steps (tests); small: 10%% of D4RL's size; full: D4RL's size (default)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--out", type=Path, default=None, help="output file (default: the ractd dataset cache)")
    g.add_argument("--no-noise", action="store_true", help="maze: no N(0, 0.5^2) action noise")
    g.add_argument("--steps", type=int, default=None, help="maze: number of steps, overrides --scale")
    g.set_defaults(func=_generate)

    def add_source(sp):
        sp.add_argument("--source", choices=SOURCES, default="auto",
                        help="where a TASK's data comes from (default auto: d4rl cache, else local file)")
        sp.add_argument("--scale", choices=SCALES, default="small", help="scale of a local dataset (default small)")

    i = sub.add_parser("info", help="summarize a dataset (sizes, episodes, returns, flags)",
                       description="Summarize a dataset given by task name or HDF5 path.")
    i.add_argument("target", help="task name or path to a D4RL-format HDF5 file")
    add_source(i)
    i.set_defaults(func=_info)

    d = sub.add_parser("download", help="download a task's D4RL file into d4rl's cache",
                       description="Download a task's D4RL HDF5 file into d4rl's cache ($D4RL_DATASET_DIR).")
    d.add_argument("task")
    d.add_argument("--force", action="store_true", help="download again even if the file exists")
    d.set_defaults(func=_download)

    e = sub.add_parser("export", help="export a dataset to Minari or to D4RL-format HDF5",
                       description="Export a dataset (task or HDF5 path) to Minari or to a D4RL-format HDF5 file.")
    e.add_argument("target", help="task name or path to a D4RL-format HDF5 file")
    add_source(e)
    e.add_argument("--minari", metavar="ID", help="Minari dataset id, e.g. ractd/hopper/medium-v0")
    e.add_argument("--hdf5", metavar="PATH", type=Path, help="output HDF5 path")
    e.add_argument("--overwrite", action="store_true", help="replace an existing Minari dataset")
    e.set_defaults(func=_export)

    b = sub.add_parser("export-behavior", help="write an env's SAC behavior policies as package artifacts",
                       description="Write the SAC behavior policies of ENV (random, medium, expert actors and "
                                   "the medium-replay rebuild inputs) into ractd/data/behavior/ (or --out), "
                                   "training or finishing the SAC run first if its cache lacks them, and check "
                                   "that the replay rebuilt from them equals the run's.")
    b.add_argument("env", help="hopper, walker2d or halfcheetah")
    b.add_argument("--scale", choices=SCALES, default="small", help="recipe scale (default small)")
    b.add_argument("--seed", type=int, default=0, help="SAC seed (default 0)")
    b.add_argument("--out", type=Path, default=None, help="artifact root (default: the package's ractd/data/behavior)")
    b.set_defaults(func=_export_behavior)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
