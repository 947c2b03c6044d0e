"""`surgery eigenshift`: damp the output-layer components that drive toxic generations."""

from __future__ import annotations

from rich.table import Table

from ..console import out


def show(result, options) -> None:
    report = result.report
    out.print(
        f"{'reused' if report.states_reused else 'collected'} {report.toxic_states} toxic-step states "
        f"({report.toxic_continuations} toxic continuations of {report.prompts} prompts) and {report.nontoxic_states} non-toxic states; "
        f"damped {report.k} of {report.rank} components by alpha {report.alpha}"
        + ("; the tied head was untied (input embeddings unchanged)" if report.tied else "")
    )
    if report.before:
        table = Table("", "toxicity rate (%)", "perplexity", title="EigenShift: before and after")
        for name, m in (("before", report.before), ("after", report.after)):
            table.add_row(name, f"{100 * m['toxicity']:.2f}", f"{m['perplexity']:.2f}")
        out.print(table)
        out.print(f"TPH {report.tph:.2f} (harmonic mean of toxicity reduction % and 100·ppl_before/ppl_after)")
    out.print(
        f"wrote {result.output} ({', '.join(f'{k_} {v:.1f}s' for k_, v in result.seconds.items())})",
        highlight=False,
        markup=False,
    )
