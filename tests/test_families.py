"""Every architecture family of surgery/arch.py on a tiny checkpoint of its own: the roles its description finds,
the probe edit on a fused gate (phi3), and direction ablation removing the direction from what every block writes.
The contract matrix runs on these families too (tests/test_contract.py)."""

from __future__ import annotations

import pytest
import torch

from surgery.arch import (
    GEMMA2,
    LLAMA,
    PHI3,
    family_of,
    gate_projections,
    is_residual_writer,
    is_token_embedding,
    post_norm,
)
from surgery.checkpoint import open_checkpoint
from surgery.errors import SurgeryError
from surgery.methods.ablation import AblateOptions, ablate_checkpoint
from surgery.methods.probe_edit import EditOptions, edit_checkpoint, gate_tensors, row_cosines
from surgery.model import linear_targets, load_model, meta_model
from surgery.stream import decoder_layers, skeleton
from surgery.testing.tiny import FAMILY_CONFIGS, char_tokenizer, save_tiny_checkpoint, tiny_model

from .conftest import bits, cli, make_probe, tensors
from .method_args import HARMFUL, HARMLESS, text_file

LAYERS, INTERMEDIATE = 2, 64
FAMILY = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "gemma2": GEMMA2, "gemma3_text": GEMMA2, "phi3": PHI3}
LINEARS_PER_BLOCK = {"phi3": 4}  # qkv_proj, o_proj, gate_up_proj, down_proj; the others 7


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """model type -> a tiny checkpoint whose norm weights are random too: gemma's post-norms start at 0 (a scale of
    1), where ignoring them would go unnoticed."""
    root, found = tmp_path_factory.mktemp("families"), {}
    for model_type in FAMILY_CONFIGS:
        model = tiny_model(model_type, layers=LAYERS, intermediate=INTERMEDIATE, seed=3)
        generator = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.rand(p.shape, generator=generator) - 0.5)
        found[model_type] = save_tiny_checkpoint(root / model_type, model=model)
    return found


def test_every_tiny_model_type_has_its_family():
    assert set(FAMILY) == set(FAMILY_CONFIGS)


@pytest.mark.parametrize("model_type", list(FAMILY))
def test_the_family_finds_every_role(model_type, checkpoints):
    ckpt = open_checkpoint(checkpoints[model_type])
    family = ckpt.family
    assert family is FAMILY[model_type]
    writers = sorted(n for n in ckpt.tensors if is_residual_writer(n, family))
    assert writers == sorted(
        f"model.layers.{i}.{m}.weight" for i in range(LAYERS) for m in ("self_attn.o_proj", "mlp.down_proj")
    )
    gate = "mlp.gate_up_proj" if model_type == "phi3" else "mlp.gate_proj"
    gates = gate_projections(ckpt.tensors, family)
    assert gates == {f"model.layers.{i}.{gate}.weight": i for i in range(LAYERS)}
    rows = ckpt.tensors[f"model.layers.0.{gate}.weight"].shape[0]
    assert family.gate.span(rows) == range(INTERMEDIATE)
    assert family.up.span(rows) == (range(INTERMEDIATE, 2 * INTERMEDIATE) if model_type == "phi3" else range(rows))
    assert [n for n in ckpt.tensors if is_token_embedding(n, family)] == ["model.embed_tokens.weight"]
    norms = {post_norm(w, family) for w in writers} - {None}
    assert norms <= set(ckpt.tensors) and len(norms) == (2 * LAYERS if family is GEMMA2 else 0)
    targets = linear_targets(meta_model(ckpt))
    assert len(targets) == LINEARS_PER_BLOCK.get(model_type, 7) * LAYERS and all(".layers." in t for t in targets)


def test_the_block_list_is_the_one_the_family_names(checkpoints):
    for path in checkpoints.values():
        name, blocks = decoder_layers(skeleton(open_checkpoint(path)))
        assert name == "model.layers" and len(blocks) == LAYERS


def test_an_unknown_model_type_is_read_by_its_names():
    names = [
        "transformer.h.0.self_attn.o_proj.weight",
        "transformer.h.1.mlp.down_proj.weight",
        "transformer.h.1.mlp.gate_proj.weight",
        "transformer.h.1.mlp.experts.3.weight",
        "transformer.embed_tokens.weight",
    ]
    family = family_of("newarch", names)
    assert (family.name, family.block_list, family.model_types) == ("newarch", "h", ())
    assert [n for n in names if is_residual_writer(n, family)] == names[:2]
    assert gate_projections(names, family) == {names[2]: 1}
    assert family_of("llama", names) is LLAMA  # a listed model type is never guessed from names


