"""`surgery repair`: every applicable method at its automatic strength, the best one written."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from surgery.methods import RunOptions
from surgery.repair import RepairOptions, repair_checkpoint

from ..build import MODEL_HELP, build_options, make_command, parameters, positional, report_check
from ..console import err, out


def show(report) -> None:
    table = Table("candidate", "strength", "held-out harmful", "perplexity", "KL", "over-refusal", "accuracy", "budget", "time",
                  title="surgery repair: each method at its automatic strength (same held-out prompts, same budget)")
    for c in report.candidates:
        if c.search is None:
            table.add_row(c.label, "-", "-", "-", "-", "-", "-", c.error or "not run", f"{c.seconds:.0f}s")
            continue
        f = c.search.chosen_point().figures
        table.add_row(
            c.label + (" *" if c is report.winner else ""), f"{c.search.knob} {c.search.chosen:g}",
            f"{100 * f['harmful_score']:.1f}% (from {100 * c.search.baseline['harmful_score']:.1f}%)" if "harmful_score" in f else "-",
            f"x{f['perplexity_ratio']:.3g}", f"{f['kl']:.3g}",
            f"{f['over_refusal_points']:+.1f} pts" if "over_refusal_points" in f else "-",
            f"{-f['accuracy_drop_points']:+.1f} pts" if "accuracy_drop_points" in f else "-",
            "inside" if c.inside else (c.search.failed or "")[:60], f"{c.seconds:.0f}s")
    out.print(table)
    out.print(f"wrote {report.output} with {report.winner.label} ({report.winner.search.knob} {report.winner.search.chosen:g}); "
              f"comparison plot: {report.output / 'repair.png'}", highlight=False, markup=False)


def _body(values: dict) -> None:
    model, target = values.pop("model"), values.pop("output")
    options = build_options(RepairOptions, values)
    run = build_options(RunOptions, values)
    with err.status("surgery repair: preparing") as status:
        report = repair_checkpoint(model, target, options, run, progress=status.update)
    show(report)
    result = report.result
    result.failed = report.failed
    report_check(result, run)


repair_command = make_command(
    "repair", "Try every method that applies at its automatic strength under one budget; write the best.",
    [positional("model", MODEL_HELP),
     inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, default=typer.Option(..., "--output", "-o",
                       help="Folder for the repaired checkpoint."), annotation=Optional[Path]),
     *parameters(RepairOptions), *[p for p in parameters(RunOptions) if p.name != "dry_run"]],
    _body)
