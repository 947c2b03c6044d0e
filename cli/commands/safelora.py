"""`surgery safelora`: a LoRA adapter projected onto the alignment subspace (what it prints)."""

from __future__ import annotations

from rich.table import Table

from ..build import show_written
from ..console import out


def cosines(report, title: str) -> Table:
    projected = set(report.projected)
    table = Table("LoRA target", "cos(C·B·A, B·A)", "projected", title=title)
    for t in sorted(report.targets, key=lambda t: (t.cosine, t.module)):
        table.add_row(t.module, f"{t.cosine:.4f}", "yes" if t.module in projected else "")
    return table


def show_plan(report, options) -> None:
    from surgery.methods.safelora import least_aligned

    chosen = least_aligned(report.targets, options.layers, options.threshold)
    report.projected = sorted(t.module for t in chosen)
    out.print(cosines(report, "dry run: nothing is written"))
    out.print(f"{len(chosen)} of {len(report.targets)} LoRA targets would have B replaced by C·B", highlight=False)


def show(result, options) -> None:
    r = result.report
    out.print(cosines(r, "SafeLoRA: least-aligned updates projected"))
    pdst = f"; Pdst {r.pdst:.3f} (mean 1/(1+‖B − C·B‖) over the projected)" if r.pdst is not None else ""
    out.print(f"projected {len(r.projected)} of {len(r.targets)} LoRA targets{pdst}", highlight=False, markup=False)
    if options.merge:
        show_written(result)
    else:
        out.print(
            f"wrote {result.output}, the projected adapter (load it on the base with peft: "
            "PeftModel.from_pretrained(base, OUT))",
            highlight=False,
            markup=False,
        )
