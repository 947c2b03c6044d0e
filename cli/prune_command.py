"""`surgery prune`: Antidote pruning of a checkpoint folder."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import typer
from rich.table import Table

from surgery.prune import PruneOptions, PrunePlan, plan_prune, prune_checkpoint

from .check import check_option, check_output, gate_option, validate_gate
from .console import err, out
from .main import app


def split_patterns(value: str | None) -> list[str] | None:
    return [p.strip() for p in value.split(",") if p.strip()] if value else None


def by_layer(values: dict[str, float], title: str = "sparsity after pruning (share of zeros, %)") -> Table:
    """One row per decoder layer, one column per projection: compact for 30-layer models."""
    grid: dict[str, dict[str, float]] = defaultdict(dict)
    kinds: list[str] = []
    for module, value in values.items():
        m = re.search(r"\.(\d+)\.(.+)$", module)
        layer, kind = (m.group(1), m.group(2).split(".")[-1]) if m else (module, "weight")
        grid[layer][kind] = value
        if kind not in kinds:
            kinds.append(kind)
    table = Table("layer", *kinds, title=title)
    for layer in sorted(grid, key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else x)):
        table.add_row(layer, *(f"{100 * grid[layer][k]:.2f}" if k in grid[layer] else "-" for k in kinds))
    return table


def show_plan(plan: PrunePlan) -> None:
    table = Table("module", "rows", "cols", "removed/row", "removed", title="dry run: nothing is written")
    for m in plan.modules:
        table.add_row(m.module, str(m.rows), str(m.cols), "-" if m.per_row is None else str(m.per_row), f"{m.removed:,}")
    out.print(table)
    out.print(
        f"{len(plan.modules)} modules, {plan.removed:,} of {plan.total_weights:,} weights would be zeroed "
        f"({100 * plan.removed / max(plan.total_weights, 1):.2f}% of the model); "
        f"estimated peak memory {plan.estimated_peak_bytes / 2**30:.2f} GiB"
    )


@app.command("prune")
def prune_command(
    model: Path = typer.Argument(..., help="Checkpoint folder to repair (never modified)."),
    output: Path = typer.Option(None, "--output", "-o", help="Folder for the pruned checkpoint."),
    ratio: float = typer.Option(0.05, help="Fraction of each row to remove (Antidote default 0.05)."),
    score: str = typer.Option("wanda", help="wanda (|W|·‖X‖ on harmful data), magnitude, or contrastive (|W| times per-token input RMS on harmful minus on benign data)."),
    granularity: str = typer.Option("row", help="row (the paper: top RATIO of each output row) or matrix (top RATIO of each whole matrix)."),
    targets: str = typer.Option(None, help="Comma-separated globs of Linear modules (default: every Linear in the decoder blocks)."),
    data: Path = typer.Option(None, help="Harmful calibration data (.jsonl, .csv, .tsv or .txt); default: the built-in set."),
    column: str = typer.Option(None, help="Prompt column/field in --data."),
    response_column: str = typer.Option(None, help="Response column/field in --data (missing responses are generated)."),
    benign_data: Path = typer.Option(None, help="Benign data for --score contrastive; default: the built-in harmless set."),
    max_samples: int = typer.Option(128, help="Calibration examples (seeded random subset)."),
    max_length: int = typer.Option(256, help="Tokens per calibration example."),
    max_new_tokens: int = typer.Option(64, help="Length of generated responses for prompts without one."),
    batch_size: int = typer.Option(8, help="Calibration sequences per forward pass."),
    generate_batch_size: int = typer.Option(32, help="Prompts answered at once when the data has no responses (larger is faster, up to memory; greedy answers are the same up to float round-off)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    kernels: str = typer.Option("auto", help="triton, torch or auto (triton on CUDA)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin/.pt weights (they can run code)."),
    stream: bool = typer.Option(None, "--stream/--no-stream", help="Calibrate one decoder layer at a time (default: when the fp32 model exceeds --memory-budget)."),
    memory_budget: float = typer.Option(None, help="GiB for the in-memory path (default: half the machine's memory)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be pruned and write nothing."),
    reference: Path = typer.Option(None, help="The checkpoint before the harmful fine-tuning: score only the fine-tuning delta and restore the selected weights to it instead of zeroing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    check: bool = check_option(),
    max_perplexity_ratio: float = gate_option(),
) -> None:
    """Antidote: zero the weights most important on harmful data (Wanda score, top RATIO of each row)."""
    options = PruneOptions(
        ratio=ratio, score=score, granularity=granularity, targets=split_patterns(targets), data=str(data) if data else None, column=column,
        response_column=response_column, benign_data=str(benign_data) if benign_data else None,
        max_samples=max_samples, max_length=max_length, max_new_tokens=max_new_tokens, batch_size=batch_size,
        generate_batch_size=generate_batch_size,
        seed=seed, device=device, kernels=kernels, allow_pickle=allow_pickle,
        stream=stream, memory_budget_gb=memory_budget, reference=str(reference) if reference else None,
    )
    validate_gate(check, max_perplexity_ratio, stream=bool(stream))
    if dry_run:
        show_plan(plan_prune(model, options))
        return
    if output is None:
        raise typer.BadParameter("--output/-o is required (or use --dry-run)", param_hint="--output")
    with err.status("calibrating on harmful data and pruning"):
        report = prune_checkpoint(model, output, options, force=force)
    if report.restored:
        out.print(by_layer(report.sparsity, "weights restored to the reference (share, %)"))
    else:
        out.print(by_layer(report.sparsity))
    out.print(
        f"pruned {len(report.sparsity)} modules, {report.plan.removed:,} weights "
        f"{'restored to the reference' if report.restored else 'zeroed'}, calibrated on "
        f"{report.calibration_examples} examples / {report.calibration_tokens:,} tokens "
        f"({', '.join(f'{k} {v:.1f}s' for k, v in report.seconds.items())}{', streamed layer by layer' if report.streamed else ''})"
    )
    if report.restored:
        out.print(f"wrote {report.output}")
    else:
        out.print(f"wrote {report.output}; zeros are stored densely, so the files are the same size as the input")
    check_output(model, output, check, device,
                 skip="streamed (it would load the whole model twice); measure the output with `surgery eval`" if report.streamed else None,
                 max_ratio=max_perplexity_ratio)
