"""The documents a newcomer reads stay true: the README is a short front door that holds the two commands CI runs,
every test and link it (or a docs page) names exists, and no hand-written page carries a measured number (those
live in docs/results.md, generated from its store; tests/test_claims.py rebuilds that page and compares)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
GENERATED = {"results.md", "results-tables.md"}  # docs pages written by a program from a store
HAND_PAGES = [README] + [p for p in sorted((REPO / "docs").glob("*.md")) if p.name not in GENERATED]
TEST_COMMAND = "python -m pytest && python -m pytest -m ray"
# a measured quantity: a mean with its error, a speed ratio, or a time/size measured on a machine
MEASURED = re.compile(r"\d\s?(±|\+-)\s?\d|\b\d+(\.\d+)?\s?x (faster|slower|the)|\b\d+\.\d+\s?(ms|s|min|GB|MB)\b|"
                      r"\b\d+ min \d+ s\b|\b\d+(\.\d+)? (steps|env-steps)/s\b")


def _code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def test_the_readme_is_a_front_door_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert TEST_COMMAND in text
    assert "python tune/search.py --task maze2d-umaze --quick && python eval/reproduce_tables.py --quick" in text
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text()  # CI runs the README's test command


def test_every_test_a_page_names_exists():
    cited = {c for page in HAND_PAGES for c in re.findall(r"tests/[\w/]+\.py::\w+", page.read_text())}
    assert cited, "the README's equation table names its tests"
    missing = []
    for c in sorted(cited):
        path, name = c.split("::")
        src = (REPO / path).read_text() if (REPO / path).is_file() else ""
        if not re.search(rf"^def {name}\(|^    def {name}\(", src, flags=re.M):
            missing.append(c)
    assert missing == []


def test_every_relative_link_resolves():
    broken = []
    for page in HAND_PAGES + [REPO / "docs" / "results.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []


def test_every_path_a_page_names_exists():
    """Files and folders written in backticks (`ractd/x.py`, `bench/y.py`, `docs/z.md`) are there."""
    missing = []
    for page in HAND_PAGES:
        for span in _code_spans(page.read_text()):
            for word in span.split():
                if re.fullmatch(r"(ractd|ractd_repro|ractd_ray|bench|tune|eval|tests|docs)/[\w/.-]*\w", word) and \
                        not re.search(r"[A-Z]{3,}", word):  # a placeholder (bench/NAME.py)
                    if not (REPO / word).exists():
                        missing.append(f"{page.relative_to(REPO)}: {word}")
    assert missing == []


def test_no_hand_written_page_carries_a_measured_number():
    found = []
    for page in HAND_PAGES:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            m = MEASURED.search(line)
            if m:
                found.append(f"{page.relative_to(REPO)}:{n}: {m.group(0)!r} in {line.strip()[:90]}")
    assert found == []


def test_the_measured_number_check_would_see_one():
    for planted in ("the student scores 125.3 ± 4.9", "it took 8 min 40 s", "2.4x faster than the teacher",
                    "7.52 ms per call", "2.2 steps/s"):
        assert MEASURED.search(planted), planted
    assert not MEASURED.search("each cell reads `mean ± SE`")
    for fact in ("an 80-bin Karras schedule", "16-step action chunks", "248 M parameters", "Table 9", "Eq. (4)"):
        assert not MEASURED.search(fact), fact


CODE_DIRS = ("ractd", "ractd_repro", "ractd_ray", "tune", "eval", "bench")
SCRIPT_PATH = re.compile(r"\b(?:bench|ractd_repro/studies|eval|tune)/\w+\.py\b")


def _stale_script_paths(text: str) -> list[str]:
    return [m for m in SCRIPT_PATH.findall(text) if not (REPO / m).is_file()]


def test_every_script_a_docstring_names_exists():
    """Docstrings and comments that point a reader at a script (`bench/x.py`, `eval/y.py`) point at one that is
    there: scripts moved (the studies left bench/ for ractd_repro/studies/) and their pointers went stale."""
    stale = []
    for d in CODE_DIRS:
        for f in sorted((REPO / d).rglob("*.py")):
            stale += [f"{f.relative_to(REPO)}: {m}" for m in _stale_script_paths(f.read_text())]
    assert stale == []


def test_the_script_path_check_would_see_a_stale_one():
    assert _stale_script_paths("measured with bench/training_seeds.py and bench/bench_training.py") == \
        ["bench/training_seeds.py"]
