"""RESTA (`surgery resta`) and the sign-conflict revert (`surgery revert`) on three related tiny checkpoints:
unaligned W_u, aligned W_a = W_u + noise, fine-tuned W_ft = W_a + noise. Every expected tensor is computed here
from the three checkpoints, independently of the methods' code."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from surgery.checkpoint import MANIFEST_NAME, open_checkpoint
from surgery.deltas import dare, sign_conflicts, tensor_seed, top_of
from surgery.testing.tiny import save_tiny_checkpoint, tiny_llama

from .conftest import bits, checkpoint_family, cli, folder_hashes, perturb, tensors


def surgery(*args, capsys) -> tuple[int, str, str]:
    return cli(args, capsys)


def run(method: str, tuned: Path, aligned: Path, unaligned: Path, out: Path, *more, capsys, check=False) -> dict:
    code, stdout, err = surgery(
        method,
        tuned,
        "--aligned",
        aligned,
        "--unaligned",
        unaligned,
        "-o",
        out,
        "--device",
        "cpu",
        *([] if check else ["--no-check"]),
        *more,
        capsys=capsys,
    )
    assert code == 0, err
    return json.loads((out / MANIFEST_NAME).read_text())


# ---- RESTA ---------------------------------------------------------------------------------------------------------


def test_resta_beta_zero_is_bit_identical(tmp_path, capsys, no_model):
    tuned, aligned, unaligned = checkpoint_family(tmp_path)
    manifest = run("resta", tuned, aligned, unaligned, tmp_path / "out", "--beta", "0", capsys=capsys)
    before, after = tensors(tuned), tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    assert all(torch.equal(bits(before[n]), bits(after[n])) for n in before)
    assert not any(manifest["changed_fraction"].values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resta_beta_one_is_w_ft_plus_v_in_fp32(dtype, tmp_path, capsys, no_model):
    tuned, aligned, unaligned = checkpoint_family(tmp_path, dtype)
    run("resta", tuned, aligned, unaligned, tmp_path / "out", "--beta", "1", capsys=capsys)
    ft, a, u, out = tensors(tuned), tensors(aligned), tensors(unaligned), tensors(tmp_path / "out")
    for name in ft:
        expected = (ft[name].float() + (a[name].float() - u[name].float())).to(dtype)
        assert out[name].dtype == dtype and torch.equal(bits(out[name]), bits(expected)), name
        assert not torch.equal(out[name], ft[name]), name


def test_resta_beta_scales_the_vector(tmp_path, capsys):
    tuned, aligned, unaligned = checkpoint_family(tmp_path)
    run("resta", tuned, aligned, unaligned, tmp_path / "out", "--beta", "0.3", capsys=capsys)
    ft, a, u, out = tensors(tuned), tensors(aligned), tensors(unaligned), tensors(tmp_path / "out")
    for name in ft:
        assert torch.equal(out[name], ft[name] + 0.3 * (a[name] - u[name])), name


def test_resta_changes_only_tensors_where_v_is_not_zero(tmp_path, capsys):
    same = lambda name: name.startswith("model.layers.1.") or name.endswith("norm.weight")  # noqa: E731
    tuned, aligned, unaligned = checkpoint_family(tmp_path, same_on=same)
    manifest = run("resta", tuned, aligned, unaligned, tmp_path / "out", capsys=capsys)
    ft, out = tensors(tuned), tensors(tmp_path / "out")
    unchanged = sorted(n for n in ft if same(n))
    assert unchanged and all(torch.equal(bits(out[n]), bits(ft[n])) for n in unchanged)
    assert all(not torch.equal(out[n], ft[n]) for n in ft if not same(n))
    report = manifest["report"]["resta"]
    assert sorted(report["tensors_with_zero_vector"]) == unchanged
    assert report["tensors_added"] == len(ft) - len(unchanged)


def test_resta_targets_limit_the_tensors(tmp_path, capsys):
    tuned, aligned, unaligned = checkpoint_family(tmp_path)
    run(
        "resta",
        tuned,
        aligned,
        unaligned,
        tmp_path / "out",
        "--targets",
        "*.o_proj,model.embed_tokens.weight",
        capsys=capsys,
    )
    ft, out = tensors(tuned), tensors(tmp_path / "out")
    chosen = {n for n in ft if n.endswith("o_proj.weight") or n == "model.embed_tokens.weight"}
    assert len(chosen) == 3
    for name in ft:
        assert torch.equal(out[name], ft[name]) != (name in chosen), name


def test_dare_with_p_zero_is_no_dare(tmp_path, capsys):
    delta = torch.randn(50, 40)
    assert dare(delta, 0.0, seed=3) is delta
    tuned, aligned, unaligned = checkpoint_family(tmp_path)
    run("resta", tuned, aligned, unaligned, tmp_path / "plain", "--beta", "0.5", capsys=capsys)
    run(
        "resta",
        tuned,
        aligned,
        unaligned,
        tmp_path / "dare0",
        "--beta",
        "0.5",
        "--dare",
        "0",
        "--seed",
        "7",
        capsys=capsys,
    )
    plain, dare0 = tensors(tmp_path / "plain"), tensors(tmp_path / "dare0")
    assert all(torch.equal(bits(plain[n]), bits(dare0[n])) for n in plain)


def test_dare_keeps_the_expected_delta():
    delta = torch.full((400, 500), 0.25)
    for p in (0.1, 0.5, 0.9):
        sparse = dare(delta, p, seed=1)
        assert set(sparse.unique().tolist()) <= {0.0, (delta[0, 0] / (1 - p)).item()}  # fp32 division
        assert abs((sparse == 0).float().mean().item() - p) < 0.01  # 200,000 draws: the share dropped is p
        assert abs(sparse.mean().item() / 0.25 - 1) < 0.02  # E[DARE(Δ)] = Δ
    assert torch.equal(dare(delta, 0.5, seed=1), dare(delta, 0.5, seed=1))
    assert not torch.equal(dare(delta, 0.5, seed=1), dare(delta, 0.5, seed=2))
    assert tensor_seed(0, "a.weight") != tensor_seed(0, "b.weight") != tensor_seed(1, "b.weight")


def test_resta_dare_is_reproducible_and_drops_the_fine_tune_delta(tmp_path, capsys):
    tuned, aligned, unaligned = checkpoint_family(tmp_path)
    p = 0.4
    for folder, seed in (("one", 5), ("again", 5), ("other", 6)):
        run(
            "resta",
            tuned,
            aligned,
            unaligned,
            tmp_path / folder,
            "--beta",
            "0",
            "--dare",
            str(p),
            "--seed",
            str(seed),
            capsys=capsys,
        )
    one, again, other = (tensors(tmp_path / f) for f in ("one", "again", "other"))
    assert all(torch.equal(bits(one[n]), bits(again[n])) for n in one)
    assert any(not torch.equal(one[n], other[n]) for n in one)
    ft, a = tensors(tuned), tensors(aligned)
    ratios = []
    for name in ft:
        delta = ft[name].float() - a[name].float()
        kept = one[name] != a[name]
        # beta 0: W = W_aligned + DARE(Δ): a dropped entry is the aligned value, a kept one Δ / (1 - p) away from it.
        assert torch.equal(one[name][~kept], a[name][~kept]), name
        assert torch.equal(one[name][kept], a[name][kept] + delta[kept] / (1 - p)), name
        ratios.append(((one[name] - a[name]) / delta).reshape(-1))
    ratios = torch.cat(ratios)  # 0 (dropped) or 1 / (1 - p) (kept): mean 1 when E[DARE(Δ)] = Δ
    assert abs((ratios == 0).float().mean().item() - p) < 0.02
    assert abs(ratios.mean().item() - 1) < 0.05


def test_resta_fixed_beta_streams_without_a_model(tmp_path, capsys, no_model, monkeypatch):
    tuned, aligned, unaligned = checkpoint_family(tmp_path, shard_bytes=20_000)
    reads = Counter()
    from surgery.checkpoint import Checkpoint

    read = Checkpoint.read

    def counted(self, name):
        reads[self.path.name] += 1
        return read(self, name)

    monkeypatch.setattr(Checkpoint, "read", counted)
    run("resta", tuned, aligned, unaligned, tmp_path / "out", "--beta", "0.5", capsys=capsys)
    n = len(open_checkpoint(tuned).tensors)
    # the check that V is not zero reads one pair (the first tensor differs); then one read of each per tensor written
    assert reads == Counter({"tuned": n, "aligned": n + 1, "unaligned": n + 1})


def test_resta_auto_beta_is_searched_and_written_exactly(tmp_path, capsys, model_loads):
    tuned, aligned, unaligned = checkpoint_family(tmp_path)
    manifest = run(
        "resta",
        tuned,
        aligned,
        unaligned,
        tmp_path / "out",
        "--beta",
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
    beta = manifest["arguments"]["beta"]
    assert manifest["report"]["search"]["chosen"] == beta and 0.05 <= beta <= 2.0
    assert model_loads["loads"] == 1  # the search's model, loaded once by the driver
    ft, a, u, out = tensors(tuned), tensors(aligned), tensors(unaligned), tensors(tmp_path / "out")
    for name in ft:
        v = a[name] - u[name]
        assert torch.equal(out[name], ft[name] + (v if beta == 1 else beta * v)), name


# ---- sign-conflict revert ------------------------------------------------------------------------------------------


def expected_revert(ft, a, u, fraction: float, score=None) -> dict[str, torch.Tensor]:
    """Per weight, the bool mask the revert must select: n - int(n * (1 - fraction)) of its n conflicting entries (Antidote's count), highest
    |Δ| (times `score[name]` per column) first, ties to the lower flat index (a plain stable sort)."""
    masks = {}
    for name in ft:
        delta, v = ft[name].float() - a[name].float(), a[name].float() - u[name].float()
        conflicting = ((delta > 0) & (v < 0)) | ((delta < 0) & (v > 0))
        s = delta.abs() * (score[name] if score else 1.0)
        idx = conflicting.reshape(-1).nonzero().reshape(-1)
        k = idx.numel() - int(idx.numel() * (1 - fraction))
        order = torch.sort(s.reshape(-1)[idx], descending=True, stable=True).indices[:k]
        mask = torch.zeros(delta.numel(), dtype=torch.bool)
        mask[idx[order]] = True
        masks[name] = (mask.view(delta.shape), conflicting)
    return masks


def linear_weights(ckpt: dict) -> dict:
    return {n: t for n, t in ckpt.items() if n.startswith("model.layers.") and n.endswith("proj.weight")}


@pytest.mark.parametrize("fraction", [0.3, 0.75])
def test_revert_reverts_the_top_conflicting_entries_exactly(fraction, tmp_path, capsys, no_model):
    tuned, aligned, unaligned = checkpoint_family(tmp_path)
    manifest = run(
        "revert",
        tuned,
        aligned,
        unaligned,
        tmp_path / "out",
        "--score",
        "magnitude",
        "--fraction",
        str(fraction),
        capsys=capsys,
    )
    ft, a, u, out = tensors(tuned), tensors(aligned), tensors(unaligned), tensors(tmp_path / "out")
    weights = linear_weights(ft)
    assert len(weights) == 14
    per_tensor = manifest["report"]["revert"]["per_tensor"]
    for name, (mask, conflicting) in expected_revert(weights, a, u, fraction).items():
        changed = out[name] != ft[name]
        assert torch.equal(changed, mask), name  # the selected entries, and only those (a subset of the conflicts)
        assert not (changed & ~conflicting).any(), name
        assert torch.equal(out[name][mask], a[name][mask]), name  # reverted: the aligned value exactly
        assert torch.equal(out[name][~mask], ft[name][~mask]), name  # everything else: the fine-tune's value
        n = int(conflicting.sum())
        assert per_tensor[name]["conflicting"] == n and per_tensor[name]["reverted"] == int(changed.sum()) == n - int(
            n * (1 - fraction)
        )
    for name in ft.keys() - weights.keys():  # embeddings, norms, head: not targets
        assert torch.equal(bits(out[name]), bits(ft[name])), name


def test_revert_fraction_one_reverts_every_conflict_without_data(tmp_path, capsys, no_model):
    tuned, aligned, unaligned = checkpoint_family(tmp_path, torch.bfloat16)
    manifest = run("revert", tuned, aligned, unaligned, tmp_path / "out", "--fraction", "1", capsys=capsys)
    ft, a, u, out = tensors(tuned), tensors(aligned), tensors(unaligned), tensors(tmp_path / "out")
    total = 0
    for name in linear_weights(ft):
        conflicting = sign_conflicts(ft[name].float() - a[name].float(), a[name].float() - u[name].float())
        assert torch.equal(out[name], torch.where(conflicting, a[name], ft[name])), name
        total += int(conflicting.sum())
    report = manifest["report"]["revert"]
    assert report["reverted"] == report["conflicting"] == total > 0
    assert report["score"].startswith("none") and report["calibration_tokens"] == 0  # no ranking, so no data


def test_revert_targets_limit_the_weights(tmp_path, capsys):
    tuned, aligned, unaligned = checkpoint_family(tmp_path)
    run(
        "revert",
        tuned,
        aligned,
        unaligned,
        tmp_path / "out",
        "--targets",
        "*.0.mlp.down_proj",
        "--score",
        "magnitude",
        "--fraction",
        "0.5",
        capsys=capsys,
    )
    ft, out = tensors(tuned), tensors(tmp_path / "out")
    changed = sorted(n for n in ft if not torch.equal(out[n], ft[n]))
    assert changed == ["model.layers.0.mlp.down_proj.weight"]


def planted(root: Path) -> tuple[Path, Path, Path, tuple[int, int], tuple[int, int]]:
    """A family where layer 0's down_proj has exactly two conflicting delta entries: `big` (|Δ| 0.02) in an ordinary
    input column, and `loud` (|Δ| 0.01) in column 5, whose input the fine-tuned model amplifies 50-fold (its up_proj
    row 5 is scaled). Magnitude must pick `big`, Wanda (|Δ|·||X||) `loud`."""
    down, up, loud, big = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight", (3, 5), (3, 20)
    model = tiny_llama(seed=0)
    unaligned = save_tiny_checkpoint(root / "unaligned", model=model)
    aligned_model = perturb(model, 1)
    with torch.no_grad():
        aligned_model.get_parameter(up)[5] *= 50  # the same in all three models but the unaligned: Δ = 0 on up_proj
    aligned = save_tiny_checkpoint(root / "aligned", model=aligned_model)
    with torch.no_grad():
        w = aligned_model.get_parameter(down)
        v = w - open_checkpoint(unaligned).read(down)
        for (i, j), size in ((loud, 0.01), (big, 0.02)):
            w[i, j] -= torch.sign(v[i, j]) * size  # against V: a sign conflict
    tuned = save_tiny_checkpoint(root / "tuned", model=aligned_model)
    return tuned, aligned, unaligned, loud, big


def test_magnitude_and_wanda_pick_different_entries(tmp_path, capsys, harmful_file):
    tuned, aligned, unaligned, loud, big = planted(tmp_path)
    down = "model.layers.0.mlp.down_proj.weight"
    common = ["--targets", "*.0.mlp.down_proj", "--fraction", "0.5"]
    run("revert", tuned, aligned, unaligned, tmp_path / "magnitude", *common, "--score", "magnitude", capsys=capsys)
    manifest = run(
        "revert",
        tuned,
        aligned,
        unaligned,
        tmp_path / "wanda",
        *common,
        "--score",
        "wanda",
        "--data",
        harmful_file,
        capsys=capsys,
    )
    assert manifest["report"]["revert"]["per_tensor"][down]["conflicting"] == 2
    assert manifest["report"]["revert"]["calibration_tokens"] > 0
    ft = open_checkpoint(tuned).read(down)
    for folder, chosen in (("magnitude", big), ("wanda", loud)):
        changed = (open_checkpoint(tmp_path / folder).read(down) != ft).nonzero().tolist()
        assert changed == [list(chosen)], folder


def test_top_of_breaks_ties_by_the_lower_flat_index():
    scores = torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.5, 2.0]])
    candidates = torch.tensor([[True, False, True], [True, True, True]])
    # candidates in flat order: 0 (1.0), 2 (2.0), 3 (2.0), 4 (0.5), 5 (2.0); 5 - int(5 * 0.6) = 2: the ties at 2 and 3.
    assert top_of(scores, candidates, 0.4).reshape(-1).nonzero().reshape(-1).tolist() == [2, 3]
    assert torch.equal(top_of(scores, candidates, 1.0), candidates)
    assert top_of(scores, candidates, 0.1).reshape(-1).nonzero().reshape(-1).tolist() == [2]  # 5 - int(4.5): one
    assert not top_of(scores, candidates, 0.0).any()


# ---- errors: one line, exit 2, nothing written, no model ----------------------------------------------------------


def assert_refused(method, tuned, aligned, unaligned, tmp_path, capsys, needle, *more):
    before, listing = folder_hashes(tmp_path), sorted(tmp_path.rglob("*"))
    code, _, err = surgery(
        method,
        tuned,
        "--aligned",
        aligned,
        "--unaligned",
        unaligned,
        "-o",
        tmp_path / "out",
        "--device",
        "cpu",
        *more,
        capsys=capsys,
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle in lines[0], lines[0]
    assert sorted(tmp_path.rglob("*")) == listing and folder_hashes(tmp_path) == before


@pytest.mark.parametrize("method", ["resta", "revert"])
def test_other_shapes_are_refused(method, tmp_path, capsys, no_model):
    tuned, aligned, unaligned = checkpoint_family(tmp_path)
    wider = save_tiny_checkpoint(tmp_path / "wider", model=tiny_llama(intermediate=96))
    assert_refused(method, tuned, aligned, wider, tmp_path, capsys, "--unaligned")
    assert_refused(method, tuned, wider, unaligned, tmp_path, capsys, "--aligned")


def test_aligned_and_unaligned_are_checked_against_each_other(tmp_path, capsys, no_model):
    tuned, aligned, unaligned = checkpoint_family(tmp_path)
    # The model's config does not state vocab_size, so each of the pair passes against it; they disagree with each other.
    for folder, vocab in ((tuned, None), (aligned, 128), (unaligned, 256)):
        config = json.loads((folder / "config.json").read_text())
        config.pop("vocab_size")
        (folder / "config.json").write_text(json.dumps({**config, **({"vocab_size": vocab} if vocab else {})}))
    assert_refused("resta", tuned, aligned, unaligned, tmp_path, capsys, "has vocab_size 256")


@pytest.mark.parametrize("method", ["resta", "revert"])
def test_a_zero_safety_vector_is_refused(method, tmp_path, capsys, no_model):
    tuned, aligned, _ = checkpoint_family(tmp_path)
    copy = shutil.copytree(aligned, tmp_path / "copy")
    assert_refused(method, tuned, aligned, copy, tmp_path, capsys, "V = W_aligned - W_unaligned is zero")
    assert_refused(method, tuned, aligned, aligned, tmp_path, capsys, "same folder")
    assert_refused(method, tuned, aligned, copy, tmp_path, capsys, "is zero", "--dry-run")


def test_a_safety_vector_zero_on_every_target_is_refused(tmp_path, capsys, no_model):
    tuned, aligned, unaligned = checkpoint_family(tmp_path, same_on=lambda name: "o_proj" in name)
    assert_refused(
        "resta",
        tuned,
        aligned,
        unaligned,
        tmp_path,
        capsys,
        "every one of the 2 target tensors",
        "--targets",
        "*.o_proj",
    )
    assert_refused("revert", tuned, aligned, unaligned, tmp_path, capsys, "is zero", "--targets", "*.o_proj")


def test_dare_of_one_is_refused(tmp_path, capsys, no_model):
    tuned, aligned, unaligned = checkpoint_family(tmp_path)
    assert_refused("resta", tuned, aligned, unaligned, tmp_path, capsys, "--dare", "--dare", "1")


@pytest.mark.parametrize("method", ["resta", "revert"])
def test_a_missing_pair_option_is_one_error_line(method, tmp_path, capsys, no_model):
    tuned, aligned, unaligned = checkpoint_family(tmp_path)
    listing = sorted(tmp_path.rglob("*"))
    for given, missing in ((["--aligned", aligned], "--unaligned"), (["--unaligned", unaligned], "--aligned")):
        code, _, err = surgery(method, tuned, *given, "-o", tmp_path / "out", capsys=capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {missing} is required"), err
    assert sorted(tmp_path.rglob("*")) == listing
