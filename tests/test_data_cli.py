"""python -m ractd.data through subprocesses: generate and info on a tiny maze dataset; bad input exits 2."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import ractd
from ractd.data.d4rl import load_d4rl_hdf5

ROOT = Path(ractd.__file__).resolve().parents[1]


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "ractd.data", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_generate_and_info(tmp_path):
    out = tmp_path / "umaze.hdf5"
    r = run("generate", "maze2d-umaze", "--scale", "tiny", "--seed", "7", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    data = load_d4rl_hdf5(out, kind="maze")
    assert len(data["rewards"]) == 5000 and data["metadata/seed"] == 7
    r = run("info", str(out))
    assert r.returncode == 0, r.stderr
    assert "transitions  5000" in r.stdout and "task         maze2d-umaze" in r.stdout
    n_eps = int(data["timeouts"].sum()) + (0 if data["timeouts"][-1] else 1)
    assert f"episodes     {n_eps}" in r.stdout
    returns = np.add.reduceat(data["rewards"].astype(np.float64), np.r_[0, np.flatnonzero(data["timeouts"])[:-1] + 1])
    assert f"max {returns.max():.2f}" in r.stdout
    # D4RL's release beside it: 5000 of maze2d-umaze-v1's 1M transitions, and BC's level on D4RL's data
    assert "D4RL         maze2d-umaze-v1: 1000000 transitions (this one: 0.01x); BC 0.4, 10% BC 12.2" in r.stdout
    # By task name: the default cache location ($RACTD_CACHE_DIR from conftest).
    r = run("generate", "maze2d-umaze", "--scale", "tiny")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == Path(os.environ["RACTD_CACHE_DIR"]) / "datasets" / "maze2d-umaze-tiny.hdf5"
    r = run("info", "maze2d-umaze", "--scale", "tiny")
    assert r.returncode == 0 and "normalized" in r.stdout, r.stderr


def test_bad_input_exits_2_with_one_line(tmp_path):
    for args, needle in [
        (("info", "maze2d-hugemaze"), "unknown task 'maze2d-hugemaze'"),
        (("generate", "not-a-task", "--scale", "tiny"), "unknown task"),
        (("generate", "maze2d-umaze", "--scale", "huge"), "invalid choice"),
        (("info", str(tmp_path / "missing.hdf5")), "not found"),
        (("info", "hopper-medium"), "python -m ractd.data generate hopper-medium"),
    ]:
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_help():
    for args in [("--help",), ("generate", "--help"), ("info", "--help"), ("export", "--help")]:
        r = run(*args)
        assert r.returncode == 0 and "usage" in r.stdout


def test_scales_come_from_one_place():
    """tiny|small|full is declared in ractd.tasks.SCALES only; the CLI, the maze sizes and the locomotion
    recipes all cover exactly those names."""
    from ractd.data import generate_locomotion
    from ractd.data.__main__ import build_parser
    from ractd.data.generate_maze import scale_steps
    from ractd.tasks import SCALES, get_task

    choices = {}
    for name, sub in build_parser()._subparsers._group_actions[0].choices.items():
        for a in sub._actions:
            if "--scale" in a.option_strings:
                choices[name] = tuple(a.choices)
    assert choices and all(c == SCALES for c in choices.values()), choices
    umaze = get_task("maze2d-umaze")
    assert [scale_steps(umaze, s) for s in SCALES] == [5_000, 100_000, 1_000_000]
    assert tuple(generate_locomotion.RECIPES) == SCALES  # (imports without the optional SB3 extra too)
    import ast

    assigned = [str(p.relative_to(Path(ractd.__file__).parent)) for p in Path(ractd.__file__).parent.rglob("*.py")
                for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name) and t.id == "SCALES"]
    assert assigned == ["tasks.py"], assigned
