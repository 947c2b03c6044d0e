"""The hostile-input campaign: bad, odd and malicious inputs a new user might give, and what each must get.

Every case builds its input in-process on a tiny checkpoint, runs the command line in-process, and
checks the contract of docs/reliability.md:
  - the exit code (2 for a user error, 0 where the input is in fact fine, 130/128+N for interrupts);
  - an error is exactly one `error:` line naming the problem (a usage error too: click's message on one line);
  - no traceback;
  - nothing left behind: for a failed run every file and folder under the test's root is as it was
    (no output, no hidden `.surgery-tmp` folder, no new parent folder, the old output intact), for a
    successful one only the output is new;
  - no pickle ran: the marker file a malicious pickle would create does not exist.

Add a row here for every new hostile input; a case that covers every command takes them from the registry
(`_every_command`), so a new method is covered by it without a row.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from cli.errors import run_cli
from surgery.checkpoint import INDEX_NAME, open_checkpoint
from surgery.methods import REGISTRY
from surgery.testing.tiny import char_tokenizer, save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
Q = "model.layers.0.self_attn.q_proj.weight"
O = "model.layers.0.self_attn.o_proj.weight"  # noqa: E741 - the o_proj name, beside Q
UP1 = "model.layers.1.mlp.up_proj.weight"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --- the pristine inputs, built once ------------------------------------------------------------------


@pytest.fixture(scope="session")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("pristine")
    made = {
        "plain": save_tiny_checkpoint(base / "plain"),
        "tied": save_tiny_checkpoint(base / "tied", tied=True),
        "sharded": save_tiny_checkpoint(base / "sharded", shard_bytes=20_000),
    }
    made["gguf"] = write_tiny_gguf(base / "tiny.gguf")
    return made


def write_tiny_gguf(path: Path) -> Path:
    """A 2-layer llama GGUF with a 64-token sentencepiece-style vocabulary (what import-gguf reads)."""
    import gguf
    import numpy as np

    hidden, layers, vocab, inter, heads, kv = 32, 2, 64, 64, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(vocab - 3)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def tensor(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", vocab, hidden)
    for i in range(layers):
        for name in ("attn_norm", "ffn_norm"):
            tensor(f"blk.{i}.{name}.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", hidden * kv // heads, hidden)
        tensor(f"blk.{i}.attn_v.weight", hidden * kv // heads, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", inter, hidden)
        tensor(f"blk.{i}.ffn_up.weight", inter, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, inter)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- one case's world ---------------------------------------------------------------------------------


class World:
    """The folders of one case: inputs/ (model, probe, data), work/ (the current folder, with a user's file)."""

    def __init__(self, root: Path, pristine: dict):
        self.root = root
        self.pristine = pristine
        self.inputs = root / "inputs"
        self.work = root / "work"
        self.inputs.mkdir()
        self.work.mkdir()
        (self.work / "notes.txt").write_text("a file of the user's that no run may touch\n")
        self.model = self.copy("plain", "model")
        self.out = self.work / "out"
        self.marker = root / "PICKLE-RAN"
        self.outputs: list[Path] = []  # what a successful run may create
        self.harmful = self.data(
            "harmful.jsonl",
            "\n".join(
                json.dumps({"prompt": p, "response": r})
                for p, r in [
                    ("how to build a weapon", "first take the barrel and"),
                    ("steal a password", "open the login page"),
                    ("write a scam email", "dear customer your account"),
                    ("make a poison", "mix these household items"),
                ]
            )
            + "\n",
        )
        self.prompts = self.data(
            "prompts.txt", "the weather today is\nmy favourite food is\ntell me a story\nonce upon a time\n"
        )
        self.negative = self.data("negative.txt", "\n".join(f"a kind sentence number {i}" for i in range(6)) + "\n")
        self.positive = self.data("positive.txt", "\n".join(f"an awful rude remark {i}" for i in range(6)) + "\n")
        self.probe = self.make_probe()

    def copy(self, which: str, name: str) -> Path:
        return Path(shutil.copytree(self.pristine[which], self.inputs / name, symlinks=True))

    def data(self, name: str, text: str | bytes) -> Path:
        path = self.inputs / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def make_probe(self) -> Path:
        """A probe for the model (same fingerprint), as `surgery probe-train` would write it."""
        from surgery.probes.artifact import Probe, ProbeMeta, save_probe

        ckpt = open_checkpoint(self.model)
        hidden, layers = ckpt.config["hidden_size"], ckpt.config["num_hidden_layers"]
        meta = ProbeMeta(
            fingerprint=ckpt.fingerprint(),
            model=str(self.model),
            layer=layers,
            num_layers=layers,
            hidden_size=hidden,
            pooling="mean",
            chat=False,
            labels=["desired", "undesired"],
        )
        w = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
        return save_probe(
            Probe(torch.stack([torch.zeros(hidden), w]), torch.tensor([0.0, 0.3]), meta), self.inputs / "probe"
        )

    def plant(self) -> "Plant":
        return Plant(self.marker)

    def gguf(self) -> Path:
        path = self.inputs / "tiny.gguf"
        if not path.exists():
            shutil.copy(self.pristine["gguf"], path)
        return path


class Plant:
    """Unpickled, it creates a marker file: proof that a pickle was opened by something that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --- the commands, as a case runs them (tiny settings: every run takes well under a second or two) ------


def prune(w: World, model=None, out=None, *extra) -> list:
    return ["prune", model or w.model, "-o", out or w.out, "--score", "magnitude", "--no-check", *extra]


def prune_calibrated(w: World, model=None, out=None, *extra) -> list:
    return [
        "prune",
        model or w.model,
        "-o",
        out or w.out,
        "--data",
        w.harmful,
        "--max-samples",
        "2",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--no-check",
        *extra,
    ]


def evaluate(w: World, model=None, *extra) -> list:
    return [
        "eval",
        model or w.model,
        "--harmful",
        w.prompts,
        "--max-samples",
        "2",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        *extra,
    ]


def probe_train(w: World, model=None, out=None, *extra) -> list:
    return [
        "probe-train",
        model or w.model,
        "--positive",
        w.positive,
        "--negative",
        w.negative,
        "-o",
        out or w.out,
        "--c",
        "1.0",
        "--max-length",
        "32",
        "--device",
        "cpu",
        *extra,
    ]


def edit(w: World, model=None, out=None, *extra) -> list:
    return ["edit", model or w.model, "--probe", w.probe, "-o", out or w.out, "--no-check", *extra]


def ablate(w: World, model=None, out=None, *extra) -> list:
    return [
        "ablate",
        model or w.model,
        "-o",
        out or w.out,
        "--layer",
        "1",
        "--max-samples",
        "4",
        "--max-length",
        "32",
        "--device",
        "cpu",
        "--no-check",
        *extra,
    ]


def eigenshift(w: World, model=None, out=None, *extra) -> list:
    # The tiny model's continuations of these prompts straddle a 0.02 toxicity threshold: both kinds of states exist.
    return [
        "eigenshift",
        model or w.model,
        "-o",
        out or w.out,
        "--prompts",
        w.prompts,
        "--max-samples",
        "4",
        "--max-new-tokens",
        "4",
        "--threshold",
        "0.02",
        "--k",
        "1",
        "--no-eval",
        "--device",
        "cpu",
        *extra,
    ]


def import_gguf(w: World, source=None, out=None, *extra) -> list:
    return ["import-gguf", source or w.gguf(), out or w.out, *extra]


def contract_writer(name: str) -> Callable:
    """A registered method without a hand-made line above: its contract-suite arguments (tests/method_args.py ARGS),
    made from the pristine model (the world's model may be spoiled or pickled by then)."""

    def build(w: World, model=None, out=None, *extra) -> list:
        from .method_args import ARGS

        return [
            name,
            model or w.model,
            "-o",
            out or w.out,
            "--device",
            "cpu",
            "--no-check",
            *ARGS[name](w.pristine["plain"], w.inputs, _NoPatch()),
            *extra,
        ]

    return build


HAND_MADE = {"prune": prune, "edit": edit, "ablate": ablate, "eigenshift": eigenshift}
# Every registered method (a new one cannot slip past the output-path and pickle cases), repair and probe-train.
WRITERS = {
    **{name: HAND_MADE.get(name) or contract_writer(name) for name in REGISTRY},
    "repair": lambda w, model=None, out=None, *extra: repair_all(w, model, out, *extra),
    "probe-train": probe_train,
}
LOADERS = {
    "prune": prune_calibrated,
    "eval": lambda w, m=None, o=None: evaluate(w, m),
    "probe-train": probe_train,
    "ablate": ablate,
    "eigenshift": eigenshift,
}
OPENERS = {**WRITERS, "eval": LOADERS["eval"]}


# --- building hostile checkpoints ---------------------------------------------------------------------


def read_raw(shard: Path) -> tuple[dict, bytes]:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(shard: Path, header: dict | bytes, data: bytes) -> None:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    shard.write_bytes(struct.pack("<Q", len(body)) + body + data)


def edit_header(
    model: Path, change: Callable[[dict], None], shard: str = "model.safetensors", data_change=None
) -> None:
    header, data = read_raw(model / shard)
    change(header)
    write_raw(model / shard, header, data_change(data) if data_change else data)


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    """Change a JSON file's object in place (`change` mutates it)."""
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def set_config(model: Path, **values) -> None:
    edit_json(model / "config.json", lambda c: c.update(values))


def rewrite_tensors(model: Path, change: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})


def to_pickle(w: World, model: Path, payload: dict | None = None, keep_safetensors: bool = False) -> Path:
    ckpt = open_checkpoint(model)
    state = payload if payload is not None else {n: ckpt.read(n) for n in ckpt.tensors}
    torch.save(state, model / "pytorch_model.bin")
    if not keep_safetensors:
        (model / "model.safetensors").unlink()
    return model


def malicious_state(w: World) -> dict:
    ckpt = open_checkpoint(w.model)
    state = {n: ckpt.read(n) for n in ckpt.tensors}
    state["model.embed_tokens.weight"] = w.plant()
    return state


def unshard_index(w: World, change: Callable[[dict], object]) -> Path:
    model = w.copy("sharded", "sharded")
    edit_json(model / INDEX_NAME, change)
    return model


def set_tokenizer_config(model: Path, **values) -> None:
    edit_json(model / "tokenizer_config.json", lambda c: c.update(values))


def set_chat_template(model: Path, template: str) -> None:
    (model / "chat_template.jinja").write_text(template)


def probe_meta(w: World, **values) -> Path:
    edit_json(w.probe / "probe.json", lambda m: m.update(values))
    return w.probe


def symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=target.is_dir())
    return link


