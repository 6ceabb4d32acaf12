"""bench/bench_study.py's runner: a study's commands from a checkout's provenance, a failed command rerun on the
next invocation while a finished one is skipped, a sweep resumed, and times summed over attempts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ractd.errors import RactdError

REPO = Path(__file__).resolve().parents[1]


def _checkout(tmp_path: Path, commands: list[str]) -> Path:
    src = tmp_path / "arm" / "src"
    (src / "docs" / "results").mkdir(parents=True)
    (src / "docs" / "results" / "provenance.json").write_text(json.dumps({"commands": commands}))
    (src / "ractd").mkdir()
    (src / "ractd" / "__init__.py").write_text("")   # the arm's own package, which the runner must import
    return src


def test_study_commands_from_the_committed_provenance(load_script):
    bench = load_script("bench/bench_study.py")
    commands, datasets = bench.study_commands(REPO)
    assert datasets == [("maze2d-umaze", "small"), ("hopper-medium-replay", "small"), ("walker2d-medium", "small")]
    assert [c.split()[1] for c in commands] == ["tune/search.py"] * 3 + ["eval/reproduce_tables.py"]
    assert "--study claims" in commands[-1]


def test_a_failed_command_reruns_a_finished_one_does_not(tmp_path, load_script):
    bench = load_script("bench/bench_study.py")
    py = sys.executable
    first = f"{py} -c \"open('first', 'a').write('x')\""
    # fails on its first run, succeeds on its second
    second = (f"{py} -c \"import os, sys; ok = os.path.exists('ran'); open('ran', 'w'); "
              f"sys.exit(0 if ok else 3)\"")
    src = _checkout(tmp_path, [first, second])
    times = bench.Times(tmp_path / "times.json")
    with pytest.raises(RactdError, match="status 3"):
        bench.run_arm("after", src, times, dry_run=False)
    saved = json.loads((tmp_path / "times.json").read_text())["after"]
    assert [a["rc"] for a in saved[first]] == [0] and [a["rc"] for a in saved[second]] == [3]

    bench.run_arm("after", src, bench.Times(tmp_path / "times.json"), dry_run=False)   # the next invocation
    assert (src / "first").read_text() == "x"   # the finished command did not run again
    times = bench.Times(tmp_path / "times.json")
    assert [a["rc"] for a in times.data["after"][second]] == [3, 0]
    assert bench.finished(times.data["after"][second])
    spent = times.data["after"][second]
    assert bench.attempt_seconds(spent) == pytest.approx(sum(a["end"] - a["start"] for a in spent))
    table = bench.report(times, ["before", "after"])
    assert "x2" in table.splitlines()[2] and "(not run)" in table.splitlines()[2]


def test_an_unfinished_attempt_counts_to_its_last_heartbeat_and_a_sweep_resumes(load_script):
    bench = load_script("bench/bench_study.py")
    attempts = [{"start": 100.0, "alive": 160.0, "end": None, "rc": None},
                {"start": 200.0, "alive": 290.0, "end": 300.0, "rc": 0}]
    assert bench.attempt_seconds(attempts) == 160.0
    sweep = "python tune/search.py --task hopper-medium-replay --sigmas 0 1"
    assert bench.resumed(sweep, []) == sweep
    assert bench.resumed(sweep, attempts[:1]) == sweep + " --resume"
    evaluation = "python eval/reproduce_tables.py --study claims"
    assert bench.resumed(evaluation, attempts[:1]) == evaluation   # resumes from its store by itself


def test_the_arm_must_import_its_own_checkout(tmp_path, load_script):
    bench = load_script("bench/bench_study.py")
    src = _checkout(tmp_path, ["true"])
    (src / "ractd" / "__init__.py").unlink()
    (src / "ractd").rmdir()
    with pytest.raises(RactdError, match="not from its checkout"):
        bench.run_arm("before", src, bench.Times(tmp_path / "times.json"), dry_run=True)


def test_an_arms_checkout_holds_the_revision_asked_for(tmp_path, load_script):
    """A worktree made earlier (by a --dry-run, or an interrupted arm) is reused only at the same commit: its times
    are that revision's; asked for another, the runner says so in one line instead of timing the old one."""
    import subprocess

    bench = load_script("bench/bench_study.py")
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    revs = []
    for k in range(2):
        (repo / "f").write_text(str(k))
        subprocess.run(git + ["add", "f"], check=True)
        subprocess.run(git + ["commit", "-q", "-m", str(k)], check=True)
        revs.append(subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True,
                                   text=True).stdout.strip())
    root = tmp_path / "study"
    src = bench.checkout(root, "after", revs[0], repo=repo)
    assert (src / "f").read_text() == "0"
    assert bench.checkout(root, "after", revs[0][:7], repo=repo) == src  # the same commit, however named
    with pytest.raises(RactdError, match=f"holds {revs[0][:7]}, not {revs[1]}"):
        bench.checkout(root, "after", revs[1], repo=repo)
    with pytest.raises(RactdError, match="not a commit"):
        bench.checkout(root, "before", "no-such-revision", repo=repo)
