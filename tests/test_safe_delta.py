"""`surgery safe-delta`: the selection and the OBS compensation against an independent computation (explicit
inverses of the trailing Hessian blocks, fp64), planted Hessians through the calibration seam, and the aligned
model's Hessians against 2 X Xᵀ computed here."""

from __future__ import annotations

import json

import pytest
import torch

from surgery.checkpoint import MANIFEST_NAME
from surgery.methods import safe_delta
from surgery.methods.safe_delta import (
    InputHessians,
    admitted_entries,
    inverse_factor,
    safe_delta_tensor,
    saturation_budget,
)

from .conftest import bits, checkpoint_family, cli, folder_hashes, tensors


def random_hessian(cols: int, seed: int, tokens: int = 40) -> torch.Tensor:
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 2 * x.T @ x / tokens


def selected(cost, inverse_sq, limit: float, protect: float) -> torch.Tensor:
    """The admitted entries [rows, count] by a Python sort: entries by (1/d_j² of their column, flat index), all but the
    last ⌊protect · n⌋ eligible, those whose running cost stays within `limit`."""
    rows, count = cost.shape
    entries = sorted(range(rows * count), key=lambda f: (float(inverse_sq[f % count]), f))
    eligible = entries[: len(entries) - int(protect * len(entries))]
    admitted = torch.zeros(rows * count, dtype=torch.bool)
    total = 0.0
    for f in eligible:
        total += float(cost.reshape(-1)[f])
        admitted[f] = total <= limit
    return admitted.view(rows, count)


def independent(aligned, tuned, hessian, budget, protect, block, damp=0.01):
    """Safe Delta computed the slow way: d_j² = [(H'_FF)⁻¹]_jj from an explicit inverse of the trailing block, the
    selection by a Python sort, and each column's OBS update from that inverse. Returns (weights, admitted)."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(len(h), dtype=torch.float64)
    w, target = aligned.double().clone(), tuned.double()
    rows, cols = w.shape
    inverses = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]
    admitted = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        inverse_sq = [1.0 / float(inverses[j][0, 0]) for j in range(i1, i2)]
        limit = sum(inverse_sq) / (i2 - i1) * budget * 0.5 * rows / 4096
        cost = (target[:, i1:i2] - w[:, i1:i2]) ** 2 * torch.tensor(inverse_sq, dtype=torch.float64)
        admitted[:, i1:i2] = selected(cost, inverse_sq, limit, protect)
        for j in range(i1, i2):
            inv = inverses[j]
            q = torch.where(admitted[:, j], target[:, j], w[:, j])
            w[:, j:] -= ((w[:, j] - q) / inv[0, 0])[:, None] * inv[0, :][None, :]
            w[:, j] = q
    return w, admitted


@pytest.mark.parametrize("block", [12, 5], ids=["one block", "three blocks"])
@pytest.mark.parametrize("protect", [0.0, 0.15])
def test_compensation_equals_an_independent_obs_computation(block, protect):
    g = torch.Generator().manual_seed(3)
    rows, cols = 7, 12
    aligned = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    tuned = aligned + 0.3 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    hessian = random_hessian(cols, seed=4)
    factor = inverse_factor(hessian, 0.01, dtype=torch.float64)
    budget = 1500.0  # a part of the eligible entries fits
    expected, chosen = independent(aligned, tuned, hessian, budget, protect, block)
    got, admitted = safe_delta_tensor(aligned, tuned, factor, budget, protect, block, compute=torch.float64)
    eligible = sum(rows * c - int(protect * rows * c) for c in (min(block, cols - i) for i in range(0, cols, block)))
    assert 0 < int(chosen.sum()) < eligible  # a real mixture: some kept, some eligible ones compensated instead
    assert torch.equal(admitted, chosen)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(got[admitted], tuned[admitted])  # admitted entries are the fine-tune's exactly
    assert not torch.allclose(got[~admitted], aligned[~admitted])  # the others were compensated, not just reverted


@pytest.mark.parametrize("tied", [False, True], ids=["distinct columns", "tied columns"])
def test_the_selection_order_is_columns_by_sensitivity_then_flat_index(tied):
    g = torch.Generator().manual_seed(11)
    rows, count = 5, 6
    cost = torch.rand(rows, count, generator=g, dtype=torch.float64)
    inverse_sq = torch.tensor([3.0, 1.0, 2.0, 1.0 if tied else 1.5, 0.5, 2.0 if tied else 2.5], dtype=torch.float64)
    limit = float(cost.sum()) / 2
    expected = selected(cost, inverse_sq, limit, 0.2)
    got = admitted_entries(cost, inverse_sq, limit, 0.2)
    assert 0 < int(got.sum()) < rows * count - int(0.2 * rows * count)  # a real cut inside the eligible entries
    assert torch.equal(got, expected)


def test_budget_zero_is_the_aligned_weights_and_an_unbounded_budget_the_fine_tune():
    g = torch.Generator().manual_seed(5)
    aligned = torch.randn(9, 16, generator=g).to(torch.bfloat16)
    tuned = (aligned.float() + 0.1 * torch.randn(9, 16, generator=g)).to(torch.bfloat16)
    factor = inverse_factor(random_hessian(16, seed=6))
    zero, none = safe_delta_tensor(aligned, tuned, factor, 0.0, 0.15, 8)
    assert torch.equal(bits(zero), bits(aligned))
    assert torch.equal(tuned[none], aligned[none])  # at budget 0 only entries the fine-tune left as they were (cost 0)
    full, every = safe_delta_tensor(aligned, tuned, factor, float("inf"), 0.0, 8)
    assert torch.equal(bits(full), bits(tuned)) and every.all()
    protected, some = safe_delta_tensor(aligned, tuned, factor, float("inf"), 0.25, 8)
    assert int(some.sum()) == 9 * 16 - 2 * int(0.25 * 9 * 8)  # a quarter of each block's entries stays aligned


def test_a_larger_budget_keeps_more_of_the_fine_tune():
    g = torch.Generator().manual_seed(7)
    aligned = torch.randn(6, 20, generator=g)
    tuned = aligned + 0.2 * torch.randn(6, 20, generator=g)
    factor = inverse_factor(random_hessian(20, seed=8))
    kept = [
        int(safe_delta_tensor(aligned, tuned, factor, s, 0.15, 2048)[1].sum()) for s in (0.0, 1.0, 10.0, 100.0, 1e4)
    ]
    assert kept == sorted(kept) and kept[0] == 0 and kept[-1] == int(6 * 20 * 0.85 + 0.5)


@pytest.mark.parametrize("protect", [0.0, 0.15])
def test_the_saturation_budget_is_where_every_eligible_entry_is_admitted(protect):
    g = torch.Generator().manual_seed(11)
    aligned = torch.randn(7, 24, generator=g)
    tuned = aligned + 0.3 * torch.randn(7, 24, generator=g)
    factor = inverse_factor(random_hessian(24, seed=12))
    saturated = saturation_budget(aligned, tuned, factor, protect, 2048)
    eligible = 7 * 24 - int(protect * 7 * 24)
    below, some = safe_delta_tensor(aligned, tuned, factor, saturated * 0.99, protect, 2048)
    at, every = safe_delta_tensor(aligned, tuned, factor, saturated * safe_delta.SATURATION_MARGIN, protect, 2048)
    far, _ = safe_delta_tensor(aligned, tuned, factor, saturated * 1e4, protect, 2048)
    assert int(some.sum()) < eligible == int(every.sum())
    assert torch.equal(bits(at), bits(far))  # past the saturation budget nothing changes
    assert not torch.equal(bits(below), bits(at))
    assert saturation_budget(aligned, tuned, factor, protect, 16) is None  # two blocks: no exact bound


INSENSITIVE = lambda j: j % 4 == 1  # noqa: E731 - the planted, least safety-sensitive columns (a quarter, not contiguous)


def plant(monkeypatch, calls: list):
    """Safe Delta's calibration seam replaced: diagonal Hessians, tiny on the planted columns and large elsewhere."""

    def planted(ctx, options, modules):
        calls.append(modules)
        out = {}
        for module in modules:
            cols = ctx.ckpt.tensors[f"{module}.weight"].shape[1]
            out[module] = torch.diag(torch.tensor([1e-6 if INSENSITIVE(j) else 1e2 for j in range(cols)]))
        return out, {}

    monkeypatch.setattr(safe_delta, "calibration_hessians", planted)


