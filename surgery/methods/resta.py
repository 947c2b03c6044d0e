"""RESTA (Bhardwaj, Anh, Poria, ACL 2024, arXiv 2402.11746): add the safety vector back to the fine-tuned model.

    V = W_aligned - W_unaligned                  (the safety vector)
    W = W_ft + beta * V                          (the paper's "restoring safety through task arithmetic")

on every tensor where V is non-zero (or those `--targets` names), in fp32, cast back to the stored dtype. The
paper's setting is beta = 1. Optionally DARE (Yu et al. 2024) first sparsifies the fine-tune delta
Δ = W_ft - W_aligned: W_ft' = W_aligned + DARE(Δ), each entry dropped with probability `--dare` and the kept ones
rescaled by 1 / (1 - P), seeded per tensor by `--seed`; the paper reports it helps most after PEFT.

Streamed: with a fixed beta no model is loaded; each written tensor is one read from each of the three
checkpoints (the driver's writer already writes one tensor at a time), so memory stays about one tensor per
input whatever the checkpoint's size (bench/bench_resta_memory.py). `--beta auto` loads the model once for the
driver's search, which applies each candidate in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..deltas import check_pair, dare, difference, floating, matching_tensors, pair_candidates, same_values, tensor_seed
from ..errors import SurgeryError
from ..options import option
from ..stream import return_freed_memory
from .base import Edit, Method, Prepared, Strength
from .pair import PAIR, PairOptions, pair_edit, require_pair


@dataclass
class RestaOptions(PairOptions):
    beta: float | str = option(
        1.0,
        "W = W_ft + BETA * (W_aligned - W_unaligned) (paper: 1); auto: the strongest inside "
        "the utility budget (loads the model).",
        strength=True,
        non_negative=True,
    )
    targets: list[str] | None = option(
        None,
        "Comma-separated globs of tensor (or module) names to add V to (default: every "
        "tensor where V is non-zero, embeddings and head included).",
        patterns=True,
    )
    dare: float = option(
        0.0,
        "DARE on the fine-tune delta first: drop each entry of W_ft - W_aligned with this probability "
        "and rescale the rest by 1/(1-P) (0: no DARE).",
        non_negative=True,
    )
    seed: int = option(0, "Seed of DARE's drops (each tensor's draw depends on it and the tensor's name).")


@dataclass
class RestaPlan:
    tensors: list[str]  # where V would be added (those with V = 0 are left as they are)
    entries: int
    largest_bytes: int  # the largest target tensor as stored
    estimated_peak_bytes: int
    beta: float | str
    dare: float


@dataclass
class RestaReport:
    beta: float
    dare: float
    added: list[str] = field(default_factory=list)  # tensors W_ft + beta * V was written to
    zero_vector: list[str] = field(default_factory=list)  # targets left as they are: V = 0 there
    entries: int = 0  # entries of the changed tensors
    dropped: int = 0  # DARE: fine-tune delta entries dropped
    vector_norm: float = 0.0  # ||V|| over the changed tensors (fp32)
    delta_norm: float = 0.0  # ||Δ|| = ||W_ft - W_aligned|| over the same tensors (before DARE)

    def to_json(self) -> dict:
        return {
            "beta": self.beta,
            "dare": self.dare,
            "tensors_added": len(self.added),
            "tensors_with_zero_vector": self.zero_vector,
            "entries": self.entries,
            "dare_dropped": self.dropped,
            "vector_norm": self.vector_norm,
            "delta_norm": self.delta_norm,
            "note": "W = W_ft + beta * (W_aligned - W_unaligned) in fp32, cast to the stored dtype",
        }


def restored(
    weight: torch.Tensor, aligned: torch.Tensor, unaligned: torch.Tensor, beta: float, p: float = 0.0, seed: int = 0
) -> tuple[torch.Tensor, dict]:
    """The method on one tensor: W_ft (DARE'd when p > 0) + beta * V, computed in fp32, in the weight's dtype.
    Returns the new tensor and its figures (||V||², ||Δ||², delta entries DARE dropped). At most two fp32
    temporaries of the tensor's size live beside the three inputs (Δ is gone before V is taken)."""
    delta = difference(weight, aligned)
    figures = {"delta_sq": _square_norm(delta)}
    if p > 0:
        sparse = dare(delta, p, seed)
        figures["dropped"] = int(delta.count_nonzero() - sparse.count_nonzero())
        del delta
        base = sparse.add_(aligned.float())  # W_ft' = W_aligned + DARE(Δ)
    else:
        del delta
        base = weight.float()
    if beta == 0:
        return base.to(weight.dtype), figures
    vector = difference(aligned, unaligned)
    figures["vector_sq"] = _square_norm(vector)
    if beta != 1.0:
        vector.mul_(beta)
    return vector.add_(base).to(weight.dtype), figures


def _square_norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t)) ** 2  # a reduction: no temporary of the tensor's size