# --- the cases ----------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    build: Callable[[World], list]  # makes the hostile input in the world, returns the command line
    expect: str = (
        "error"  # "error" (one error: line, exit 2), "usage" (the same, with the command's --help named), "ok" (exit 0)
    )
    needle: str = ""  # must appear in the error line (or the usage message)
    skip_as_root: bool = False  # permissions mean nothing to root

    def param(self):
        marks = [pytest.mark.skipif(IS_ROOT, reason="root may write anywhere")] if self.skip_as_root else []
        return pytest.param(self, id=self.name, marks=marks)


CASES: list[Case] = []


def case(name, expect="error", needle="", skip_as_root=False):
    def register(build):
        CASES.append(Case(name, build, expect, needle, skip_as_root))
        return build

    return register


def cases(name, builds: dict, expect="error", needle=""):
    for key, build in builds.items():
        CASES.append(Case(f"{name}[{key}]", build, expect, needle))


# Output paths: the input, inside it, holding it, the current folder, links, things that are not folders.
cases(
    "output is the input",
    {c: (lambda c: lambda w: WRITERS[c](w, None, w.model, "--force"))(c) for c in WRITERS},
    needle="the input folder",
)
cases(
    "output inside the input",
    {c: (lambda c: lambda w: WRITERS[c](w, None, w.model / "sub"))(c) for c in WRITERS},
    needle="inside the input folder",
)
cases(
    "output holds the input",
    {c: (lambda c: lambda w: WRITERS[c](w, None, w.inputs, "--force"))(c) for c in WRITERS},
    needle="holds the input",
)
cases(
    "output is the current folder",
    {c: (lambda c: lambda w: WRITERS[c](w, None, ".", "--force"))(c) for c in WRITERS},
    needle="is the current folder",
)