def run(tuned, aligned, out, *more, capsys) -> dict:
    code, _, err = cli(
        ["safe-delta", tuned, "--reference", aligned, "-o", out, "--device", "cpu", "--no-check", *more], capsys
    )
    assert code == 0, err
    return json.loads((out / MANIFEST_NAME).read_text())


def test_a_planted_hessian_selects_the_planted_entries(tmp_path, capsys, monkeypatch, no_model):
    calls = []
    plant(monkeypatch, calls)
    tuned, aligned, _ = checkpoint_family(tmp_path)
    before = folder_hashes(tuned), folder_hashes(aligned)
    # A budget that cannot hold every planted entry: the admitted ones are planted ones only (some in every weight).
    manifest = run(tuned, aligned, tmp_path / "some", "--budget", "0.05", "--protect", "0", capsys=capsys)
    # An unbounded budget with the other three quarters protected: exactly the planted entries.
    run(tuned, aligned, tmp_path / "all", "--budget", "1e9", "--protect", "0.75", capsys=capsys)
    assert (folder_hashes(tuned), folder_hashes(aligned)) == before and len(calls) == 2
    ft, a, some, every = tensors(tuned), tensors(aligned), tensors(tmp_path / "some"), tensors(tmp_path / "all")
    weights = manifest["report"]["safe_delta"]["per_tensor"]
    assert len(weights) == 14  # every Linear of the two decoder blocks
    for name in weights:
        planted = torch.tensor([INSENSITIVE(j) for j in range(ft[name].shape[1])]).expand_as(ft[name])
        # diagonal H: no compensation, so every entry is the fine-tune's or the aligned model's exactly
        assert torch.equal(every[name], torch.where(planted, ft[name], a[name])), name
        kept = some[name] == ft[name]
        assert torch.equal(some[name], torch.where(kept, ft[name], a[name])), name
        assert kept[~planted].sum() == 0 and 0 < kept[planted].sum() < planted.sum(), name
        assert weights[name]["admitted"] == int(kept.sum())
    others = [n for n in ft if n not in weights]
    assert others and all(torch.equal(bits(some[n]), bits(ft[n])) for n in others)  # not Linear weights: untouched


