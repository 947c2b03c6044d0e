"""The after-write check shared by the repair commands (`prune`, `edit`, `ablate`)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import typer

from surgery.errors import SurgeryError
from surgery.health import CHECK_SAMPLES, health_check, record_check

from .console import err, out


def check_option():
    return typer.Option(True, "--check/--no-check",
                        help=f"After writing, compare perplexity and first-token KL of input and output on {CHECK_SAMPLES} "
                             "built-in harmless prompts (recorded in surgery.json; warns when the output looks broken).")


def gate_option():
    return typer.Option(None, "--max-perplexity-ratio",
                        help="CI gate: exit 1 when the check finds the output's perplexity more than this many times the "
                             "input's (the output stays written, the check in its surgery.json).")


def validate_gate(check: bool, max_ratio: float | None, stream: bool = False) -> None:
    """Refuse a gate that could never be evaluated, before any work is done."""
    if max_ratio is None:
        return
    if not (math.isfinite(max_ratio) and max_ratio >= 1):
        raise SurgeryError(f"--max-perplexity-ratio must be a factor of 1 or more, got {max_ratio}")
    if not check:
        raise SurgeryError("--max-perplexity-ratio needs the after-write check: drop --no-check")
    if stream:
        raise SurgeryError("--max-perplexity-ratio needs the after-write check, which --stream skips")


def gate_failed(message: str) -> None:
    err.print(f"[bold red]gate failed:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(1)


def check_output(model: Path, output: Path, enabled: bool, device: str = "auto", skip: str | None = None,
                 max_ratio: float | None = None) -> None:
    """Run the after-write check, record it in the output's manifest; with `max_ratio`, exit 1 past the bar."""
    if not enabled:
        return
    if skip:
        out.print(f"check skipped: {skip}")
        if max_ratio is not None:
            gate_failed(f"--max-perplexity-ratio could not be evaluated (check skipped: {skip.split(';')[0]})")
        return
    try:
        with err.status("checking the output on harmless prompts"):
            check = health_check(model, output, device=device)
    except Exception as e:  # the repair itself is written and complete: say why it was not checked, do not fail it
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        out.print(f"check skipped: {why} (the output is written)")
        if max_ratio is not None:
            gate_failed(f"--max-perplexity-ratio could not be evaluated (check skipped: {why})")
        return
    record_check(output, check)
    out.print(check.summary(), style="bold red" if check.broken else None)
    if max_ratio is not None and not check.perplexity_ratio <= max_ratio:  # NaN fails the gate
        gate_failed(f"perplexity on the check grew x{check.perplexity_ratio:.2f}, above --max-perplexity-ratio {max_ratio:g} "
                    f"({output} is written; its check is in surgery.json)")
