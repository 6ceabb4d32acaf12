"""The shape of the code, checked on the source (so a lazy import inside a function counts too):

- the library (ractd/) never imports Ray, the reproduction package (ractd_repro/) or the Ray glue (ractd_ray/);
  ractd_repro/ never imports Ray or ractd_ray/: dependencies point one way, ractd_ray -> ractd_repro -> ractd;
- the modules' import graph has no cycle (so every module sits on a floor above everything it imports);
- no module is over MAX_MODULE_LINES lines and no function over MAX_FUNCTION_LINES, in the packages and the
  command scripts (tune/, eval/, bench/)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ractd", "ractd_repro", "ractd_ray")
# what each package may import among ours and Ray (anything else: the standard library and third parties)
ALLOWED = {"ractd": {"ractd"}, "ractd_repro": {"ractd", "ractd_repro"},
           "ractd_ray": {"ractd", "ractd_repro", "ractd_ray", "ray"}}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imported(name: str, path: Path) -> set[str]:
    """Every dotted name a module imports (absolute; relative imports resolved), with `from a import b` as a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name resolved to its longest module prefix)."""
    graph = {}
    for name, path in modules.items():
        deps = set()
        for dotted in _imported(name, path):
            while dotted and dotted not in modules:
                dotted = dotted.rpartition(".")[0]
            if dotted and dotted != name:
                deps.add(dotted)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_each_package_imports_only_what_is_below_it():
    modules = _modules()
    assert len(modules) > 40
    offenders = []
    for name, path in modules.items():
        pkg = name.split(".")[0]
        ours = {d.split(".")[0] for d in _imported(name, path)} & (set(PACKAGES) | {"ray"})
        bad = ours - ALLOWED[pkg]
        if bad:
            offenders.append(f"{name} imports {sorted(bad)}")
    assert offenders == []


def test_the_import_graph_has_no_cycle():
    assert _cycles(_graph(_modules())) == []


def test_a_planted_cycle_and_an_upward_import_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    # the library's own source, read as the test reads it: an import of ractd_repro is upward
    src = REPO / "ractd" / "tasks.py"
    assert "ractd_repro" not in {d.split(".")[0] for d in _imported("ractd.tasks", src)}
    assert _imported("ractd.x", REPO / "ractd_repro" / "store.py") >= {"ractd"}


def _long(paths):
    modules, functions = [], []
    for path in paths:
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            modules.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    return modules, functions


def test_no_module_or_function_is_too_long_to_read():
    paths = [p for pkg in PACKAGES + ("tune", "eval", "bench") for p in sorted((REPO / pkg).rglob("*.py"))]
    modules, functions = _long(paths)
    assert modules == []
    assert functions == []


def test_the_library_never_imports_ray():
    files = sorted((REPO / "ractd").rglob("*.py"))
    assert len(files) > 20
    offenders = [str(f.relative_to(REPO)) for f in files
                 if {d.split(".")[0] for d in _imported(_module_name(f), f)} & {"ray", "ractd_ray", "ractd_repro"}]
    assert offenders == []
