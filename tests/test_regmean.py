"""`surgery regmean`: the merge against an independent least-squares solve, its special cases (identity Grams are
interpolation, the ends are the two models bit for bit), planted Grams through the calibration seams, the task data's
sources, and the safety Hessians shared with Safe Delta."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from surgery.checkpoint import MANIFEST_NAME
from surgery.methods import regmean, safe_delta
from surgery.methods.interpolate import interpolated
from surgery.methods.regmean import normalised, reference_share, regmean_tensor

from .conftest import bits, checkpoint_family, cli, folder_hashes, tensors


def gram(cols: int, seed: int, tokens: int = 30) -> torch.Tensor:
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x / tokens


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.9])
def test_the_merge_is_the_least_squares_solution_of_the_two_objectives(alpha):
    """min (1-α)||(W - W_ft) C_t||² + α||(W - W_ref) C_s||² (Ĝ = C Cᵀ) solved row by row by lstsq on the stacked
    system, against the closed form W_ft + (W_ref - W_ft) K."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 5, 12
    ft, ref = torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g)
    task, safety = normalised(gram(cols, 1, tokens=8), 0.01), normalised(gram(cols, 2, tokens=8), 0.01)  # rank 8 < 12
    merged = regmean_tensor(ft, ref, reference_share(task, safety, alpha), alpha)
    ct, cs = torch.linalg.cholesky(task), torch.linalg.cholesky(safety)
    a = torch.cat([(1 - alpha) ** 0.5 * ct.T, alpha**0.5 * cs.T])  # [2 cols, cols]
    b = torch.cat([(1 - alpha) ** 0.5 * ct.T @ ft.double().T, alpha**0.5 * cs.T @ ref.double().T])  # [2 cols, rows]
    expected = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(merged.double(), expected, atol=1e-5)
    assert not torch.allclose(merged, interpolated(ft, ref, alpha), atol=1e-3)  # the Grams matter


def test_identity_grams_are_interpolation_and_the_ends_are_exact():
    g = torch.Generator().manual_seed(4)
    ft, ref = torch.randn(6, 9, generator=g).bfloat16(), torch.randn(6, 9, generator=g).bfloat16()
    eye = torch.eye(9, dtype=torch.float64)
    for alpha in (0.25, 0.5, 0.75):
        merged = regmean_tensor(ft, ref, reference_share(eye, eye, alpha), alpha)
        assert merged.dtype == torch.bfloat16
        assert torch.allclose(merged.float(), interpolated(ft, ref, alpha).float(), atol=1e-2)
    assert torch.equal(bits(regmean_tensor(ft, ref, None, 0.0)), bits(ft))
    assert torch.equal(bits(regmean_tensor(ft, ref, None, 1.0)), bits(ref))


def test_a_gram_is_scaled_to_a_mean_diagonal_of_one_and_damped():
    h = torch.diag(torch.tensor([4.0, 0.0, 2.0]))  # a column never seen: 1 first
    assert torch.allclose(
        normalised(h, 0.01), torch.diag(torch.tensor([4.0, 1.0, 2.0])) / (7 / 3) + 0.01 * torch.eye(3).double()
    )


TASK_COLUMNS = lambda j: j % 2 == 0  # noqa: E731 - the planted task uses the even input columns, safety the odd ones
BIG, SMALL = 1e2, 1e-6


def plant(monkeypatch, calls: list):
    """Both calibration seams replaced by diagonal Grams: the task's large on the even columns, safety's on the odd."""

    def diagonal(ctx, modules, task: bool):
        out = {}
        for module in modules:
            cols = ctx.ckpt.tensors[f"{module}.weight"].shape[1]
            out[module] = torch.diag(torch.tensor([BIG if TASK_COLUMNS(j) == task else SMALL for j in range(cols)]))
        return out

    def task_grams(ctx, options, modules):
        calls.append("task")
        return diagonal(ctx, modules, True), {"task_source": "planted", "task_examples": 0, "task_tokens": 0}

    def hessians(ctx, options, modules):
        calls.append("safety")
        return diagonal(ctx, modules, False), {"calibration_examples": 0, "calibration_tokens": 0, "responses": "-"}

    monkeypatch.setattr(regmean, "task_grams", task_grams)
    monkeypatch.setattr(safe_delta, "calibration_hessians", hessians)


def run(tuned, aligned, out, *more, capsys) -> dict:
    code, _, err = cli(
        ["regmean", tuned, "--reference", aligned, "-o", out, "--device", "cpu", "--no-check", *more], capsys
    )
    assert code == 0, err
    return json.loads((out / MANIFEST_NAME).read_text())