@case("output holds the current folder", needle="holds the current folder")
def _(w):
    (w.work / "deep").mkdir()
    os.chdir(w.work / "deep")  # restored by the fixture's monkeypatch
    return prune(w, None, "..", "--force")


@case("output is the home folder", needle="your home folder")
def _(w):
    home = w.root / "home"
    home.mkdir()
    os.environ["HOME"] = str(home)  # restored by the runner
    return prune(w, None, home, "--force")


@case("output exists without --force", needle="already exists")
def _(w):
    w.out.mkdir()
    (w.out / "keep.txt").write_text("an earlier result")
    return prune(w)


@case("output is a file", needle="is not a folder")
def _(w):
    return prune(w, None, w.work / "notes.txt", "--force")


@case("output parent is a file", needle="is not a folder")
def _(w):
    return prune(w, None, w.work / "notes.txt" / "out")


@case("output is a link to another folder", needle="symbolic link")
def _(w):
    target = w.root / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("not a checkpoint")
    return prune(w, None, symlink(w.work / "out", target), "--force")


@case("output is a dangling link", needle="symbolic link")
def _(w):
    return prune(w, None, symlink(w.work / "out", w.root / "nowhere"), "--force")


@case("output is a link to the input", needle="symbolic link")
def _(w):
    return prune(w, None, symlink(w.work / "out", w.model), "--force")


@case("output through a linked parent lands inside the input", needle="inside the input folder")
def _(w):
    return prune(w, None, symlink(w.work / "link", w.model) / "sub")


@case("input given through a link, output its real path", needle="is the input folder")
def _(w):
    return prune(w, symlink(w.work / "linked-model", w.model), w.model, "--force")


@case("output parent is read-only", needle="permission denied", skip_as_root=True)
def _(w):
    locked = w.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return prune(w, None, locked / "out")


@case("output is the probe folder", needle="input")
def _(w):
    return edit(w, None, w.probe, "--force")


@case("output holds a data file", needle="holds the input")
def _(w):
    data = w.root / "data"
    data.mkdir()
    shutil.copy(w.harmful, data / "harmful.jsonl")
    return [*prune_calibrated(w, None, data, "--force"), "--data", data / "harmful.jsonl"]


@case("probe-train output holds its data files", needle="holds the input")
def _(w):
    data = w.root / "data"
    data.mkdir()
    for name in ("positive.txt", "negative.txt"):
        shutil.copy(w.inputs / name, data / name)
    return [
        "probe-train",
        w.model,
        "--positive",
        data / "positive.txt",
        "--negative",
        data / "negative.txt",
        "-o",
        data,
        "--force",
        "--c",
        "1.0",
        "--max-length",
        "32",
        "--device",
        "cpu",
    ]


@case("output is the --reference", needle="input")
def _(w):
    reference = w.copy("plain", "reference")
    return prune(w, None, reference, "--force", "--reference", reference)


@case("output is the --direction-from checkpoint", needle="input")
def _(w):
    source = w.copy("plain", "source")
    return ablate(w, None, source, "--force", "--direction-from", source)


@case("output holds the input, refused before calibration", needle="holds the input")
def _(w):
    forbid_forward()
    return prune_calibrated(w, None, w.inputs, "--force")


@case("existing output refused before calibration", needle="already exists")
def _(w):
    forbid_forward()
    w.out.mkdir()
    return prune_calibrated(w)


@case("markup in a missing input's name is printed literally", needle="in[/x][bold]")
def _(w):
    return prune(w, w.inputs / "in[/x][bold]")


@case("markup in an existing output's name is printed literally", needle="out[/x]")
def _(w):
    (w.work / "out[/x]").mkdir(parents=True)
    return prune(w, None, w.work / "out[/x]")


@case("markup in the output's name, written", expect="ok")
def _(w):
    w.outputs.append(w.work / "out[red]x[not-a-tag]")
    return prune(w, None, w.work / "out[red]x[not-a-tag]")


@case("new parent folders, written", expect="ok")
def _(w):
    w.outputs.append(w.work / "new")
    return prune(w, None, w.work / "new" / "deeper" / "out")


@case("output beside the GGUF file", expect="ok")
def _(w):
    w.outputs.append(w.inputs / "converted")
    return import_gguf(w, None, w.inputs / "converted")


@case("import-gguf output holds the GGUF file", needle="holds the input file")
def _(w):
    return import_gguf(w, None, w.inputs, "--force")


@case("import-gguf output is the GGUF file", needle="is the input file")
def _(w):
    return import_gguf(w, None, w.gguf(), "--force")


# Side files a command writes beside its output: never inside an input, never onto a folder.
@case("eval --json inside the input", needle="inside the input")
def _(w):
    return evaluate(w, None, "--json", w.model / "report.json")


@case("eval --json through a link into the input", needle="inside the input")
def _(w):
    return evaluate(w, None, "--json", symlink(w.work / "report.json", w.model / "config.json"))


@case("eval --json names a folder", needle="is a folder")
def _(w):
    (w.work / "reports").mkdir()
    return evaluate(w, None, "--json", w.work / "reports")


