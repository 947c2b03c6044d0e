import json

import pytest
import torch

from surgery.checkpoint import MANIFEST_NAME, open_checkpoint
from surgery.errors import SurgeryError
from surgery.methods.antidote import PruneOptions, collect_norms, plan_prune, prune_checkpoint
from surgery.prompts import load_examples
from surgery.select import rows_to_remove
from surgery.testing.tiny import char_tokenizer, save_tiny_checkpoint, tiny_llama

from .conftest import DTYPES, folder_hashes

TARGET_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def opts(**kw):
    base = dict(ratio=0.25, max_samples=4, max_length=64, max_new_tokens=8, batch_size=2, device="cpu", kernels="torch")
    base.update(kw)
    return PruneOptions(**base)


def tensors(path):
    ckpt = open_checkpoint(path)
    return {n: ckpt.read(n) for n in ckpt.tensors}


def test_default_targets_are_every_decoder_linear(tiny_ckpt):
    plan = plan_prune(tiny_ckpt, opts())
    assert len(plan.modules) == 2 * 7
    assert {m.module.rsplit(".", 1)[1] for m in plan.modules} == TARGET_KINDS
    assert not any("embed" in m.module or "lm_head" in m.module for m in plan.modules)
    narrowed = plan_prune(tiny_ckpt, opts(targets=["q_proj", "*.v_proj"]))
    assert [m.module for m in narrowed.modules] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_removes_exact_ratio_per_row_and_leaves_the_rest(make_ckpt, tmp_path, harmful_file, dtype):
    src = make_ckpt(dtype=dtype)
    before = folder_hashes(src)
    report = prune_checkpoint(src, tmp_path / "out", opts(data=str(harmful_file)))
    assert folder_hashes(src) == before
    old, new = tensors(src), tensors(tmp_path / "out")
    targets = {m.tensor for m in report.plan.modules}
    for name, w in old.items():
        assert new[name].dtype == w.dtype
        if name not in targets:
            assert torch.equal(new[name].view(torch.uint8), w.view(torch.uint8)), name
            continue
        removed = (new[name] != w).sum(dim=1)
        k = rows_to_remove(w.shape[1], 0.25)
        assert (removed == k).all(), name  # random weights have no zeros, so every selected weight changes
        assert torch.equal(new[name][new[name] != w], torch.zeros(int(removed.sum()), dtype=dtype))
    assert report.calibration_examples == 4 and report.calibration_tokens > 0


def test_selected_weights_are_the_top_wanda_scores(tiny_ckpt, tmp_path, harmful_file):
    options = opts(data=str(harmful_file))
    prune_checkpoint(tiny_ckpt, tmp_path / "out", options)
    model, tok = tiny_llama(), char_tokenizer()
    ckpt = open_checkpoint(tiny_ckpt)
    model.load_state_dict({n: ckpt.read(n) for n in ckpt.tensors}, strict=False)
    name = "model.layers.1.mlp.down_proj"
    norms = collect_norms(model, tok, load_examples(harmful_file), options, [name]).norms()[name]
    w = ckpt.read(name + ".weight")
    score = w.abs() * norms  # Wanda, S_ij = |W_ij| * ||X_j||_2
    pruned = tensors(tmp_path / "out")[name + ".weight"] == 0
    for row in range(w.shape[0]):
        assert score[row][pruned[row]].min() >= score[row][~pruned[row]].max()


def test_magnitude_score_needs_no_data_and_differs_from_wanda(tiny_ckpt, tmp_path, harmful_file):
    prune_checkpoint(tiny_ckpt, tmp_path / "mag", opts(score="magnitude"))
    prune_checkpoint(tiny_ckpt, tmp_path / "wanda", opts(data=str(harmful_file)))
    name = "model.layers.0.mlp.up_proj.weight"
    w = open_checkpoint(tiny_ckpt).read(name)
    mag = tensors(tmp_path / "mag")[name] == 0
    for row in range(w.shape[0]):
        assert w[row].abs()[mag[row]].min() >= w[row].abs()[~mag[row]].max()
    assert not torch.equal(mag, tensors(tmp_path / "wanda")[name] == 0)


def test_generated_responses_used_when_data_has_none(tiny_ckpt, tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_text("do a bad thing\ndo another bad thing\n")
    report = prune_checkpoint(tiny_ckpt, tmp_path / "out", opts(data=str(data)))
    # prompt-only tokens would be fewer: the model's own 8-token answers were appended.
    tok = char_tokenizer()
    prompt_only = sum(
        len(tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False))["input_ids"])
        for p in ["do a bad thing", "do another bad thing"]
    )
    assert report.calibration_tokens > prompt_only


def test_generation_batch_size_changes_speed_not_the_result(tiny_ckpt, tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_text("do a bad thing\ndo another bad thing\nsteal it\nhide the evidence quickly\n")
    one = prune_checkpoint(tiny_ckpt, tmp_path / "one", opts(data=str(data), generate_batch_size=1))
    four = prune_checkpoint(tiny_ckpt, tmp_path / "four", opts(data=str(data), generate_batch_size=4))
    assert one.calibration_tokens == four.calibration_tokens
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "four")
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(SurgeryError, match="--generate-batch-size must be positive"):
        prune_checkpoint(tiny_ckpt, tmp_path / "bad", opts(data=str(data), generate_batch_size=0))


