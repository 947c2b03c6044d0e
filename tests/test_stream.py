import pytest
import torch

from surgery.checkpoint import open_checkpoint
from surgery.errors import SurgeryError
from surgery.methods.antidote import PruneOptions, prune_checkpoint, should_stream

from .conftest import DTYPES


def opts(**kw):
    base = dict(ratio=0.3, batch_size=2, device="cpu", kernels="torch")
    base.update(kw)
    return PruneOptions(**base)


def tensors(path):
    ckpt = open_checkpoint(path)
    return {n: ckpt.read(n) for n in ckpt.tensors}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["wanda", "contrastive"])
def test_streamed_equals_in_memory(make_ckpt, tmp_path, harmful_file, dtype, score):
    src = make_ckpt(dtype=dtype, tied=dtype == torch.float16, shard_bytes=20_000 if dtype == torch.bfloat16 else None)
    benign = tmp_path / "benign.jsonl"  # other texts and another token count than the harmful set
    benign.write_text(
        '{"prompt": "bake bread", "response": "mix flour, water and salt, then knead it well"}\n'
        '{"prompt": "a poem about rain", "response": "soft rain on the roof"}\n'
    )
    common = dict(data=str(harmful_file), score=score, benign_data=str(benign) if score == "contrastive" else None)
    a = prune_checkpoint(src, tmp_path / "mem", opts(stream=False, **common))
    b = prune_checkpoint(src, tmp_path / "stream", opts(stream=True, **common))
    assert not a.streamed and b.streamed
    assert a.calibration_tokens == b.calibration_tokens > 0
    mem, streamed = tensors(tmp_path / "mem"), tensors(tmp_path / "stream")
    assert mem.keys() == streamed.keys()
    for name in mem:
        assert torch.equal(mem[name].view(torch.uint8), streamed[name].view(torch.uint8)), name
    assert a.sparsity == b.sparsity
    if score == "contrastive":  # the benign statistic changed the selection (the comparison above is not vacuous)
        prune_checkpoint(src, tmp_path / "wanda", opts(stream=False, data=str(harmful_file)))
        wanda = tensors(tmp_path / "wanda")
        assert any(not torch.equal(wanda[n], mem[n]) for n in mem)


def test_stream_needs_responses(tiny_ckpt, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a harmful request\n")
    with pytest.raises(SurgeryError, match="streamed pruning calibrates on the data's own responses"):
        prune_checkpoint(tiny_ckpt, tmp_path / "out", opts(stream=True, data=str(prompts)))
    assert not (tmp_path / "out").exists()


def test_auto_streams_above_the_memory_budget(tiny_ckpt):
    ckpt = open_checkpoint(tiny_ckpt)
    fp32_bytes = sum(t.numel for t in ckpt.tensors.values()) * 4
    assert should_stream(ckpt, opts(memory_budget_gb=fp32_bytes / 2**30 / 2))
    assert not should_stream(ckpt, opts(memory_budget_gb=fp32_bytes / 2**30 * 2))
    assert should_stream(ckpt, opts(stream=True, memory_budget_gb=100))
