"""`surgery ablate`: direction ablation (what it prints)."""

from __future__ import annotations

from rich.table import Table

from ..console import out


def show_layer_scores(report) -> None:
    judged = report.baseline is not None
    columns = ["layer", "held-out AUC", "gap (sd)"] + (
        ["harmful refused", "harmless refused", "perplexity"] if judged else []
    )
    table = Table(
        *columns,
        title="direction per layer (fit half -> held-out half)"
        + (", each edit tried on the held-out prompts" if judged else ""),
    )
    if judged:
        b = report.baseline
        table.add_row(
            "unedited",
            "",
            "",
            f"{100 * b['harmful_refused']:.1f}%",
            f"{100 * b['harmless_refused']:.1f}%",
            f"{b['perplexity']:.4g}",
        )
    for k, v in sorted(report.layer_scores.items()):
        shares = (
            [
                f"{100 * v['harmful_refused']:.1f}%",
                f"{100 * v['harmless_refused']:.1f}%",
                f"x{v['perplexity_ratio']:.3g}",
            ]
            if judged
            else []
        )
        table.add_row(str(k) + (" *" if k == report.layer else ""), f"{v['auc']:.3f}", f"{v['gap']:.2f}", *shares)
    out.print(table)


def show(result, options) -> None:
    report = result.report
    if report.layer_scores:
        show_layer_scores(report)
    verb = "amplified" if options.reverse else "ablated"
    source = f" of {options.direction_from}" if options.direction_from else ""
    out.print(
        f"{verb} the direction from layer {report.layer}{source} in {len(report.edited)} matrices "
        f"(scale {result.strength:g}); wrote {result.output}",
        highlight=False,
        markup=False,
    )
