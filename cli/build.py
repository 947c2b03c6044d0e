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
    """The candidates' table and the chosen point; a search in stages (EigenShift's k, then alpha) shows each. Each
    figure judged by generation is shown as "proxy / generated" (generated only for the confirmed points)."""
    from rich.table import Table

    from surgery import figures as F

    for stage in search.before:
        show_search(stage)
    metric = search.metric.replace("_", " ")
    proxy = F.PROXY_OF.get(search.metric)
    task = any(F.ACCURACY_PROXY in p.figures or F.ACCURACY in p.figures for p in search.points)
    pair = "proxy / generated"
    table = Table(search.knob, f"held-out {metric}" + (f" ({pair})" if proxy else ""), "perplexity",
                  "KL" + (" (input, reference)" if F.KL_REFERENCE in search.baseline else ""), f"over-refusal ({pair})",
                  *([f"accuracy ({pair})"] if task else []), "budget", "s",
                  title=f"automatic {search.knob}: input {metric} " + (
                      f"{100 * search.baseline[search.metric]:.1f}%" if search.metric in search.baseline else
                      f"{100 * search.baseline.get(proxy, float('nan')):.1f}% (proxy)"))

    def both(f, keys, fmt) -> str:  # "proxy / generated", "-" for a figure not measured
        shown = [fmt(f[k]) if k in f else "-" for k in keys]
        return " / ".join(shown) if any(s != "-" for s in shown) else "-"

    share, points, drop = (lambda v: f"{100 * v:.1f}%"), (lambda v: f"{v:+.1f} pts"), (lambda v: f"{-v:+.1f} pts")
    for p in search.points:
        f = p.figures
        kl = f"{f[F.KL]:.3g}" if F.KL in f else "-"
        if F.KL_REFERENCE in f:
            kl += f" ({f[F.KL_INPUT]:.3g}, {f[F.KL_REFERENCE]:.3g})"
        row = [f"{p.strength:g}" + (" *" if p.strength == search.chosen else ""),
               both(f, (proxy, search.metric), share) if proxy else both(f, (search.metric,), share),
               f"x{f[F.PERPLEXITY_RATIO]:.3g}" if F.PERPLEXITY_RATIO in f else "-", kl,
               both(f, (F.OVER_REFUSAL_PROXY_POINTS, F.OVER_REFUSAL_POINTS), points)]
        if task:
            row.append(both(f, (F.ACCURACY_PROXY_DROP_POINTS, F.ACCURACY_DROP_POINTS), drop))
        row.append("inside" if p.within else "; ".join(p.broken))
        row.append(f"{p.seconds:.1f}")
        table.add_row(*row)
    out.print(table)
    for line in search.resolution():
        out.print(line, highlight=False, markup=False)
    out.print(f"chosen {search.knob} {search.chosen:g}: {search.reason}", highlight=False, markup=False)
    if search.bound:
        out.print(f"bound by {search.bound}; {search.forward_passes} forward passes, {search.seconds:.1f}s",
                  highlight=False, markup=False)


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
