"""`surgery edit`: Model Surgery's probe-direction edit (what it prints)."""

from __future__ import annotations

from rich.table import Table

from surgery.methods.probe_edit import EditPlan

from ..console import err, out


def show_plan(plan: EditPlan, options=None) -> None:
    title = "gate rows selected (most negative cosine with the probe)"
    table = Table(
        "layer", "rows selected", title=title + ("; dry run: nothing is written" if options is not None else "")
    )
    for layer, n in plan.per_layer().items():
        table.add_row(str(layer), str(n))
    out.print(table)
    note = "" if plan.selected == plan.requested else f" (only {plan.selected:,} rows have negative cosine)"
    out.print(
        f"{plan.selected:,} of {plan.total_rows:,} gate rows ({100 * plan.selected / max(plan.total_rows, 1):.2f}%){note}"
    )
    if options is not None and isinstance(options.alpha, float):
        show_step(plan, options.alpha)
        if plan.gate_check is not None:
            show_gate_check(plan.gate_check)
        elif options.gate_check and plan.selected:
            out.print(
                "gate check: not measured by a header-only dry run; name --check-positive/--check-negative to "
                "measure it here (loads the model), or run the edit"
            )


def show_step(plan, alpha: float) -> None:
    """alpha is in units of the probe's norm, which depends on how the probe was trained: say what it means here."""
    if plan.selected:
        out.print(
            f"each row moves by |alpha|·‖w‖ = {abs(alpha) * plan.probe_norm:.4g} = {100 * plan.relative_step(alpha):.1f}% of the "
            f"selected rows' mean norm {plan.mean_row_norm:.4g} (‖w‖ = {plan.probe_norm:.4g}); paper-equivalent alpha "
            f"{plan.paper_alpha(alpha):.4g} ({_probe_kind(plan)})"
        )
        if plan.centred_norms:
            norms = list(plan.centred_norms.values())
            out.print(
                f"--centre (beyond the paper): ‖w_l‖ from {min(norms):.4g} to {max(norms):.4g} across layers "
                f"(‖w‖ = {plan.probe_norm:.4g}); the step above is an upper bound"
            )


def _probe_kind(plan) -> str:
    meta = plan.probe_meta
    return (
        "a paper-classifier probe: its row 1 is what the paper adds"
        if meta.classifier == "paper"
        else "a logistic probe: the paper's W[1] of the same classifier is about w/2"
    )


def show_gate_check(check) -> None:
    """The paper's Fig. 2 for this edit: share of selected gates open, undesired vs desired inputs, before -> after."""
    table = Table(
        "inputs",
        "tokens",
        "before",
        "after",
        "change",
        title=f"selected gates open (gate input > 0), alpha {check.alpha:g}",
    )
    rows = [("undesired", check.pool, False), ("desired", check.pool, False)]
    if check.pool != "all":
        rows += [("undesired", "every token", True), ("desired", "every token", True)]
    for kind, tokens, every in rows:
        b, a = check.before[kind], check.after.get(kind, check.before[kind])
        sb, sa = (b.share_all, a.share_all) if every else (b.share, a.share)
        table.add_row(
            f"{kind} ({check.prompts[kind]})", tokens, f"{sb:.3f}", f"{sa:.3f}", f"{100 * (sa - sb):+.1f} pts"
        )
    out.print(table)
    offset, gap = check.offset_and_gap()
    out.print(
        f"mean w·h over the selected rows' layers: class gap {gap:+.4g} (undesired - desired), |offset| on desired "
        f"text {offset:.4g}"
    )
    warning = check.warning()
    if warning:
        err.print(f"warning: {warning}", style="bold red", highlight=False, markup=False, soft_wrap=True)


def show(result, options) -> None:
    plan = result.report.plan
    show_plan(plan)
    show_step(plan, result.strength)
    if plan.gate_check is not None:
        show_gate_check(plan.gate_check)
    out.print(
        f"edited {plan.selected:,} rows with alpha {result.strength:g}; wrote {result.output}",
        highlight=False,
        markup=False,
    )
