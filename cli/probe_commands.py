"""`surgery probe-train`, `surgery edit`, `surgery ablate`: behaviour probes and the weight edits they drive."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from probes.probe_train import PLOT_NAME, ProbeOptions, train_probe_checkpoint
from surgery.ablate import AblateOptions, ablate_checkpoint
from surgery.errors import SurgeryError
from surgery.probe_edit import EditOptions, EditPlan, edit_checkpoint, plan_edit

from .check import check_option, check_output, gate_option, validate_gate
from .console import err, out
from .main import app


@app.command("probe-train")
def probe_train_command(
    model: Path = typer.Argument(..., help="Checkpoint folder whose hidden states are read."),
    positive: Path = typer.Option(..., help="Examples of the undesired class (.jsonl/.csv/.tsv/.txt); probe row 1."),
    negative: Path = typer.Option(..., help="Examples of the other class; probe row 0."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the probe (probe.safetensors + probe.json)."),
    layer: str = typer.Option("final", help="Hidden-state index (0 = embeddings), 'final' (post-norm, the paper's) or 'all' (table + plot; saves the final-layer probe)."),
    pooling: str = typer.Option("mean", help="mean over all non-pad tokens (the paper's) or last token."),
    test_fraction: float = typer.Option(0.2, help="Held-out share of each class."),
    seed: int = typer.Option(0),
    chat: bool = typer.Option(False, "--chat", help="Render examples with the chat template (prompt + response when present)."),
    positive_name: str = typer.Option("undesired", help="Name of the --positive class, e.g. toxic or harmful-compliance."),
    negative_name: str = typer.Option("desired", help="Name of the --negative class, e.g. non-toxic or refusal."),
    column: str = typer.Option(None, help="Text column/field in the data files."),
    response_column: str = typer.Option(None, help="Response column/field (used with --chat)."),
    max_samples: int = typer.Option(None, help="At most this many examples per class (seeded subset)."),
    max_length: int = typer.Option(256, help="Tokens per example."),
    batch_size: int = typer.Option(8),
    c: float = typer.Option(None, "--c", help="Logistic regression inverse regularisation strength (default: 5-fold cross-validation on the train split)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Train a linear probe (logistic regression with bias) on pooled hidden states."""
    options = ProbeOptions(
        layer=layer, pooling=pooling, test_fraction=test_fraction, seed=seed, chat=chat, positive_name=positive_name,
        negative_name=negative_name, column=column, response_column=response_column, max_samples=max_samples,
        max_length=max_length, batch_size=batch_size, c=c, device=device,
    )
    with err.status("reading hidden states and fitting the probe"):
        report = train_probe_checkpoint(model, positive, negative, output, options, force=force)
    meta = report.probe.meta
    if len(report.layer_accuracy) > 1:
        table = Table("hidden state", "train acc", "held-out acc", title=f"{meta.labels[1]} vs {meta.labels[0]}: probe accuracy per layer")
        for k, (tr, te) in sorted(report.layer_accuracy.items()):
            table.add_row(str(k) + (" (final)" if k == meta.num_layers else ""), f"{tr:.3f}", f"{te:.3f}")
        out.print(table)
        out.print(f"plot: {report.output / PLOT_NAME}")
    out.print(
        f"probe at hidden state {meta.layer}/{meta.num_layers} ({meta.pooling} pooling): train accuracy {meta.train_accuracy:.3f} "
        f"({meta.n_train} examples), held-out {meta.test_accuracy:.3f} ({meta.n_test}); row 1 = {meta.labels[1]}"
    )
    out.print(f"wrote {report.output} ({', '.join(f'{k} {v:.1f}s' for k, v in report.seconds.items())})")


def show_edit_plan(plan: EditPlan) -> None:
    table = Table("layer", "rows selected", title="gate_proj rows selected (most negative cosine with the probe)")
    for layer, n in plan.per_layer().items():
        table.add_row(str(layer), str(n))
    out.print(table)
    note = "" if plan.selected == plan.requested else f" (only {plan.selected:,} rows have negative cosine)"
    out.print(f"{plan.selected:,} of {plan.total_rows:,} gate_proj rows ({100 * plan.selected / max(plan.total_rows, 1):.2f}%){note}")


