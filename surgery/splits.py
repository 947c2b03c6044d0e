"""Which prompts are for what: calibration, selection and the after-write check never share a prompt.

The built-in request sets (320 harmful, 320 harmless, 8 categories, written for this project) are cut
once, by a fixed seeded permutation, into three disjoint parts:

    selection    48 prompts   what an automatic strength search or layer choice looks at
    check        32 prompts   the after-write check of every repair command
    calibration  the rest     what a method learns from (statistics, directions)

A user's own data file is cut the same way when a search needs a held-out part of it (`hold_out`).
Evaluation sets (AdvBench, SST-2 dev, Alpaca in the lab) are never any of these.
"""

from __future__ import annotations

import random

from .prompts import Example, builtin_prompts, load_examples

SELECTION, CHECK, CALIBRATION = "selection", "check", "calibration"
PART_SIZES = {SELECTION: 48, CHECK: 32}
_PERMUTATION_SEED = 20261201


def builtin_part(kind: str, part: str) -> list[Example]:
    """One part of a built-in set, in a fixed order (the same on every machine and version of Python)."""
    prompts = builtin_prompts(kind)
    order = list(range(len(prompts)))
    random.Random(_PERMUTATION_SEED).shuffle(order)
    cut = PART_SIZES[SELECTION]
    bounds = {
        SELECTION: (0, cut),
        CHECK: (cut, cut + PART_SIZES[CHECK]),
        CALIBRATION: (cut + PART_SIZES[CHECK], len(order)),
    }
    start, end = bounds[part]
    return [prompts[i] for i in sorted(order[start:end])]


def sample(examples: list[Example], max_samples: int | None, seed: int) -> list[Example]:
    """A seeded random subset of at most `max_samples`, in the original order (all of them when None)."""
    if max_samples is None or len(examples) <= max_samples:
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), max_samples))
    return [examples[i] for i in keep]


def hold_out(examples: list[Example], count: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(kept, held_out): a seeded `count` of the examples held out (at most a quarter, at least 2 kept)."""
    count = max(0, min(count, len(examples) // 4))
    rng = random.Random(seed + 1)
    chosen = set(rng.sample(range(len(examples)), count)) if count else set()
    kept = [e for i, e in enumerate(examples) if i not in chosen]
    return kept, [e for i, e in enumerate(examples) if i in chosen]


def examples_for(
    path,
    *,
    builtin: str,
    part: str = CALIBRATION,
    column: str | None = None,
    response_column: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """A user's data file (all of it, or a seeded subset), or with no file the named part of a built-in set."""
    if path is not None:
        return load_examples(path, column=column, response_column=response_column, max_samples=max_samples, seed=seed)
    examples = builtin_part(builtin, part)
    if max_samples is not None and max_samples < len(examples):
        examples = random.Random(seed).sample(examples, max_samples)
    return examples
