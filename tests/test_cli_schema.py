"""Every command's defaults exist once: the repair commands are generated from their options schema, and the two
hand-written commands (`eval`, `probe-train`) are checked here, mechanically, against their options dataclasses."""

import dataclasses
import inspect

import pytest
import typer

from cli.build import parameters
from cli.commands.eval import eval_command
from cli.commands.probe_train import probe_train_command
from surgery.evaluate import EvalOptions
from surgery.methods import REGISTRY, RunOptions
from surgery.options import option_fields
from surgery.probes.probe_train import ProbeOptions


def typer_defaults(command) -> dict:
    out = {}
    for name, p in inspect.signature(command).parameters.items():
        info = p.default
        if isinstance(info, (typer.models.OptionInfo, typer.models.ArgumentInfo)):
            out[name] = info.default
    return out


@pytest.mark.parametrize("command, options", [(eval_command, EvalOptions), (probe_train_command, ProbeOptions)])
def test_hand_written_commands_state_the_dataclass_defaults(command, options):
    fields = {f.name: f.default for f in dataclasses.fields(options)}
    shared = {name: default for name, default in typer_defaults(command).items() if name in fields}
    assert len(shared) >= 8  # the check covers the command's options, not a handful
    wrong = {
        name: (default, fields[name])
        for name, default in shared.items()
        if default is not ... and default != fields[name]
    }
    assert not wrong, f"flag default differs from the dataclass default: {wrong}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_generated_commands_carry_each_schema_field_once(name):
    method = REGISTRY[name]
    names = [p.name for p in parameters(method.Options)] + [p.name for p in parameters(RunOptions)]
    assert len(names) == len(set(names)), "an option is declared by both the method and the shared run options"
    assert names == [f.name for f in option_fields(method.Options)] + [f.name for f in option_fields(RunOptions)]
    for p in parameters(method.Options):
        field = next(f for f in option_fields(method.Options) if f.name == p.name)
        assert p.default.help == field.metadata["help"]
