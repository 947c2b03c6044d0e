"""The `surgery` command line: a thin shell over the library; user errors become one line and exit code 2."""

from __future__ import annotations

import sys

from surgery.methods import REGISTRY

from .app import app
from .build import repair_command
from .commands import ablate, edit, eigenshift, prune, resta, revert, safelora
from .commands.eval import eval_command
from .commands.import_gguf import import_gguf_command
from .commands.probe_train import probe_train_command
from .commands.repair import repair_command as repair_all_command
from .errors import exit_code

# What each repair method prints (its options come from its schema: cli/build.py).
PRINTERS = {"prune": (prune.show, prune.show_plan), "edit": (edit.show, edit.show_plan),
            "ablate": (ablate.show, None), "eigenshift": (eigenshift.show, None),
            "resta": (resta.show, resta.show_plan), "revert": (revert.show, revert.show_plan),
            "safelora": (safelora.show, safelora.show_plan)}



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
    """Run one command; user errors, usage errors and signals end as exit codes with one line (cli/errors.py)."""
    code = exit_code(app, argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
