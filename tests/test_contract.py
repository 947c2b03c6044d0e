"""The contract every registered repair method keeps, checked through the command line on tiny checkpoints.

A method joins by adding one row to ARGS (tests/method_args.py): the extra arguments it needs on a tiny model. Everything else
(the checkpoint variants, the refusals, the manifest, the bad values taken from its options schema) is
the same for every method. The toy method (tests/toy_method.py) runs the same matrix, registered only
for its own tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from cli.app import app
from cli.build import method_command
from cli.main import register_command
from surgery.checkpoint import MANIFEST_NAME, PICKLE_SUFFIXES, open_checkpoint
from surgery.methods import REGISTRY, RunOptions, register
from surgery.options import flag_of, option_fields
from surgery.testing.tiny import save_tiny_checkpoint

from .conftest import cli, file_adapter, folder_hashes, merged_checkpoint
from .method_args import ARGS, TOY

SHARD_BYTES = 20_000  # a few shards of the tiny model
VARIANTS = {  # every pair of values of (dtype, embeddings, files) appears in one variant
    "fp32-untied-single": {},
    "fp32-tied-sharded": {"tied": True, "shard_bytes": SHARD_BYTES},
    "bf16-untied-sharded": {"dtype": torch.bfloat16, "shard_bytes": SHARD_BYTES},
    "bf16-tied-single": {"dtype": torch.bfloat16, "tied": True},
}
CHECKED = (
    "fp32-untied-single"  # the after-write check runs on this variant and on the pickle input; --no-check elsewhere
)
CONTRACT = {**REGISTRY, TOY.name: TOY}  # every registered method, and the toy (registered for its own tests)
MISSING = "<missing>"  # a path that does not exist, made under tmp_path


@contextlib.contextmanager
def joined(method):
    """`method` registered and given its command the way cli/main.py does for every REGISTRY entry, for one test."""
    register(method)
    register_command(app, method)
    info = app.registered_commands[-1]
    try:
        yield method
    finally:
        app.registered_commands.remove(info)
        del REGISTRY[method.name]


@pytest.fixture
def method(request):
    name = request.param
    if name not in ARGS:
        pytest.fail(
            f"method '{name}' is registered but has no row in ARGS of tests/test_contract.py: add the "
            "arguments it needs on a tiny checkpoint so that it runs the contract"
        )
    with joined(TOY) if name == TOY.name else contextlib.nullcontext():
        yield CONTRACT[name]


@pytest.fixture
def model_use(monkeypatch):
    """Counts transformers model loads and forward passes (every model, however a method or the driver loads it)."""
    from transformers import PreTrainedModel

    counts = Counter()
    load, forward = PreTrainedModel.__dict__["from_pretrained"].__func__, torch.nn.Module.__call__

    def counted_load(cls, *args, **kwargs):
        counts["loads"] += 1
        return load(cls, *args, **kwargs)

    def counted_forward(self, *args, **kwargs):
        counts["forwards"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counted_load))
    monkeypatch.setattr(PreTrainedModel, "__call__", counted_forward)
    return counts


def checkpoint_and_args(
    method, tmp_path, monkeypatch, variant: str = CHECKED, pickle: bool = False, model_type: str = "llama"
) -> tuple[Path, list[str]]:
    """A tiny checkpoint (as `variant`, or as pickle weights only) and the method's row of arguments for it."""
    model = save_tiny_checkpoint(tmp_path / "model", model_type=model_type, **VARIANTS[variant])
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    extra = [str(a) for a in ARGS[method.name](model, inputs, monkeypatch)]
    if pickle:
        ckpt = open_checkpoint(model)
        torch.save({n: ckpt.read(n) for n in ckpt.tensors}, model / "pytorch_model.bin")
        for path in ckpt.weight_files():
            path.unlink()
    return model, extra


surgery = cli


def command(method, model, out, extra, *more) -> list:
    return [method.name, model, "-o", out, "--device", "cpu", *extra, *more]


def assert_one_error(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weight_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES]


def given(method, args: list[str]) -> tuple[dict, dict]:
    """What the command line set: (method option -> text, RunOptions option -> text); switches as True/False."""
    found: tuple[dict, dict] = ({}, {})
    for fields, into in ((option_fields(method.Options), found[0]), (option_fields(RunOptions), found[1])):
        for f in fields:
            spelled = (f.metadata["flag"] or flag_of(f)).split("/")
            for i, arg in enumerate(args):
                if arg == spelled[0]:
                    into[f.name] = True if "bool" in str(f.type) else args[i + 1]
                elif len(spelled) > 1 and arg == spelled[1]:
                    into[f.name] = False
    return found


