"""`surgery edit`: Model Surgery's probe-direction edit (what it prints)."""

from __future__ import annotations

from rich.table import Table

from surgery.methods.probe_edit import EditPlan

from ..console import out


def show_plan(plan: EditPlan, options=None) -> None:
    title = "gate_proj rows selected (most negative cosine with the probe)"
    table = Table("layer", "rows selected", title=title + ("; dry run: nothing is written" if options is not None else ""))
    for layer, n in plan.per_layer().items():
        table.add_row(str(layer), str(n))
    out.print(table)
    note = "" if plan.selected == plan.requested else f" (only {plan.selected:,} rows have negative cosine)"
    out.print(f"{plan.selected:,} of {plan.total_rows:,} gate_proj rows ({100 * plan.selected / max(plan.total_rows, 1):.2f}%){note}")
    if options is not None and isinstance(options.alpha, float):
        show_step(plan, options.alpha)


def show_step(plan, alpha: float) -> None:
    """alpha is in units of the probe's norm, which depends on how the probe was trained: say what it means here."""
    if plan.selected:
        out.print(
            f"each row moves by |alpha|·‖w‖ = {abs(alpha) * plan.probe_norm:.4g} = {100 * plan.relative_step(alpha):.1f}% of the "
            f"selected rows' mean norm {plan.mean_row_norm:.4g} (‖w‖ = {plan.probe_norm:.4g})"
        )


def show(result, options) -> None:
    plan = result.report.plan
    show_plan(plan)
    show_step(plan, result.strength)
    out.print(f"edited {plan.selected:,} rows with alpha {result.strength:g}; wrote {result.output}", highlight=False, markup=False)
