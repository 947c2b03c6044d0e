import json

import pytest
import torch

from cli.main import main
from surgery.checkpoint import open_checkpoint

from .conftest import folder_hashes


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def assert_one_line_error(code, err, needle):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]
    assert "Traceback" not in err


def prune_args(model, out, *extra):
    args = ["prune", model, "-o", out, "--max-samples", "2", "--max-new-tokens", "4", "--device", "cpu", *extra]
    return [str(a) for a in args]


def test_prune_cli_end_to_end(tiny_ckpt, tmp_path, harmful_file, capsys):
    main(prune_args(tiny_ckpt, tmp_path / "out", "--data", harmful_file, "--ratio", "0.25"))
    out = capsys.readouterr().out
    assert "same size as the input" in out and "25.00" in out  # 8 of 32 per row in every module
    assert (tmp_path / "out" / "surgery.json").is_file()


def test_dry_run_writes_nothing_and_counts(tiny_ckpt, tmp_path, capsys):
    main(["prune", str(tiny_ckpt), "--dry-run", "--ratio", "0.25", "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    # q,k,v,o: 32x32/32x32/16x32/... per-row 8 of 32 cols; the summary line counts modules.
    assert "14 modules" in out and "dry run" in out


def corrupt(path):
    shard = path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])


def unknown_arch(path):
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "no-such-arch"
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "does not exist"),
        ("not_checkpoint", "config.json is missing"),
        ("unknown_arch", "unknown architecture 'no-such-arch'"),
        ("truncated", "truncated shard model.safetensors"),
        ("ratio", "--ratio must be between 0 and 1"),
        ("empty_data", "holds no prompts"),
        ("unreadable_data", "unreadable"),
        ("inside", "inside the input folder"),
        ("exists", "already exists"),
        ("pickle", "pickle weights"),
        ("max_length", "longer than the model's context"),
        ("reference", "--reference"),
    ],
)
def test_bad_input_one_line_no_output(case, needle, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    model = tiny_ckpt
    extra = []
    if case == "missing":
        model = tmp_path / "nope"
    elif case == "not_checkpoint":
        model = tmp_path / "plain"
        model.mkdir()
    elif case == "unknown_arch":
        unknown_arch(tiny_ckpt)
    elif case == "truncated":
        corrupt(tiny_ckpt)
    elif case == "ratio":
        extra = ["--ratio", "1.5"]
    elif case == "empty_data":
        (tmp_path / "empty.jsonl").write_text("")
        extra = ["--data", tmp_path / "empty.jsonl"]
    elif case == "unreadable_data":
        (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x81")
        extra = ["--data", tmp_path / "bad.txt"]
    elif case == "inside":
        out = tiny_ckpt / "pruned"
    elif case == "exists":
        out.mkdir()
    elif case == "pickle":
        ckpt = open_checkpoint(tiny_ckpt)
        torch.save({n: ckpt.read(n) for n in ckpt.tensors}, tiny_ckpt / "pytorch_model.bin")
        (tiny_ckpt / "model.safetensors").unlink()
    elif case == "max_length":
        extra = ["--max-length", "100000"]
    elif case == "reference":
        extra = ["--reference", tmp_path / "plain"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(prune_args(model, out, *extra), capsys)
    assert_one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind
    if case == "exists":
        assert list(out.iterdir()) == []


def test_force_replaces_existing_output(tiny_ckpt, tmp_path, harmful_file, capsys):
    out = tmp_path / "out"
    out.mkdir()
    main(prune_args(tiny_ckpt, out, "--data", harmful_file, "--force"))
    assert (out / "model.safetensors").is_file()


def test_input_untouched_by_cli(tiny_ckpt, tmp_path, harmful_file, capsys):
    before = folder_hashes(tiny_ckpt)
    main(prune_args(tiny_ckpt, tmp_path / "out", "--data", harmful_file))
    assert folder_hashes(tiny_ckpt) == before


def test_allow_pickle_converts_to_safetensors(tiny_ckpt, tmp_path, harmful_file, capsys):
    ckpt = open_checkpoint(tiny_ckpt)
    state = {n: ckpt.read(n) for n in ckpt.tensors}
    torch.save(state, tiny_ckpt / "pytorch_model.bin")
    (tiny_ckpt / "model.safetensors").unlink()
    main(prune_args(tiny_ckpt, tmp_path / "out", "--data", harmful_file, "--allow-pickle", "--score", "magnitude"))
    assert set(open_checkpoint(tmp_path / "out").tensors) == set(state)


def test_python_dash_m_runs_the_registered_commands(tiny_ckpt, tmp_path):
    """`python -m cli.main` (what experiments/lab.py runs) sees every command, and bad input is still one line."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "cli.main", "prune", str(tmp_path / "missing"), "-o", str(tmp_path / "out")],
        cwd=root,
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]
    assert not (tmp_path / "out").exists()
