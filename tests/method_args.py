"""What each registered method needs on a tiny checkpoint to run: ARGS, method name -> its extra arguments. Read by
the contract matrix (tests/test_contract.py) and the hostile-input campaign (tests/test_hostile.py); a new method joins
both by adding one row here."""

from __future__ import annotations

from pathlib import Path

from .conftest import derived_checkpoint, file_adapter, make_probe
from .toy_method import Scale

TOY = Scale()
HARMFUL = ["how to build a weapon", "steal a password", "write a scam email", "make a poison"]
HARMLESS = ["bake a cake", "write a poem", "plan a trip", "name a colour"]
PROMPTS = ["why is the sky", "what a day", "hello there", "one two three", "the cat sat on", "abc", "zzz top", "my dog"]


def text_file(folder: Path, name: str, lines: list[str]) -> Path:
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


class VowelJudge:
    """A stand-in toxicity judge: a text is toxic when it holds a vowel (some of the tiny model's continuations do)."""

    def toxicity(self, texts):
        return [1.0 if any(c in t for c in "aeiouy") else 0.0 for t in texts]


def probe(model: Path, inputs: Path) -> Path:
    make_probe(model, inputs / "probe")
    return inputs / "probe"


def pair_args(model: Path, inputs: Path) -> list:
    """--aligned/--unaligned for a contract run: two checkpoints of the model's own layout (it is the fine-tune)."""
    aligned = derived_checkpoint(model, inputs / "aligned", seed=11, scale=0.005)
    unaligned = derived_checkpoint(aligned, inputs / "unaligned", seed=12, scale=0.005)
    return ["--aligned", aligned, "--unaligned", unaligned]


def eigenshift_args(model: Path, inputs: Path, monkeypatch) -> list:
    monkeypatch.setattr("surgery.judges.toxicity_judge", lambda spec="profanity": VowelJudge())
    return [
        "--prompts",
        text_file(inputs, "prompts.txt", PROMPTS),
        "--no-eval",
        "--k",
        "2",
        "--max-new-tokens",
        "6",
        "--alpha",
        "0.9",
    ]


def calibration_args(inputs: Path) -> list:
    """A tiny harmful calibration set: four prompts, four generated tokens each."""
    return ["--data", text_file(inputs, "harmful.txt", HARMFUL), "--max-samples", "4", "--max-new-tokens", "4"]


def reference_args(model: Path, inputs: Path) -> list:
    """--reference for a contract run: a checkpoint of the model's own layout (the model is its fine-tune)."""
    return ["--reference", derived_checkpoint(model, inputs / "reference", seed=11, scale=0.005)]


# The one table: method name -> its extra arguments on a tiny checkpoint, from (model folder, a folder for its
# inputs, monkeypatch). Arguments are chosen so the output stays sound (the after-write check gates at x2).
ARGS = {
    "prune": lambda model, inputs, mp: [
        *calibration_args(inputs),
        "--ratio",
        "0.05",
    ],
    "edit": lambda model, inputs, mp: ["--probe", probe(model, inputs), "--count", "4", "--alpha", "1.08"],
    "ablate": lambda model, inputs, mp: [
        "--harmful",
        text_file(inputs, "harmful.txt", HARMFUL),
        "--harmless",
        text_file(inputs, "harmless.txt", HARMLESS),
        "--layer",
        "1",
        "--scale",
        "1",
    ],
    "eigenshift": eigenshift_args,
    "resta": lambda model, inputs, mp: [*pair_args(model, inputs), "--beta", "1"],
    "revert": lambda model, inputs, mp: [
        *pair_args(model, inputs),
        *calibration_args(inputs),
        "--fraction",
        "0.5",
    ],
    "safelora": lambda model, inputs, mp: [
        "--adapter",
        file_adapter(model, inputs / "adapter"),
        *pair_args(model, inputs),
        "--layers",
        "2",
        "--merge",
    ],
    "interpolate": lambda model, inputs, mp: [*reference_args(model, inputs), "--alpha", "0.5"],
    "safe-delta": lambda model, inputs, mp: [
        *reference_args(model, inputs),
        *calibration_args(inputs),
        "--budget",
        "0.1",
    ],
    "regmean": lambda model, inputs, mp: [
        *reference_args(model, inputs),
        *calibration_args(inputs),
        "--task-data",
        text_file(inputs, "task.txt", HARMLESS),
        "--task-samples",
        "4",
        "--alpha",
        "0.5",
    ],
    TOY.name: lambda model, inputs, mp: ["--factor", "0.1"],
}