def same_value(recorded, text) -> bool:
    if isinstance(text, bool) or isinstance(recorded, bool):
        return recorded is text
    if isinstance(recorded, (int, float)):
        return float(recorded) == float(text)
    if isinstance(recorded, list):
        return recorded == [p.strip() for p in text.split(",")]
    return str(recorded) == text or Path(str(recorded)).resolve() == Path(text).resolve()


def assert_manifest(method, model: Path, out: Path, args: list[str]) -> dict:
    """The method's id, every option of its schema and of RunOptions, the values given, and the weight files' hashes."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["method"] == method.manifest_id
    arguments = manifest["arguments"]
    assert not [f.name for f in option_fields(method.Options) if f.name not in arguments], arguments
    assert not [f.name for f in option_fields(RunOptions) if f.name not in arguments["run"]], arguments["run"]
    options, run = given(method, args)
    for recorded, values in ((arguments, options), (arguments["run"], run)):
        for name, text in values.items():
            assert same_value(recorded[name], text), f"{name}: given {text!r}, recorded {recorded[name]!r}"
    for folder, key in ((model, "input_sha256"), (out, "output_sha256")):
        hashes = manifest[key]
        assert {p.name for p in weight_files(folder)} <= set(hashes), (key, hashes)
        assert all(sha256(folder / name) == digest for name, digest in hashes.items()), key
    assert any(share > 0 for share in manifest["changed_fraction"].values()), "the repair changed no weight"
    return manifest


def assert_loads_and_generates(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello there", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
        tokens = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.isfinite(logits).all()
    assert tokens.shape[1] == ids["input_ids"].shape[1] + 4


def test_every_registered_method_has_a_row():
    missing = sorted(set(REGISTRY) - set(ARGS))
    assert not missing, (
        f"registered methods without a row in ARGS of tests/test_contract.py: {', '.join(missing)}; "
        "add the arguments each needs on a tiny checkpoint so that it runs the contract"
    )
    stale = sorted(set(ARGS) - set(REGISTRY) - {TOY.name})
    assert not stale, f"rows in ARGS for methods that are not registered: {', '.join(stale)}"


NAMES = list(CONTRACT)


def assert_contract(method, variant, tmp_path, monkeypatch, capsys, model_type: str = "llama") -> None:
    model, extra = checkpoint_and_args(method, tmp_path, monkeypatch, variant, model_type=model_type)
    before = folder_hashes(model)
    args = command(method, model, tmp_path / "out", extra, *([] if variant == CHECKED else ["--no-check"]))
    code, out, err = surgery(args, capsys)
    assert code == 0, err
    assert folder_hashes(model) == before
    manifest = assert_manifest(method, model, tmp_path / "out", [str(a) for a in args])
    if variant == CHECKED:
        assert manifest["check"]["passed"] and "check on" in out
    old, new = open_checkpoint(model), open_checkpoint(tmp_path / "out")
    assert new.shards == old.shards and set(old.tensors) <= set(new.tensors)
    assert {n: new.tensors[n].dtype for n in old.tensors} == {n: t.dtype for n, t in old.tensors.items()}
    assert_loads_and_generates(tmp_path / "out")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", NAMES, indirect=True)
def test_repair_keeps_the_contract(method, variant, tmp_path, monkeypatch, capsys):
    assert_contract(method, variant, tmp_path, monkeypatch, capsys)


# The other families of surgery/arch.py run the methods that read what a family describes: the gates (edit), the
# residual writers and the embedding (ablate, the toy), the decoder blocks' Linears (prune; revert and safe-delta
# take them from the same model.linear_targets). The other methods edit every tensor alike or find the head through
# the loaded model. One model type per family runs all four; qwen2 (llama's description, with attention biases) and
# gemma2 (gemma3_text's) run edit and ablate; mistral (llama's description) only tests/test_families.py. Every
# method on every family would add minutes on a 2-core CPU.
FAMILY_RUNS = [
    *((model_type, name) for model_type in ("gemma3_text", "phi3") for name in ("edit", "ablate", TOY.name, "prune")),
    *((model_type, name) for model_type in ("qwen2", "gemma2") for name in ("edit", "ablate")),
]


@pytest.mark.parametrize("model_type, method", FAMILY_RUNS, indirect=["method"])
def test_repair_keeps_the_contract_on_every_family(method, model_type, tmp_path, monkeypatch, capsys):
    assert_contract(method, CHECKED, tmp_path, monkeypatch, capsys, model_type)


@pytest.mark.parametrize("method", NAMES, indirect=True)
def test_existing_output_is_refused_before_any_model_is_loaded(method, tmp_path, monkeypatch, capsys, model_use):
    model, extra = checkpoint_and_args(method, tmp_path, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    before, kept = folder_hashes(model), folder_hashes(out)
    code, _, err = surgery(command(method, model, out, extra), capsys)
    assert_one_error(code, err, "already exists")
    assert model_use == Counter(), f"{dict(model_use)} before refusing the output"
    assert folder_hashes(out) == kept and folder_hashes(model) == before


# (method, folder): the output placed inside MODEL, or inside each folder option of the method's schema.
INSIDE = [
    (name, flag)
    for name, m in CONTRACT.items()
    for flag in ["MODEL", *(flag_of(f) for f in option_fields(m.Options) if f.metadata["folder"])]
]


@pytest.mark.parametrize("method, folder", INSIDE, indirect=["method"])
def test_output_inside_an_input_folder_is_refused(method, folder, tmp_path, monkeypatch, capsys, model_use):
    model, extra = checkpoint_and_args(method, tmp_path, monkeypatch)
    if folder == "MODEL":
        inside = model
    elif folder in extra:
        inside = Path(extra[extra.index(folder) + 1])
    else:  # a folder option the row does not set: another checkpoint of the same architecture
        inside = save_tiny_checkpoint(tmp_path / "other", seed=1)
        extra += [folder, str(inside)]
    before = folder_hashes(inside)
    code, _, err = surgery(command(method, model, inside / "out", extra), capsys)
    assert_one_error(code, err, "inside")
    assert folder_hashes(inside) == before and model_use == Counter()


@pytest.mark.parametrize("method", NAMES, indirect=True)
def test_dry_run_writes_nothing(method, tmp_path, monkeypatch, capsys, model_use):
    model, extra = checkpoint_and_args(method, tmp_path, monkeypatch)
    before, files = folder_hashes(model), listing(tmp_path)
    code, _, err = surgery(command(method, model, tmp_path / "out", extra, "--dry-run"), capsys)
    assert code == 0, err
    assert listing(tmp_path) == files and folder_hashes(model) == before
    assert model_use == Counter(), f"--dry-run shows the plan from the headers, but ran {dict(model_use)}"


@pytest.mark.parametrize("method", NAMES, indirect=True)
def test_pickle_input_needs_allow_pickle(method, tmp_path, monkeypatch, capsys, model_use):
    model, extra = checkpoint_and_args(method, tmp_path, monkeypatch, pickle=True)
    before, files = folder_hashes(model), listing(tmp_path)
    code, _, err = surgery(command(method, model, tmp_path / "out", extra), capsys)
    assert_one_error(code, err, "--allow-pickle")
    assert model_use == Counter() and listing(tmp_path) == files
    args = command(method, model, tmp_path / "out", extra, "--allow-pickle")
    code, out, err = surgery(args, capsys)
    assert code == 0, err
    assert folder_hashes(model) == before
    manifest = assert_manifest(method, model, tmp_path / "out", [str(a) for a in args])
    assert "pytorch_model.bin" in manifest["input_sha256"] and manifest["check"]["passed"]
    assert model_use["loads"] > 0 and model_use["forwards"] > 0  # the counter sees what a run loads
    assert_loads_and_generates(tmp_path / "out")


def violations(f) -> list[str]:
    """One value breaking each rule the schema declares for field `f` (each parses as the field's type)."""
    m, values = f.metadata, []
    if m["strength"]:
        values.append("nonsense")
    if m["choices"]:
        values.append("no-such-choice")
    if m["positive"]:
        values.append("0")
    if m["non_negative"]:
        values.append("-1")
    if m["fraction"]:
        values.append("1.5")
    if m["low"] is not None:
        values.append(f"{m['low'] - 1:g}")
    if m["high"] is not None:
        values.append(f"{m['high'] + 1:g}")
    if m["file"] or m["folder"]:
        values.append(MISSING)
    return list(dict.fromkeys(values))


# (method, flag, value): every rule of every method's schema and of RunOptions, a device no machine has, a missing model.
BAD = [
    (name, flag_of(f), value)
    for name, m in CONTRACT.items()
    for f in [*option_fields(m.Options), *option_fields(RunOptions)]
    for value in violations(f)
]
BAD += [
    (name, flag, value)
    for name in CONTRACT
    for flag, value in (("--device", "tpu"), ("--task", "nonsense"), ("MODEL", MISSING))
]


@pytest.mark.parametrize("method, flag, value", BAD, indirect=["method"], ids=[f"{n}{f}={v}" for n, f, v in BAD])
def test_bad_value_is_one_error_line(method, flag, value, tmp_path, monkeypatch, capsys, model_use):
    model, extra = checkpoint_and_args(method, tmp_path, monkeypatch)
    value = str(tmp_path / "missing") if value == MISSING else value
    before, files = folder_hashes(model), listing(tmp_path)
    target, more = (value, []) if flag == "MODEL" else (model, [flag, value])
    code, _, err = surgery(command(method, target, tmp_path / "out", extra, *more), capsys)
    assert_one_error(code, err, "does not exist" if flag == "MODEL" else flag if flag in err else value)
    assert listing(tmp_path) == files and folder_hashes(model) == before
    assert model_use == Counter(), f"{dict(model_use)} before refusing {flag} {value}"


def test_toy_command_comes_from_its_schema():
    import typer
    from typer.testing import CliRunner

    fresh = typer.Typer()
    fresh.command(TOY.name)(method_command(TOY, lambda result, options: None))
    result = CliRunner().invoke(fresh, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("--factor", "W <- (1 - FACTOR) W", "0.1", "--allow-pickle", "--max-perplexity-ratio", "--dry-run"):
        assert text in result.output, text


@pytest.mark.parametrize("method", [TOY.name], indirect=True)
def test_toy_auto_factor_is_searched_and_written_exactly(method, tmp_path, monkeypatch, capsys):
    model, _ = checkpoint_and_args(method, tmp_path, monkeypatch)
    code, _, err = surgery(
        command(
            method,
            model,
            tmp_path / "out",
            [
                "--factor",
                "auto",
                "--search-samples",
                "4",
                "--search-tokens",
                "4",
                "--search-steps",
                "1",
                "--min-improvement",
                "0",
            ],
        ),
        capsys,
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    factor = manifest["arguments"]["factor"]
    assert manifest["report"]["search"]["chosen"] == factor and 0.0 <= factor <= 0.5
    old, new = open_checkpoint(model), open_checkpoint(tmp_path / "out")
    for name in old.tensors:
        scaled = (
            old.read(name) * (1.0 - factor) if name.endswith(("o_proj.weight", "down_proj.weight")) else old.read(name)
        )
        assert torch.equal(new.read(name), scaled), name


MERGING = [n for n in NAMES if CONTRACT[n].adapter_mode == "merge" and n != TOY.name]


@pytest.mark.parametrize("method", MERGING, indirect=True)
def test_on_an_adapter_the_method_repairs_base_plus_adapter_merged(method, tmp_path, monkeypatch, capsys):
    """`METHOD BASE --adapter A` writes exactly what `METHOD MERGED` writes, MERGED being peft's merge of A into BASE;
    the manifest hashes the base and the adapter, and neither is touched."""
    model, extra = checkpoint_and_args(method, tmp_path, monkeypatch)
    adapter = file_adapter(model, tmp_path / "adapter")  # small: the tiny model still says what ARGS expect
    merged = merged_checkpoint(model, adapter, tmp_path / "merged")
    before = folder_hashes(model), folder_hashes(adapter)
    code, _, err = surgery(command(method, model, tmp_path / "a", extra, "--adapter", adapter, "--no-check"), capsys)
    assert code == 0, err
    code, _, err = surgery(command(method, merged, tmp_path / "b", extra, "--no-check"), capsys)
    assert code == 0, err
    a, b = open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "b")
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.read(n), b.read(n)) for n in a.tensors)
    manifest = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    assert manifest["adapter_sha256"] == {"adapter_model.safetensors": sha256(adapter / "adapter_model.safetensors")}
    assert manifest["adapter"] == str(adapter.resolve())
    assert (folder_hashes(model), folder_hashes(adapter)) == before


