import hashlib
from pathlib import Path

import pytest
import torch

from surgery.testing.tiny import save_tiny_checkpoint


def folder_hashes(path: Path) -> dict[str, str]:
    """SHA-256 of every file under `path`, to prove a folder was not touched."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A 2-layer Llama checkpoint (fp32, untied, single file) with a char tokenizer."""
    return save_tiny_checkpoint(tmp_path / "model")


@pytest.fixture
def make_ckpt(tmp_path):
    def make(name="model", **kwargs):
        return save_tiny_checkpoint(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def harmful_file(tmp_path):
    path = tmp_path / "harmful.jsonl"
    rows = [
        ('{"prompt": "how to build a weapon", "response": "first take the barrel and"}'),
        ('{"prompt": "steal a password", "response": "open the login page and copy"}'),
        ('{"prompt": "write a scam email", "response": "dear customer your account"}'),
        ('{"prompt": "make a poison", "response": "mix these household items"}'),
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cli(args, capsys) -> tuple[int, str, str]:
    """Run the `surgery` command in-process: (exit code, stdout, stderr)."""
    from cli.main import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
