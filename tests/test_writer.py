import json

import pytest
import torch
from safetensors import safe_open

from surgery.checkpoint import MANIFEST_NAME, open_checkpoint
from surgery.errors import SurgeryError
from surgery.writer import write_checkpoint

from .conftest import DTYPES, folder_hashes

Q = "model.layers.0.self_attn.q_proj.weight"


def zero_first_row(name, t):
    if name != Q:
        return t
    t = t.clone()
    t[0] = 0
    return t


def all_tensors(path):
    ckpt = open_checkpoint(path)
    return {n: ckpt.read(n) for n in ckpt.tensors}, ckpt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_roundtrip_keeps_names_dtypes_layout_and_untouched_bits(make_ckpt, tmp_path, dtype, tied, sharded):
    src = make_ckpt(dtype=dtype, tied=tied, shard_bytes=20_000 if sharded else None)
    before = folder_hashes(src)
    write_checkpoint(open_checkpoint(src), tmp_path / "out", zero_first_row, method="test", arguments={"x": 1})
    assert folder_hashes(src) == before
    old, old_ckpt = all_tensors(src)
    new, new_ckpt = all_tensors(tmp_path / "out")
    assert old.keys() == new.keys()
    assert new_ckpt.sharded == sharded and new_ckpt.shards == old_ckpt.shards
    for name in old:
        assert new[name].dtype == old[name].dtype == dtype
        if name != Q:
            assert torch.equal(new[name].view(torch.uint8), old[name].view(torch.uint8)), name
    assert (new[Q][0] == 0).all() and torch.equal(new[Q][1:], old[Q][1:])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] == tied
    assert ("lm_head.weight" in new) == (not tied)


