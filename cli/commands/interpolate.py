"""`surgery interpolate`: the fine-tune moved back toward the reference (what it prints)."""

from __future__ import annotations

from ..build import show_written
from ..console import out


def show_plan(plan, options) -> None:
    out.print(
        f"dry run: nothing is written; W_ref + (1 - {plan.alpha:g})·(W_ft - W_ref) would be written to the "
        f"{len(plan.tensors)} floating tensors ({plan.entries:,} entries) where the fine-tune differs from "
        "--reference; streamed tensor by tensor",
        highlight=False,
        markup=False,
    )


def show(result, options) -> None:
    r = result.report
    same = f"; {len(r.unchanged)} tensors equal to the reference, left as they are" if r.unchanged else ""
    out.print(
        f"interpolated {len(r.interpolated)} tensors ({r.entries:,} entries) at alpha {r.alpha:g}{same}; "
        f"||W_ft - W_ref|| {r.delta_norm:.4g}",
        highlight=False,
        markup=False,
    )
    show_written(result)
