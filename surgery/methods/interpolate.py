"""Interpolation back toward the reference (WiSE-FT, Wortsman et al., CVPR 2022, arXiv 2109.01903; as a safety
repair, the pre/post-fine-tune merge every delta method is measured against):

    Δ = W_ft - W_ref                     what the fine-tune changed
    W = W_ref + (1 - α) Δ                α = 0: the fine-tune, α = 1: the reference

on every floating tensor the model and the reference both hold (the driver has checked that they hold the same
names and shapes), in fp32, cast back to the stored dtype. α = 0 writes W_ft bit for bit and α = 1 writes W_ref
bit for bit (no rounding through fp32); a tensor where the two are equal is left as it is. WiSE-FT's own
setting is α = 0.5, the default here.

Streamed like RESTA: with a fixed α no model is loaded; each written tensor is one read from each checkpoint.
`--alpha auto` loads the model once for the driver's search.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..deltas import floating, matching_tensors, same_values
from ..options import option
from ..stream import return_freed_memory
from .base import Edit, Method, Prepared, Strength
from .pair import REFERENCE, ReferenceOptions, pair_edit, reference_candidates, require_reference


@dataclass
class InterpolateOptions(ReferenceOptions):
    alpha: float | str = option(
        0.5,
        "W = W_ref + (1 - ALPHA) (W_ft - W_ref): 0 is the fine-tune, 1 the reference "
        "(WiSE-FT: 0.5); auto: the strongest inside the utility budget (loads the model).",
        strength=True,
        low=0.0,
        high=1.0,
    )
    targets: list[str] | None = option(
        None,
        "Comma-separated globs of tensor (or module) names to interpolate (default: "
        "every floating tensor, embeddings and head included).",
        patterns=True,
    )


@dataclass
class InterpolatePlan:
    tensors: list[str]
    entries: int
    alpha: float | str


@dataclass
class InterpolateReport:
    alpha: float
    interpolated: list[str] = field(default_factory=list)  # tensors written as W_ref + (1 - alpha) Δ
    unchanged: list[str] = field(default_factory=list)  # targets where the fine-tune equals the reference
    entries: int = 0
    delta_norm: float = 0.0  # ||Δ|| over the interpolated tensors (fp32)

    def to_json(self) -> dict:
        return {
            "alpha": self.alpha,
            "tensors_interpolated": len(self.interpolated),
            "tensors_equal_to_reference": len(self.unchanged),
            "entries": self.entries,
            "delta_norm": self.delta_norm,
            "note": "W = W_ref + (1 - alpha) (W_ft - W_ref) in fp32, cast to the stored dtype",
        }


def interpolated(weight: torch.Tensor, reference: torch.Tensor, alpha: float) -> torch.Tensor:
    """W_ref + (1 - alpha)(W_ft - W_ref) for one tensor, in fp32, in the weight's dtype; the ends exactly."""
    if alpha == 0:
        return weight
    if alpha == 1:
        return reference.to(weight.dtype)
    ref = reference.float()
    return torch.sub(weight.float(), ref).mul_(1.0 - alpha).add_(ref).to(weight.dtype)


class PreparedInterpolate(Prepared):
    def __init__(self, ctx, options: InterpolateOptions, targets: list[str]):
        self.options, self.targets = options, targets
        self.reference = ctx.references["reference"]
        self.report = None

    def at(self, alpha: float) -> Edit:
        report = self.report = InterpolateReport(alpha)
        square = [0.0]

        def change(name: str, weight: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
            if same_values(weight, reference):
                report.unchanged.append(name)
                return weight
            report.interpolated.append(name)
            report.entries += weight.numel()
            square[0] += float(torch.linalg.vector_norm(torch.sub(weight.float(), reference.float()))) ** 2
            report.delta_norm = square[0] ** 0.5
            return interpolated(weight, reference, alpha)

        edit, recorded = pair_edit(self.targets, change, report, (self.reference,))
        return Edit(edit, touched=list(self.targets), summary={"interpolate": recorded})


class Interpolate(Method):
    name = "interpolate"
    manifest_id = "interpolate"
    summary = "Interpolate back toward the reference: W_ref + (1 - alpha)(W_ft - W_ref), tensor by tensor (WiSE-FT)."
    paper = "Wortsman et al. 2022, WiSE-FT (robust fine-tuning of zero-shot models), arXiv 2109.01903"
    Options = InterpolateOptions
    references = REFERENCE
    # 0 is no repair (the fine-tune), so it is not searched; 1 is the reference itself.
    strength = Strength("alpha", low=0.05, high=1.0)

    def repair_candidates(self, given):
        """With `surgery repair --reference ALIGNED`: the baseline every delta method must beat."""
        return reference_candidates("interpolate", InterpolateOptions, "alpha", given)

    def validate(self, options: InterpolateOptions) -> None:
        require_reference(options)

    def targets(self, ctx, options: InterpolateOptions) -> list[str]:
        return floating(ctx.ckpt, matching_tensors(ctx.ckpt.tensors, options.targets))

    def plan(self, ctx, options: InterpolateOptions) -> InterpolatePlan:
        targets = self.targets(ctx, options)
        return InterpolatePlan(targets, sum(ctx.ckpt.tensors[n].numel for n in targets), options.alpha)

    def prepare(self, ctx, options: InterpolateOptions) -> PreparedInterpolate:
        return_freed_memory()  # each tensor's buffers go back to the OS when freed (streamed, like resta)
        return PreparedInterpolate(ctx, options, self.targets(ctx, options))
