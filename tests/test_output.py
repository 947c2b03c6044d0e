"""The CLI's output for CI logs and the built-in sentiment task set (`--task sst2:builtin`)."""

import json

import pytest

from surgery.errors import SurgeryError
from surgery.evaluate import EvalOptions, sst2_items
from surgery.methods.base import RunOptions
from surgery.tasks import EVALUATION, SELECTION, TRAIN, sentiment_part

from .conftest import cli


def test_builtin_sentiment_parts_disjoint_balanced_and_cover_the_file():
    parts = {p: sentiment_part(p) for p in (SELECTION, EVALUATION, TRAIN)}
    assert {p: len(rows) for p, rows in parts.items()} == {SELECTION: 48, EVALUATION: 48, TRAIN: 146}
    for part in (SELECTION, EVALUATION):
        assert sum(label for _, label in parts[part]) == 24  # 24 positive, 24 negative
    assert sum(label for _, label in parts[TRAIN]) == 73
    sentences = [s for rows in parts.values() for s, _ in rows]
    assert len(set(sentences)) == len(sentences) == 242  # disjoint, nothing lost
    assert all(s.strip() and "\t" not in s for s in sentences)
    with pytest.raises(SurgeryError, match="no part"):
        sentiment_part("check")


def test_builtin_items_are_prompts_of_the_named_part():
    prompts, labels = sst2_items("builtin", None, 0, part=SELECTION)
    assert len(prompts) == 48 and sorted(set(labels)) == [0, 1]
    assert all(s in p for p, (s, _) in zip(prompts, sentiment_part(SELECTION)))
    prompts, labels = sst2_items("builtin", 10, 0)  # eval's part, a seeded subset
    assert len(prompts) == 10 and set(prompts) <= set(sst2_items("builtin", None, 0)[0])


def test_builtin_task_accepted_by_eval_and_method_options(tmp_path):
    assert EvalOptions(task="sst2:builtin").task_spec()[0] == "sst2"
    RunOptions(task="sst2:builtin").validate()
    with pytest.raises(SurgeryError, match="does not exist"):
        RunOptions(task=f"sst2:{tmp_path / 'builtin'}").validate()


def test_eval_cli_reads_builtin_task(tiny_ckpt, tmp_path, capsys):
    report = tmp_path / "eval.json"
    code, out, err = cli(["eval", tiny_ckpt, "--task", "sst2:builtin", "--max-task-samples", "6", "--max-new-tokens", "2",
                          "--device", "cpu", "--json", report], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["counts"]["task"] == 6 and 0.0 <= data["figures"]["accuracy"] <= 1.0
