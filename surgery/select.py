"""Select the weights to edit: the top `ratio` of each row (Antidote/Wanda) or of a whole tensor.

Every function here has one exact answer, stated in its docstring, and the Triton kernels in
`surgery.kernels` give bit-for-bit the same one; these plain-torch versions are what runs on CPU and
what the kernels are tested against.

Ordering rules shared by all selections:
- scores are compared as fp32 numbers; -0.0 and +0.0 are the same score;
- a NaN score is treated as -inf (it is never chosen ahead of a number);
- among equal scores the lower column (per row) or lower flat index (global) is chosen first.
"""

from __future__ import annotations

import math

import torch

from .errors import SurgeryError
from .kernels.keys import key_to_float, order_keys, pick_digit

KERNELS = ("auto", "torch", "triton")
_CHUNK = 1 << 24  # elements per chunk of temporaries (64 MiB of fp32): bounds memory on huge tensors
_DIGIT_BITS = 16  # radix digit of the reference global threshold: two passes over a 32-bit key


def rows_to_remove(n_cols: int, ratio: float) -> int:
    """k = n_cols - int(n_cols * (1 - ratio)), in binary floating point (Python floats): Antidote's own count.

    The paper's code keeps the lowest `int(d·(1 - ratio))` scores of each row and selects the rest, so this is
    exactly as many weights per row as its public code removes, for LoRA matrices and full checkpoints alike.
    It differs from wanda's floor(d·ratio) in two ways: a tiny ratio still removes one weight per row
    (`rows_to_remove(4096, 1e-5)` is 1, where the floor is 0: the full-fine-tune recipe's ratio), and
    a product that lands just below an integer rounds up (`rows_to_remove(100, 0.29)` is 29). No epsilon is added.
    Ratio 0 removes nothing.
    """
    if not 0.0 <= ratio <= 1.0:
        raise SurgeryError(f"ratio must be between 0 and 1, got {ratio}")
    if n_cols < 0:
        raise SurgeryError(f"the number of columns must be non-negative, got {n_cols}")
    return n_cols - int(n_cols * (1.0 - ratio))


def _fp32_scores(scores: torch.Tensor) -> torch.Tensor:
    """A fresh fp32 copy with NaN turned into -inf (see the module docstring)."""
    s = scores.to(torch.float32, copy=True)
    return s.masked_fill_(s.isnan(), -math.inf)