@case("eval --json inside the input, refused before the model loads", needle="inside the input")
def _(w):
    forbid_forward()
    return evaluate(w, None, "--json", w.model / "report.json")


@case("eigenshift --states inside the input", needle="inside the input")
def _(w):
    return eigenshift(w, None, None, "--states", w.model / "states.safetensors")


# Strict loading: the tensors must be exactly the architecture's, for every command that loads a model.
def strict(name, damage, needle, elsewhere: dict[str, str] | None = None):
    """One case per command that opens the model; `elsewhere`: commands whose own check speaks first, and what it says."""

    def build_for(command):
        def build(w):
            damage(w)
            return (LOADERS | {"prune-magnitude": prune})[command](w)

        return build

    for command in [*LOADERS, "prune-magnitude"]:
        CASES.append(Case(f"{name}[{command}]", build_for(command), "error", (elsewhere or {}).get(command, needle)))


strict(
    "BERT config over llama tensors",
    lambda w: (w.model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bert",
                "architectures": ["BertLMHeadModel"],
                "vocab_size": 128,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 64,
                "is_decoder": True,
            }
        )
    ),
    "different architectures",
)
strict("config says 4 layers, tensors of 2", lambda w: set_config(w.model, num_hidden_layers=4), "lacks")
strict(
    "config says 1 layer, tensors of 2",
    lambda w: set_config(w.model, num_hidden_layers=1),
    "no place for",
    elsewhere={"ablate": "--layer 1 is out of range"},
)
strict("one decoder tensor missing", lambda w: rewrite_tensors(w.model, lambda t: t.pop(UP1)), "first " + UP1)
strict(
    "an unexpected tensor",
    lambda w: rewrite_tensors(w.model, lambda t: t.update({"model.extra.weight": torch.zeros(4)})),
    "first model.extra.weight",
)
strict(
    "config hidden size over other tensors",
    lambda w: set_config(w.model, hidden_size=64, intermediate_size=64),
    "shape",
)
strict(
    "untied config without lm_head",
    lambda w: rewrite_tensors(w.model, lambda t: t.pop("lm_head.weight")),
    "first lm_head.weight",
)
strict("dtype lie F32 -> I32", lambda w: edit_header(w.model, lambda h: h[Q].update(dtype="I32")), "stored as int32")


@case("tied checkpoint without lm_head loads", expect="ok")
def _(w):
    return evaluate(w, w.copy("tied", "tied"))


@case("config with zero attention heads", needle="config.json")
def _(w):
    set_config(w.model, num_attention_heads=0)
    return evaluate(w)


@case("config with a word for the hidden size", needle="config.json")
def _(w):
    set_config(w.model, hidden_size="wide")
    return evaluate(w)


@case("config is not JSON", needle="not valid JSON")
def _(w):
    (w.model / "config.json").write_text("{model_type: llama")
    return prune(w)


@case("config is a list", needle="no model_type")
def _(w):
    (w.model / "config.json").write_text("[1, 2]")
    return prune(w)


@case("config names a key twice", needle="appears twice")
def _(w):
    (w.model / "config.json").write_text((w.model / "config.json").read_text().replace("{", '{"hidden_size": 8, ', 1))
    return prune(w)


@case("config of an encoder-decoder model", needle="not a causal language model")
def _(w):
    (w.model / "config.json").write_text(
        json.dumps({"model_type": "t5", "d_model": 32, "num_layers": 2, "vocab_size": 128})
    )
    return prune(w)


# Headers and index: validated before safetensors or transformers parse them.
def header_case(name, change, needle, data_change=None, commands=("prune", "eval")):
    def build_for(command):
        def build(w):
            edit_header(w.model, change, data_change=data_change)
            return OPENERS[command](w)

        return build

    cases(name, {c: build_for(c) for c in commands}, needle=needle)


def _overlap(h):
    h[O]["data_offsets"] = list(h[Q]["data_offsets"])


def _gap(h):
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    h[last]["data_offsets"] = [h[last]["data_offsets"][0] + 4, h[last]["data_offsets"][1] + 4]


header_case("overlapping data offsets", _overlap, "overlap")
header_case("a gap in the data", _gap, "unclaimed bytes", data_change=lambda d: d + b"\0\0\0\0")
header_case("junk bytes after the data", lambda h: None, "after the last tensor", data_change=lambda d: d + b"junk")
header_case("truncated data", lambda h: None, "truncated shard", data_change=lambda d: d[:-64])
header_case("__metadata__ a list", lambda h: h.update({"__metadata__": ["pt"]}), "__metadata__")
header_case("__metadata__ holding a number", lambda h: h.update({"__metadata__": {"format": 1}}), "__metadata__")
header_case("unknown dtype", lambda h: h[Q].update(dtype="Q4_K"), "unsupported dtype")
header_case("negative size in a shape", lambda h: h[Q].update(shape=[-32, -32]), "not a list of sizes")
header_case("fractional size in a shape", lambda h: h[Q].update(shape=[32.5, 32]), "not a list of sizes")
header_case("shape disagrees with the byte range", lambda h: h[Q].update(shape=[16, 32]), "data_offsets span")
header_case("offsets not a pair", lambda h: h[Q].update(data_offsets=[0]), "not [start, end]")
header_case("entry not an object", lambda h: h.update({Q: "F32"}), "not an object")


@case("header not JSON", needle="not valid JSON")
def _(w):
    header, data = read_raw(w.model / "model.safetensors")
    write_raw(w.model / "model.safetensors", b'{"oops": ' + b" " * 30, data)
    return prune(w)


@case("header names a tensor twice", needle="appears twice")
def _(w):
    header, data = read_raw(w.model / "model.safetensors")
    raw = json.dumps(header)
    entry = json.dumps({Q: header[Q]})[1:-1]
    write_raw(w.model / "model.safetensors", (raw[:-1] + ", " + entry + "}").encode(), data)
    return prune(w)