def test_sharded_in_sharded_out_and_manifest(make_ckpt, tmp_path, harmful_file):
    src = make_ckpt(shard_bytes=20_000, tied=True)
    report = prune_checkpoint(src, tmp_path / "out", opts(data=str(harmful_file), ratio=0.1))
    out = open_checkpoint(tmp_path / "out")
    assert out.sharded and out.shards == open_checkpoint(src).shards
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["method"] == "antidote-prune" and manifest["arguments"]["ratio"] == 0.1
    k = rows_to_remove(32, 0.1)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert manifest["changed_fraction"][q] == pytest.approx(k / 32)
    assert report.sparsity["model.layers.0.self_attn.q_proj"] == pytest.approx(k / 32)
    assert "same size" in manifest["report"]["note"]


def test_pruned_model_loads_and_generates(tiny_ckpt, tmp_path, harmful_file):
    from transformers import AutoModelForCausalLM

    prune_checkpoint(tiny_ckpt, tmp_path / "out", opts(data=str(harmful_file)))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.generate(torch.tensor([[5, 6]]), max_new_tokens=3, do_sample=False).shape == (1, 5)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_unit_interval_refused(tiny_ckpt, tmp_path, ratio):
    with pytest.raises(SurgeryError, match="--ratio must be between 0 and 1"):
        prune_checkpoint(tiny_ckpt, tmp_path / "out", opts(ratio=ratio))
    assert not (tmp_path / "out").exists()


def test_matrix_granularity_removes_ratio_of_each_matrix(tiny_ckpt, tmp_path, harmful_file):
    report = prune_checkpoint(tiny_ckpt, tmp_path / "out", opts(data=str(harmful_file), granularity="matrix"))
    old, new = tensors(tiny_ckpt), tensors(tmp_path / "out")
    for m in report.plan.modules:
        w = old[m.tensor]
        assert m.per_row is None and m.removed == rows_to_remove(w.numel(), 0.25)
        assert int((new[m.tensor] != w).sum()) == m.removed, m.module
    # rows lose different counts: the selection is not per row
    down = new["model.layers.1.mlp.down_proj.weight"] == 0
    assert len(set(down.sum(dim=1).tolist())) > 1


def _fine_tuned_pair(tmp_path, dtype=torch.float32):
    """A reference checkpoint and a 'fine-tuned' copy whose every weight moved by a random delta."""
    ref = save_tiny_checkpoint(tmp_path / "ref", dtype=dtype)
    model = tiny_llama(dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=gen) * 0.01).to(dtype))
    return ref, save_tiny_checkpoint(tmp_path / "ft", model=model)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_restores_the_top_delta_of_each_row(tmp_path, dtype):
    ref, ft = _fine_tuned_pair(tmp_path, dtype)
    before = {**folder_hashes(ref), **{f"ft/{k}": v for k, v in folder_hashes(ft).items()}}
    report = prune_checkpoint(ft, tmp_path / "out", opts(score="magnitude", reference=str(ref)))
    assert {**folder_hashes(ref), **{f"ft/{k}": v for k, v in folder_hashes(ft).items()}} == before
    r, w, new = tensors(ref), tensors(ft), tensors(tmp_path / "out")
    targets = {m.tensor for m in report.plan.modules}
    assert report.restored
    for name in w:
        if name not in targets:
            assert torch.equal(new[name].view(torch.uint8), w[name].view(torch.uint8)), name
            continue
        restored = new[name] != w[name]
        k = rows_to_remove(w[name].shape[1], 0.25)
        assert (restored.sum(dim=1) == k).all(), name
        assert torch.equal(new[name][restored], r[name][restored])  # restored exactly to the reference
        # the restored entries are the largest |W - R| of their row
        delta = (w[name].float() - r[name].float()).abs()
        kept_max = delta.masked_fill(restored, -1).amax(dim=1)
        restored_min = delta.masked_fill(~restored, float("inf")).amin(dim=1)
        assert (restored_min >= kept_max).all(), name
    assert report.sparsity[next(iter(targets)).removesuffix(".weight")] == pytest.approx(k / 32)


def test_reference_wanda_streamed_equals_in_memory(tmp_path, harmful_file):
    ref, ft = _fine_tuned_pair(tmp_path)
    common = dict(data=str(harmful_file), reference=str(ref))
    prune_checkpoint(ft, tmp_path / "mem", opts(stream=False, **common))
    prune_checkpoint(ft, tmp_path / "stream", opts(stream=True, **common))
    mem, streamed, w = tensors(tmp_path / "mem"), tensors(tmp_path / "stream"), tensors(ft)
    assert any(not torch.equal(mem[n], w[n]) for n in w)
    for name in mem:
        assert torch.equal(mem[name], streamed[name]), name


def test_reference_must_match_and_differ(tmp_path):
    ref, ft = _fine_tuned_pair(tmp_path)
    wider = save_tiny_checkpoint(tmp_path / "wider", model=tiny_llama(intermediate=96))
    deeper = save_tiny_checkpoint(
        tmp_path / "deeper", model=tiny_llama(layers=3)
    )  # holds every tensor of ft, same shapes
    cases = [
        (str(ft), "model itself"),
        (str(tmp_path / "missing"), "--reference"),
        (str(wider), "intermediate_size 96, the model has 64"),
        (str(deeper), "num_hidden_layers 3, the model has 2"),
    ]
    for reference, message in cases:
        with pytest.raises(SurgeryError, match=message):
            prune_checkpoint(ft, tmp_path / "out", opts(score="magnitude", reference=reference))
        assert not (tmp_path / "out").exists()