def _top_k_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries of each row of an fp32, NaN-free matrix (ties: lower column)."""
    rows, n = scores.shape
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool)
    # The k-th largest value of each row is the (n - k + 1)-th smallest.
    kth = scores.kthvalue(n - k + 1, dim=1, keepdim=True).values
    above = scores > kth
    equal = scores == kth  # float equality: -0.0 == +0.0
    need = k - above.sum(dim=1, keepdim=True)  # how many of the ties each row still takes
    rank = equal.cumsum(dim=1, dtype=torch.int32)  # 1-based position among the ties, in column order
    return above | (equal & (rank <= need))


def _row_chunks(rows: int, cols: int):
    step = max(1, _CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def select_per_row(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask (True = selected) of the k = rows_to_remove(n_cols, ratio) largest scores of each row.

    Exactly k entries per row are True; among equal scores the lower column index is selected first.
    Scores are compared in fp32 (exact for fp16/bf16 input); NaN counts as -inf.
    """
    if scores.dim() != 2:
        raise ValueError(f"select_per_row expects a 2-D score matrix, got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    k = rows_to_remove(cols, ratio)
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    for r0, r1 in _row_chunks(rows, cols):
        mask[r0:r1] = _top_k_per_row(_fp32_scores(scores[r0:r1]), k)
    return mask


def _wanda_scores(weight: torch.Tensor, col_scale: torch.Tensor | None) -> torch.Tensor:
    """S_ij = |W_ij| * col_scale_j in fp32 (Wanda: col_scale = ||X_j||_2), NaN turned into -inf."""
    s = weight.abs().to(torch.float32)  # abs first: a new tensor even when weight is already fp32
    if col_scale is not None:
        s.mul_(col_scale)
    return s.masked_fill_(s.isnan(), -math.inf)


def _check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise SurgeryError(f"kernels must be one of {', '.join(KERNELS)}, got '{kernels}'")


def _use_triton(tensor: torch.Tensor, kernels: str) -> bool:
    """Whether to run the Triton kernel: asked for (and usable), or auto on a CUDA tensor."""
    _check_kernels(kernels)
    if kernels == "torch":
        return False
    from .kernels import interpreter_mode, triton_available, triton_problem

    if kernels == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise SurgeryError(f"--kernels triton: {triton_problem()}")
    if not (tensor.is_cuda or interpreter_mode()):
        raise SurgeryError("--kernels triton needs the tensors on a CUDA device (or TRITON_INTERPRET=1 to run on CPU)")
    return True


def _column_scale(col_scale: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    if col_scale is None:
        return None
    if col_scale.numel() != weight.shape[1]:
        raise ValueError(f"col_scale has {col_scale.numel()} entries but the weight has {weight.shape[1]} columns")
    return col_scale.reshape(-1).to(device=weight.device, dtype=torch.float32).contiguous()


def prune_rows(
    weight: torch.Tensor, col_scale: torch.Tensor | None, ratio: float, kernels: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Antidote/Wanda selection and edit in one step: zero the top `ratio` of each row by score.

    score_ij = |W_ij| (as fp32) * col_scale_j (fp32; None = all ones, the magnitude score; may be
    negative, as in the contrastive harmful-minus-benign score). The selection is `select_per_row` of
    that score. Returns (new weight in weight's dtype, bool mask of the zeroed entries); `weight` is not
    modified and the weights left alone are bit-identical.

    kernels: "torch" (this reference), "triton" (fused kernel; an error if it cannot run), "auto"
    (Triton on a CUDA tensor when Triton is installed, else torch).
    """
    if weight.dim() != 2:
        raise ValueError(f"prune_rows expects a 2-D weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"prune_rows expects a floating-point weight, got {weight.dtype}")
    scale = _column_scale(col_scale, weight)
    rows, cols = weight.shape
    k = rows_to_remove(cols, ratio)
    if _use_triton(weight, kernels):
        from .kernels.triton_select import prune_rows_triton

        return prune_rows_triton(weight, scale, k)
    new = weight.clone(memory_format=torch.contiguous_format)
    mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    if k == 0:
        return new, mask.fill_(False)
    for r0, r1 in _row_chunks(rows, cols):
        chosen = _top_k_per_row(_wanda_scores(weight[r0:r1], scale), k)
        mask[r0:r1] = chosen
        new[r0:r1].masked_fill_(chosen, 0)
    return new, mask


def prune_matrix(
    weight: torch.Tensor, col_scale: torch.Tensor | None, ratio: float, kernels: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `prune_rows`, but the top k = floor(numel * ratio) scores of the whole matrix are zeroed.

    The threshold is `global_threshold` (the radix-select kernel on CUDA); ties by lowest flat index.
    """
    if weight.dim() != 2:
        raise ValueError(f"prune_matrix expects a 2-D weight, got shape {tuple(weight.shape)}")
    scores = _wanda_scores(weight, _column_scale(col_scale, weight))
    mask = select_global(scores, ratio, kernels)
    del scores
    return weight.masked_fill(mask, 0), mask


# ---- global selection ------------------------------------------------------------------------------


def _flat_chunks(flat: torch.Tensor):
    for i in range(0, flat.numel(), _CHUNK):
        yield flat[i : i + _CHUNK]


def global_threshold(scores: torch.Tensor, ratio: float, kernels: str = "auto") -> tuple[float, int]:
    """Exact top k = floor(numel * ratio) of a whole fp32 score tensor, as (t, n_eq).

    The selected set is every score > t plus the first n_eq scores equal to t in flat (row-major) index
    order, so count(scores > t) + n_eq == k. k == 0 gives (inf, 0). Works beyond 2^31 elements in
    memory of a few chunks: a radix select on the order-preserving 32-bit key of each score (two
    passes of 16-bit digits here; the Triton kernel uses four of 8 bits), counts in int64.
    A non-contiguous tensor is copied once.
    """
    flat = scores.reshape(-1)
    k = rows_to_remove(flat.numel(), ratio)
    if k == 0:
        return math.inf, 0
    if _use_triton(flat, kernels):
        from .kernels.triton_select import global_threshold_triton

        return global_threshold_triton(flat, k)
    bins = 1 << _DIGIT_BITS
    high = torch.zeros(bins, dtype=torch.int64, device=flat.device)
    for chunk in _flat_chunks(flat):
        high += torch.bincount(order_keys(chunk) >> _DIGIT_BITS, minlength=bins)
    top, need = pick_digit(high, k)
    low = torch.zeros(bins, dtype=torch.int64, device=flat.device)
    for chunk in _flat_chunks(flat):
        key = order_keys(chunk)
        low += torch.bincount(key[(key >> _DIGIT_BITS) == top] & (bins - 1), minlength=bins)
    bottom, n_eq = pick_digit(low, need)
    return key_to_float((top << _DIGIT_BITS) | bottom), n_eq


def select_global(scores: torch.Tensor, ratio: float, kernels: str = "auto") -> torch.Tensor:
    """Bool mask (same shape) of the top k = floor(numel * ratio) scores of the whole tensor.

    Built on `global_threshold`: every score > t, then ties equal to t by lowest flat index.
    """
    t, n_eq = global_threshold(scores, ratio, kernels)
    flat = scores.reshape(-1)
    mask = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    taken = 0  # ties already selected in earlier chunks
    for i in range(0, flat.numel(), _CHUNK):
        s = _fp32_scores(flat[i : i + _CHUNK])
        equal = s == t
        rank = equal.cumsum(0) + taken  # 1-based position among all ties so far, in flat order
        mask[i : i + s.numel()] = (s > t) | (equal & (rank <= n_eq))
        taken = int(rank[-1])
    return mask.view(scores.shape)