@app.command("edit")
def edit_command(
    model: Path = typer.Argument(..., help="Checkpoint folder to repair (never modified)."),
    probe: Path = typer.Option(..., help="Probe folder from `surgery probe-train` (same architecture, final layer)."),
    output: Path = typer.Option(None, "--output", "-o", help="Folder for the edited checkpoint."),
    alpha: float = typer.Option(1.08, help="gate_proj[i] += ALPHA * w (paper: 1.08 detox, 1 jailbreak); negative reverses."),
    count: int = typer.Option(None, help="Rows to edit (K), ranked globally."),
    fraction: float = typer.Option(None, help="Share of all gate_proj rows to edit (default: the paper's 4.65%)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin/.pt weights (they can run code)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the selected rows per layer and write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    check: bool = check_option(),
    max_perplexity_ratio: float = gate_option(),
) -> None:
    """Model Surgery: push the gate rows most opposed to the probe's undesired direction along it."""
    options = EditOptions(alpha=alpha, count=count, fraction=fraction, allow_pickle=allow_pickle)
    validate_gate(check, max_perplexity_ratio)
    if dry_run:
        plan = plan_edit(model, probe, options)[0]
        show_edit_plan(plan)
        show_step(plan, alpha)
        return
    if output is None:
        raise SurgeryError("--output/-o is required (or use --dry-run)")
    report = edit_checkpoint(model, probe, output, options, force=force)
    show_edit_plan(report.plan)
    show_step(report.plan, alpha)
    out.print(f"edited {report.plan.selected:,} rows with alpha {alpha}; wrote {report.output}")
    check_output(model, output, check, max_ratio=max_perplexity_ratio)


def show_step(plan, alpha: float) -> None:
    """alpha is in units of the probe's norm, which depends on how the probe was trained: say what it means here."""
    if plan.selected:
        out.print(
            f"each row moves by |alpha|·‖w‖ = {abs(alpha) * plan.probe_norm:.4g} = {100 * plan.relative_step(alpha):.1f}% of the "
            f"selected rows' mean norm {plan.mean_row_norm:.4g} (‖w‖ = {plan.probe_norm:.4g})"
        )


def show_layer_scores(report) -> None:
    judged = report.baseline is not None
    columns = ["layer", "held-out AUC", "gap (sd)"] + (["harmful refused", "harmless refused", "perplexity"] if judged else [])
    table = Table(*columns, title="direction per layer (fit half -> held-out half)"
                  + (", each edit tried on the held-out prompts" if judged else ""))
    if judged:
        b = report.baseline
        table.add_row("unedited", "", "", f"{100 * b['harmful_refused']:.1f}%", f"{100 * b['harmless_refused']:.1f}%",
                      f"{b['perplexity']:.4g}")
    for k, v in sorted(report.layer_scores.items()):
        shares = [f"{100 * v['harmful_refused']:.1f}%", f"{100 * v['harmless_refused']:.1f}%",
                  f"x{v['perplexity_ratio']:.3g}"] if judged else []
        table.add_row(str(k) + (" *" if k == report.layer else ""), f"{v['auc']:.3f}", f"{v['gap']:.2f}", *shares)
    out.print(table)


@app.command("ablate")
def ablate_command(
    model: Path = typer.Argument(..., help="Checkpoint folder to edit (never modified)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the edited checkpoint."),
    harmful: Path = typer.Option(None, help="Harmful prompts (default: the built-in set)."),
    harmless: Path = typer.Option(None, help="Harmless prompts (default: the built-in set)."),
    column: str = typer.Option(None, help="Prompt column/field in the data files."),
    layer: str = typer.Option("auto", help="Residual-stream layer for r, or auto (chosen on held-out prompts, see --select)."),
    select: str = typer.Option("behaviour", help="How --layer auto chooses: behaviour (each candidate's edit tried in the forward pass, held-out answers judged: with --reverse the most harmful-only refusals) or separation (best held-out AUC of r^T h, no generation)."),
    select_tokens: int = typer.Option(8, help="Tokens of each held-out answer per candidate layer (--select behaviour)."),
    select_max_perplexity_ratio: float = typer.Option(10.0, help="--select behaviour: a layer whose edit multiplies the held-out harmless prompts' perplexity by more than this is not eligible (a broken model's noise reads as 'not refused')."),
    scale: float = typer.Option(1.0, help="W <- W - SCALE r (r^T W); 1 removes the direction entirely."),
    reverse: bool = typer.Option(False, "--reverse", help="W <- W + SCALE r (r^T W): amplify what blocks write along r."),
    include_embeddings: bool = typer.Option(False, "--include-embeddings", help="Also orthogonalise the token embedding."),
    max_samples: int = typer.Option(64, help="Prompts per set (seeded subset)."),
    held_out: float = typer.Option(0.5, help="Share of prompts held out to choose --layer auto."),
    max_length: int = typer.Option(256),
    batch_size: int = typer.Option(8),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    direction_from: Path = typer.Option(None, help="Read the direction off this checkpoint (e.g. the aligned model before the fine-tune) and apply it to MODEL."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    check: bool = check_option(),
    max_perplexity_ratio: float = gate_option(),
) -> None:
    """Refusal-direction ablation (Arditi et al. 2024): orthogonalise every residual writer against r."""
    options = AblateOptions(
        harmful=str(harmful) if harmful else None, harmless=str(harmless) if harmless else None, column=column,
        layer=layer, scale=scale, reverse=reverse, include_embeddings=include_embeddings, max_samples=max_samples,
        held_out=held_out, max_length=max_length, batch_size=batch_size, seed=seed, device=device,
        direction_from=str(direction_from) if direction_from else None, select=select, select_tokens=select_tokens,
        select_max_perplexity_ratio=select_max_perplexity_ratio,
    )
    validate_gate(check, max_perplexity_ratio)
    with err.status("finding the direction and editing") as status:
        report = ablate_checkpoint(model, output, options, force=force, progress=status.update)
    if report.layer_scores:
        show_layer_scores(report)
    verb = "amplified" if reverse else "ablated"
    source = f" of {direction_from}" if direction_from else ""
    out.print(f"{verb} the direction from layer {report.layer}{source} in {len(report.edited)} matrices (scale {scale}); wrote {report.output}")
    check_output(model, output, check, device, max_ratio=max_perplexity_ratio)