def test_planted_grams_keep_the_fine_tune_on_task_columns_and_the_reference_on_safety_columns(
    tmp_path, capsys, monkeypatch, no_model
):
    """Diagonal Grams make the merge a per-column weighted mean, ((1-α) t_j W_ft + α s_j W_ref) / ((1-α) t_j + α s_j),
    with t, s the normalised, damped diagonals: the task's columns stay the fine-tune's, safety's return to the
    reference. Every other tensor that differs (embeddings, norms, head) is interpolated at α; the inputs are not
    touched."""
    calls = []
    plant(monkeypatch, calls)
    tuned, aligned, _ = checkpoint_family(tmp_path)
    before = folder_hashes(tuned), folder_hashes(aligned)
    alpha = 0.5
    manifest = run(tuned, aligned, tmp_path / "out", "--alpha", str(alpha), capsys=capsys)
    assert (folder_hashes(tuned), folder_hashes(aligned)) == before and calls == ["task", "safety"]
    ft, a, out = tensors(tuned), tensors(aligned), tensors(tmp_path / "out")
    report = manifest["report"]["regmean"]
    assert report["weights_merged"] == 14 and report["alpha"] == alpha  # every Linear of the two decoder blocks
    merged = [n for n in ft if n.endswith("_proj.weight")]
    assert len(merged) == 14
    for name in merged:
        cols = ft[name].shape[1]
        diag = lambda task: torch.tensor([BIG if TASK_COLUMNS(j) == task else SMALL for j in range(cols)])  # noqa: E731
        t, s = (torch.diagonal(normalised(torch.diag(diag(k)), 0.01)) for k in (True, False))
        w = ((1 - alpha) * t * ft[name].double() + alpha * s * a[name].double()) / ((1 - alpha) * t + alpha * s)
        assert torch.allclose(out[name].double(), w, atol=1e-5), name
        even = torch.tensor([TASK_COLUMNS(j) for j in range(cols)])
        gap = (a[name] - ft[name]).abs() + 1e-6  # each column within 1 % of the way to the other model (the damping)
        assert ((out[name] - ft[name]).abs() <= 0.01 * gap)[:, even].all()  # the task's inputs: the fine-tune
        assert ((out[name] - a[name]).abs() <= 0.01 * gap)[:, ~even].all()  # safety's: the reference
    others = [n for n in ft if n not in merged]
    assert others and report["tensors_interpolated"] == len(others)
    for name in others:
        assert torch.equal(bits(out[name]), bits(interpolated(ft[name], a[name], alpha))), name


def test_alpha_one_writes_the_reference_and_a_tensor_equal_to_it_is_left_alone(tmp_path, capsys, monkeypatch, no_model):
    plant(monkeypatch, [])
    tuned, aligned, _ = checkpoint_family(tmp_path, torch.bfloat16, same_on=lambda name: "norm" in name)
    manifest = run(tuned, aligned, tmp_path / "out", "--alpha", "1", capsys=capsys)
    ft, a, out = tensors(tuned), tensors(aligned), tensors(tmp_path / "out")
    assert all(torch.equal(bits(out[n]), bits(a[n])) for n in ft)
    zero = run(tuned, aligned, tmp_path / "zero", "--alpha", "0", capsys=capsys)
    assert all(torch.equal(bits(tensors(tmp_path / "zero")[n]), bits(ft[n])) for n in ft)
    assert (
        manifest["report"]["regmean"]["tensors_equal_to_reference"]
        == zero["report"]["regmean"]["tensors_equal_to_reference"]
    )


def context(task=None):
    return SimpleNamespace(run=SimpleNamespace(task=task))


def test_the_task_data_comes_from_the_file_then_the_sentiment_train_part_then_the_harmless_set(tmp_path):
    from surgery.methods.regmean import RegMeanOptions, task_examples
    from surgery.metrics import SST2_TEMPLATE
    from surgery.tasks import SELECTION, sentiment_part

    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(5)))
    found, source = task_examples(context("sst2:builtin"), RegMeanOptions(task_data=str(data)))
    assert source == "file" and sorted(e.prompt for e in found) == [f"q{i}" for i in range(5)]
    found, source = task_examples(context("sst2:builtin"), RegMeanOptions(task_samples=40))
    selection = {SST2_TEMPLATE.format(s) for s, _ in sentiment_part(SELECTION)}
    assert source == "built-in sentiment train part" and len(found) == 40
    assert all(e.response in ("negative", "positive") for e in found) and not selection & {e.prompt for e in found}
    assert {e.response for e in found} == {"negative", "positive"}  # a seeded sample, both labels
    # A sentiment task measured on the user's own file is still calibrated on sentiment data (not on that file).
    other, source = task_examples(context("sst2:other.tsv"), RegMeanOptions(task_samples=40))
    assert source == "built-in sentiment train part" and other == found
    found, source = task_examples(context(None), RegMeanOptions(task_samples=6))
    assert source == "harmless instructions" and len(found) == 6 and all(e.response is None for e in found)


def test_surgery_repair_computes_the_safety_hessians_once_for_safe_delta_and_regmean(monkeypatch):
    calls = []

    def computed(ctx, options, modules):
        calls.append(tuple(modules))
        return {m: torch.eye(2) for m in modules}, {}

    monkeypatch.setattr(safe_delta, "_calibration_hessians", computed)
    ctx = SimpleNamespace(cache={}, references={"reference": SimpleNamespace(path="ref")})
    first = safe_delta.calibration_hessians(ctx, safe_delta.SafeDeltaOptions(), ["a", "b"])
    again = safe_delta.calibration_hessians(ctx, regmean.RegMeanOptions(), ["a", "b"])
    other = safe_delta.calibration_hessians(ctx, regmean.RegMeanOptions(max_samples=7), ["a", "b"])
    assert first is again and other is not first and calls == [("a", "b"), ("a", "b")]
