"""Triton kernels against the plain-torch reference: bit-identical masks and outputs.

Without a GPU the kernels run in Triton's CPU interpreter, which reads TRITON_INTERPRET when a kernel
is defined: it is set here before `surgery.kernels.triton_select` is first imported. Shapes are small
because the interpreter is slow.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from surgery.kernels import triton_available, triton_problem  # noqa: E402

if not triton_available():
    pytest.skip(triton_problem(), allow_module_level=True)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from surgery.kernels import triton_select  # noqa: E402
from surgery.select import global_threshold, prune_rows, rows_to_remove, select_global  # noqa: E402

from .conftest import DTYPES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not isinstance(triton_select._prune_rows_kernel, InterpretedFunction):
    pytest.skip("no GPU, and the kernels were defined before TRITON_INTERPRET=1 was set", allow_module_level=True)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def assert_same_prune(weight, scale, ratio, block=None):
    """Triton and torch give the same mask and bit-identical outputs; returns the mask."""
    ref_w, ref_m = prune_rows(weight, scale, ratio, kernels="torch")
    if block is None:
        tri_w, tri_m = prune_rows(weight, scale, ratio, kernels="triton")
    else:  # a small block splits each row into several steps: ties must carry across them
        s = None if scale is None else scale.float().to(weight.device)
        tri_w, tri_m = triton_select.prune_rows_triton(weight, s, rows_to_remove(weight.shape[1], ratio), block=block)
    assert tri_m.dtype == torch.bool and tri_w.dtype == weight.dtype
    assert torch.equal(tri_m, ref_m)
    assert torch.equal(bits(tri_w), bits(ref_w))
    assert (tri_m.sum(dim=1) == rows_to_remove(weight.shape[1], ratio)).all()
    return tri_m


def tie_heavy(shape, g):
    return torch.randint(-2, 3, shape, generator=g).float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1, 37, 64, 130])
def test_per_row_prune_matches_reference(dtype, cols):
    g = torch.Generator().manual_seed(cols)
    weight = torch.randn(5, cols, generator=g).to(dtype).to(DEVICE)
    norms = (torch.rand(cols, generator=g) * 4).to(DEVICE)
    for ratio in (0.05, 0.5, 1.0):
        assert_same_prune(weight, norms, ratio)
    assert_same_prune(weight, None, 0.3)  # magnitude score


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_row_prune_ties_across_blocks(dtype):
    g = torch.Generator().manual_seed(7)
    weight = tie_heavy((6, 45), g).to(dtype).to(DEVICE)
    scale = tie_heavy((45,), g).to(DEVICE)  # negative, zero and equal scales: many tied scores
    for ratio in (0.1, 0.4, 0.75):
        assert_same_prune(weight, scale, ratio, block=16)
    ones = torch.ones(3, 40, dtype=dtype, device=DEVICE)
    mask = assert_same_prune(ones, None, 0.55, block=16)  # k = 22 spans two blocks of the row
    assert torch.equal(mask.cpu(), torch.tensor([[True] * 22 + [False] * 18] * 3))


def test_per_row_prune_negative_scale_and_rounding_to_zero():
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(4, 37, generator=g).to(torch.bfloat16).to(DEVICE)
    scale = torch.randn(37, generator=g).to(DEVICE)  # contrastive: harmful minus benign norms
    assert_same_prune(weight, scale, 0.5)
    assert_same_prune(weight, -scale.abs(), 0.2)
    mask = assert_same_prune(weight, scale, 0.02)  # 37 - int(37 * 0.98) == 1: one per row, where the floor gives 0
    assert mask.sum(dim=1).tolist() == [1] * 4
    mask = assert_same_prune(weight, scale, 0.0)  # nothing changes
    assert not mask.any()


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0 in the interpreter's numpy
def test_per_row_prune_special_values_and_strided_input():
    w = torch.tensor([[0.0, -0.0, 1.0, -1.0, math.inf, 2.0, -0.0, 3.0, 1e-40, -1e-45]] * 3)
    scale = torch.tensor([1.0, -1.0, 0.0, -0.0, 0.0, math.inf, 2.0, -math.inf, 1e30, 1.0])
    for ratio in (0.2, 0.4, 0.6, 0.9):  # NaN (inf * 0), signed zeros, infinities, denormals
        assert_same_prune(w.to(DEVICE), scale.to(DEVICE), ratio)
    g = torch.Generator().manual_seed(9)
    wide = torch.randn(30, 6, generator=g).to(DEVICE)
    assert_same_prune(wide.t(), torch.rand(30, generator=g).to(DEVICE), 0.3)  # a transposed view


def check_global(scores, ratio, programs=None):
    ref = global_threshold(scores, ratio, kernels="torch")
    k = rows_to_remove(scores.numel(), ratio)
    flat = scores.reshape(-1).to(DEVICE)
    got = (
        triton_select.global_threshold_triton(flat, k, programs=programs)
        if k
        else global_threshold(flat, ratio, "triton")
    )
    assert got == ref
    return got


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.3, 1.0])
def test_global_threshold_matches_reference(ratio):
    g = torch.Generator().manual_seed(10)
    check_global(torch.randn(10_000, generator=g), ratio, programs=2)  # 3 blocks on 2 programs: grid-stride loop
    check_global(tie_heavy((50, 61), g), ratio)
    special = torch.tensor([math.nan, -0.0, 0.0, math.inf, -math.inf, 1e-45, -1e-45, 2.0, 2.0, -2.0] * 11)
    check_global(special, ratio)


def test_select_global_with_triton_threshold():
    g = torch.Generator().manual_seed(11)
    scores = tie_heavy((30, 41), g).to(DEVICE)
    mask = select_global(scores, 0.37, kernels="triton")
    assert torch.equal(mask, select_global(scores, 0.37, kernels="torch"))
    assert int(mask.sum()) == rows_to_remove(scores.numel(), 0.37)
