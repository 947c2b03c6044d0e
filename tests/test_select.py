import math

import pytest
import torch

import surgery.kernels
import surgery.select as select
from surgery.errors import SurgeryError
from surgery.kernels.keys import key_to_float, order_keys
from surgery.select import (
    global_threshold,
    prune_matrix,
    prune_rows,
    rows_to_remove,
    select_global,
    select_per_row,
)

from .conftest import DTYPES


def sort_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Independent answer: a stable descending sort keeps equal scores in index order (last dim)."""
    s = scores.float().nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order, True)


def tie_heavy(shape, generator) -> torch.Tensor:
    return torch.randint(-3, 4, shape, generator=generator).float()


def test_rows_to_remove_is_antidotes_count():
    assert rows_to_remove(4096, 0.05) == 205  # 4096 - int(4096 * 0.95) = 4096 - 3891
    assert rows_to_remove(11008, 0.05) == 551
    assert rows_to_remove(37, 0.02) == 1  # the paper's count removes one where floor(d * ratio) removes none
    assert rows_to_remove(4096, 1e-5) == 1  # the full-fine-tune recipe's ratio: exactly one weight per row
    assert rows_to_remove(256, 1e-5) == 1
    assert rows_to_remove(37, 1.0) == 37
    assert rows_to_remove(37, 0.0) == 0
    assert rows_to_remove(100, 0.29) == 29  # 100 - int(100 * 0.71)
    for n in (1, 7, 37, 256, 4096, 11008, 28672):
        for ratio in (0.0, 1e-5, 0.01, 0.05, 0.1, 0.29, 0.5, 0.57, 1.0):
            assert rows_to_remove(n, ratio) == n - int(n * (1 - ratio))  # Antidote's utils.py, per row
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(SurgeryError, match="ratio"):
            rows_to_remove(10, bad)


@pytest.mark.parametrize("ratio", [0.0, 0.02, 0.05, 0.3, 0.5, 0.99, 1.0])
def test_select_per_row_takes_exactly_k_largest(ratio):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(9, 37, generator=g)
    mask = select_per_row(scores, ratio)
    k = rows_to_remove(37, ratio)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert (mask.sum(dim=1) == k).all()
    if 0 < k < 37:
        for row in range(9):
            assert scores[row][mask[row]].min() >= scores[row][~mask[row]].max()
    assert torch.equal(mask, sort_top_k(scores, k))


def test_ties_go_to_the_lower_column():
    scores = torch.full((3, 10), 2.5)
    mask = select_per_row(scores, 0.4)
    assert torch.equal(mask, torch.tensor([[True] * 4 + [False] * 6] * 3))
    # one large score, then ties for the rest: the large one and then the first tied columns
    row = torch.tensor([[1.0, 1.0, 5.0, 1.0, 1.0]])
    assert select_per_row(row, 0.6).tolist() == [[True, True, True, False, False]]
    g = torch.Generator().manual_seed(1)
    scores = tie_heavy((20, 33), g)
    for ratio in (0.1, 0.33, 0.5, 0.9):
        assert torch.equal(select_per_row(scores, ratio), sort_top_k(scores, rows_to_remove(33, ratio)))


def test_signed_zero_is_one_score_and_nan_counts_as_minus_inf():
    assert select_per_row(torch.tensor([[-0.0, 0.0, 0.0]]), 0.3).tolist() == [[True, False, False]]
    # NaN ties with -inf (lower column first) and never beats a number
    row = torch.tensor([[math.nan, -math.inf, 1.0, -5.0]])
    assert select_per_row(row, 0.5).tolist() == [[False, False, True, True]]
    assert select_per_row(row, 0.75).tolist() == [[True, False, True, True]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_rows_zeroes_the_top_wanda_scores_and_nothing_else(dtype):
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 45, generator=g).to(dtype)
    norms = torch.rand(45, generator=g) * 3
    before = weight.clone()
    new, mask = prune_rows(weight, norms, 0.2, kernels="torch")
    assert torch.equal(weight.view(torch.uint8), before.view(torch.uint8))  # input untouched
    assert new.dtype == dtype and new.shape == weight.shape
    expected = select_per_row(weight.float().abs() * norms, 0.2)  # Wanda: S_ij = |W_ij| * ||X_j||_2
    assert torch.equal(mask, expected)
    assert (mask.sum(dim=1) == rows_to_remove(45, 0.2)).all()
    assert (new[mask] == 0).all() and not torch.signbit(new[mask].float()).any()  # +0.0
    assert torch.equal(
        new[~mask].view(torch.uint8 if dtype == torch.float32 else torch.int16),
        weight[~mask].view(torch.uint8 if dtype == torch.float32 else torch.int16),
    )


def test_prune_rows_magnitude_negative_scale_and_rounding_to_zero():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 30, generator=g)
    new, mask = prune_rows(weight, None, 0.1, kernels="torch")
    assert torch.equal(mask, select_per_row(weight.abs(), 0.1))
    # contrastive score: harmful minus benign norms can be negative; the largest (least negative) go
    scale = torch.randn(30, generator=g)
    new, mask = prune_rows(weight, scale, 0.5, kernels="torch")
    assert torch.equal(mask, sort_top_k(weight.abs() * scale, 15))
    new, mask = prune_rows(weight, scale, 0.03, kernels="torch")  # 30 - int(30 * 0.97) == 1: one per row, not zero
    assert mask.sum(dim=1).tolist() == [1] * 8 and torch.equal(mask, sort_top_k(weight.abs() * scale, 1))
    new, mask = prune_rows(weight, scale, 0.0, kernels="torch")
    assert not mask.any() and torch.equal(new, weight) and new is not weight
    new, mask = prune_rows(weight, scale, 1.0, kernels="torch")
    assert mask.all() and (new == 0).all()


def test_prune_rows_checks_its_arguments():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match="columns"):
        prune_rows(w, torch.ones(5), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        prune_rows(torch.randn(6), None, 0.5)
    with pytest.raises(SurgeryError, match="kernels"):
        prune_rows(w, None, 0.5, kernels="cuda")
    with pytest.raises(SurgeryError, match="ratio"):
        prune_rows(w, None, 1.5)


def test_triton_asked_for_but_unusable_is_a_clear_error(monkeypatch):
    w = torch.randn(4, 6)
    monkeypatch.setattr(surgery.kernels, "triton_problem", lambda: "Triton is not installed")
    with pytest.raises(SurgeryError, match="Triton is not installed"):
        prune_rows(w, None, 0.5, kernels="triton")
    with pytest.raises(SurgeryError, match="Triton is not installed"):
        global_threshold(w, 0.5, kernels="triton")
    assert torch.equal(prune_rows(w, None, 0.5, kernels="auto")[1], prune_rows(w, None, 0.5, kernels="torch")[1])
    monkeypatch.setattr(surgery.kernels, "triton_problem", lambda: None)
    monkeypatch.setattr(surgery.kernels, "interpreter_mode", lambda: False)
    with pytest.raises(SurgeryError, match="CUDA"):
        prune_rows(w, None, 0.5, kernels="triton")


def test_chunked_reference_gives_the_same_answer(monkeypatch):
    g = torch.Generator().manual_seed(4)
    weight, scale = tie_heavy((13, 21), g), torch.randn(21, generator=g)
    scores = tie_heavy((1000,), g)
    whole = (
        prune_rows(weight, scale, 0.4, "torch"),
        select_global(scores, 0.3, "torch"),
        global_threshold(scores, 0.3, "torch"),
    )
    monkeypatch.setattr(select, "_CHUNK", 50)  # 2 rows / 50 elements per chunk
    chunked = (
        prune_rows(weight, scale, 0.4, "torch"),
        select_global(scores, 0.3, "torch"),
        global_threshold(scores, 0.3, "torch"),
    )
    assert torch.equal(whole[0][0], chunked[0][0]) and torch.equal(whole[0][1], chunked[0][1])
    assert torch.equal(whole[1], chunked[1]) and whole[2] == chunked[2]


def test_order_keys_follow_the_numbers():
    values = torch.tensor([-math.inf, -3e38, -1.5, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1.0, 2.0, 3e38, math.inf])
    keys = order_keys(values)
    assert keys.dtype == torch.int64 and 0 <= keys.min() and keys.max() < 2**32
    assert (keys[1:] >= keys[:-1]).all()
    assert keys[4] == keys[5]  # -0.0 and +0.0
    assert (keys[1:4] > keys[:3]).all() and (keys[6:] > keys[5:-1]).all()
    assert order_keys(torch.tensor([math.nan]))[0] == keys[0]  # NaN is -inf
    back = torch.tensor([key_to_float(int(k)) for k in keys])
    assert torch.equal(back, values.masked_fill(values == 0, 0.0))


def check_threshold(scores: torch.Tensor, ratio: float, kernels: str = "torch"):
    """global_threshold against a full stable sort of the flattened scores."""
    t, n_eq = global_threshold(scores, ratio, kernels)
    k = rows_to_remove(scores.numel(), ratio)
    s = scores.reshape(-1).float().nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    if k == 0:
        assert (t, n_eq) == (math.inf, 0)
    else:
        assert t == torch.sort(s, descending=True).values[k - 1].item()
    assert int((s > t).sum()) + n_eq == k and 0 <= n_eq <= int((s == t).sum())
    mask = select_global(scores, ratio, kernels)
    assert mask.shape == scores.shape and int(mask.sum()) == k
    assert torch.equal(mask.reshape(-1), sort_top_k(s, k))
    return t, n_eq


@pytest.mark.parametrize("ratio", [0.0, 0.001, 0.05, 0.5, 1.0])
def test_global_threshold_agrees_with_sort(ratio):
    g = torch.Generator().manual_seed(5)
    check_threshold(torch.randn(3000, generator=g), ratio)
    check_threshold(tie_heavy((40, 75), g), ratio)  # any shape; many ties, n_eq > 1
    check_threshold(torch.randn(7, 11, 13, generator=g).abs(), ratio)


def test_global_threshold_ties_and_special_values():
    t, n_eq = check_threshold(torch.ones(100), 0.37)
    assert (t, n_eq) == (1.0, 37)
    assert select_global(torch.ones(10), 0.3).tolist() == [True] * 3 + [False] * 7  # lowest flat index first
    special = torch.tensor([math.nan, -0.0, 0.0, math.inf, -math.inf, 1e-45, -1e-45, 2.0, 2.0, -2.0] * 7)
    for ratio in (0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 0.9, 1.0):
        check_threshold(special, ratio)


@pytest.mark.skipif(
    not __import__("os").environ.get("SURGERY_BIG_TESTS"), reason="set SURGERY_BIG_TESTS=1 (needs ~20 GB, minutes)"
)
def test_global_threshold_beyond_int32_elements():
    n = 2**31 + 1000
    scores = torch.zeros(n)
    scores[-5:] = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0])  # the largest lie past index 2^31
    t, n_eq = global_threshold(scores, 3.5 / n, kernels="torch")  # k = 3: 3.0, then two of the 2.0s
    assert (t, n_eq) == (2.0, 2)
    t, n_eq = global_threshold(scores, 0.75)
    assert t == 0.0 and n_eq == rows_to_remove(n, 0.75) - 5


def test_prune_matrix_removes_exact_share_of_whole_matrix():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 20, generator=gen)
    norms = torch.rand(20, generator=gen) + 0.1
    pruned, mask = prune_matrix(weight, norms, 0.3, kernels="torch")
    assert int(mask.sum()) == rows_to_remove(240, 0.3) == 72
    scores = weight.abs() * norms
    # every zeroed weight scores at least as high as every kept one, and only zeroed weights changed
    assert scores[mask].min() >= scores[~mask].max()
    assert torch.equal(pruned[~mask], weight[~mask]) and bool((pruned[mask] == 0).all())
