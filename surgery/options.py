"""One schema for every option: a dataclass field carries its default, help text, flag and validation.

The command line is generated from these fields (`cli/build.py`), so a default or a help text exists
once. `validate_fields` checks what the metadata declares; a method's cross-field rules stay in its
own `validate`.

    ratio: float | str = option(0.05, "Fraction of each row to remove.", strength=True, fraction=True)
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

from .errors import SurgeryError

AUTO = "auto"


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    short: str | None = None,
    choices: tuple[str, ...] | None = None,
    positive: bool = False,
    non_negative: bool = False,
    fraction: bool = False,
    low: float | None = None,
    high: float | None = None,
    file: bool = False,
    folder: bool = False,
    patterns: bool = False,
    strength: bool = False,
    hidden: bool = False,
    required: bool = False,
) -> Any:
    """A dataclass field with its command-line description.

    flag: the option's spelling (default `--name-with-dashes`; `--x/--no-x` for a switch that is on by default).
    choices: allowed strings. positive / non_negative / fraction (open interval 0..1) / low..high (closed):
    numeric rules. file / folder: the value names an existing file / folder. patterns: a comma-separated
    list on the command line. strength: the method's strength knob, which also accepts `auto` (searched
    under the utility budget by the driver). hidden: kept out of `--help`.
    """
    meta = {
        "help": help,
        "flag": flag,
        "short": short,
        "choices": choices,
        "positive": positive,
        "non_negative": non_negative,
        "fraction": fraction,
        "low": low,
        "high": high,
        "file": file,
        "folder": folder,
        "patterns": patterns,
        "strength": strength,
        "hidden": hidden,
        "required": required,
    }
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    spelled = f.metadata.get("flag")
    return spelled.split("/")[0] if spelled else "--" + f.name.replace("_", "-")


def option_fields(cls) -> list[dataclasses.Field]:
    """The fields of an options class that carry a command-line description, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


def parse_strength(f: dataclasses.Field, value: Any) -> float | str | None:
    """A strength knob from the command line: a number, or `auto`."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise SurgeryError(f"{flag_of(f)} must be a number or 'auto', got '{value}'") from None


def validate_fields(options) -> None:
    """Every rule the schema declares, checked before any model is loaded (first failure raised)."""
    for f in option_fields(type(options)):
        value = getattr(options, f.name)
        if value is None:
            continue
        m, name = f.metadata, flag_of(f)
        if m["strength"]:
            value = parse_strength(f, value)
            setattr(options, f.name, value)
            if is_auto(value):
                continue
        if m["choices"] and value not in m["choices"]:
            raise SurgeryError(f"{name} must be one of {', '.join(m['choices'])}, got '{value}'")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_number(name, float(value), m)
        if m["file"] and not Path(value).is_file():
            raise SurgeryError(
                f"{name} {value} does not exist" if not Path(value).exists() else f"{name} {value} is not a file"
            )
        if m["folder"] and not Path(value).is_dir():
            raise SurgeryError(
                f"{name} {value} does not exist" if not Path(value).exists() else f"{name} {value} is not a folder"
            )


def _check_number(name: str, value: float, m: dict) -> None:
    if not math.isfinite(value):
        raise SurgeryError(f"{name} must be a finite number, got {value}")
    if m["positive"] and not value > 0:
        raise SurgeryError(f"{name} must be positive, got {value:g}")
    if m["non_negative"] and not value >= 0:
        raise SurgeryError(f"{name} must be zero or more, got {value:g}")
    if m["fraction"] and not 0.0 < value < 1.0:
        raise SurgeryError(f"{name} must be between 0 and 1 (exclusive), got {value:g}")
    if m["low"] is not None and m["high"] is not None and not m["low"] <= value <= m["high"]:
        raise SurgeryError(f"{name} must be between {m['low']:g} and {m['high']:g}, got {value:g}")
    if m["low"] is not None and value < m["low"]:
        raise SurgeryError(f"{name} must be at least {m['low']:g}, got {value:g}")
    if m["high"] is not None and value > m["high"]:
        raise SurgeryError(f"{name} must be at most {m['high']:g}, got {value:g}")


def arguments(options) -> dict:
    """The options as plain data, for the manifest."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(options).items()}
