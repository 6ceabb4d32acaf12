"""The library never imports Ray: Ray lives in ractd_ray/, tune/ and eval/ (checked on the source, so a lazy
import inside a function counts too)."""

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "ractd"


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_library_never_imports_ray():
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 20
    offenders = [str(f.relative_to(LIBRARY)) for f in files if _imported_roots(f) & {"ray", "ractd_ray"}]
    assert offenders == []
