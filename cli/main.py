"""The `surgery` command line: a thin shell over the library; user errors become one line and exit code 2."""

from __future__ import annotations

import importlib
import sys

from surgery.methods import REGISTRY

from .app import app
from .build import method_command
from .commands.eval import eval_command
from .commands.import_gguf import import_gguf_command
from .commands.probe_train import probe_train_command
from .commands.repair import repair_command
from .errors import exit_code


def printers(method) -> tuple:
    """(show, show_plan) of a method's command, from the module its `printer` names (cli/commands/NAME.py by default)."""
    module = method.printer_module()
    if module is None:
        return (lambda result, options: None), None
    found = importlib.import_module(module)
    return found.show, getattr(found, "show_plan", None)


def register_command(target, method) -> None:
    """Give a registered method its command on `target`, generated from its options schema, printed by its printer."""
    show, plan = printers(method)
    target.command(method.name, help=method.summary)(method_command(method, show, plan))


for _method in REGISTRY.values():
    register_command(app, _method)
app.command("repair")(repair_command)
app.command("probe-train")(probe_train_command)
app.command("eval")(eval_command)
app.command("import-gguf")(import_gguf_command)


def main(argv: list[str] | None = None) -> None:
    """Run one command; user errors, usage errors and signals end as exit codes with one line (cli/errors.py)."""
    code = exit_code(app, argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
