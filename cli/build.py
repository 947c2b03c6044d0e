"""Turn options dataclasses (surgery.options) into typer commands, so each flag, default and help exists once."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from surgery.errors import SurgeryError
from surgery.methods import Method, RunOptions, run_repair
from surgery.options import field_types, option_fields

from .console import err, out, progress, summary

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
    for f in option_fields(cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if meta.get("strength") and default is not None:
            default = f"{default:g}"
        decls = [meta["flag"] or "--" + f.name.replace("_", "-")]
        if meta.get("short"):
            decls.append(meta["short"])
        info = typer.Option(
            ... if meta.get("required") else default,
            *decls,
            help=meta["help"],
            hidden=meta.get("hidden", False),
            show_default=not meta.get("required"),
        )
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=_cli_type(hints[f.name], meta)
            )
        )
    return params


def build_options(cls, values: dict[str, Any]):
    """An options object from the command's keyword values (glob lists split on commas)."""
    kwargs = {}
    for f in option_fields(cls):
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
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=typer.Argument(..., help=help), annotation=annotation
    )


def method_command(method: Method, show: Callable, show_plan: Callable | None = None) -> Callable:
    """The `surgery METHOD` command: MODEL, -o OUTPUT, the method's options, then the shared RunOptions."""
    output = inspect.Parameter(
        "output",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(None, "--output", "-o", help=OUTPUT_HELP),
        annotation=Optional[Path],
    )
    params = [
        positional("model", MODEL_HELP),
        output,
        *parameters(method.Options),
        *parameters(RunOptions),
        json_option(),
    ]

    def body(values: dict) -> None:
        model, target, json_path = values.pop("model"), values.pop("output"), values.pop("json_path")
        options = build_options(method.Options, values)
        run = build_options(RunOptions, values)
        check_json_path(json_path, [model])
        with progress(f"{method.name}: preparing") as status:
            result = run_repair(method, model, target, options, run, progress=status.update)
        if run.dry_run:
            (show_plan or _no_plan)(result.plan, options)
            write_json(json_path, {"command": method.name, "dry_run": True, "exit_status": 0})
            summary(f"{method.name} dry run: nothing written, {status.elapsed():.0f} s")
            return
        if result.search is not None:
            show_search(result.search)
        show(result, options)
        write_json(json_path, run_json(method.name, result))
        report_check(result, run, repair_summary(method.name, result, status.elapsed()))

    doc = f"{method.summary}\n\n{method.paper}" if method.paper else method.summary
    return make_command(method.name, doc, params, body)


def json_option() -> inspect.Parameter:
    """`--json FILE`: the command's report as JSON (written on exit 1 too, so CI can read why; not on a usage error)."""
    return inspect.Parameter(
        "json_path",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Optional[Path],
        default=typer.Option(
            None,
            "--json",
            help="Write the report (the manifest's report, the chosen point, the check, the exit status) as "
            "JSON to this file, also when the command exits 1.",
        ),
    )


def check_json_path(path: Path | None, inputs: list) -> None:
    """Refuse an unusable --json FILE before any work (one error line, exit 2)."""
    if path is None:
        return
    from surgery.writer import check_side_file

    if not Path(path).parent.is_dir():
        raise SurgeryError(f"--json: folder {Path(path).parent} does not exist")
    check_side_file(path, [Path(p) for p in inputs if p is not None])


def write_json(path: Path | None, payload: dict) -> None:
    """Write `payload` to --json FILE, complete or not at all."""
    if path is None:
        return
    import json
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.surgery-tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def run_json(command: str, result) -> dict:
    """The --json report of a written repair: read back from the output's surgery.json, so its figures are the manifest's."""
    import json

    from surgery.checkpoint import MANIFEST_NAME

    manifest = json.loads((Path(result.output) / MANIFEST_NAME).read_text())
    search = result.search
    chosen = None
    if search is not None:
        point = next(
            (
                p
                for p in manifest["report"].get("search", {}).get("candidates", [])
                if p.get("strength") == search.chosen
            ),
            None,
        )
        chosen = {"knob": search.knob, "strength": search.chosen, "figures": (point or {}).get("figures")}
    elif result.strength is not None:
        chosen = {"strength": result.strength}
    return {
        "command": command,
        "exit_status": 1 if result.failed else 0,
        "failed": result.failed,
        "output": str(result.output),
        "method": manifest.get("method"),
        "chosen": chosen,
        "report": manifest.get("report"),
        "check": manifest.get("check"),
    }


