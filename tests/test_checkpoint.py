import json
import math
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


# --- finiteness: NaN or Inf anywhere is refused, naming the tensor, its file and the count --------------------------


def _weights(folder, tensors, dtype):
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file(
        {k: v.to(dtype) for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    return open_checkpoint(folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_nonfinite_found_in_any_chunk_and_counted(tmp_path, monkeypatch, dtype):
    import surgery.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_CHECK_BYTES", 64)  # many pieces per tensor: the bad values sit in the last ones
    bad = torch.zeros(40, 8)
    bad[39, 7], bad[38, 0], bad[30, 1] = math.nan, math.inf, -math.inf
    ckpt = _weights(tmp_path / "m", {"a": torch.ones(3), "b": bad, "i": torch.arange(4)}, dtype)
    with pytest.raises(SurgeryError) as e:
        checkpoint.refuse_nonfinite(ckpt, "--reference")
    assert str(e.value).startswith(
        f"--reference: tensor b in {tmp_path / 'm' / 'model.safetensors'} holds 1 NaN and 2 Inf (of 320 values)"
    )


def test_finite_weights_pass_even_when_their_sum_overflows(tmp_path):
    import surgery.checkpoint as checkpoint

    big = torch.full((64,), 3e38)  # finite values whose float32 sum is inf: the exact test decides
    checkpoint.refuse_nonfinite(_weights(tmp_path / "m", {"big": big, "neg": -big}, torch.float32))


def test_a_file_found_finite_is_not_read_again_until_it_changes(tmp_path, monkeypatch):
    import surgery.checkpoint as checkpoint

    ckpt = _weights(tmp_path / "m", {"w": torch.ones(4, 4)}, torch.float32)
    reads = []
    real = checkpoint._chunks
    monkeypatch.setattr(checkpoint, "_chunks", lambda *a: reads.append(1) or real(*a))
    checkpoint.refuse_nonfinite(ckpt)
    checkpoint.refuse_nonfinite(ckpt)
    assert reads == [1]
    spoiled = _weights(tmp_path / "n", {"w": torch.full((4, 4), math.nan)}, torch.float32)
    with pytest.raises(SurgeryError, match="holds 16 NaN"):
        checkpoint.refuse_nonfinite(spoiled)


def test_nonfinite_pickle_weights_refused(tmp_path):
    from surgery.checkpoint import refuse_nonfinite

    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    torch.save({"w": torch.tensor([1.0, math.inf])}, folder / "pytorch_model.bin")
    with pytest.raises(SurgeryError, match="tensor w in .*pytorch_model.bin holds 1 Inf"):
        refuse_nonfinite(open_checkpoint(folder, allow_pickle=True))
