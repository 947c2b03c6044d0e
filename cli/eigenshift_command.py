"""`surgery eigenshift`: damp the output-layer components that drive toxic generations."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from surgery.eigenshift import EigenShiftOptions, eigenshift_checkpoint

from .console import err, out
from .main import app


@app.command("eigenshift")
def eigenshift_command(
    model: Path = typer.Argument(..., help="Checkpoint folder to repair (never modified)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the repaired checkpoint."),
    prompts: Path = typer.Option(None, help="Prompts to continue (.txt one per line, .jsonl, .csv/.tsv), e.g. RealToxicityPrompts."),
    column: str = typer.Option(None, help="Prompt column/field in --prompts and --eval-prompts."),
    max_samples: int = typer.Option(None, help="Use a seeded random subset of this many prompts."),
    k: int = typer.Option(None, "--k", help="Components to damp (default: 25% of the rank, the paper's headline)."),
    percentile: float = typer.Option(None, help="Components to damp, as a percent of the rank (instead of --k)."),
    alpha: float = typer.Option(0.9, help="Scale for the chosen singular values, in [0, 1]: 0.9 the paper's safe setting, 0 its headline."),
    projection: str = typer.Option("paper", help="paper (v_iᵀh) or legacy (the released code's V h)."),
    rank_by: str = typer.Option("signed", help="signed (Δ_i, signs canonicalised) or abs (|Δ_i|)."),
    signs: str = typer.Option("canonical", help="canonical (largest |u_i| entry positive) or svd (as the SVD returns them)."),
    judge: str = typer.Option("profanity", help="Toxicity judge: profanity (alt-profanity-check) or classifier:PATH[@LABEL]."),
    threshold: float = typer.Option(0.5, help="Judge probability at or above which a text is toxic."),
    max_new_tokens: int = typer.Option(32, help="Length of each continuation."),
    batch_size: int = typer.Option(8),
    chat: bool = typer.Option(False, "--chat", help="Render prompts with the chat template (default: plain-text continuation)."),
    sample: bool = typer.Option(False, "--sample", help="Seeded nucleus sampling (top-p 0.9) instead of greedy decoding."),
    seed: int = typer.Option(0),
    states: Path = typer.Option(None, help="Hidden-state file (safetensors): reused if it exists, else collected and saved."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Measure toxicity and perplexity before and after."),
    eval_prompts: Path = typer.Option(None, help="Held-out prompts for the toxicity figure (default: the collection prompts)."),
    ppl_text: Path = typer.Option(None, help="Texts for perplexity (default: the built-in harmless set)."),
    max_eval_samples: int = typer.Option(200, help="At most this many eval prompts and perplexity texts."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """EigenShift: SVD the output head and scale the singular values of the components toxic states load on."""
    options = EigenShiftOptions(
        prompts=str(prompts) if prompts else None, column=column, max_samples=max_samples, k=k, percentile=percentile,
        alpha=alpha, projection=projection, rank_by=rank_by, signs=signs, judge=judge, threshold=threshold,
        max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat, sample=sample, seed=seed,
        states=str(states) if states else None, evaluate=evaluate, eval_prompts=str(eval_prompts) if eval_prompts else None,
        ppl_text=str(ppl_text) if ppl_text else None, max_eval_samples=max_eval_samples, device=device,
    )
    with err.status("collecting hidden states, decomposing the head and editing"):
        report = eigenshift_checkpoint(model, output, options, force=force)
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
    out.print(f"wrote {report.output} ({', '.join(f'{k_} {v:.1f}s' for k_, v in report.seconds.items())})")
