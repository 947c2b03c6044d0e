"""`surgery probe-train`: a behaviour probe on pooled hidden states."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from probes.probe_train import PLOT_NAME, ProbeOptions, train_probe_checkpoint

from ..console import err, out


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


