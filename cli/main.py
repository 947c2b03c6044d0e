"""The `surgery` command line: a thin shell over the library; user errors become one line and exit code 2."""

from __future__ import annotations

import sys

import click
import typer

from surgery.errors import SurgeryError

from .console import err

app = typer.Typer(
    name="surgery",
    help="Repair language-model checkpoints after the fact: prune, edit, eigenshift, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each command module registers itself on `app`; one import per line.
from . import checkpoint_commands  # noqa: E402,F401
from . import prune_command  # noqa: E402,F401
from . import probe_commands  # noqa: E402,F401
from . import eval_command  # noqa: E402,F401
from . import eigenshift_command  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except SurgeryError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted: no output was written")
        sys.exit(130)


if __name__ == "__main__":
    # `python -m cli.main`: this file runs as __main__, while the command modules registered themselves
    # on the `app` of the importable cli.main; run that one.
    from cli.main import main as _main

    _main()
