"""Turn options dataclasses (surgery.options) into typer commands, so each flag, default and help exists once."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from surgery.methods import Method, RunOptions, run_repair
from surgery.options import field_types, schema

from .console import err, out

MODEL_HELP = "Checkpoint folder to repair (never modified)."
OUTPUT_HELP = "Folder for the repaired checkpoint."


def _cli_type(annotation: Any, meta: dict) -> Any:
    """The type typer sees: strength knobs and glob lists are read as text, then parsed by the schema."""
    if meta.get("strength") or meta.get("patterns"):
        return Optional[str]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    return Optional[base] if type(None) in typing.get_args(annotation) else base


def parameters(cls) -> list[inspect.Parameter]:
    """One keyword parameter per schema field of `cls`, its default a typer.Option carrying flag and help."""
    hints = field_types(cls)
    params = []
    for f in schema(cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if meta.get("strength") and default is not None:
            default = f"{default:g}"
        decls = [meta["flag"] or "--" + f.name.replace("_", "-")]
        if meta.get("short"):
            decls.append(meta["short"])
        info = typer.Option(... if meta.get("required") else default, *decls, help=meta["help"], hidden=meta.get("hidden", False),
                            show_default=not meta.get("required"))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=_cli_type(hints[f.name], meta)))
    return params


def build_options(cls, values: dict[str, Any]):
    """An options object from the command's keyword values (glob lists split on commas)."""
    kwargs = {}
    for f in schema(cls):
        if f.name not in values:  # a field the command does not offer keeps its default
            continue
        value = values.pop(f.name)
        if f.metadata.get("patterns") and isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()] or None
        kwargs[f.name] = value
    return cls(**kwargs)


def make_command(name: str, doc: str, params: list[inspect.Parameter], body: Callable[[dict], None]) -> Callable:
    """A function typer can register: its signature is `params`, its call hands the values to `body`."""

    def command(**values):
        body(values)

    command.__name__ = name.replace("-", "_")
    command.__doc__ = doc
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def positional(name: str, help: str, annotation=Path) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=typer.Argument(..., help=help), annotation=annotation)


def repair_command(method: Method, show: Callable, show_plan: Callable | None = None) -> Callable:
    """The `surgery METHOD` command: MODEL, -o OUTPUT, the method's options, then the shared RunOptions."""
    output = inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY,
                               default=typer.Option(None, "--output", "-o", help=OUTPUT_HELP), annotation=Optional[Path])
    params = [positional("model", MODEL_HELP), output, *parameters(method.Options), *parameters(RunOptions)]

    def body(values: dict) -> None:
        model, target = values.pop("model"), values.pop("output")
        options = build_options(method.Options, values)
        run = build_options(RunOptions, values)
        with err.status(f"{method.name}: preparing") as status:
            result = run_repair(method, model, target, options, run, progress=status.update)
        if run.dry_run:
            (show_plan or _no_plan)(result.plan, options)
            return
        if result.search is not None:
            show_search(result.search)
        show(result, options)
        report_check(result, run)

    doc = f"{method.summary}\n\n{method.paper}" if method.paper else method.summary
    return make_command(method.name, doc, params, body)


def show_written(result) -> None:
    """The last line of a repair's report: where it was written and how long each stage took (the check apart)."""
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items() if k != "check")
    out.print(f"wrote {result.output} ({timings})", highlight=False, markup=False)


def _no_plan(plan, options) -> None:
    out.print("dry run: nothing is written; this method's edit depends on statistics computed from the model "
              "(run without --dry-run to see it)")


def show_search(search) -> None:
    """The candidates' table and the chosen point; a search in stages (EigenShift's k, then alpha) shows each."""
    from rich.table import Table

    for stage in search.before:
        show_search(stage)
    metric = search.metric.replace("_", " ")
    table = Table(search.knob, f"held-out {metric}", "perplexity", "KL", "over-refusal", *(["accuracy"] if any(
        "accuracy" in p.figures for p in search.points) else []), "budget",
        title=f"automatic {search.knob}: input {metric} {100 * search.baseline[search.metric]:.1f}%")
    for p in search.points:
        f = p.figures
        row = [f"{p.strength:g}" + (" *" if p.strength == search.chosen else ""),
               f"{100 * f[search.metric]:.1f}%" if search.metric in f else "-",
               f"x{f['perplexity_ratio']:.3g}" if "perplexity_ratio" in f else "-",
               f"{f['kl']:.3g}" if "kl" in f else "-",
               f"{f['over_refusal_points']:+.1f} pts" if "over_refusal_points" in f else "-"]
        if any("accuracy" in q.figures for q in search.points):
            row.append(f"{-f['accuracy_drop_points']:+.1f} pts" if "accuracy_drop_points" in f else "-")
        row.append("inside" if p.within else "; ".join(p.broken))
        table.add_row(*row)
    out.print(table)
    for line in search.resolution():
        out.print(line, highlight=False, markup=False)
    out.print(f"chosen {search.knob} {search.chosen:g}: {search.reason}")


def report_check(result, run: RunOptions) -> None:
    """The after-write check's line, then exit 1 when the output failed its budget (the output stays, marked failed)."""
    if result.check is not None:
        out.print(result.check.summary(), style="bold red" if not result.check.passed else None, highlight=False)
    elif run.check:
        out.print("check skipped: streamed (it would load the whole model); measure the output with `surgery eval`")
    if result.failed:
        err.print(f"failed: {result.failed} ({result.output} is written for inspection; surgery.json says it failed)",
                  style="bold red", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
