"""The built-in sentiment task: three disjoint, balanced parts, readable as `--task sst2:builtin`."""

import pytest

from surgery.errors import SurgeryError
from surgery.evaluate import EvalOptions, sst2_items
from surgery.methods.base import RunOptions
from surgery.tasks import EVALUATION, SELECTION, TRAIN, sentiment_part


def test_parts_are_disjoint_balanced_and_cover_the_set():
    parts = {p: sentiment_part(p) for p in (SELECTION, EVALUATION, TRAIN)}
    assert [len(parts[p]) for p in (SELECTION, EVALUATION, TRAIN)] == [48, 48, 146]
    for rows in parts.values():
        labels = [y for _, y in rows]
        assert labels.count(0) == labels.count(1)
    sentences = [s for rows in parts.values() for s, _ in rows]
    assert len(set(sentences)) == len(sentences) == 242


def test_builtin_task_items_are_classification_prompts_of_the_named_part():
    prompts, labels = sst2_items("builtin", None, 0, part=SELECTION)
    assert len(prompts) == 48 and sum(labels) == 24
    assert all(p.startswith("Classify the sentiment") for p in prompts)
    evaluation, _ = sst2_items("builtin", 10, 0)
    assert len(evaluation) == 10
    assert not set(evaluation) & set(prompts)


def test_builtin_is_accepted_where_a_task_file_is():
    RunOptions(task="sst2:builtin").validate()
    assert EvalOptions(task="sst2:builtin").task_spec()[0] == "sst2"
    with pytest.raises(SurgeryError, match="does not exist"):
        RunOptions(task="sst2:builtin-missing.tsv").validate()
    with pytest.raises(SurgeryError):
        sentiment_part("dev")
