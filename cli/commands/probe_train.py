"""`surgery probe-train`: a behaviour probe on pooled hidden states."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from surgery.probes.probe_train import PLOT_NAME, ProbeOptions, train_probe_checkpoint
from surgery.probes.train import MOSTLY_RANDOM, PAPER_BATCH

from ..build import check_json_path, write_json
from ..console import err, out, progress, summary


def probe_train_command(
    model: Path = typer.Argument(..., help="Checkpoint folder whose hidden states are read."),
    positive: Path = typer.Option(..., help="Examples of the undesired class (.jsonl/.csv/.tsv/.txt); probe row 1."),
    negative: Path = typer.Option(..., help="Examples of the other class; probe row 0."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the probe (probe.safetensors + probe.json)."),
    layer: str = typer.Option(
        "final",
        help="Hidden-state index (0 = embeddings), 'final' (post-norm, the paper's) or 'all' (table + plot; saves the final-layer probe).",
    ),
    pooling: str = typer.Option(
        "mean", help="How the pooled tokens (--pool) are reduced: mean (the paper's) or the last of them."
    ),
    pool: str = typer.Option(
        None,
        help="Which tokens are pooled: all (every non-pad token), content (the example's own text, "
        "not the tokens the chat template adds, its default system prompt included) or "
        "response (the answer only). Default: all for plain text; with --chat, response "
        "when every example has one, else content.",
    ),
    classifier: str = typer.Option(
        "logistic",
        help="logistic (regularised logistic regression, C by cross-validation) or "
        "paper (the paper's 2-class softmax head on raw states, Adam).",
    ),
    epochs: int = typer.Option(
        None, help="--classifier paper: epochs (default: the authors' 9; their data was ~144k examples)."
    ),
    lr: float = typer.Option(None, "--lr", help="--classifier paper: Adam learning rate (default: the authors' 1e-4)."),
    test_fraction: float = typer.Option(0.2, help="Held-out share of each class."),
    seed: int = typer.Option(0),
    chat: bool = typer.Option(
        False, "--chat", help="Render examples with the chat template (prompt + response when present)."
    ),
    positive_name: str = typer.Option(
        "undesired", help="Name of the --positive class, e.g. toxic or harmful-compliance."
    ),
    negative_name: str = typer.Option("desired", help="Name of the --negative class, e.g. non-toxic or refusal."),
    column: str = typer.Option(None, help="Text column/field in the data files."),
    response_column: str = typer.Option(None, help="Response column/field (used with --chat)."),
    max_samples: int = typer.Option(None, help="At most this many examples per class (seeded subset)."),
    max_length: int = typer.Option(256, help="Tokens per example."),
    batch_size: int = typer.Option(8),
    c: float = typer.Option(
        None,
        "--c",
        help="Logistic regression inverse regularisation strength (default: 5-fold cross-validation on the train split).",
    ),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    adapter: Path = typer.Option(None, help="A peft LoRA adapter folder on MODEL: the probe reads base + adapter."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    json_path: Path = typer.Option(
        None, "--json", help="Write the probe's report (accuracies, layer, sizes) as JSON to this file."
    ),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Accept .bin/.pt weights (read weights-only; loading them can run code)."
    ),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="Work on weights holding NaN or Inf (refused by default, before any work)."
    ),
) -> None:
    """Train a linear probe (logistic regression or the paper's softmax head) on pooled hidden states."""
    options = ProbeOptions(
        layer=layer,
        pooling=pooling,
        pool=pool,
        classifier=classifier,
        epochs=epochs,
        lr=lr,
        test_fraction=test_fraction,
        seed=seed,
        chat=chat,
        positive_name=positive_name,
        negative_name=negative_name,
        column=column,
        response_column=response_column,
        max_samples=max_samples,
        max_length=max_length,
        batch_size=batch_size,
        c=c,
        device=device,
        adapter=str(adapter) if adapter else None,
        allow_pickle=allow_pickle,
        allow_nonfinite=allow_nonfinite,
    )
    check_json_path(json_path, [model, positive, negative, adapter])
    with progress("reading hidden states and fitting the probe") as status:
        report = train_probe_checkpoint(model, positive, negative, output, options, force=force)
    meta = report.probe.meta
    if len(report.layer_accuracy) > 1:
        table = Table(
            "hidden state",
            "train acc",
            "held-out acc",
            title=f"{meta.labels[1]} vs {meta.labels[0]}: probe accuracy per layer",
        )
        for k, (tr, te) in sorted(report.layer_accuracy.items()):
            table.add_row(str(k) + (" (final)" if k == meta.num_layers else ""), f"{tr:.3f}", f"{te:.3f}")
        out.print(table)
        out.print(f"plot: {report.output / PLOT_NAME}")
    out.print(
        f"probe at hidden state {meta.layer}/{meta.num_layers} ({meta.pooling} of {meta.pool} tokens, {meta.classifier}): "
        f"train accuracy {meta.train_accuracy:.3f} ({meta.n_train} examples), held-out {meta.test_accuracy:.3f} "
        f"({meta.n_test}); row 1 = {meta.labels[1]}"
    )
    probe = report.probe
    factor = probe.paper_alpha_per_alpha
    out.print(
        f"‖w‖ = {float(probe.direction.norm()):.4g}: `surgery edit --alpha A` adds A·w to each selected gate row, "
        f"which is the paper's alpha {factor:g}·A (`surgery edit` also prints the step relative to the rows' norm)"
    )
    if meta.classifier == "paper":
        line = (
            f"paper classifier: {meta.steps} Adam steps (lr {meta.lr:g}, batch {PAPER_BATCH}, {meta.epochs} epochs); "
            f"random initialisation share of W[1] {meta.init_share:.2f} (|W1_init| / (|W1_init| + |W1 - W1_init|))"
        )
        out.print(line)
        if meta.init_share > MOSTLY_RANDOM:
            err.print(
                f"warning: W[1] is more random initialisation than learned direction after {meta.steps} steps (the "
                f"authors ran about 81k): raise --epochs or --lr, or use --classifier logistic",
                style="bold red",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    out.print(f"wrote {report.output} ({', '.join(f'{k} {v:.1f}s' for k, v in report.seconds.items())})")
    from dataclasses import asdict, is_dataclass

    write_json(
        json_path,
        {
            "command": "probe-train",
            "exit_status": 0,
            "output": str(report.output),
            "probe": asdict(meta) if is_dataclass(meta) else vars(meta),
            "layer_accuracy": {str(k): list(v) for k, v in report.layer_accuracy.items()},
            "seconds": report.seconds,
        },
    )
    summary(
        f"probe-train wrote {report.output}: hidden state {meta.layer}/{meta.num_layers}, held-out accuracy "
        f"{meta.test_accuracy:.3f} on {meta.n_test} examples, {status.elapsed():.0f} s"
    )
