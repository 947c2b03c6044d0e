"""The built-in sentiment task (`--task sst2:builtin`): 242 short sentences written for this project, each labelled
0 (negative) or 1 (positive), in the SST-2 format, so a demonstration can fine-tune, search and evaluate a task with
no data outside the package. Cut once, balanced by label, into three disjoint parts:

    selection    48 sentences (24 per label)   what an automatic strength search measures the task on
    evaluation   48 sentences (24 per label)   what `surgery eval --task sst2:builtin` reports
    train        the rest (146)                what a fine-tune learns from (experiments/demo_pair.py)
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .errors import SurgeryError

BUILTIN = "builtin"
SELECTION, EVALUATION, TRAIN = "selection", "evaluation", "train"
PER_LABEL = {SELECTION: 24, EVALUATION: 24}
_FILE = Path(__file__).resolve().parent / "data" / "sentiment.tsv"


def is_builtin(path) -> bool:
    return str(path) == BUILTIN


@lru_cache(maxsize=None)
def _rows() -> tuple[tuple[str, int], ...]:
    lines = _FILE.read_text(encoding="utf-8").splitlines()
    rows = []
    for line in lines[1:]:
        label, _, sentence = line.partition("\t")
        rows.append((sentence, int(label)))
    return tuple(rows)


def sentiment_part(part: str) -> list[tuple[str, int]]:
    """(sentence, label) rows of one part, in file order."""
    if part not in (SELECTION, EVALUATION, TRAIN):
        raise SurgeryError(f"no part '{part}' of the built-in sentiment set (selection, evaluation, train)")
    found = []
    for label in (0, 1):
        rows = [r for r in _rows() if r[1] == label]
        cut = {
            SELECTION: (0, PER_LABEL[SELECTION]),
            EVALUATION: (PER_LABEL[SELECTION], PER_LABEL[SELECTION] + PER_LABEL[EVALUATION]),
            TRAIN: (PER_LABEL[SELECTION] + PER_LABEL[EVALUATION], len(rows)),
        }[part]
        found += rows[cut[0] : cut[1]]
    order = {r: i for i, r in enumerate(_rows())}
    return sorted(found, key=order.__getitem__)
