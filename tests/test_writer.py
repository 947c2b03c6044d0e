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
    report = write_checkpoint(open_checkpoint(tiny_ckpt), tmp_path / "out", zero_first_row, method="test", arguments={"ratio": 0.5})
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["method"] == "test" and manifest["arguments"] == {"ratio": 0.5}
    assert manifest["changed_fraction"] == {Q: pytest.approx(1 / 32)}
    assert set(manifest["input_sha256"]) == {"model.safetensors"}
    assert manifest["input_sha256"] != manifest["output_sha256"]
    assert {"config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= set(manifest["copied_files"])
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
        write_checkpoint(open_checkpoint(tiny_ckpt), tiny_ckpt.parent, zero_first_row, method="t", arguments={}, force=True)


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
    write_checkpoint(ckpt, tmp_path / "out", lambda n, t: t, method="t", arguments={},
                     added={"lm_head.weight": head}, config_updates={"tie_word_embeddings": False})
    new, _ = all_tensors(tmp_path / "out")
    assert torch.equal(new["lm_head.weight"], head)
    assert torch.equal(new["model.embed_tokens.weight"], ckpt.read("model.embed_tokens.weight"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