def test_output_loads_with_transformers_and_generates(tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    write_checkpoint(open_checkpoint(tiny_ckpt), tmp_path / "out", zero_first_row, method="test", arguments={})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model.state_dict()[Q][0], torch.zeros(32))
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_manifest_and_metadata(tiny_ckpt, tmp_path):
    report = write_checkpoint(
        open_checkpoint(tiny_ckpt), tmp_path / "out", zero_first_row, method="test", arguments={"ratio": 0.5}
    )
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["method"] == "test" and manifest["arguments"] == {"ratio": 0.5}
    assert manifest["changed_fraction"] == {Q: pytest.approx(1 / 32)}
    assert set(manifest["input_sha256"]) == {"model.safetensors"}
    assert manifest["input_sha256"] != manifest["output_sha256"]
    assert {"config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= set(
        manifest["copied_files"]
    )
    assert report.changed_fraction == manifest["changed_fraction"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["surgery_method"] == "test" and json.loads(meta["surgery_arguments"]) == {"ratio": 0.5}


def test_existing_output_refused_then_forced(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(SurgeryError, match="already exists"):
        write_checkpoint(open_checkpoint(tiny_ckpt), out, zero_first_row, method="t", arguments={})
    assert (out / "keep.txt").read_text() == "user file"
    write_checkpoint(open_checkpoint(tiny_ckpt), out, zero_first_row, method="t", arguments={}, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_output_inside_input_refused(tiny_ckpt):
    with pytest.raises(SurgeryError, match="inside the input"):
        write_checkpoint(open_checkpoint(tiny_ckpt), tiny_ckpt / "sub", zero_first_row, method="t", arguments={})
    with pytest.raises(SurgeryError, match="is the input folder"):
        write_checkpoint(open_checkpoint(tiny_ckpt), tiny_ckpt, zero_first_row, method="t", arguments={})
    with pytest.raises(SurgeryError, match="holds the input folder"):
        write_checkpoint(
            open_checkpoint(tiny_ckpt), tiny_ckpt.parent, zero_first_row, method="t", arguments={}, force=True
        )


def test_failure_midway_leaves_nothing_behind(tiny_ckpt, tmp_path):
    def explode(name, t):
        if name == Q:
            raise RuntimeError("boom")
        return t

    with pytest.raises(RuntimeError):
        write_checkpoint(open_checkpoint(tiny_ckpt), tmp_path / "out", explode, method="t", arguments={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_added_tensor_and_config_update(make_ckpt, tmp_path):
    src = make_ckpt(tied=True)
    ckpt = open_checkpoint(src)
    head = ckpt.read("model.embed_tokens.weight") * 2
    write_checkpoint(
        ckpt,
        tmp_path / "out",
        lambda n, t: t,
        method="t",
        arguments={},
        added={"lm_head.weight": head},
        config_updates={"tie_word_embeddings": False},
    )
    new, _ = all_tensors(tmp_path / "out")
    assert torch.equal(new["lm_head.weight"], head)
    assert torch.equal(new["model.embed_tokens.weight"], ckpt.read("model.embed_tokens.weight"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


# --- a run stopped at any step of its write: no output, or a complete one whose manifest tells the truth ----------

STEPS = ["weights", "config", "plot", "check", "manifest", "rename", "renamed"]


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def searched_prune(tmp_path_factory):
    """A magnitude prune searched under a budget nothing meets (so its output must say failed), prepared once."""
    from surgery.methods import get_method
    from surgery.methods.antidote import PruneOptions
    from surgery.methods.base import RunOptions, open_context, prepare_and_search
    from surgery.testing.tiny import save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path_factory.mktemp("stop") / "model")
    method, options = get_method("prune"), PruneOptions(ratio="auto", score="magnitude", device="cpu")
    run = RunOptions(search_samples=4, search_tokens=2, min_improvement=0.0, max_kl=1e-5)
    ctx = open_context(method, model, options, run, searching=True)
    prepared, search = prepare_and_search(method, ctx, options, run)
    assert search.failed  # nothing inside the budget
    return method, ctx, prepared, options, run, search


@pytest.mark.parametrize("at", STEPS + [None])
def test_a_write_stopped_at_any_step_leaves_no_output_or_a_true_one(searched_prune, tmp_path, monkeypatch, at):
    import surgery.writer as writer
    from surgery.methods.base import write_repair

    method, ctx, prepared, options, run, search = searched_prune
    seen = []

    def fault(step):
        seen.append(step)
        if step == at:
            raise Stop(step)

    monkeypatch.setattr(writer, "FAULT", fault)
    out = tmp_path / "out"
    if at is None:
        result = write_repair(method, ctx, prepared, options, run, out, search)
        assert result.failed == search.failed and result.check is not None
    else:
        with pytest.raises(Stop):
            write_repair(method, ctx, prepared, options, run, out, search)
    assert seen == STEPS[: STEPS.index(at) + 1] if at else seen == STEPS  # every step was reached, in this order
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if at in ("renamed", None) else [])  # no staged folder left
    if at not in ("renamed", None):
        return
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["failed"] == search.failed  # written before the rename: a failing output never looks passed
    assert manifest["check"]["prompts"] > 0 and manifest["check"]["passed"] in (True, False)
    assert manifest["report"]["search"]["chosen"] == search.chosen and (out / "search.png").is_file()
    from surgery.checkpoint import sha256_file

    assert manifest["output_sha256"] == {"model.safetensors": sha256_file(out / "model.safetensors")}


KILLED = """
import sys
from cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("at", STEPS)
def test_a_kill_at_a_step_leaves_no_output_or_a_true_one(tiny_ckpt, tmp_path, at):
    """SIGKILL (nothing can be cleaned up): before the rename no output exists; after it, the output is complete."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from surgery.checkpoint import sha256_file

    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    argv = [
        "prune",
        tiny_ckpt,
        "-o",
        out,
        "--ratio",
        "auto",
        "--score",
        "magnitude",
        "--device",
        "cpu",
        "--search-samples",
        "4",
        "--search-tokens",
        "2",
        "--min-improvement",
        "0",
        "--max-kl",
        "1e-5",
        "--search-steps",
        "1",
    ]
    env = {**os.environ, "SURGERY_KILL_AT": at}
    run = subprocess.run(
        [sys.executable, "-c", KILLED, *map(str, argv)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr  # the step was reached
    if at != "renamed":
        assert not out.exists()  # a staged folder may remain (hidden, beside it), never a partial output
        assert all(p.name.startswith(".out.surgery-tmp-") for p in out.parent.iterdir())
        return
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # the staged folder became the output
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["failed"] and manifest["check"]["prompts"] > 0 and (out / "search.png").is_file()
    assert manifest["report"]["search"]["chosen"] is not None
    assert manifest["output_sha256"] == {"model.safetensors": sha256_file(out / "model.safetensors")}


def test_the_method_report_is_serialised_once_after_the_write(searched_prune, tmp_path):
    """Edit.summary may hold a report object the edit fills tensor by tensor: the driver serialises it once, when
    every tensor has gone through the edit, into a dict of its own (nothing aliases the method's objects)."""
    from surgery.methods.base import Edit, Prepared, write_repair

    method, ctx, prepared, options, run, search = searched_prune

    class Counted:
        def __init__(self):
            self.tensors, self.serialised = 0, 0

        def to_json(self):
            self.serialised += 1
            return {"tensors": self.tensors}

    report = Counted()

    def fn(name, tensor):
        report.tensors += 1
        return tensor

    class Fixed(Prepared):
        def at(self, value):
            return Edit(fn, summary={"counted": report, "plain": 3})

    from dataclasses import replace

    write_repair(method, ctx, Fixed(), options, replace(run, check=False), tmp_path / "out")
    written = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["report"]
    n = len(open_checkpoint(tmp_path / "out").tensors)
    assert report.serialised == 1 and written["counted"] == {"tensors": n} and written["plain"] == 3
