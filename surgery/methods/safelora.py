"""SafeLoRA (Hsu et al., NeurIPS 2024, arXiv 2405.16833): project a fine-tuning LoRA adapter onto the alignment subspace.

For every LoRA target (a Linear of the base with its pair A [r, in], B [out, r]):

    V   = W_aligned - W_unaligned            that Linear's weight in the two reference checkpoints (fp32)
    C   = V·Vᵀ / ‖V‖_F                       [out, out]; as the paper and the authors' code write it (not idempotent)
    cos = cos(vec(C·B·A), vec(B·A))          how much of the adapter's update already lies in the alignment subspace
    B  <- C·B                                on the K targets with the lowest cos (`--layers K`, the authors' default
                                             10), or on every target with cos <= τ (`--threshold`)

"Layers" counts LoRA targets (pairs), as the authors' code counts its projected modules. No data and no forward
pass: the scores need only the three checkpoints. The output is the adapter with the projected B matrices (A and
every other tensor bit-identical), or with --merge the projected adapter merged into the base. The report gives
each target's cosine and the paper's Pdst, the mean of 1 / (1 + ‖B − C·B‖) over the projected targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SurgeryError
from ..options import option
from .base import Edit, Method, Prepared, Strength
from .pair import PAIR, PairOptions, pair_edit, require_pair


@dataclass
class SafeLoraOptions(PairOptions):
    layers: float | str = option(
        10,
        "Project the K LoRA targets whose update is least aligned (lowest cosine between "
        "C·B·A and B·A; the authors' default 10), or auto: the most inside the utility "
        "budget.",
        strength=True,
        non_negative=True,
    )
    threshold: float | None = option(
        None, "Instead of --layers: project every target whose cosine is at most this.", low=-1.0, high=1.0
    )
    merge: bool = option(
        False,
        "Write the projected adapter merged into the base (a full checkpoint) instead of the adapter folder.",
        flag="--merge",
    )


@dataclass
class SafeLoraTarget:
    module: str
    b: str  # the adapter tensor projected
    cosine: float


@dataclass
class SafeLoraReport:
    targets: list[SafeLoraTarget]
    projected: list[str] = field(default_factory=list)  # modules whose B was replaced by C·B
    pdst: float | None = None

    def to_json(self) -> dict:
        return {
            "targets": len(self.targets),
            "projected": self.projected,
            "pdst": self.pdst,
            "cosine": {t.module: round(t.cosine, 6) for t in self.targets},
            "note": "B <- (V·Vᵀ/‖V‖_F)·B on the projected targets, in fp32, cast to B's dtype; A untouched",
        }


def projection(aligned: torch.Tensor, unaligned: torch.Tensor) -> torch.Tensor:
    """C = V·Vᵀ / ‖V‖_F for one target's weight, V = aligned − unaligned, in fp32 ([out, out])."""
    v = aligned.float() - unaligned.float()
    norm = torch.linalg.matrix_norm(v)
    return (v @ v.T) / norm


def update_cosine(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(vec(C·B·A), vec(B·A)); 1 when the update is zero (nothing to project)."""
    update = b.float() @ a.float()
    projected = c @ update
    denominator = torch.linalg.vector_norm(update) * torch.linalg.vector_norm(projected)
    return 1.0 if denominator == 0 else float((update * projected).sum() / denominator)


def least_aligned(targets: list[SafeLoraTarget], layers: float | None, threshold: float | None) -> list[SafeLoraTarget]:
    """The targets to project: every one with cosine at most `threshold`, else the `layers` lowest (ties: by name)."""
    ranked = sorted(targets, key=lambda t: (t.cosine, t.module))  # least aligned first
    if threshold is not None:
        return [t for t in ranked if t.cosine <= threshold]
    return ranked[: int(round(layers or 0))]


class PreparedSafeLora(Prepared):
    def __init__(
        self, ctx, options: SafeLoraOptions, targets: list[SafeLoraTarget], projections: dict[str, torch.Tensor]
    ):
        self.ctx, self.options, self.targets, self.projections = ctx, options, targets, projections
        self.report = SafeLoraReport(targets)

    def bounds(self) -> tuple[float, float]:
        return 1.0, float(len(self.targets))

    def at(self, layers: float | None) -> Edit:
        chosen = {t.b: t for t in least_aligned(self.targets, layers, self.options.threshold)}
        report = self.report
        report.projected = sorted(t.module for t in chosen.values())
        distances: list[float] = []

        def change(name: str, weight: torch.Tensor) -> torch.Tensor:
            new = self.projections[chosen[name].module] @ weight.float()
            distances.append(1.0 / (1.0 + float(torch.linalg.matrix_norm(weight.float() - new))))
            report.pdst = sum(distances) / len(distances)
            return new.to(weight.dtype)

        edit, recorded = pair_edit(chosen, change, report)
        return Edit(
            edit, touched=sorted(chosen), summary={"safelora": recorded}, arguments={"projected_targets": len(chosen)}
        )


class SafeLora(Method):
    name = "safelora"
    manifest_id = "safelora"
    summary = (
        "SafeLoRA: project the adapter's least-aligned LoRA updates onto the alignment subspace (aligned - unaligned)."
    )
    paper = "Hsu et al. 2024, Safe LoRA, arXiv 2405.16833"
    Options = SafeLoraOptions
    references = PAIR
    strength = Strength("layers", low=1, high=10, integer=True)
    adapter_mode = "adapter"
    may_be_the_model = frozenset({"aligned"})  # the adapter is usually trained on the aligned model: MODEL = --aligned

    def repair_candidates(self, given):
        """With `surgery repair --adapter A --reference ALIGNED --unaligned BASE`."""
        if given.adapter is None or given.reference is None or given.unaligned is None:
            return []
        return [
            (
                "safelora",
                SafeLoraOptions(
                    layers="auto",
                    adapter=given.adapter,
                    aligned=given.reference,
                    unaligned=given.unaligned,
                    device=given.device,
                    allow_pickle=given.allow_pickle,
                ),
            )
        ]

    def validate(self, options: SafeLoraOptions) -> None:
        if options.adapter is None:
            raise SurgeryError("--adapter is required: SafeLoRA projects a LoRA adapter (give the base as MODEL)")
        require_pair(options)
        if options.threshold is not None and options.layers == "auto":
            raise SurgeryError("--threshold chooses the targets itself: not with --layers auto")

    def plan(self, ctx, options: SafeLoraOptions) -> SafeLoraReport:
        return self.prepare(ctx, options).report

    def prepare(self, ctx, options: SafeLoraOptions) -> PreparedSafeLora:
        from ..deltas import check_pair

        adapter = ctx.adapter
        aligned, unaligned = ctx.references["aligned"], ctx.references["unaligned"]
        weights = [t.base_tensor for t in adapter.targets.values()]
        check_pair(ctx.ckpt, aligned, unaligned, weights)
        targets, projections = [], {}
        for t in adapter.targets.values():
            c = projection(aligned.read(t.base_tensor), unaligned.read(t.base_tensor))
            if not torch.isfinite(c).all():  # V = 0 on this target: nothing to project onto
                continue
            projections[t.module] = c
            targets.append(SafeLoraTarget(t.module, t.b, update_cosine(c, adapter.read(t.a), adapter.read(t.b))))
        if not targets:
            raise SurgeryError(
                "--aligned and --unaligned hold the same weights on every LoRA target: no alignment subspace"
            )
        return PreparedSafeLora(ctx, options, targets, projections)
