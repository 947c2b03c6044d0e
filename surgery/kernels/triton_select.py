"""Fused selection kernels: per-row Antidote/Wanda prune and a global top-k threshold.

Both select by a radix search on an order-preserving 32-bit key of each fp32 score (most significant
8-bit digit first, one histogram per digit), never by sorting, and give bit-for-bit the selection of
the plain-torch reference in `surgery.select` (same key, same tie rule: lower index first).

Per-row prune (`prune_rows_triton`): one program per row; the score |W_ij| * col_scale_j is computed
on the fly from W and col_scale in every pass, so no score matrix is ever stored. Four histogram passes
find the k-th largest key of the row and how many keys equal to it are still wanted; a fifth pass
writes the zeroed row and the mask. The row is read from DRAM once and from cache after that (a row of
a Llama-70B down_proj is 56 KiB in bf16); the output is written once.

Global threshold (`global_threshold_triton`): four passes over the whole tensor, each a histogram of
one 8-bit digit of the keys that share the digits already fixed, with int64 offsets and int64 counts
so it is exact beyond 2^31 elements; memory is one 256-bin histogram.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .keys import key_to_float, pick_digit

DIGIT_BITS = 8  # radix digit: 4 passes over a 32-bit key, 256-bin histograms
MAX_ROW_BLOCK = 2048  # columns handled per step of a row program
GLOBAL_BLOCK = 4096  # elements per step of a global-histogram program


@triton.jit
def _order_key(score):
    """fp32 -> uint32 with the same order (the map of `surgery.kernels.keys.order_keys`)."""
    score = tl.where(score != score, float("-inf"), score)  # NaN counts as -inf
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 and +0.0 are one score: give them one key
    bits = score.to(tl.uint32, bitcast=True)
    negative = (bits >> 31) != 0
    # Negative floats order backwards as integers: flip all their bits; positives: set the sign bit.
    return tl.where(negative, ~bits, bits | 0x80000000)


@triton.jit
def _row_keys(w_row, scale_ptr, cols, n_cols, HAS_SCALE: tl.constexpr):
    """One block of a row: the raw weights, the keys of their scores, and which columns exist."""
    valid = cols < n_cols
    w = tl.load(w_row + cols, mask=valid, other=0.0)
    score = tl.abs(w.to(tl.float32))  # Wanda: S_ij = |W_ij| * ||X_j||_2, in fp32
    if HAS_SCALE:
        score = score * tl.load(scale_ptr + cols, mask=valid, other=0.0)
    return w, _order_key(score), valid


@triton.jit
def _prune_rows_kernel(
    w_ptr,
    scale_ptr,
    out_ptr,
    mask_ptr,
    n_cols,
    stride_w,
    stride_out,
    k,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 on big matrices
    w_row = w_ptr + row * stride_w
    RADIX: tl.constexpr = 1 << DIGIT_BITS
    digits = tl.arange(0, RADIX)
    # Radix select, top digit first: `prefix` collects the digits of the k-th largest key, `need` is
    # how many keys sharing the digits fixed so far are still to be selected.
    prefix = tl.zeros([], dtype=tl.uint32)
    need = k
    for p in tl.static_range(32 // DIGIT_BITS):
        shift = 32 - (p + 1) * DIGIT_BITS  # a constexpr: p and DIGIT_BITS are
        hist = tl.zeros([RADIX], dtype=tl.int32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            _, key, valid = _row_keys(w_row, scale_ptr, cols, n_cols, HAS_SCALE)
            if p > 0:  # only keys whose higher digits match the prefix are still candidates
                valid = valid & ((key >> (shift + DIGIT_BITS)) == (prefix >> (shift + DIGIT_BITS)))
            hist += tl.histogram(((key >> shift) & (RADIX - 1)).to(tl.int32), RADIX, mask=valid)
        at_or_above = tl.cumsum(hist, 0, reverse=True)  # at_or_above[d]: candidates with digit >= d
        d = tl.max(tl.where(at_or_above >= need, digits, 0))  # the digit holding the need-th largest
        need -= tl.sum(tl.where(digits > d, hist, 0))  # those above d are all selected
        prefix |= d.to(tl.uint32) << shift
    # Write pass: every key above the k-th largest, then the first `need` equal to it in column order.
    out_row = out_ptr + row * stride_out
    mask_row = mask_ptr + row * n_cols
    taken = 0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        w, key, valid = _row_keys(w_row, scale_ptr, cols, n_cols, HAS_SCALE)
        equal = valid & (key == prefix)
        rank = tl.cumsum(equal.to(tl.int32), 0) + taken  # 1-based position among this row's ties
        chosen = (valid & (key > prefix)) | (equal & (rank <= need))
        taken += tl.sum(equal.to(tl.int32))
        tl.store(out_row + cols, tl.where(chosen, tl.zeros_like(w), w), mask=valid)
        tl.store(mask_row + cols, chosen.to(tl.uint8), mask=valid)


def prune_rows_triton(
    weight: torch.Tensor, scale: torch.Tensor | None, k: int, block: int | None = None, num_warps: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the k highest-scoring weights of each row; see `surgery.select.prune_rows`.

    `scale` is None or an fp32 vector of n_cols on weight's device; `k` is already rows_to_remove(...).
    """
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rows, cols = weight.shape
    out = torch.empty((rows, cols), dtype=weight.dtype, device=weight.device)
    mask = torch.zeros((rows, cols), dtype=torch.uint8, device=weight.device)
    if k == 0 or rows == 0:
        return out.copy_(weight), mask.view(torch.bool)
    block = block or min(triton.next_power_of_2(cols), MAX_ROW_BLOCK)
    _prune_rows_kernel[(rows,)](
        weight,
        scale if scale is not None else weight,
        out,
        mask,
        cols,
        weight.stride(0),
        out.stride(0),
        k,
        HAS_SCALE=scale is not None,
        BLOCK=block,
        DIGIT_BITS=DIGIT_BITS,
        num_warps=num_warps,
        enable_fp_fusion=False,  # the score is one fp32 multiply, rounded exactly as torch rounds it
    )
    return out, mask.view(torch.bool)


