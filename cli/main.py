"""The `surgery` command line: a thin shell over the library; user errors become one line and exit code 2."""

from __future__ import annotations

import sys

import click

from surgery.errors import SurgeryError
from surgery.methods import REGISTRY

from .app import app
from .build import repair_command
from .commands import ablate, edit, eigenshift, prune
from .commands.eval import eval_command
from .commands.import_gguf import import_gguf_command
from .commands.probe_train import probe_train_command
from .commands.repair import repair_command as repair_all_command
from .console import err

# What each repair method prints (its options come from its schema: cli/build.py).
PRINTERS = {"prune": (prune.show, prune.show_plan), "edit": (edit.show, edit.show_plan),
            "ablate": (ablate.show, None), "eigenshift": (eigenshift.show, None)}



def register_command(target, method) -> None:
    """Give a registered method its command on `target`, generated from its options schema."""
    show, plan = PRINTERS.get(method.name, (lambda result, options: None, None))
    target.command(method.name, help=method.summary)(repair_command(method, show, plan))


for _method in REGISTRY.values():
    register_command(app, _method)
app.command("repair")(repair_all_command)
app.command("probe-train")(probe_train_command)
app.command("eval")(eval_command)
app.command("import-gguf")(import_gguf_command)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except SurgeryError as e:
        err.print(f"error: {e}", highlight=False, soft_wrap=True, markup=False, style="bold red")
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
    main()