@pytest.fixture
def gpt2(tmp_path):
    """A model whose family is not listed and whose names are not llama's (attn.c_proj, mlp.c_fc, wte)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(char_tokenizer()), n_embd=32, n_layer=2, n_head=4))
    return save_tiny_checkpoint(tmp_path / "gpt2", model=model)


def test_a_model_without_the_roles_is_refused_naming_what_is_missing(gpt2, tmp_path, capsys):
    with pytest.raises(
        SurgeryError, match=r"no MLP gate weights \(mlp.gate_proj in each h.N block, as model type 'gpt2'"
    ):
        gate_tensors(open_checkpoint(gpt2))
    harmful, harmless = text_file(tmp_path, "harmful.txt", HARMFUL), text_file(tmp_path, "harmless.txt", HARMLESS)
    args = ["ablate", gpt2, "-o", tmp_path / "out", "--harmful", harmful, "--harmless", harmless, "--layer", "1"]
    code, _, err = cli([*args, "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no residual writers (self_attn.o_proj and mlp.down_proj in each h.N block, as model type 'gpt2'" in err


def test_the_probe_edit_moves_only_the_gate_rows_of_a_fused_gate_up_proj(checkpoints, tmp_path):
    src = checkpoints["phi3"]
    w = make_probe(src, tmp_path / "p")
    report = edit_checkpoint(src, tmp_path / "p", tmp_path / "out", EditOptions(alpha=0.7, count=10))
    old, new = tensors(src), tensors(tmp_path / "out")
    gates = gate_projections(old, PHI3)
    ranked = sorted((float(c), t, i) for t in gates for i, c in enumerate(row_cosines(old[t][:INTERMEDIATE], w)))
    assert {(t, i) for t, rows in report.plan.rows.items() for i in rows} == {(t, i) for _, t, i in ranked[:10]}
    assert report.plan.total_rows == LAYERS * INTERMEDIATE and report.plan.gate_check.before["desired"].pairs > 0
    up = slice(INTERMEDIATE, 2 * INTERMEDIATE)
    for name, t in old.items():
        rows = report.plan.rows.get(name, [])
        if not rows:
            assert torch.equal(bits(new[name]), bits(t)), name
            continue
        assert torch.equal(bits(new[name][up]), bits(t[up])), name  # the up half, bit for bit
        assert (new[name] != t).any(dim=1).nonzero().flatten().tolist() == rows
        assert torch.equal(new[name][rows], t[rows] + 0.7 * w)


def residual_components(path, r: torch.Tensor) -> list[float]:
    """|r . h| / max |h| for the embedding output and the residual stream after every block, on a few prompts."""
    model = load_model(open_checkpoint(path), torch.device("cpu"))
    seen = []

    def record(module, args, output):
        h = (output[0] if isinstance(output, tuple) else output).float()
        seen.append(float((h @ r).abs().max() / h.abs().max()))

    _, blocks = decoder_layers(model)
    handles = [m.register_forward_hook(record) for m in [model.get_input_embeddings(), *blocks]]
    ids = torch.randint(6, 100, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("model_type", list(FAMILY))
def test_ablation_removes_the_direction_from_everything_the_blocks_write(model_type, checkpoints, tmp_path):
    src, family = checkpoints[model_type], FAMILY[model_type]
    options = AblateOptions(
        harmful=str(text_file(tmp_path, "harmful.txt", HARMFUL)),
        harmless=str(text_file(tmp_path, "harmless.txt", HARMLESS)),
        layer="1",
        include_embeddings=True,
        device="cpu",
    )
    report = ablate_checkpoint(src, tmp_path / "out", options)
    old, new, r = tensors(src), tensors(tmp_path / "out"), report.direction
    writers = [n for n in old if is_residual_writer(n, family)]
    assert sorted(report.edited) == sorted([*writers, "model.embed_tokens.weight"])
    for name in set(old) - set(report.edited):
        assert torch.equal(bits(new[name]), bits(old[name])), name
    for name in writers:  # d^T W = 0, d the direction the writer's post-norm (if any) maps onto r
        norm = post_norm(name, family)
        d = r if norm is None else (family.norm_offset + old[norm]) * r
        assert (d @ old[name]).abs().max() > 1e-3 and (d @ new[name]).abs().max() < 1e-5 * d.norm(), name
    assert (new["model.embed_tokens.weight"] @ r).abs().max() < 1e-5
    assert max(residual_components(src, r)) > 1e-2
    assert max(residual_components(tmp_path / "out", r)) < 1e-5
