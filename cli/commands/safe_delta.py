"""`surgery safe-delta`: the fine-tune delta kept under a safety budget, OBS-compensated (what it prints)."""

from __future__ import annotations

from ..build import show_written
from ..console import out
from .prune import by_layer


def show_plan(plan, options) -> None:
    widths = ", ".join(f"{n} reading width {w}" for w, n in sorted(plan.widths.items()))
    out.print(
        f"dry run: nothing is written; {len(plan.modules)} Linear weights ({plan.entries:,} entries; {widths}) would "
        f"keep the fine-tune delta entries budget {plan.budget:g} allows, the rest aligned and compensated; the "
        "Hessians come from the aligned model's forward passes: run without --dry-run to see the counts",
        highlight=False,
        markup=False,
    )


def show(result, options) -> None:
    r = result.report
    shares = {name.removesuffix(".weight"): r.admitted[name] / max(r.entries[name], 1) for name in r.entries}
    out.print(by_layer(shares, "entries given the fine-tune value (share of each weight, %)"))
    t = r.totals()
    calibrated = r.calibration
    data = (
        f"; Hessians ({r.hessians}) from the aligned model on {calibrated['calibration_examples']} examples / "
        f"{calibrated['calibration_tokens']:,} tokens ({calibrated['responses']} responses)"
        if calibrated
        else ""
    )
    out.print(
        f"kept {t['admitted']:,} of the {t['changed']:,} fine-tuned entries of {len(r.entries)} weights at budget "
        f"{r.budget:g} (protect {r.protect:g}){data}",
        highlight=False,
        markup=False,
    )
    show_written(result)
