"""`surgery resta`: the safety vector added back to the fine-tuned model (what it prints)."""

from __future__ import annotations

from ..build import show_written
from ..console import out


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def show_plan(plan, options) -> None:
    dare = f", DARE drop {plan.dare:g} on the fine-tune delta first" if plan.dare else ""
    out.print(
        f"dry run: nothing is written; W_ft + {plan.beta:g}·V would be written to the tensors of {len(plan.tensors)} "
        f"where V is non-zero ({plan.entries:,} entries){dare}; streamed tensor by tensor, largest tensor "
        f"{_mib(plan.largest_bytes)}, estimated peak {_mib(plan.estimated_peak_bytes)} above the interpreter",
        highlight=False,
        markup=False,
    )


def show(result, options) -> None:
    r = result.report
    zero = f"; V = 0 on {len(r.zero_vector)} target tensors, left as they are" if r.zero_vector else ""
    dare = f"; DARE ({r.dare:g}) dropped {r.dropped:,} fine-tune delta entries" if r.dare else ""
    out.print(
        f"added {r.beta:g}·V to {len(r.added)} tensors ({r.entries:,} entries){zero}{dare}; ||V|| {r.vector_norm:.4g}, "
        f"||W_ft - W_aligned|| {r.delta_norm:.4g}",
        highlight=False,
        markup=False,
    )
    show_written(result)
