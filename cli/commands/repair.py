"""`surgery repair`: every applicable method at its automatic strength, the best one written."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from surgery.methods import RunOptions
from surgery.repair import RepairOptions, repair_checkpoint

from ..build import (
    MODEL_HELP,
    build_options,
    check_json_path,
    json_option,
    make_command,
    parameters,
    positional,
    repair_summary,
    report_check,
    run_json,
    write_json,
)
from ..console import out, progress


def show(report) -> None:
    from surgery import figures as F

    if report.picked is not None:
        p = report.picked
        out.print(
            f"wrote {report.output} with point {p['n']} of {p['from']}: {p['candidate']} ({p['knob']} {p['strength']:g}), "
            f"not searched again",
            highlight=False,
            markup=False,
        )
        return
    table = Table(
        "candidate",
        "strength",
        "held-out harmful",
        "perplexity",
        "KL",
        "over-refusal",
        "accuracy",
        "budget",
        "bound by",
        "time",
        title="surgery repair: each method at its automatic strength (same held-out prompts, same budget; every "
        "method screened on forward-pass proxies, the finalists' choices confirmed by generation)",
    )
    for c in report.candidates:
        if c.search is None:
            table.add_row(c.label, "-", "-", "-", "-", "-", "-", c.error or "not run", "-", f"{c.seconds:.0f}s")
            continue
        f, base = c.search.chosen_point().figures, c.search.baseline
        table.add_row(
            c.label + (" *" if c is report.winner else ""),
            f"{c.search.knob} {c.search.chosen:g}",
            f"{100 * f[F.HARMFUL]:.1f}% (from {100 * base[F.HARMFUL]:.1f}%)"
            if F.HARMFUL in f and F.HARMFUL in base
            else f"proxy {100 * f[F.HARMFUL_PROXY]:.1f}% (from {100 * base[F.HARMFUL_PROXY]:.1f}%)"
            if F.HARMFUL_PROXY in f and F.HARMFUL_PROXY in base
            else "-",
            f"x{f[F.PERPLEXITY_RATIO]:.3g}" if F.PERPLEXITY_RATIO in f else "-",
            f"{f[F.KL]:.3g}" if F.KL in f else "-",
            f"{f[F.OVER_REFUSAL_POINTS]:+.1f} pts" if F.OVER_REFUSAL_POINTS in f else "-",
            f"{-f[F.ACCURACY_DROP_POINTS]:+.1f} pts" if F.ACCURACY_DROP_POINTS in f else "-",
            ("inside" if c.finalist else "inside (proxies; screened)") if c.inside else (c.search.failed or "")[:60],
            (c.search.bound or "").split(":")[0],
            f"{c.seconds:.0f}s",
        )
    out.print(table)
    points = Table(
        "#",
        "candidate",
        "strength",
        "harmful (proxy / generated)",
        "perplexity",
        "KL",
        "over-refusal (proxy / generated)",
        "budget",
        title="every measured point (surgery repair --pick N --from OUT/surgery.json writes one)",
    )

    def pair(f, proxy, key, fmt) -> str:  # "proxy / generated"
        return " / ".join(fmt(f[k]) if k in f else "-" for k in (proxy, key))

    for row in report.points:
        f = row["figures"]
        points.add_row(
            str(row["n"]) + (" *" if row["chosen"] else ""),
            row["candidate"],
            f"{row['knob']} {row['strength']:g}",
            pair(f, F.HARMFUL_PROXY, F.HARMFUL, lambda v: f"{100 * v:.1f}%"),
            f"x{f[F.PERPLEXITY_RATIO]:.3g}" if F.PERPLEXITY_RATIO in f else "-",
            f"{f[F.KL]:.3g}" if F.KL in f else "-",
            pair(f, F.OVER_REFUSAL_PROXY_POINTS, F.OVER_REFUSAL_POINTS, lambda v: f"{v:+.1f}"),
            "inside" if row["within_budget"] else "; ".join(row["broken"])[:50],
        )
    out.print(points)
    out.print(
        f"wrote {report.output} with {report.winner.label} ({report.winner.search.knob} {report.winner.search.chosen:g}); "
        f"comparison plot: {report.output / 'repair.png'}",
        highlight=False,
        markup=False,
    )


def _body(values: dict) -> None:
    model, target, json_path = values.pop("model"), values.pop("output"), values.pop("json_path")
    options = build_options(RepairOptions, values)
    run = build_options(RunOptions, values)
    check_json_path(json_path, [model, options.reference, options.unaligned, options.probe, options.adapter])
    with progress("surgery repair: preparing") as status:
        report = repair_checkpoint(model, target, options, run, progress=status.update)
    show(report)
    result = report.result
    result.failed = report.failed
    found = run_json("repair", result)
    found["candidates"] = [c.to_json() for c in report.candidates]
    found["winner"] = report.winner.label if report.winner is not None else None
    found["picked"] = report.picked
    write_json(json_path, found)
    label = report.winner.label if report.winner is not None else (report.picked or {}).get("candidate", "")
    report_check(
        result,
        run,
        repair_summary("repair", result, status.elapsed()).replace("repair wrote", f"repair ({label}) wrote", 1),
    )


repair_command = make_command(
    "repair",
    "Try every method that applies at its automatic strength under one budget; write the best.",
    [
        positional("model", MODEL_HELP),
        inspect.Parameter(
            "output",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(..., "--output", "-o", help="Folder for the repaired checkpoint."),
            annotation=Optional[Path],
        ),
        *parameters(RepairOptions),
        *[p for p in parameters(RunOptions) if p.name != "dry_run"],
        json_option(),
    ],
    _body,
)
