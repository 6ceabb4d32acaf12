"""ractd.errors: every command fails with one line and a status that says why (no traceback)."""

import pytest

from ractd import RactdError
from ractd.errors import Parser, one_line, run_command


def _raise(e):
    def body():
        raise e
    return body


@pytest.mark.parametrize("exc, code, line", [
    (RactdError("--steps 0: must be positive"), 2, "error: --steps 0: must be positive"),
    (PermissionError(13, "Permission denied"), 2, "error: PermissionError: [Errno 13] Permission denied"),
])
def test_user_errors_are_one_line_with_status_2(capsys, exc, code, line):
    assert run_command(_raise(exc)) == code
    assert capsys.readouterr().err == line + "\n"


def test_interrupt_prints_the_commands_hint_and_exits_130(capsys):
    assert run_command(_raise(KeyboardInterrupt()), interrupted="interrupted; continue with --resume") == 130
    assert capsys.readouterr().err == "interrupted; continue with --resume\n"


def test_closed_pipe_is_success_and_body_status_passes_through(capsys):
    assert run_command(_raise(BrokenPipeError())) == 0
    assert run_command(lambda: 3) == 3 and run_command(lambda: None) == 0
    assert capsys.readouterr().err == ""


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run_command(lambda: 1 / 0)


def test_rays_own_errors_are_one_line_with_their_last_line(capsys):
    exceptions = pytest.importorskip("ray.exceptions")
    e = exceptions.RaySystemError("Traceback (most recent call last):\n  File x\nGCS at 10.0.0.1:6379 is gone")
    assert run_command(_raise(e)) == 1
    assert capsys.readouterr().err == "error: Ray: GCS at 10.0.0.1:6379 is gone\n"


def test_parser_errors_are_one_line_with_status_2(capsys):
    p = Parser(prog="x")
    p.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "two"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --n: invalid int value") and err.count("\n") == 1


def test_one_line_picks_first_or_last_nonempty_line():
    e = ValueError("\n first \n\n last \n")
    assert one_line(e) == "first" and one_line(e, last=True) == "last"
    assert one_line(ValueError()) == "ValueError"


def test_the_evaluate_command_refuses_one_karras_bin_in_one_line(capsys):
    """`evaluate --sampler euler --nfe 1` ended in a ValueError traceback from karras_sigmas; it is a user error."""
    from ractd.cli import main

    for sampler in ("euler", "heun"):
        assert main(["evaluate", "--task", "maze2d-umaze", "--sampler", sampler, "--nfe", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: nfe=1: --sampler {sampler} takes the number of Karras bins, at least 2")
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