class PreparedResta(Prepared):
    def __init__(self, ctx, options: RestaOptions, targets: list[str]):
        self.ctx, self.options, self.targets = ctx, options, targets
        self.aligned, self.unaligned = ctx.references["aligned"], ctx.references["unaligned"]
        self.report = None

    def at(self, beta: float) -> Edit:
        options = self.options
        report = self.report = RestaReport(beta, options.dare)
        squares = {"vector_sq": 0.0, "delta_sq": 0.0}

        def change(name: str, weight: torch.Tensor, aligned: torch.Tensor, unaligned: torch.Tensor) -> torch.Tensor:
            if same_values(aligned, unaligned):
                report.zero_vector.append(name)
                return weight
            if beta == 0 and options.dare == 0:  # W_ft itself, bit for bit
                return weight
            new, figures = restored(weight, aligned, unaligned, beta, options.dare, tensor_seed(options.seed, name))
            report.added.append(name)
            report.entries += weight.numel()
            report.dropped += figures.get("dropped", 0)
            for key in squares:
                squares[key] += figures.get(key, 0.0)
            report.vector_norm, report.delta_norm = squares["vector_sq"] ** 0.5, squares["delta_sq"] ** 0.5
            return new

        edit, recorded = pair_edit(self.targets, change, report, (self.aligned, self.unaligned))
        return Edit(edit, touched=list(self.targets), summary={"resta": recorded})


class Resta(Method):
    name = "resta"
    manifest_id = "resta"
    summary = "RESTA: add the safety vector (aligned - unaligned) back to the fine-tuned model, tensor by tensor."
    paper = "Bhardwaj, Anh, Poria 2024, RESTA, arXiv 2402.11746"
    Options = RestaOptions
    references = PAIR
    on_request_with_reference = frozenset({"resta"})
    # Log scale: a useful beta spans decades (a weak un-alignment vector wants > 1, a full base-to-instruct vector often
    # much less than the paper's 1, whose perplexity cost can exceed the budget). 0 is no repair, so it is not searched.
    strength = Strength("beta", low=0.05, high=2.0, log=True)

    def repair_candidates(self, given):
        """With `surgery repair --reference ALIGNED --unaligned BASE --methods resta` (not by default: see
        surgery/repair.py)."""
        return pair_candidates("resta", RestaOptions, "beta", given)

    def validate(self, options: RestaOptions) -> None:
        require_pair(options)
        if options.dare >= 1:
            raise SurgeryError(f"--dare is a drop probability and must be below 1, got {options.dare:g}")

    def targets(self, ctx, options: RestaOptions) -> list[str]:
        return floating(ctx.ckpt, matching_tensors(ctx.ckpt.tensors, options.targets))

    def plan(self, ctx, options: RestaOptions) -> RestaPlan:
        targets = self.targets(ctx, options)
        check_pair(ctx.ckpt, ctx.references["aligned"], ctx.references["unaligned"], targets)
        infos = [ctx.ckpt.tensors[n] for n in targets]
        largest = max(infos, key=lambda t: t.numel, default=None)
        # The largest tensor three times as stored, and up to three fp32 temporaries of it (four with DARE's draw).
        peak = 0 if largest is None else 3 * largest.nbytes + (3 + (options.dare > 0)) * 4 * largest.numel
        return RestaPlan(
            targets, sum(t.numel for t in infos), largest.nbytes if largest else 0, peak, options.beta, options.dare
        )

    def prepare(self, ctx, options: RestaOptions) -> PreparedResta:
        targets = self.targets(ctx, options)
        check_pair(ctx.ckpt, ctx.references["aligned"], ctx.references["unaligned"], targets)
        return_freed_memory()  # each tensor's buffers go back to the OS when freed (else the heap grows tensor by tensor)
        return PreparedResta(ctx, options, targets)  # no model: a fixed beta streams; the search loads it itself
