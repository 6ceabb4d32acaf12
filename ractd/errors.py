"""The one way the project's commands fail: a one-line message on stderr and a non-zero exit, never a traceback.

Every CLI (python -m ractd ..., python -m ractd.data, tune/search.py, eval/reproduce_tables.py, ...) builds its
parser with `Parser` and runs its body through `run_command`:

- a bad flag or value (argparse): "error: <message>", exit 2;
- RactdError (the library's user-facing error): "error: <message>", exit 2;
- OSError (an unwritable --out, a full disk): "error: <type>: <first line>", exit 2;
- an error raised by Ray itself (a lost cluster, a refused storage path): "error: Ray: <its last line>", exit 1
  (Ray puts the cause on its last line; the failure is the cluster's, not the input's);
- Ctrl-C: the command's own hint (how to continue), exit 130; a closed pipe (`| head`): exit 0.
Any other exception is a bug of this project and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ractd import RactdError


def one_line(e: BaseException, last: bool = False) -> str:
    """The first (or last) non-empty line of an exception's message, else its type name."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else type(e).__name__


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line ("error: ...", no usage dump) with exit status 2."""

    def error(self, message):
        raise SystemExit(fail(message))


def _from_ray(e: BaseException) -> bool:
    return any(c.__module__.split(".")[0] == "ray" for c in type(e).__mro__)


def run_command(body: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run a CLI's body and map its failures to one line and an exit status (module doc); returns the status
    (the body's return value, 0 if it returns None)."""
    try:
        code = body()
    except RactdError as e:
        return fail(str(e))
    except BrokenPipeError:
        return 0
    except OSError as e:
        return fail(f"{type(e).__name__}: {one_line(e)}")
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as e:
        if not _from_ray(e):
            raise
        return fail(f"Ray: {one_line(e, last=True)}", 1)
    return 0 if code is None else int(code)