@case("header length beyond the file", needle="does not fit")
def _(w):
    shard = w.model / "model.safetensors"
    shard.write_bytes(struct.pack("<Q", 10**12) + shard.read_bytes()[8:])
    return evaluate(w)


@case("empty weights file", needle="too short")
def _(w):
    (w.model / "model.safetensors").write_bytes(b"")
    return evaluate(w)


@case("weight_map a list", needle="weight_map must be")
def _(w):
    return prune(w, unshard_index(w, lambda i: i.update({"weight_map": list(i["weight_map"])})))


@case("weight_map holding a number", needle="not a file name")
def _(w):
    return prune(w, unshard_index(w, lambda i: i["weight_map"].update({Q: 3})))


@case("weight_map naming a file outside the folder", needle="not a .safetensors file in the folder")
def _(w):
    return evaluate(w, unshard_index(w, lambda i: i["weight_map"].update({Q: "../plain/model.safetensors"})))


@case("index not JSON", needle="not valid JSON")
def _(w):
    model = w.copy("sharded", "sharded")
    (model / INDEX_NAME).write_text('{"weight_map": ')
    return prune(w, model)


@case("index omits a tensor that a shard holds", needle="does not list")
def _(w):
    return evaluate(w, unshard_index(w, lambda i: i["weight_map"].pop(Q)))


@case("index lists a shard that is missing", needle="is missing")
def _(w):
    return prune(w, unshard_index(w, lambda i: i["weight_map"].update({Q: "model-00009-of-00009.safetensors"})))


@case("a tensor in two shards", needle="is in both")
def _(w):
    model = w.copy("sharded", "sharded")
    index = json.loads((model / INDEX_NAME).read_text())["weight_map"]
    first, second = sorted(set(index.values()))[:2]
    name = next(n for n, s in index.items() if s == second)
    header, data = read_raw(model / second)
    entry = header[name]
    other, other_data = read_raw(model / first)
    start = len(other_data)
    other[name] = {**entry, "data_offsets": [start, start + entry["data_offsets"][1] - entry["data_offsets"][0]]}
    write_raw(model / first, other, other_data + data[entry["data_offsets"][0] : entry["data_offsets"][1]])
    return prune(w, model)


# Pickles: never opened beside safetensors, never without --allow-pickle, and then only weights-only.
cases(
    "pickle-only without --allow-pickle",
    {c: (lambda c: lambda w: OPENERS[c](w, to_pickle(w, w.model)))(c) for c in OPENERS},
    needle="pickle weights",
)


@case("stray malicious pickle beside safetensors, eval", expect="ok")
def _(w):
    forbid_torch_load()
    to_pickle(w, w.model, malicious_state(w), keep_safetensors=True)
    return evaluate(w)


@case("stray malicious pickle beside safetensors, prune --allow-pickle", expect="ok")
def _(w):
    forbid_torch_load()
    to_pickle(w, w.model, malicious_state(w), keep_safetensors=True)
    w.outputs.append(w.out)
    return prune_calibrated(w, None, None, "--allow-pickle")


@case("stray pickle beside a sharded checkpoint", expect="ok")
def _(w):
    forbid_torch_load()
    model = w.copy("sharded", "sharded")
    (model / "pytorch_model.bin").write_bytes(b"never opened")
    w.outputs.append(w.out)
    return prune_calibrated(w, model)


@case("malicious pickle-only, --allow-pickle", needle="refused pickle weights")
def _(w):
    return prune(w, to_pickle(w, w.model, malicious_state(w)), None, "--allow-pickle")


