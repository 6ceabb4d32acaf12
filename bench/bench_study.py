"""The claims study end to end, before and after issue 28's training work, on one machine (issue 28, item 4).

    python bench/bench_study.py [--before 58fde0f] [--after HEAD] [--arms before,after] [--root DIR] [--dry-run]

Each arm is a checkout of its revision (a git worktree under --root) with a cache of its own (RACTD_CACHE_DIR, so
no calibration, checkpoint or sweep carries over), into which the study's datasets are copied from this machine's
cache (generated there first, with this checkout's code, where missing: the "before" revision predates the
committed behavior policies, and generating a dataset is not training). The arm then runs its own checkout's
claims commands (its docs/results/provenance.json: the three sweeps, then `eval/reproduce_tables.py --study
claims`), one after another on the whole machine, as a user runs the study; run nothing else beside it.

Resumable, since the study takes hours and a session may end: <root>/times.json keeps every attempt of every
command (start, last heartbeat, end, exit status). Rerun the same command line: a finished command is skipped, an
interrupted sweep continues with --resume and the evaluation from its store. A command's time is the sum of its
attempts (an interrupted one to its last heartbeat), printed with their count. Printed: per command and in all,
minutes before and after, and after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ractd.errors import RactdError, run_command  # noqa: E402
from ractd.paths import cache_dir  # noqa: E402

BEFORE = "58fde0f"   # the parent of 1b8cf41, issue 28's first training change
HEARTBEAT_S = 30.0
_SKIP = ("ractd.data generate", "eval/results_doc.py")
_GENERATE = re.compile(r"ractd\.data generate (\S+) --scale (\S+)")


def study_commands(src: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(the claims study's timed commands, its datasets as (task, scale)) from a checkout's provenance."""
    path = src / "docs" / "results" / "provenance.json"
    try:
        commands = json.loads(path.read_text())["commands"]
    except (OSError, ValueError, KeyError) as e:
        raise RactdError(f"{path}: no claims study commands ({e})") from None
    datasets = [m.groups() for c in commands if (m := _GENERATE.search(c))]
    return [c for c in commands if not any(s in c for s in _SKIP)], datasets


def attempt_seconds(attempts: list[dict]) -> float:
    """A command's time: its attempts summed, an unfinished one to its last heartbeat."""
    return sum((a["end"] if a.get("end") is not None else a["alive"]) - a["start"] for a in attempts)


def finished(attempts: list[dict]) -> bool:
    return any(a.get("rc") == 0 for a in attempts)


def resumed(command: str, attempts: list[dict]) -> str:
    """The command to run now: a sweep that ran before continues its own search (--resume)."""
    if attempts and "tune/search.py" in command and "--resume" not in command:
        return command + " --resume"
    return command


class Times:
    """<root>/times.json: {arm: {command: [attempt, ...]}}, written atomically at every change."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        self.lock = threading.Lock()

    def attempts(self, arm: str, command: str) -> list[dict]:
        return self.data.setdefault(arm, {}).setdefault(command, [])

    def save(self) -> None:
        with self.lock:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)


def _commit(repo: Path, rev: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True,
                         text=True)
    if out.returncode:
        raise RactdError(f"{rev}: not a commit of {repo}")
    return out.stdout.strip()


def checkout(root: Path, arm: str, rev: str, repo: Path = REPO) -> Path:
    """The arm's worktree of `rev` (made on first use). One made earlier must hold that very commit: its times are
    that revision's, so a resumed arm never mixes two revisions."""
    src = root / arm / "src"
    want = _commit(repo, rev)
    if not src.is_dir():
        src.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(src), want], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    have = _commit(src, "HEAD")
    if have != want:
        raise RactdError(f"the {arm} arm's checkout {src} holds {have[:7]}, not {rev} ({want[:7]}), and its times "
                         f"are that revision's: pass --{arm} {have[:7]}, or remove {root / arm} and its times")
    return src


def put_datasets(datasets: list[tuple[str, str]], arm_cache: Path) -> None:
    from ractd.data.d4rl import local_dataset_path

    for task, scale in datasets:
        here = local_dataset_path(task, scale)
        if not here.is_file():
            subprocess.run([sys.executable, "-m", "ractd.data", "generate", task, "--scale", scale], check=True,
                           cwd=REPO)
        dst = arm_cache / "datasets" / here.name
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(here, dst)


