"""`surgery prune`: Antidote pruning of a checkpoint folder."""

from __future__ import annotations

from collections import defaultdict

from rich.table import Table

from surgery.arch import LAYER_INDEX
from surgery.methods.antidote import PrunePlan

from ..console import out


def by_layer(values: dict[str, float], title: str = "sparsity after pruning (share of zeros, %)") -> Table:
    """One row per decoder layer, one column per projection: compact for 30-layer models."""
    grid: dict[str, dict[str, float]] = defaultdict(dict)
    kinds: list[str] = []
    for module, value in values.items():
        m = LAYER_INDEX.search(module)
        parts = module[m.end() :].removesuffix(".default").split(".") if m else []  # .default: peft's adapter name
        kind = ".".join(parts[-2:]) if parts and parts[-1].startswith("lora_") else (parts[-1] if parts else "weight")
        layer = m.group(1) if m else module
        grid[layer][kind] = value
        if kind not in kinds:
            kinds.append(kind)
    table = Table("layer", *kinds, title=title)
    for layer in sorted(grid, key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else x)):
        table.add_row(layer, *(f"{100 * grid[layer][k]:.2f}" if k in grid[layer] else "-" for k in kinds))
    return table


def show_plan(plan: PrunePlan, options=None) -> None:
    table = Table("module", "rows", "cols", "removed/row", "removed", title="dry run: nothing is written")
    for m in plan.modules:
        table.add_row(
            m.module.removeprefix("base_model.model.").removesuffix(".default"),
            str(m.rows),
            str(m.cols),
            "-" if m.per_row is None else str(m.per_row),
            f"{m.removed:,}",
        )
    out.print(table)
    out.print(
        f"{len(plan.modules)} modules, {plan.removed:,} of {plan.total_weights:,} weights would be zeroed "
        f"({100 * plan.removed / max(plan.total_weights, 1):.2f}% of {plan.pool}); "
        f"estimated peak memory {plan.estimated_peak_bytes / 2**30:.2f} GiB"
    )


def show(result, options) -> None:
    report = result.report
    if report.restored:
        out.print(by_layer(report.sparsity, "weights restored to the reference (share, %)"))
    else:
        out.print(by_layer(report.sparsity))
    out.print(
        f"pruned {len(report.sparsity)} modules at ratio {result.strength:g}, {report.plan.removed:,} weights "
        f"{'restored to the reference' if report.restored else 'zeroed'}, calibrated on "
        f"{report.calibration_examples} examples / {report.calibration_tokens:,} tokens "
        f"({', '.join(f'{k} {v:.1f}s' for k, v in result.seconds.items() if k != 'check')}"
        f"{', streamed layer by layer' if report.streamed else ''})",
        highlight=False,
    )
    if report.adapter and not options.merge:
        out.print(
            f"wrote {result.output}, the pruned adapter (the base is unchanged; load both with peft: "
            "PeftModel.from_pretrained(base, OUT))",
            highlight=False,
            markup=False,
        )
    elif report.restored:
        out.print(f"wrote {result.output}", highlight=False, markup=False)
    else:
        out.print(
            f"wrote {result.output}; zeros are stored densely, so the files are the same size as the input",
            highlight=False,
            markup=False,
        )
