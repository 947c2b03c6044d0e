"""The after-write check shared by the repair commands (`prune`, `edit`, `ablate`)."""

from __future__ import annotations

from pathlib import Path

import typer

from surgery.health import CHECK_SAMPLES, health_check, record_check

from .console import err, out


def check_option():
    return typer.Option(True, "--check/--no-check",
                        help=f"After writing, compare perplexity and first-token KL of input and output on {CHECK_SAMPLES} "
                             "built-in harmless prompts (recorded in surgery.json; warns when the output looks broken).")


def check_output(model: Path, output: Path, enabled: bool, device: str = "auto", skip: str | None = None) -> None:
    if not enabled:
        return
    if skip:
        out.print(f"check skipped: {skip}")
        return
    try:
        with err.status("checking the output on harmless prompts"):
            check = health_check(model, output, device=device)
    except Exception as e:  # the repair itself is written and complete: say why it was not checked, do not fail it
        out.print(f"check skipped: {str(e).splitlines()[0] if str(e) else type(e).__name__} (the output is written)")
        return
    record_check(output, check)
    out.print(check.summary(), style="bold red" if check.broken else None)
