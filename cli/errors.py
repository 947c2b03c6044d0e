"""How a `surgery` run ends: an exit code and at most one line about it on stderr, never a traceback.

    0        done
    1        a gate failed (the command printed which)
    2        a user error: one `error:` line (bad input, bad path, a usage error: unknown option, missing value)
    130      Ctrl-C
    128 + N  signal N: SIGTERM 143, SIGHUP 129

SIGTERM and SIGHUP are turned into an exception where the program is, so every `finally` on the way
out runs: a staged output removes its temporary folder exactly as for Ctrl-C or an error. A traceback
that still gets out is a bug in surgery, not a problem with the input.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Iterator, NoReturn

import click
import typer

from surgery.errors import SurgeryError

from .console import print_error

INTERRUPTED = "stopped before finishing; no partial output was left behind"


class Interrupted(BaseException):
    """A terminating signal (SIGTERM, SIGHUP) raised as an exception; BaseException, so `except Exception` lets it pass."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM/SIGHUP raise Interrupted while the block runs (main thread only)."""
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_interrupted}
    if hasattr(signal, "SIGHUP"):
        handlers[signal.SIGHUP] = _raise_interrupted
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def run_cli(app: typer.Typer, argv: list[str] | None = None) -> NoReturn:
    """Run the typer app on `argv` (default: the process's arguments) and exit with the code the outcome maps to."""
    sys.exit(exit_code(app, argv))


def exit_code(app: typer.Typer, argv: list[str] | None = None) -> int:
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with signals_as_exceptions():
            # Click's own main loop would turn Ctrl-C into a returned 130 and print errors its way: invoke directly.
            with command.make_context(app.info.name or "surgery", args) as ctx:
                command.invoke(ctx)
        return 0
    except SurgeryError as e:
        print_error(str(e))
        return 2
    except (typer.Exit, click.exceptions.Exit) as e:
        return e.exit_code
    except (typer.Abort, click.exceptions.Abort):
        print_error(INTERRUPTED, "aborted:")
        return 130
    except KeyboardInterrupt:
        print_error(INTERRUPTED, "interrupted:")
        return 130
    except Interrupted as e:
        print_error(f"{INTERRUPTED} ({signal.Signals(e.signum).name})", "terminated:")
        return 128 + e.signum
    except (typer.TyperException, click.ClickException) as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # its message, the help, is already printed
            return e.exit_code
        # typer carries its own copy of click's exceptions: recognised by what they have, not by class
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        context = getattr(e, "ctx", None)
        if context is not None and any(c.__name__ == "UsageError" for c in type(e).__mro__):
            message = f"{message.rstrip('.')} (see '{context.command_path} --help')"
        print_error(message)
        return e.exit_code
    except BrokenPipeError:
        # Whoever read stdout (`| head`) has gone: say nothing more, and let the final flush go nowhere.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        print_error(describe_os_error(e))
        return 2


def describe_os_error(e: OSError) -> str:
    """`path: reason` for a file the user named that cannot be read or written (permission, disk full, ...)."""
    reason = e.strerror or str(e)
    if e.filename is None:
        return reason
    return f"{e.filename}: {reason}" + (f" (and {e.filename2})" if getattr(e, "filename2", None) else "")
