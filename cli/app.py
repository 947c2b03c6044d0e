"""The `surgery` typer application; commands are registered on it by cli/main.py, explicitly."""

import typer

from surgery.methods import REGISTRY

app = typer.Typer(
    name="surgery",
    help="Repair language-model checkpoints after the fact. Repair methods: "
    + "; ".join(f"{name} ({m.summary.split(':')[0]})" for name, m in REGISTRY.items())
    + ".",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