def repair_summary(command: str, result, seconds: float) -> str:
    """`METHOD wrote OUT (knob s): harmful a% -> b% on N held-out prompts, perplexity xR, T s`, each part when known."""
    from surgery import figures as F

    head = f"{command} wrote {result.output}"
    parts = []
    search = result.search
    if search is not None:
        head += f" ({search.knob.replace('_', ' ')} {search.chosen:g})"
        f, base = search.chosen_point().figures, search.baseline
        for key, label in ((F.HARMFUL, "harmful"), (F.HARMFUL_PROXY, "harmful (proxy)")):
            if key in f and key in base:
                n = search.prompts.get("harmful")
                parts.append(
                    f"{label} {100 * base[key]:.1f}% -> {100 * f[key]:.1f}%"
                    + (f" on {n} held-out prompts" if n else "")
                )
                break
    elif result.strength is not None:
        head += f" (strength {result.strength:g})"
    if result.check is not None:
        parts.append(f"perplexity x{result.check.perplexity_ratio:.3g} on {result.check.prompts} check prompts")
    if result.failed:
        parts.append(f"FAILED: {result.failed}")
    return head + (": " + ", ".join(parts) if parts else "") + f", {seconds:.0f} s"


def show_written(result) -> None:
    """The last line of a repair's report: where it was written and how long each stage took (the check apart)."""
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items() if k != "check")
    out.print(f"wrote {result.output} ({timings})", highlight=False, markup=False)


def _no_plan(plan, options) -> None:
    out.print(
        "dry run: nothing is written; this method's edit depends on statistics computed from the model "
        "(run without --dry-run to see it)"
    )


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
    table = Table(
        search.knob,
        f"held-out {metric}" + (f" ({pair})" if proxy else ""),
        "perplexity",
        "KL" + (" (input, reference)" if F.KL_REFERENCE in search.baseline else ""),
        f"over-refusal ({pair})",
        *([f"accuracy ({pair})"] if task else []),
        "budget",
        "s",
        title=f"automatic {search.knob}: input {metric} "
        + (
            f"{100 * search.baseline[search.metric]:.1f}%"
            if search.metric in search.baseline
            else f"{100 * search.baseline.get(proxy, float('nan')):.1f}% (proxy)"
        ),
    )

    def both(f, keys, fmt) -> str:  # "proxy / generated", "-" for a figure not measured
        shown = [fmt(f[k]) if k in f else "-" for k in keys]
        return " / ".join(shown) if any(s != "-" for s in shown) else "-"

    share, points, drop = (lambda v: f"{100 * v:.1f}%"), (lambda v: f"{v:+.1f} pts"), (lambda v: f"{-v:+.1f} pts")
    for p in search.points:
        f = p.figures
        kl = f"{f[F.KL]:.3g}" if F.KL in f else "-"
        if F.KL_REFERENCE in f:
            kl += f" ({f[F.KL_INPUT]:.3g}, {f[F.KL_REFERENCE]:.3g})"
        row = [
            f"{p.strength:g}" + (" *" if p.strength == search.chosen else ""),
            both(f, (proxy, search.metric), share) if proxy else both(f, (search.metric,), share),
            f"x{f[F.PERPLEXITY_RATIO]:.3g}" if F.PERPLEXITY_RATIO in f else "-",
            kl,
            both(f, (F.OVER_REFUSAL_PROXY_POINTS, F.OVER_REFUSAL_POINTS), points),
        ]
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
        out.print(
            f"bound by {search.bound}; {search.forward_passes} forward passes, {search.seconds:.1f}s",
            highlight=False,
            markup=False,
        )


def report_check(result, run: RunOptions, final: str | None = None) -> None:
    """The after-write check's line, the command's summary line (`final`), then exit 1 when the output failed its
    budget (the output stays, marked failed)."""
    if result.check is not None:
        out.print(result.check.summary(), style="bold red" if not result.check.passed else None, highlight=False)
    elif run.check:
        out.print("check skipped: streamed (it would load the whole model); measure the output with `surgery eval`")
    if final is not None:
        summary(final)
    if result.failed:
        err.print(
            f"failed: {result.failed} ({result.output} is written for inspection; surgery.json says it failed)",
            style="bold red",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        sys.exit(1)
