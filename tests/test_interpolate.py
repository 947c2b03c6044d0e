"""`surgery interpolate`: W = W_ref + (1 - alpha)(W_ft - W_ref), checked against the formula computed here from the
checkpoints (tests/test_safety_vector.py builds the related tiny checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch

from surgery.checkpoint import MANIFEST_NAME

from .conftest import bits, checkpoint_family, cli, folder_hashes, tensors


def run(model, reference, out, *more, capsys) -> dict:
    code, _, err = cli(
        ["interpolate", model, "--reference", reference, "-o", out, "--device", "cpu", "--no-check", *more], capsys
    )
    assert code == 0, err
    return json.loads((out / MANIFEST_NAME).read_text())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.85])
def test_written_tensors_are_the_formula(dtype, alpha, tmp_path, capsys, no_model):
    tuned, aligned, _ = checkpoint_family(tmp_path, dtype)
    before = folder_hashes(tuned), folder_hashes(aligned)
    manifest = run(tuned, aligned, tmp_path / "out", "--alpha", str(alpha), capsys=capsys)
    ft, ref, out = tensors(tuned), tensors(aligned), tensors(tmp_path / "out")
    assert out.keys() == ft.keys()
    for name in ft:
        expected = (ref[name].float() + (1 - alpha) * (ft[name].float() - ref[name].float())).to(dtype)
        assert out[name].dtype == dtype and torch.equal(bits(out[name]), bits(expected)), name
        if dtype == torch.float32:  # bf16 rounding may land a small tensor on one end
            assert not torch.equal(out[name], ft[name]) and not torch.equal(out[name], ref[name]), name
    assert (folder_hashes(tuned), folder_hashes(aligned)) == before
    report = manifest["report"]["interpolate"]
    assert report["tensors_interpolated"] == len(ft) and report["alpha"] == alpha
    assert manifest["method"] == "interpolate" and manifest["arguments"]["alpha"] == alpha


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_alpha_zero_is_the_fine_tune_and_one_the_reference_bit_for_bit(dtype, tmp_path, capsys, no_model):
    tuned, aligned, _ = checkpoint_family(tmp_path, dtype)
    zero = run(tuned, aligned, tmp_path / "zero", "--alpha", "0", capsys=capsys)
    run(tuned, aligned, tmp_path / "one", "--alpha", "1", capsys=capsys)
    ft, ref = tensors(tuned), tensors(aligned)
    at0, at1 = tensors(tmp_path / "zero"), tensors(tmp_path / "one")
    assert all(torch.equal(bits(at0[n]), bits(ft[n])) for n in ft)
    assert all(torch.equal(bits(at1[n]), bits(ref[n])) for n in ft)
    assert not any(zero["changed_fraction"].values())


def test_tensors_equal_to_the_reference_and_outside_the_targets_are_untouched(tmp_path, capsys):
    same = lambda name: name.startswith("model.layers.1.") or name.endswith("norm.weight")  # noqa: E731
    _, aligned, unaligned = checkpoint_family(
        tmp_path, same_on=same
    )  # aligned == unaligned on `same`: the "fine-tune" is aligned
    manifest = run(aligned, unaligned, tmp_path / "out", "--alpha", "0.5", capsys=capsys)
    model, ref, out = tensors(aligned), tensors(unaligned), tensors(tmp_path / "out")
    unchanged = sorted(n for n in model if same(n))
    assert unchanged and all(torch.equal(bits(out[n]), bits(model[n])) for n in unchanged)
    assert all(not torch.equal(out[n], model[n]) for n in model if not same(n))
    report = manifest["report"]["interpolate"]
    assert report["tensors_equal_to_reference"] == len(unchanged)
    assert report["tensors_interpolated"] == len(model) - len(unchanged)
    run(aligned, unaligned, tmp_path / "some", "--alpha", "0.5", "--targets", "*.o_proj", capsys=capsys)
    some = tensors(tmp_path / "some")
    for name in model:
        moved = name.endswith("o_proj.weight") and not same(name)
        assert torch.equal(some[name], model[name]) != moved, name
        if moved:
            assert torch.equal(some[name], (ref[name] + 0.5 * (model[name] - ref[name]))), name


def test_auto_alpha_is_searched_and_written_exactly(tmp_path, capsys, model_loads):
    tuned, aligned, _ = checkpoint_family(tmp_path)
    manifest = run(
        tuned,
        aligned,
        tmp_path / "out",
        "--alpha",
        "auto",
        "--search-samples",
        "4",
        "--search-tokens",
        "4",
        "--search-steps",
        "1",
        "--min-improvement",
        "0",
        capsys=capsys,
    )
    alpha = manifest["arguments"]["alpha"]
    assert manifest["report"]["search"]["chosen"] == alpha and 0.05 <= alpha <= 1.0
    assert model_loads["loads"] == 1
    ft, ref, out = tensors(tuned), tensors(aligned), tensors(tmp_path / "out")
    for name in ft:
        expected = ref[name] if alpha == 1 else ref[name] + (1 - alpha) * (ft[name] - ref[name])
        assert torch.equal(out[name], expected), name


def test_missing_reference_is_one_error_line(tmp_path, capsys, no_model):
    tuned, _, _ = checkpoint_family(tmp_path)
    listing = sorted(tmp_path.rglob("*"))
    code, _, err = cli(["interpolate", tuned, "-o", tmp_path / "out"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --reference is required"), err
    assert sorted(tmp_path.rglob("*")) == listing