def offered_labels(method) -> set[str]:
    """Every label `method.repair_candidates` offers for some combination of what `surgery repair` may be given."""
    import itertools
    from types import SimpleNamespace

    from surgery.repair import INPUTS

    labels = set()
    for size in range(len(INPUTS) + 1):
        for combo in itertools.combinations(INPUTS, size):
            given = SimpleNamespace(
                **{k: (f"<{k}>" if k in combo else None) for k in INPUTS},
                device="cpu",
                allow_pickle=False,
                max_harmful_score=None,
            )
            labels |= {label for label, _ in method.repair_candidates(given)}
    return labels


def test_the_table_of_names_in_docs_matches_the_registry():
    """docs/architecture.md's one mapping of names: command, class, module, printer, manifest id, repair labels."""
    from cli.main import printers
    from surgery.repair import offers

    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    table = text.split("### One table of names", 1)[1].split("| command |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    assert set(rows) == set(REGISTRY), sorted(set(rows) ^ set(REGISTRY))
    for name, method in REGISTRY.items():
        _, cls, module, printer, manifest, labels = rows[name]
        assert cls == type(method).__name__ and module == type(method).__module__.rsplit(".", 1)[1] + ".py", name
        assert printer == method.printer_module().rsplit(".", 1)[1] + ".py" and callable(printers(method)[0]), name
        assert manifest == method.manifest_id, name
        listed = set() if labels.startswith("(") else {label.strip() for label in labels.split(",")}
        assert listed == (offered_labels(method) if method.repair_metric == "harmful_score" else set()), name
    assert list(offers()) == [
        label for m in REGISTRY.values() if m.repair_metric == "harmful_score" for label in rows[m.name][5].split(", ")
    ]  # the --methods help, in registry order