@triton.jit(do_not_specialize=["prefix"])
def _key_histogram_kernel(
    x_ptr,
    n,
    hist_ptr,
    prefix,
    SHIFT: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    RADIX: tl.constexpr = 1 << DIGIT_BITS
    # int64 offsets and a grid-stride loop: any number of elements with a fixed number of programs.
    start0 = tl.program_id(0).to(tl.int64) * BLOCK
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    counts = tl.zeros([RADIX], dtype=tl.int64)
    for start in range(start0, n, step):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        key = _order_key(tl.load(x_ptr + offs, mask=valid, other=0.0))
        if SHIFT + DIGIT_BITS < 32:  # only keys whose higher digits equal the prefix found so far
            valid = valid & ((key >> (SHIFT + DIGIT_BITS)) == prefix.to(tl.uint32))
        counts += tl.histogram(((key >> SHIFT) & (RADIX - 1)).to(tl.int32), RADIX, mask=valid).to(tl.int64)
    tl.atomic_add(hist_ptr + tl.arange(0, RADIX), counts)  # one int64 add per bin per program


def global_threshold_triton(flat: torch.Tensor, k: int, programs: int | None = None) -> tuple[float, int]:
    """(t, n_eq) of the top k of a 1-D score tensor; see `surgery.select.global_threshold`."""
    flat = flat.to(torch.float32).contiguous()
    n = flat.numel()
    if programs is None:
        # Enough programs to fill the GPU; the interpreter runs them one after another, so few there.
        sms = torch.cuda.get_device_properties(flat.device).multi_processor_count if flat.is_cuda else 1
        programs = 8 * sms
    grid = (max(1, min(programs, triton.cdiv(n, GLOBAL_BLOCK))),)
    hist = torch.empty(1 << DIGIT_BITS, dtype=torch.int64, device=flat.device)
    prefix, need = 0, k
    for p in range(32 // DIGIT_BITS):
        shift = 32 - (p + 1) * DIGIT_BITS
        hist.zero_()
        _key_histogram_kernel[grid](flat, n, hist, prefix, SHIFT=shift, DIGIT_BITS=DIGIT_BITS, BLOCK=GLOBAL_BLOCK)
        d, need = pick_digit(hist, need)  # same digit choice as the reference
        prefix = (prefix << DIGIT_BITS) | d
    return key_to_float(prefix), need
