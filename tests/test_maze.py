"""ractd.maze: the maze geometry module stands alone (no ractd.data imports, no import cycle), and the maze
reward radius is defined there only."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import ractd
from ractd import maze, rollout
from ractd.data import generate_maze, windows

PKG = Path(ractd.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ractd_imports(path: Path, known: set[str]) -> set[str]:
    """Every ractd module `path` imports, at module level or inside functions (lazy imports count too)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ractd"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                deps.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name.startswith("ractd"))
    return deps


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    known = set(files)
    return {m: {d for d in _ractd_imports(p, known) if d in known and d != m} for m, p in files.items()}


def test_maze_module_imports_nothing_from_ractd_data():
    deps = _graph()["ractd.maze"]
    assert deps, "the AST walk found no ractd import at all in ractd/maze.py (it imports ractd.tasks)"
    assert not [d for d in deps if d == "ractd.data" or d.startswith("ractd.data.")], deps


def _find_cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(n, stack):
        state[n] = 1
        for d in sorted(graph[n] & nodes):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d, stack + [d])):
                return found
        state[n] = 2
        return None

    for n in sorted(nodes):
        if n not in state and (found := visit(n, [n])):
            return found
    return None


def test_no_import_cycle_among_data_and_maze_modules():
    """The old cycle d4rl -> minari_io -> generate_maze -> d4rl (through lazy imports) must not come back."""
    graph = _graph()
    nodes = {m for m in graph if m.startswith("ractd.data")} | {"ractd.maze", "ractd.io", "ractd.tasks"}
    assert {"ractd.data.d4rl", "ractd.data.minari_io", "ractd.data.generate_maze"} <= nodes
    assert "ractd.maze" in graph["ractd.data.minari_io"]  # the walk sees the edges it should
    assert _find_cycle(graph, nodes) is None, _find_cycle(graph, nodes)


@pytest.mark.parametrize("first", ["ractd.data.d4rl", "ractd.data.minari_io", "ractd.data.generate_maze",
                                   "ractd.maze"])
def test_fresh_interpreter_imports(first):
    """Each formerly cyclic module imports first in a fresh interpreter; ractd.maze loads no ractd.data module."""
    code = (f"import sys, importlib\nimportlib.import_module({first!r})\n"
            "import ractd.data.d4rl as d\nassert callable(d.load_dataset)\n")
    if first == "ractd.maze":
        code = ("import sys\nimport ractd.maze\n"
                "bad = [m for m in sys.modules if m.startswith('ractd.data')]\nassert not bad, bad\n" + code)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_reward_radius_has_one_definition():
    """REWARD_RADIUS is assigned in ractd/maze.py only; its users share it and the windows default to it."""
    assigned = [p.name for p in PKG.rglob("*.py")
                for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name) and t.id == "REWARD_RADIUS"]
    assert assigned == ["maze.py"]
    assert maze.REWARD_RADIUS == 0.5  # D4RL maze2d sparse reward
    assert rollout.REWARD_RADIUS is maze.REWARD_RADIUS and generate_maze.REWARD_RADIUS is maze.REWARD_RADIUS
    for fn in (windows.maze_segments, windows.maze_windows):
        assert inspect.signature(fn).parameters["threshold"].default is maze.REWARD_RADIUS


def test_coordinate_pair_round_trips():
    import numpy as np

    x = np.random.default_rng(0).normal(size=(7, 2)) * 3
    for vector in (False, True):
        back = maze.pointmaze_to_d4rl(maze.d4rl_to_pointmaze(x, (5, 6), vector), (5, 6), vector)
        np.testing.assert_allclose(back, x, atol=1e-12)
