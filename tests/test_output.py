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
    code, out, err = cli(
        [
            "eval",
            tiny_ckpt,
            "--task",
            "sst2:builtin",
            "--max-task-samples",
            "6",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
            "--json",
            report,
        ],
        capsys,
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["counts"]["task"] == 6 and 0.0 <= data["figures"]["accuracy"] <= 1.0


def table_rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split(" | ")] for line in text.splitlines() if line.startswith("| ")
    ]


def assert_log_readable(out: str, err: str) -> None:
    """No cell cut to fit a width, every Markdown row whole (as many cells as its header), no spinner frames."""
    assert "…" not in out + err and "\r" not in out + err and "\x1b[" not in out + err
    rows = table_rows(out)
    assert rows, out
    {len(r) for r in rows}
    for line in out.splitlines():
        if line.startswith("| "):
            assert line.rstrip().endswith("|"), line


def test_markdown_table_keeps_every_cell_whole(capsys):
    from rich.table import Table

    from cli.console import out, plain

    long = "a candidate label much longer than eighty columns would allow in a squashed rich table " * 2
    table = Table("candidate", "strength", title="title")
    table.add_row(long, "0.5 *")
    table.add_row("b|c", "1")
    assert plain()  # captured: not a terminal
    out.print(table)
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "title:"
    assert table_rows(text) == [["candidate", "strength"], ["---", "---"], [long.strip(), "0.5 *"], ["b\\|c", "1"]]


def test_progress_estimates_time_left_from_the_finished_items(monkeypatch, capsys):
    from cli import console

    now = [0.0]
    with console.progress("work") as p:
        p._clock, p.start = (lambda: now[0]), 0.0
        for t, message in (
            (0, "[1/4 prune] start"),
            (10, "[2/4 prune] start"),  # 10 s an item: items 2-4 take 30 s
            (20, "[3/4 revert] start"),
            (25, "[3/4 revert] measured"),  # 5 s into item 3: 20 - 5
            (40, "[3/4 revert] measured again"),  # item 3 overran: what it has left is unknown
            (45, "[4/4 revert] start"),  # items 1-3 took 45 s: 15 s an item
            (50, "[4/4 revert] measured"),
            (70, "[4/4 revert] measured again"),  # the last item overran: nothing later to estimate
            (71, "saving"),
        ):
            now[0] = t
            p.update(message)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("] work") and len(lines) == 10
    assert lines[1].endswith("[1/4 prune] start")
    tails = [line.partition(" (")[2] for line in lines[2:9]]
    assert tails == [
        "about 30s left for items 2-4)",
        "about 20s left for items 3-4)",
        "about 15s left for items 3-4)",
        "item 3 is past the 10s average; about 10s for item 4)",
        "about 15s left for item 4)",
        "about 10s left for item 4)",
        "item 4 is past the 15s average)",
    ]
    assert lines[9].endswith("saving")


def test_ci_variable_makes_output_plain(monkeypatch):
    from cli import console

    monkeypatch.setattr(type(console.out), "is_terminal", property(lambda self: True))
    monkeypatch.delenv("CI", raising=False)
    assert not console.plain()
    monkeypatch.setenv("CI", "true")
    assert console.plain()


def search_args(model, out, data, *extra):
    return [
        "prune",
        model,
        "-o",
        out,
        "--ratio",
        "auto",
        "--data",
        data,
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
        "--search-samples",
        "4",
        "--search-tokens",
        "2",
        *extra,
    ]