def run_arm(arm: str, src: Path, times: Times, dry_run: bool) -> None:
    commands, datasets = study_commands(src)
    arm_cache = src.parent / "cache"
    env = dict(os.environ, RACTD_CACHE_DIR=str(arm_cache), PYTHONPATH=str(src))
    if dry_run:
        print(f"[{arm}] datasets: {', '.join(f'{t} ({s})' for t, s in datasets)} -> {arm_cache / 'datasets'}")
    else:
        put_datasets(datasets, arm_cache)
    found = subprocess.run([sys.executable, "-c", "import ractd; print(ractd.__file__)"], env=env, cwd=src,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not found.startswith(str(src)):
        raise RactdError(f"arm {arm}: python imports ractd from {found}, not from its checkout {src}")
    for command in commands:
        attempts = times.attempts(arm, command)
        if finished(attempts):
            print(f"[{arm}] done before: {command}", flush=True)
            continue
        now = resumed(command, attempts)
        print(f"[{arm}] {now}", flush=True)
        if dry_run:
            continue
        attempt = {"start": time.time(), "alive": time.time(), "end": None, "rc": None}
        attempts.append(attempt)
        times.save()
        stop = threading.Event()

        def beat(attempt=attempt, stop=stop):
            while not stop.wait(HEARTBEAT_S):
                attempt["alive"] = time.time()
                times.save()

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        rc = subprocess.run(now, shell=True, env=env, cwd=src).returncode
        stop.set()
        beater.join()
        attempt.update(end=time.time(), alive=time.time(), rc=rc)
        times.save()
        if rc != 0:
            raise RactdError(f"arm {arm}: `{now}` exited with status {rc}; rerun to continue")


def report(times: Times, arms: list[str]) -> str:
    commands = list(dict.fromkeys(c for arm in arms for c in times.data.get(arm, {})))
    rows, total = [], {arm: 0.0 for arm in arms}
    for command in commands:
        cells = []
        for arm in arms:
            attempts = times.data.get(arm, {}).get(command, [])
            s = attempt_seconds(attempts)
            total[arm] += s
            state = "" if finished(attempts) else " (unfinished)" if attempts else " (not run)"
            cells.append(f"{s / 60:7.1f} min x{len(attempts)}{state}")
        ratio = _ratio(times, arms, command)
        rows.append(f"{' | '.join(cells)} | {ratio} | {command}")
    head = " | ".join(f"{arm:>22}" for arm in arms) + " | after/before | command"
    done = all(finished(times.data.get(arm, {}).get(c, [])) for arm in arms for c in commands)
    whole = " | ".join(f"{total[arm] / 60:7.1f} min" for arm in arms)
    ratio = f"{total[arms[-1]] / total[arms[0]]:.2f}x" if len(arms) == 2 and done and total[arms[0]] else "-"
    return "\n".join([head, *rows, f"{whole} | {ratio} | the claims study, end to end"
                      + ("" if done else " (not every command finished)")])


def _ratio(times: Times, arms: list[str], command: str) -> str:
    if len(arms) != 2:
        return "-"
    a, b = (times.data.get(arm, {}).get(command, []) for arm in arms)
    if not (finished(a) and finished(b)):
        return "-"
    return f"{attempt_seconds(b) / attempt_seconds(a):.2f}x"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=BEFORE, help=f"revision of the 'before' arm (default {BEFORE})")
    ap.add_argument("--after", default="HEAD", help="revision of the 'after' arm (default HEAD)")
    ap.add_argument("--arms", default="before,after", help="arms to run, in this order (default before,after)")
    ap.add_argument("--root", type=Path, default=None,
                    help="checkouts, caches and times.json (default <cache>/bench/study)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    ap.add_argument("--report", action="store_true", help="print the times recorded so far, run nothing")
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    if not arms or set(arms) - {"before", "after"}:
        raise RactdError(f"--arms {args.arms!r}: expected before and/or after")
    root = (args.root or cache_dir() / "bench" / "study").resolve()
    root.mkdir(parents=True, exist_ok=True)
    times = Times(root / "times.json")
    if not args.report:
        revs = {"before": args.before, "after": args.after}
        for arm in arms:
            run_arm(arm, checkout(root, arm, revs[arm]), times, args.dry_run)
    print(report(times, ["before", "after"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
