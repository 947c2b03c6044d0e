"""SafeLoRA: B <- C·B (C = V·Vᵀ/‖V‖_F, V = aligned − unaligned) on the least-aligned LoRA targets, nothing else."""

import json

import pytest
import torch
from safetensors.torch import load_file

from surgery.checkpoint import open_checkpoint

from .conftest import cli, derived_checkpoint, folder_hashes, make_adapter

PREFIX = "base_model.model."


@pytest.fixture
def setup(tmp_path, tiny_ckpt):
    """The base is the aligned model (the paper's setting: the adapter was trained on it); unaligned = base + noise."""
    unaligned = derived_checkpoint(tiny_ckpt, tmp_path / "unaligned", seed=5, scale=0.02)
    adapter = make_adapter(tiny_ckpt, tmp_path / "adapter")
    return tiny_ckpt, adapter, unaligned


def expected(base, adapter, unaligned):
    """Per target module: (C, cosine, B name) computed here from the formulas, in fp32."""
    a_ckpt, u_ckpt, tensors = (
        open_checkpoint(base),
        open_checkpoint(unaligned),
        load_file(adapter / "adapter_model.safetensors"),
    )
    found = {}
    for name in tensors:
        if name.endswith("lora_A.weight"):
            module = name[len(PREFIX) : -len(".lora_A.weight")]
            v = a_ckpt.read(f"{module}.weight").float() - u_ckpt.read(f"{module}.weight").float()
            c = v @ v.T / torch.linalg.matrix_norm(v)
            a, b = tensors[name], tensors[name.replace("lora_A", "lora_B")]
            ba = b @ a
            cos = torch.nn.functional.cosine_similarity((c @ ba).reshape(1, -1), ba.reshape(1, -1)).item()
            found[module] = (c, cos, name.replace("lora_A", "lora_B"))
    return found


def run(base, adapter, unaligned, out, capsys, *more):
    return cli(
        [
            "safelora",
            base,
            "--adapter",
            adapter,
            "--aligned",
            base,
            "--unaligned",
            unaligned,
            "-o",
            out,
            "--device",
            "cpu",
            "--no-check",
            *more,
        ],
        capsys,
    )


@pytest.mark.parametrize("layers", [1, 3, 6])
def test_projects_b_on_the_k_least_aligned_targets_and_leaves_the_rest_bit_identical(setup, tmp_path, capsys, layers):
    base, adapter, unaligned = setup
    before = folder_hashes(base), folder_hashes(adapter), folder_hashes(unaligned)
    code, out, err = run(base, adapter, unaligned, tmp_path / "out", capsys, "--layers", str(layers))
    assert code == 0, err
    want = expected(base, adapter, unaligned)
    chosen = sorted(want, key=lambda m: (want[m][1], m))[:layers]
    old, new = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(tmp_path / "out" / "adapter_model.safetensors"),
    )
    assert new.keys() == old.keys()
    projected = {want[m][2]: want[m][0] for m in chosen}
    for name, tensor in new.items():
        if name in projected:
            assert torch.allclose(tensor, projected[name] @ old[name], rtol=1e-5, atol=1e-6), name
            assert not torch.equal(tensor, old[name])
        else:
            assert torch.equal(tensor, old[name]), name  # A, and every B not chosen: bit for bit
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert sorted(manifest["report"]["safelora"]["projected"]) == sorted(chosen)
    for module, (_c, cos, _b) in want.items():
        assert manifest["report"]["safelora"]["cosine"][module] == pytest.approx(cos, abs=1e-5)
    assert (folder_hashes(base), folder_hashes(adapter), folder_hashes(unaligned)) == before
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == json.loads(
        (adapter / "adapter_config.json").read_text()
    )


def test_threshold_projects_every_target_at_or_below_it(setup, tmp_path, capsys):
    base, adapter, unaligned = setup
    want = expected(base, adapter, unaligned)
    cosines = sorted(c for _, c, _ in want.values())
    tau = (cosines[1] + cosines[2]) / 2  # exactly the two lowest
    code, _, err = run(base, adapter, unaligned, tmp_path / "out", capsys, "--threshold", str(tau))
    assert code == 0, err
    old, new = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(tmp_path / "out" / "adapter_model.safetensors"),
    )
    changed = {n for n in new if not torch.equal(new[n], old[n])}
    assert changed == {b for _, c, b in want.values() if c <= tau} and len(changed) == 2


def test_aligned_equal_to_unaligned_is_refused(setup, tmp_path, capsys):
    import shutil

    base, adapter, _ = setup
    copy = shutil.copytree(base, tmp_path / "copy")  # the same weights in another folder: V = 0 everywhere
    code, _, err = cli(
        ["safelora", base, "--adapter", adapter, "--aligned", base, "--unaligned", copy, "-o", tmp_path / "out"], capsys
    )
    assert code == 2 and "V = W_aligned - W_unaligned is zero" in err and not (tmp_path / "out").exists()


def test_safelora_needs_an_adapter(setup, tmp_path, capsys):
    base, _, unaligned = setup
    code, _, err = cli(["safelora", base, "--aligned", base, "--unaligned", unaligned, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "--adapter is required" in err and not (tmp_path / "out").exists()


def test_layers_auto_searches_the_count_in_memory(setup, tmp_path, capsys, harmful_file):
    base, adapter, unaligned = setup
    code, out, err = run(
        base,
        adapter,
        unaligned,
        tmp_path / "out",
        capsys,
        "--layers",
        "auto",
        "--min-improvement",
        "0",
        "--search-samples",
        "4",
        "--search-tokens",
        "2",
        "--max-perplexity-ratio",
        "100",
        "--max-kl",
        "100",
        "--max-over-refusal",
        "100",
    )
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    search = manifest["report"]["search"]
    assert all(float(p["strength"]).is_integer() for p in search["candidates"])  # whole counts only
    assert len(manifest["report"]["safelora"]["projected"]) == int(search["chosen"])
    assert code == 0, err
