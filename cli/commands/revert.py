"""`surgery revert`: sign-conflicting fine-tune delta entries set back to the aligned model (what it prints)."""

from __future__ import annotations

from ..build import show_written
from ..console import out
from .prune import by_layer


def show_plan(plan, options) -> None:
    score = "every one: no score needed" if plan.fraction == 1 else f"highest {plan.score} score first"
    out.print(
        f"dry run: nothing is written; {len(plan.modules)} Linear weights ({plan.entries:,} entries) would be compared "
        f"with --aligned and --unaligned, and {plan.fraction:g} of each one's sign-conflicting delta entries reverted "
        f"({score}); the counts depend on the weights: run without --dry-run to see them",
        highlight=False,
        markup=False,
    )


def show(result, options) -> None:
    r = result.report
    shares = {name.removesuffix(".weight"): r.reverted[name] / max(r.entries[name], 1) for name in r.entries}
    out.print(by_layer(shares, "entries reverted to the aligned model (share of each weight, %)"))
    t = r.totals()
    calibrated = (
        f", calibrated on {r.calibration_examples} examples / {r.calibration_tokens:,} tokens"
        if r.calibration_tokens
        else ""
    )
    out.print(
        f"reverted {t['reverted']:,} of {t['conflicting']:,} sign-conflicting entries (fraction {r.fraction:g} of each "
        f"tensor's, score {r.score}{calibrated}); the fine-tune changed {t['changed']:,} of {t['entries']:,} entries "
        f"of the {len(r.entries)} weights",
        highlight=False,
        markup=False,
    )
    show_written(result)