def test_budget_zero_writes_the_aligned_linear_weights(tmp_path, capsys, monkeypatch, no_model):
    plant(monkeypatch, [])
    tuned, aligned, _ = checkpoint_family(tmp_path, torch.bfloat16)
    manifest = run(tuned, aligned, tmp_path / "out", "--budget", "0", capsys=capsys)
    ft, a, out = tensors(tuned), tensors(aligned), tensors(tmp_path / "out")
    weights = manifest["report"]["safe_delta"]["per_tensor"]
    for name in ft:
        assert torch.equal(bits(out[name]), bits(a[name] if name in weights else ft[name])), name


def test_the_aligned_models_hessians_are_2xxt_shared_by_modules_reading_one_input(tmp_path):
    from surgery.prompts import pad_batches
    from surgery.testing.tiny import tiny_llama

    model = tiny_llama(seed=1).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (7, 11, 5, 9)]
    stats = InputHessians(model, names).run(pad_batches(sequences, 3, 0))
    hessians = stats.hessians()
    layer = model.model.layers[1]
    q, k, v = (hessians[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    gate, up = hessians["model.layers.1.mlp.gate_proj"], hessians["model.layers.1.mlp.up_proj"]
    assert q is k is v and gate is up and q is not gate
    assert len({id(h) for h in hessians.values()}) == 4 * 2  # q/k/v, o, gate/up, down in each of the two blocks
    captured = {}
    handles = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: captured.setdefault("attn", []).append(a[0])),
        layer.mlp.down_proj.register_forward_hook(lambda m, a, o: captured.setdefault("down", []).append(a[0])),
    ]
    tokens, sums = 0, {"attn": 0, "down": 0}
    with torch.no_grad():
        for ids, mask in pad_batches(sequences, 3, 0):
            captured.clear()
            model(input_ids=ids, attention_mask=mask)
            keep = mask.reshape(-1).bool()
            tokens += int(keep.sum())
            for key in sums:
                x = captured[key][0].reshape(-1, captured[key][0].shape[-1])[keep].double()
                sums[key] = sums[key] + x.T @ x
    for h in handles:
        h.remove()
    assert stats.tokens == tokens == 32
    assert torch.allclose(q.double(), 2 * sums["attn"] / tokens, rtol=1e-4, atol=1e-6)
    assert torch.allclose(
        hessians["model.layers.1.mlp.down_proj"].double(), 2 * sums["down"] / tokens, rtol=1e-4, atol=1e-6
    )


def test_missing_reference_is_one_error_line(tmp_path, capsys, no_model):
    tuned, _, _ = checkpoint_family(tmp_path)
    listing = sorted(tmp_path.rglob("*"))
    code, _, err = cli(["safe-delta", tuned, "-o", tmp_path / "out"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --reference is required"), err
    assert sorted(tmp_path.rglob("*")) == listing


def test_auto_budget_searches_from_the_smallest_budget_and_writes_the_chosen_one_exactly(tmp_path, capsys, monkeypatch):
    plant(monkeypatch, [])
    tuned, aligned, _ = checkpoint_family(tmp_path)
    manifest = run(
        tuned,
        aligned,
        tmp_path / "out",
        "--budget",
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
    search = manifest["report"]["search"]
    budget = manifest["arguments"]["budget"]
    assert search["chosen"] == budget and 0.001 <= budget <= 100
    tried = [c["strength"] for c in search["candidates"]]  # weakest first
    assert tried[-1] == 0.001 and tried == sorted(
        tried, reverse=True
    )  # stronger = lower: the smallest is the strongest
    ft, a, out = tensors(tuned), tensors(aligned), tensors(tmp_path / "out")
    saturated = max(  # the weakest end: the saturation budget, past which every budget writes the same model
        saturation_budget(
            a[n],
            ft[n],
            inverse_factor(torch.diag(torch.tensor([1e-6 if INSENSITIVE(j) else 1e2 for j in range(ft[n].shape[1])]))),
            0.15,
            2048,
        )
        for n in manifest["report"]["safe_delta"]["per_tensor"]
    )
    weakest = saturated * safe_delta.SATURATION_MARGIN
    assert 0.001 < weakest < 100 and tried[0] == pytest.approx(weakest, rel=1e-3)  # 44.2 here, not the knob's 100
    for name, figures in manifest["report"]["safe_delta"]["per_tensor"].items():
        kept = out[name] == ft[name]
        assert torch.equal(out[name], torch.where(kept, ft[name], a[name])), name  # diagonal H: no compensation
        assert figures["admitted"] == int(kept.sum())