def test_search_in_a_log_one_line_per_candidate_json_on_exit_1(tiny_ckpt, harmful_file, tmp_path, capsys):
    """A random tiny model refuses nothing: the search finds no repair and exits 1; the --json report says why."""
    report = tmp_path / "report.json"
    code, out, err = cli(search_args(tiny_ckpt, tmp_path / "out", harmful_file, "--json", report), capsys)
    assert code == 1, err
    assert_log_readable(out, err)
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    candidates = manifest["report"]["search"]["candidates"]
    measured = [line for line in err.splitlines() if ": candidate " in line]
    assert len(measured) == len(candidates) >= 1
    assert all(line.startswith("[") and "s] " in line for line in measured)  # elapsed seconds on each
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("automatic "))  # the search's table, its title
    search_table = "\n".join(
        lines[start + 1 : next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("| "))]
    )
    assert len(table_rows(search_table)) == 2 + len(candidates)  # header, rule, one row a candidate
    data = json.loads(report.read_text())
    assert data["exit_status"] == 1 and data["failed"] == manifest["failed"] and "no repair" in data["failed"]
    assert data["report"] == manifest["report"]
    assert data["chosen"]["strength"] == manifest["report"]["search"]["chosen"]
    chosen = next(c for c in candidates if c["strength"] == data["chosen"]["strength"])
    assert data["chosen"]["figures"] == chosen["figures"]
    line = [line for line in out.splitlines() if line.startswith("summary: ")]
    assert len(line) == 1 and "prune wrote" in line[0] and "FAILED" in line[0] and line[0].endswith(" s")


def test_fixed_strength_json_and_summary(tiny_ckpt, harmful_file, tmp_path, capsys):
    report = tmp_path / "report.json"
    code, out, err = cli(
        [
            "prune",
            tiny_ckpt,
            "-o",
            tmp_path / "out",
            "--data",
            harmful_file,
            "--ratio",
            "0.25",
            "--max-samples",
            "2",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
            "--json",
            report,
        ],
        capsys,
    )
    assert code == 0, err
    assert "…" not in out + err
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    data = json.loads(report.read_text())
    assert data["exit_status"] == 0 and data["report"] == manifest["report"] and data["check"] == manifest.get("check")
    assert out.splitlines()[-1].startswith("summary: prune wrote")
    if manifest.get("check"):
        ratio = manifest["check"]["perplexity_after"] / manifest["check"]["perplexity_before"]
        assert f"perplexity x{ratio:.3g}" in out.splitlines()[-1]


def test_json_path_refused_up_front(tiny_ckpt, harmful_file, tmp_path, capsys):
    code, out, err = cli(
        [
            "prune",
            tiny_ckpt,
            "-o",
            tmp_path / "out",
            "--data",
            harmful_file,
            "--ratio",
            "0.25",
            "--json",
            tmp_path / "nowhere" / "r.json",
        ],
        capsys,
    )
    assert code == 2 and err.startswith("error:") and "--json" in err and not (tmp_path / "out").exists()
    code, out, err = cli(
        [
            "prune",
            tiny_ckpt,
            "-o",
            tmp_path / "out",
            "--data",
            harmful_file,
            "--ratio",
            "0.25",
            "--json",
            tiny_ckpt / "r.json",
        ],
        capsys,
    )
    assert code == 2 and "inside the input" in err and not (tmp_path / "out").exists()


def test_every_command_offers_json():
    import typer

    from cli.main import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert any("--json" in p.opts for p in command.params), name


def test_eval_gate_failure_writes_json_with_exit_status_and_summary(tiny_ckpt, harmful_file, tmp_path, capsys):
    report = tmp_path / "eval.json"
    code, out, err = cli(
        [
            "eval",
            tiny_ckpt,
            "--harmful",
            harmful_file,
            "--max-samples",
            "4",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
            "--max-harmful-score",
            "0",
            "--json",
            report,
        ],
        capsys,
    )
    data = json.loads(report.read_text())
    assert code == 1 and data["exit_status"] == 1 and data["misses"]  # a random tiny model refuses nothing
    assert data["figures"]["harmful_score"] > 0 and data["counts"]["harmful"] == 4
    assert_log_readable(out, err)
    line = out.splitlines()[-1]
    assert line.startswith("summary: eval of") and "gate FAILED" in line
    assert f"harmful score {100 * data['figures']['harmful_score']:.1f}%" in line
