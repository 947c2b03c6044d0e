"""Options every method has (declared once, inherited by each method's options dataclass)."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import option, validate_fields


@dataclass
class MethodOptions:
    device: str = option("auto", "cpu, cuda or auto.")
    allow_pickle: bool = option(
        False,
        "Accept .bin/.pt weights (loading them can run code); never used when safetensors exist.",
        flag="--allow-pickle",
    )
    adapter: str | None = option(
        None,
        "A peft LoRA adapter folder on top of MODEL (the base): the repair applies to base + adapter.",
        folder=True,
    )

    def validate(self) -> None:
        """Every rule the schema declares (a method's cross-field rules are in its `Method.validate`)."""
        validate_fields(self)
