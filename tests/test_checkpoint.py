import json
import struct

import pytest
import torch

from surgery.checkpoint import INDEX_NAME, open_checkpoint, read_shard_header
from surgery.errors import SurgeryError

from .conftest import DTYPES


def test_single_file_index_matches_model(tiny_ckpt):
    ckpt = open_checkpoint(tiny_ckpt)
    assert not ckpt.sharded and ckpt.shards == ["model.safetensors"]
    assert ckpt.model_type == "llama"
    q = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (32, 32) and q.dtype == torch.float32
    assert torch.equal(ckpt.read(q.name), ckpt.read(q.name))
    assert ckpt.read(q.name).shape == (32, 32)


def test_sharded_checkpoint_is_indexed_across_shards(make_ckpt):
    path = make_ckpt(shard_bytes=20_000)
    ckpt = open_checkpoint(path)
    index = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    assert ckpt.sharded and len(ckpt.shards) > 1
    assert {n: t.shard for n, t in ckpt.tensors.items()} == index


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_is_read_from_header(make_ckpt, dtype):
    ckpt = open_checkpoint(make_ckpt(dtype=dtype))
    assert {t.dtype for t in ckpt.tensors.values()} == {dtype}


def test_fingerprint_depends_on_architecture(make_ckpt):
    a = open_checkpoint(make_ckpt("a", seed=1)).fingerprint()
    b = open_checkpoint(make_ckpt("b", seed=2)).fingerprint()
    c = open_checkpoint(make_ckpt("c", tied=True)).fingerprint()
    assert a == b  # same architecture, different weights
    assert a != c  # tied model has no lm_head tensor


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(SurgeryError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SurgeryError, match="config.json is missing"):
        open_checkpoint(tmp_path / "empty")


def test_truncated_shard_is_named(tiny_ckpt):
    shard = tiny_ckpt / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(SurgeryError, match="truncated shard model.safetensors"):
        open_checkpoint(tiny_ckpt)


def test_corrupt_header_is_named(tiny_ckpt):
    shard = tiny_ckpt / "model.safetensors"
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:12] = b"\xff\xfe{{"
    shard.write_bytes(bytes(data))
    with pytest.raises(SurgeryError, match="corrupt shard"):
        open_checkpoint(tiny_ckpt)


def test_pickle_weights_refused_unless_allowed(tiny_ckpt):
    ckpt = open_checkpoint(tiny_ckpt)
    state = {n: ckpt.read(n) for n in ckpt.tensors}
    (tiny_ckpt / "model.safetensors").unlink()
    torch.save(state, tiny_ckpt / "pytorch_model.bin")
    with pytest.raises(SurgeryError, match="pickle"):
        open_checkpoint(tiny_ckpt)
    opened = open_checkpoint(tiny_ckpt, allow_pickle=True)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(opened.read(name), state[name])


def test_header_parser_reports_every_tensor(tiny_ckpt):
    header = read_shard_header(tiny_ckpt / "model.safetensors")
    assert len(header.tensors) == len(open_checkpoint(tiny_ckpt).tensors)
    assert header.metadata.get("format") == "pt"
