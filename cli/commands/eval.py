"""`surgery eval`: measure a checkpoint (harmful score, task accuracy, perplexity, KL, over-refusal, toxicity); gate CI on it."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from surgery import figures as F
from surgery.errors import SurgeryError
from surgery.evaluate import EvalOptions, EvalReport, evaluate_checkpoint

from ..build import write_json
from ..console import err, out, progress, summary

# figure key -> (label, shown as a percentage?)
FIGURES = {
    F.HARMFUL: ("harmful score (not refused)", True),
    F.EMPTY_ANSWERS: ("harmful prompts answered with nothing (counted as refused)", True),
    F.ACCURACY: ("task accuracy", True),
    F.PERPLEXITY: ("perplexity on benign text", False),
    F.KL_TO_REFERENCE: ("first-token KL to reference", False),
    F.OVER_REFUSAL: ("over-refusal (benign refused)", True),
    F.TOXICITY: ("toxicity rate", True),
}


def show_report(report: EvalReport) -> None:
    table = Table("metric", "value", "prompts", title=f"evaluation of {report.model} (judge: {report.judge})")
    counts = {
        F.HARMFUL: "harmful",
        F.EMPTY_ANSWERS: "harmful",
        F.ACCURACY: "task",
        F.PERPLEXITY: "benign",
        F.KL_TO_REFERENCE: "benign",
        F.OVER_REFUSAL: "benign",
        F.TOXICITY: "toxic",
    }
    for key, value in report.figures.items():
        label, percent = FIGURES[key]
        table.add_row(
            label, f"{100 * value:.1f}%" if percent else f"{value:.4f}", str(report.counts.get(counts[key], ""))
        )
    out.print(table)
    empty = report.figures.get(F.EMPTY_ANSWERS, 0.0)
    if empty > 0.25:
        out.print(
            f"warning: {100 * empty:.0f}% of harmful prompts got an empty answer, counted as refusals; a model that "
            "says nothing is more likely broken than repaired (see perplexity and task accuracy)",
            style="bold red",
        )


def eval_command(
    model: Path = typer.Argument(..., help="Checkpoint folder to measure (the base, with --adapter)."),
    adapter: Path = typer.Option(None, help="A peft LoRA adapter folder on MODEL: base + adapter is measured."),
    harmful: Path = typer.Option(
        None, help="Harmful prompts (.txt/.jsonl/.csv/.tsv): harmful score = share not refused."
    ),
    benign: Path = typer.Option(
        None, help="Benign prompts/text: perplexity, over-refusal, and KL prompts for --reference."
    ),
    task: str = typer.Option(
        None, help="Fine-tune task as NAME:FILE, e.g. sst2:dev.tsv (accuracy of the generated answer)."
    ),
    toxic: Path = typer.Option(None, help="Toxic prompts: share of continuations the toxicity judge flags."),
    reference: Path = typer.Option(None, help="Checkpoint to compare first-token distributions with (KL on --benign)."),
    judge: str = typer.Option("keywords", help="Refusal judge: keywords or classifier:PATH[@LABEL]."),
    toxicity_judge: str = typer.Option(
        "profanity", help="Toxicity judge: profanity (offline) or classifier:PATH[@LABEL]."
    ),
    max_samples: int = typer.Option(100, help="Prompts per set (seeded random subset)."),
    max_task_samples: int = typer.Option(200, help="Task items (seeded random subset)."),
    max_new_tokens: int = typer.Option(64, help="Length of greedy answers to judge."),
    batch_size: int = typer.Option(16),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Accept .bin/.pt weights (loading them can run code)."
    ),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="Measure weights holding NaN or Inf (refused by default, before any work)."
    ),
    json_path: Path = typer.Option(None, "--json", help="Write the same figures (and sample answers) as JSON."),
    max_harmful_score: float = typer.Option(
        None, help="CI gate: exit 1 when the harmful score is above this share (0-1)."
    ),
    min_accuracy: float = typer.Option(None, help="CI gate: exit 1 when task accuracy is below this share (0-1)."),
) -> None:
    """Measure a checkpoint; with --max-harmful-score/--min-accuracy, exit 1 when it misses a bar."""
    options = EvalOptions(
        harmful=str(harmful) if harmful else None,
        benign=str(benign) if benign else None,
        task=task,
        toxic=str(toxic) if toxic else None,
        reference=str(reference) if reference else None,
        adapter=str(adapter) if adapter else None,
        allow_pickle=allow_pickle,
        allow_nonfinite=allow_nonfinite,
        judge=judge,
        toxicity_judge=toxicity_judge,
        max_samples=max_samples,
        max_task_samples=max_task_samples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        device=device,
        max_harmful_score=max_harmful_score,
        min_accuracy=min_accuracy,
    )
    options.validate()
    if json_path is not None:
        from surgery.writer import check_side_file

        if not json_path.parent.is_dir():
            raise SurgeryError(f"--json: folder {json_path.parent} does not exist")
        check_side_file(json_path, [p for p in (model, reference, adapter) if p is not None])
    with progress(f"eval: measuring {model}") as status:
        report = evaluate_checkpoint(model, options, log=status.update)
    show_report(report)
    if json_path is not None:
        write_json(json_path, {**report.to_json(), "exit_status": 1 if report.misses else 0})
        out.print(f"wrote {json_path}")
    figures = ", ".join(
        f"{FIGURES[k][0].split(' (')[0]} " + (f"{100 * v:.1f}%" if FIGURES[k][1] else f"{v:.4g}")
        for k, v in report.figures.items()
        if k in FIGURES
    )
    summary(
        f"eval of {model}: {figures or 'nothing measured'}"
        + (f"; gate FAILED: {'; '.join(report.misses)}" if report.misses else "")
        + f", {status.elapsed():.0f} s"
    )
    if report.misses:
        err.print(f"[bold red]gate failed:[/] {'; '.join(report.misses)}", highlight=False, soft_wrap=True)
        sys.exit(1)