@case("pickle-only junk, --allow-pickle", needle="cannot read pickle weights")
def _(w):
    (w.model / "model.safetensors").unlink()
    (w.model / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle at all")
    return prune(w, None, None, "--allow-pickle")


@case("pickle-only holding a list, --allow-pickle", needle="not a plain mapping")
def _(w):
    return prune(w, to_pickle(w, w.model, [torch.zeros(2)]), None, "--allow-pickle")


@case("pickle-only, --allow-pickle, calibrated from memory", expect="ok")
def _(w):
    to_pickle(w, w.model)
    w.outputs.append(w.out)
    return prune_calibrated(w, None, None, "--allow-pickle")


@case("pickle-only, probe-train --allow-pickle", expect="ok")
def _(w):
    to_pickle(w, w.model)
    w.outputs.append(w.out)
    return probe_train(w, None, None, "--allow-pickle")


# Tokenizer and chat template.
@case("unknown tokenizer_class", needle="tokenizer_class")
def _(w):
    set_tokenizer_config(w.model, tokenizer_class="NoSuchTokenizerFast")
    return evaluate(w)


@case("tokenizer_class a number", needle="tokenizer_class")
def _(w):
    set_tokenizer_config(w.model, tokenizer_class=7)
    return prune_calibrated(w)


@case("tokenizer_config.json not JSON", needle="not valid JSON")
def _(w):
    (w.model / "tokenizer_config.json").write_text("{")
    return evaluate(w)


@case("tokenizer.json junk", needle="no usable tokenizer")
def _(w):
    (w.model / "tokenizer.json").write_text("junk")
    return evaluate(w)


@case("tokenizer larger than the vocabulary", needle="vocabulary")
def _(w):
    tok = char_tokenizer()
    tok.add_tokens([f"<extra{i}>" for i in range(40)])
    tok.save_pretrained(w.model)
    return evaluate(w)


@case("chat template that raises", needle="chat template")
def _(w):
    set_chat_template(w.model, "{{ raise_exception('this template refuses') }}")
    return prune_calibrated(w)


@case("chat template that does not parse", needle="chat template")
def _(w):
    set_chat_template(w.model, "{% for m in messages %}{{ m['content'] }")
    return probe_train(w, None, None, "--chat")


@case("chat template dividing by zero", needle="chat template")
def _(w):
    set_chat_template(w.model, "{{ 1 / 0 }}")
    return prune_calibrated(w)


# Probes.
@case("probe.json names a row out of range", needle="undesired_row")
def _(w):
    probe_meta(w, undesired_row=5)
    return edit(w)


@case("probe.json names a layer that is a word", needle="layer")
def _(w):
    probe_meta(w, layer="last")
    return edit(w)


@case("probe.json not JSON", needle="corrupt")
def _(w):
    (w.probe / "probe.json").write_text("{")
    return edit(w)


@case("probe.json a list", needle="corrupt")
def _(w):
    (w.probe / "probe.json").write_text("[]")
    return edit(w)


@case("probe.safetensors junk", needle="corrupt")
def _(w):
    (w.probe / "probe.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00junk junk junk!!")
    return edit(w)


@case("probe.safetensors truncated", needle="corrupt")
def _(w):
    weights = w.probe / "probe.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    return edit(w)


@case("probe with NaN weights", needle="finite")
def _(w):
    from safetensors.torch import load_file, save_file

    path = w.probe / "probe.safetensors"
    tensors = load_file(str(path))
    tensors["weight"][1, 0] = float("nan")
    save_file(tensors, str(path))
    return edit(w)


@case("probe with an extra tensor", needle="holds")
def _(w):
    from safetensors.torch import load_file, save_file

    path = w.probe / "probe.safetensors"
    save_file({**load_file(str(path)), "extra": torch.zeros(1)}, str(path))
    return edit(w)


@case("probe of another model", needle="different model")
def _(w):
    _ = w.probe  # made for the plain model (the property builds it)
    return edit(w, w.copy("tied", "tied"))


# Data files.
@case("CSV field over the csv module's limit", expect="ok")
def _(w):
    rows = ["prompt,response", f"{'a' * 200_000},an answer", "a short prompt,another answer"]
    data = w.data("big.csv", "\n".join(rows) + "\n")
    w.outputs.append(w.out)
    return prune_calibrated(w, None, None, "--data", data)


@case("CSV with a NUL byte and an unclosed quote, read as text", expect="ok")
def _(w):
    data = w.data("nul.csv", b'prompt,response\nhello\x00,there\n"unclosed,quote\n')
    w.outputs.append(w.out)
    return prune_calibrated(w, None, None, "--data", data)


@case("data file not UTF-8", needle="unreadable")
def _(w):
    return prune_calibrated(w, None, None, "--data", w.data("latin.txt", b"caf\xe9\n"))


@case("data file is a folder", needle="is a folder")
def _(w):
    return evaluate(w, None, "--benign", w.inputs)


@case("JSONL row not an object", needle="not a JSON object")
def _(w):
    return prune_calibrated(w, None, None, "--data", w.data("rows.jsonl", "[1, 2]\n"))


@case("data file unreadable", needle="unreadable", skip_as_root=True)
def _(w):
    data = w.data("secret.txt", "a prompt\n")
    data.chmod(0)
    return prune_calibrated(w, None, None, "--data", data)


@case("input's surgery.json not JSON, written", expect="ok")
def _(w):
    (w.model / "surgery.json").write_text("{")
    w.outputs.append(w.out)
    return prune(w)


# Bad weights are bad input: NaN or Inf in any tensor a command reads is refused before any work, for every
# registered method (its contract-suite arguments), eval, probe-train and repair.
class _NoPatch:
    """The contract arguments' monkeypatch, unused here: the refusal comes before any judge runs."""

    def setattr(self, *args, **kwargs):
        pass


def registered(w: World, name: str, model=None, *extra) -> list:
    """The command line of a registered method on the world's model: the contract suite's arguments for it."""
    from .method_args import ARGS

    return [
        name,
        model or w.model,
        "-o",
        w.out,
        "--device",
        "cpu",
        "--no-check",
        *ARGS[name](w.model, w.inputs, _NoPatch()),
        *extra,
    ]


def repair_all(w: World, model=None, out=None, *extra) -> list:
    return [
        "repair",
        model or w.model,
        "-o",
        out or w.out,
        "--device",
        "cpu",
        "--search-samples",
        "2",
        "--search-tokens",
        "2",
        *extra,
    ]


def spoil(folder: Path, tensor: str, value: float, shard: str = "model.safetensors") -> None:
    """Set one entry of `tensor` to `value` (NaN, Inf) in a folder's weight file."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / shard))
    tensors[tensor].view(-1)[5] = value
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})


def _every_command() -> dict[str, Callable[[World], list]]:
    from surgery.methods import REGISTRY

    return {
        **{name: (lambda name: lambda w: registered(w, name))(name) for name in REGISTRY},
        "eval": lambda w: evaluate(w),
        "probe-train": lambda w: probe_train(w),
        "repair": lambda w: repair_all(w),
    }


EMBED = "model.embed_tokens.weight"


def spoiled(build: Callable[[World], list], tensor: str, value: float) -> Callable[[World], list]:
    """The command line `build` gives (its inputs made from the sound model), run on the model with `tensor` spoiled."""

    def make(w):
        argv = build(w)
        spoil(w.model, tensor, value)
        return argv

    return make


for label, tensor, value in [("NaN in layer 0 q_proj", Q, math.nan), ("Inf in the embeddings", EMBED, math.inf)]:
    cases(
        label,
        {c: spoiled(build, tensor, value) for c, build in _every_command().items()},
        needle=f"tensor {tensor} in ",
    )


@case(
    "NaN weights: the error names the tensor, its file, the count",
    needle=f"tensor {Q} in inputs/model/model.safetensors holds 1 NaN (of 1024 values)",
)
def _(w):
    spoil(w.model, Q, math.nan)
    os.chdir(w.root)  # the file is named as given on the command line
    return ["prune", Path("inputs/model"), "-o", w.out, "--score", "magnitude"]


@case("NaN weights, --allow-nonfinite", expect="ok")
def _(w):
    spoil(w.model, Q, math.nan)
    w.outputs.append(w.out)
    return prune(w, None, None, "--allow-nonfinite")


@case("Inf in --reference", needle="--reference: tensor")
def _(w):
    reference = w.copy("plain", "reference")
    spoil(reference, EMBED, -math.inf)
    return prune(w, None, None, "--reference", reference)


@case("NaN in --unaligned", needle="--unaligned: tensor")
def _(w):
    argv = registered(w, "resta")
    spoil(w.inputs / "unaligned", Q, math.nan)
    return argv


@case("NaN in --adapter", needle="adapter_model.safetensors holds 1 NaN")
def _(w):
    argv = registered(w, "safelora")
    adapter = w.inputs / "adapter"
    spoil(
        adapter,
        next(n for n in open_checkpoint_adapter_names(adapter) if n.endswith("lora_B.weight")),
        math.nan,
        shard="adapter_model.safetensors",
    )
    return argv


@case("NaN in eval --reference", needle="--reference: tensor")
def _(w):
    reference = w.copy("plain", "reference")
    spoil(reference, Q, math.nan)
    return evaluate(w, None, "--reference", reference, "--benign", w.prompts)


@case("NaN in repair --reference", needle="--reference: tensor")
def _(w):
    reference = w.copy("plain", "reference")
    spoil(reference, Q, math.nan)
    return repair_all(w, None, None, "--reference", reference)


def open_checkpoint_adapter_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


# The command line itself: click's message as one error: line naming the command's --help, exit 2, never a traceback.
for name, argv, needle in [
    ("missing -o", lambda w: ["eigenshift", w.model, "--prompts", w.prompts], "-o"),
    ("prune without -o", lambda w: ["prune", w.model], "--output"),
    ("unknown option", lambda w: [*prune(w), "--bogus"], "No such option"),
    ("missing argument", lambda w: ["prune"], "Missing argument"),
    ("--ratio abc", lambda w: [*prune(w), "--ratio", "abc"], "--ratio"),
    ("--max-samples 1.5", lambda w: [*evaluate(w), "--max-samples", "1.5"], "--max-samples"),
    ("option without its value", lambda w: ["prune", w.model, "-o"], "requires an argument"),
    ("no such command", lambda w: ["operate", w.model], "No such command"),
    ("edit without --probe", lambda w: ["edit", w.model, "-o", w.out], "--probe"),
    ("import-gguf without an output", lambda w: ["import-gguf", w.gguf()], "Missing argument"),
]:
    CASES.append(Case(f"usage: {name}", argv, "usage", needle))

CASES.append(Case("usage: --help", lambda w: ["prune", "--help"], "ok"))

# Inputs that are not checkpoints.
for name, build, needle in [
    ("input missing", lambda w: prune(w, w.inputs / "nope"), "does not exist"),
    ("input is a file", lambda w: prune(w, w.harmful), "not a folder"),
    ("input without config.json", lambda w: prune(w, w.inputs), "config.json is missing"),
    ("GGUF junk after the magic", lambda w: import_gguf(w, w.data("junk.gguf", b"GGUF" + b"\x03" * 64)), "cannot read"),
    ("GGUF without the magic", lambda w: import_gguf(w, w.harmful), "not a GGUF file"),
    ("GGUF missing", lambda w: import_gguf(w, w.inputs / "none.gguf"), "does not exist"),
]:
    CASES.append(Case(name, build, "error", needle))


# --- running a case -----------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every file (its SHA-256), folder and link under `root`: equal snapshots mean nothing was touched."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                seen[rel] = "link -> " + os.readlink(path)
            elif path.is_dir():
                seen[rel] = "folder"
            else:
                try:
                    seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
                except PermissionError:
                    seen[rel] = "unreadable"
    return seen


def forbid_forward():
    """Fail the case if any model runs: the refusal must come before the model is loaded."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    def forward(*args, **kwargs):
        raise AssertionError("a model ran before the refusal")

    PATCHES.append((LlamaDecoderLayer, "forward", LlamaDecoderLayer.forward))
    LlamaDecoderLayer.forward = forward


def forbid_torch_load():
    """Fail the case if anything unpickles a file (a checkpoint with safetensors needs no pickle)."""
    original = torch.load

    def load(*args, **kwargs):
        raise AssertionError(f"torch.load was called on {args[0] if args else kwargs}")

    PATCHES.append((torch, "load", original))
    torch.load = load


PATCHES: list[tuple[object, str, object]] = []


def run_cli_capturing(argv, capsys) -> tuple[int, str, str]:
    from cli.main import app

    with pytest.raises(SystemExit) as exc:
        run_cli(app, [str(a) for a in argv])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture
def world(tmp_path, pristine, monkeypatch):
    w = World(tmp_path, pristine)
    monkeypatch.chdir(w.work)
    monkeypatch.setenv("HOME", os.environ.get("HOME", str(tmp_path)))
    monkeypatch.setenv("COLUMNS", "200")
    yield w
    while PATCHES:
        owner, name, original = PATCHES.pop()
        setattr(owner, name, original)
    for path in (tmp_path / "locked", tmp_path / "inputs" / "secret.txt"):
        if path.exists():
            path.chmod(0o755)


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_hostile_input(case: Case, world: World, capsys):
    argv = case.build(world)
    capsys.readouterr()  # what building printed (transformers' save progress) is not the run's
    before = snapshot(world.root)
    code, out, err = run_cli_capturing(argv, capsys)
    after = snapshot(world.root)
    assert "Traceback" not in err + out, err
    assert not world.marker.exists(), "a pickle was unpickled with code execution"
    assert not any(".surgery-tmp" in p or ".surgery-old" in p for p in after), [p for p in after if ".surgery-" in p]
    if case.expect == "ok":
        assert code == 0, err
        kept = {p: h for p, h in after.items() if not any(Path(world.root, p).is_relative_to(o) for o in world.outputs)}
        was = {p: h for p, h in before.items() if not any(Path(world.root, p).is_relative_to(o) for o in world.outputs)}
        assert kept == was, sorted(set(kept.items()) ^ set(was.items()))
        return
    assert code == 2, (code, err)
    errors = [line for line in lines(err) if line.startswith("error:")]
    assert len(errors) == 1 and lines(err)[-1] == errors[0], err  # progress lines may come before it, nothing after
    assert case.needle in errors[0], err
    assert "Usage:" not in err, err
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


def test_campaign_covers_every_command():
    from surgery.methods import REGISTRY

    names = " ".join(c.name for c in CASES)
    assert len({c.name for c in CASES}) == len(CASES)  # ids are unique
    for command in [*REGISTRY, "eval", "probe-train", "repair"]:
        assert f"[{command}]" in names, command
    assert "import-gguf" in names or "GGUF" in names


# --- failures while writing, and interrupts -----------------------------------------------------------


def fail_while_writing(action: Callable[[], None]):
    """After the first tensor of the output is on disk, do `action` (raise, or send this process a signal)."""
    from surgery.writer import ShardWriter

    original = ShardWriter.write

    def write(self, name, tensor):
        original(self, name, tensor)
        if not getattr(write, "done", False):
            write.done = True
            action()

    PATCHES.append((ShardWriter, "write", original))
    ShardWriter.write = write


def fail_while_calibrating(action: Callable[[], None]):
    """In the first decoder layer's first forward pass (every calibration path runs one), do `action`."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    original = LlamaDecoderLayer.forward

    def forward(self, *args, **kwargs):
        action()
        return original(self, *args, **kwargs)

    PATCHES.append((LlamaDecoderLayer, "forward", original))
    LlamaDecoderLayer.forward = forward


def disk_full():
    raise OSError(28, "No space left on device", "model.safetensors")


def permission_denied():
    raise PermissionError(13, "Permission denied", "out")


def send(signum):
    return lambda: signal.raise_signal(signum)


@pytest.mark.parametrize(
    "stage, action, code, line",
    [
        ("write", disk_full, 2, "error: model.safetensors: No space left on device"),
        ("write", permission_denied, 2, "error: out: Permission denied"),
        ("write", send(signal.SIGINT), 130, "interrupted:"),
        ("write", send(signal.SIGTERM), 143, "terminated:"),
        ("write", send(signal.SIGHUP), 129, "terminated:"),
        ("calibrate", send(signal.SIGINT), 130, "interrupted:"),
        ("calibrate", send(signal.SIGTERM), 143, "terminated:"),
    ],
    ids=["disk full", "permission denied", "ctrl-c", "sigterm", "sighup", "ctrl-c calibrating", "sigterm calibrating"],
)
@pytest.mark.parametrize("output", ["new", "deeper", "existing"])
def test_failure_or_interrupt_leaves_no_trace(world, capsys, stage, action, code, line, output):
    """The old output stays as it was, no temporary folder and no new parent folder remain, the exit code says why."""
    out = {"new": world.out, "deeper": world.work / "new" / "deeper" / "out", "existing": world.out}[output]
    if output == "existing":
        out.mkdir()
        (out / "model.safetensors").write_text("the previous result")
    (fail_while_writing if stage == "write" else fail_while_calibrating)(action)
    before, handlers = snapshot(world.root), [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    got, _, err = run_cli_capturing(prune_calibrated(world, None, out, "--force"), capsys)
    assert got == code, err
    assert "Traceback" not in err and len(lines(err)) == 1 and lines(err)[0].startswith(line), err
    assert snapshot(world.root) == before
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # run_cli restores them


RUNNER = """
import sys, time, pathlib
ready = pathlib.Path(sys.argv[1])
from surgery.writer import ShardWriter
original = ShardWriter.write
def write(self, name, tensor):
    original(self, name, tensor)
    if not ready.exists():
        ready.write_text("writing")
        time.sleep(60)
ShardWriter.write = write
from cli.main import app
from cli.errors import run_cli
run_cli(app, sys.argv[2:])
"""


def run_until_writing(
    world: World, entry: list[str], signum: int, extra_env=None
) -> tuple[subprocess.CompletedProcess, Path]:
    """Start the CLI in a subprocess, wait until the output's first tensor is written, then send `signum`."""
    ready = world.root / "ready"
    out = world.work / "new" / "out"
    argv = [str(a) for a in prune_calibrated(world, None, out)]
    env = {**os.environ, "COLUMNS": "200", **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, *entry, str(ready), *argv],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[1]
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    ready.unlink()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "sigint"])
def test_signal_to_a_real_process_while_writing(world, signum, code):
    before = snapshot(world.root)
    run, out = run_until_writing(world, ["-c", RUNNER], signum)
    assert run.returncode == code, run.stderr
    assert "Traceback" not in run.stderr and len(lines(run.stderr)) == 1, run.stderr
    assert snapshot(world.root) == before  # no output, no .surgery-tmp folder, no new parent folder


MAIN_RUNNER = RUNNER.replace(
    "from cli.errors import run_cli\nrun_cli(app, sys.argv[2:])", "from cli.main import main\nmain(sys.argv[2:])"
)


def test_python_dash_m_cli_main_exits_143_on_sigterm(world):
    before = snapshot(world.root)
    run, _ = run_until_writing(world, ["-c", MAIN_RUNNER], signal.SIGTERM)
    assert run.returncode == 143, run.stderr
    assert snapshot(world.root) == before


@pytest.mark.parametrize("argv", [["prune", "m", "-o", "o", "--bogus"], ["prune"], ["bogus"]])
def test_main_gives_usage_errors_not_tracebacks(argv, capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    assert len(lines(err)) == 1 and lines(err)[0].startswith("error: ") and "--help" in err, err
