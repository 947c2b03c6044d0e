"""The reference family's shared parts: the checkpoints a delta method reads beside the model, their options, the
rule that they are given, and the per-tensor edit closure every member builds its `Edit` from.

    resta, revert, safelora     --aligned and --unaligned (PAIR): V = W_aligned - W_unaligned
    interpolate, safe-delta     --reference (REFERENCE): Δ = W_ft - W_reference

The closure (`pair_edit`) passes every tensor outside the method's targets through untouched; on a target it reads
the same tensor from each reference checkpoint (one tensor of each at a time: the write stays streamed), calls the
method's per-tensor function, which fills the method's report; the driver serialises that report once, after the write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..errors import SurgeryError
from ..options import option
from .common import MethodOptions

# The two checkpoints a safety vector is taken between (options fields; the driver opens and checks them).
PAIR = {
    "aligned": "the aligned model the fine-tune started from",
    "unaligned": "the same model before alignment (or un-aligned on harmful data)",
}
# The one checkpoint a delta is taken from (interpolate, safe-delta).
REFERENCE = {"reference": "the aligned checkpoint the fine-tune started from (same architecture)"}


@dataclass
class PairOptions(MethodOptions):
    # Required, but checked by `require_pair` (one error line) rather than by the command-line parser.
    aligned: str | None = option(
        None, "Required: the aligned checkpoint the fine-tune started from (same architecture).", folder=True
    )
    unaligned: str | None = option(
        None,
        "Required: the unaligned checkpoint, the aligned model before alignment (its base) "
        "or un-aligned on harmful data (same architecture). V = ALIGNED - UNALIGNED.",
        folder=True,
    )


@dataclass
class ReferenceOptions(MethodOptions):
    # Required, but checked by `require_reference` (one error line) rather than by the command-line parser.
    reference: str | None = option(
        None,
        "Required: the aligned checkpoint the fine-tune started from (same architecture; "
        "with --adapter, the base itself may serve).",
        folder=True,
    )


def require(options, roles: dict[str, str]) -> None:
    """One error line for the first reference option of `roles` the options leave empty."""
    for name, what in roles.items():
        if not getattr(options, name):
            raise SurgeryError(f"--{name} is required: {what}")


def require_pair(options: PairOptions) -> None:
    require(options, PAIR)


def require_reference(options: ReferenceOptions) -> None:
    require(options, REFERENCE)


def pair_edit(
    targets: Iterable[str], change: Callable[..., torch.Tensor], report, references: Sequence = ()
) -> tuple[Callable[[str, torch.Tensor], torch.Tensor], object]:
    """The edit closure of a reference method, and the report object it is written with (for the `Edit` summary: the
    driver serialises it, `report.to_json()`, once every tensor has gone through the closure).

    `change(name, weight, *tensors)` gets the model's tensor and the same tensor read from each of `references`
    (checkpoints, in order), fills `report` as it goes, and returns the new tensor; tensors outside `targets` are
    returned as they are."""
    chosen = set(targets)

    def edit(name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in chosen:
            return weight
        return change(name, weight, *(ref.read(name) for ref in references))

    return edit, report


def reference_candidates(label: str, options_cls, knob: str, given) -> list[tuple[str, object]]:
    """`surgery repair`'s candidate for a method that needs only --reference (interpolate, safe-delta, regmean): the
    strength `knob` on auto; nothing without a reference."""
    if given.reference is None:
        return []
    options = options_cls(
        **{knob: "auto"},
        reference=given.reference,
        device=given.device,
        allow_pickle=given.allow_pickle,
        adapter=given.adapter,
    )
    return [(label, options)]


def linear_weights(ctx, targets: list[str] | None, method: str) -> dict[str, str]:
    """Module -> weight tensor of the Linear modules `targets` names (default: every Linear of the decoder blocks),
    each a 2-D floating weight, or one error line naming `method`."""
    from ..model import linear_targets, meta_model, weight_name

    found = {m: weight_name(ctx.ckpt, m) for m in linear_targets(meta_model(ctx.ckpt), targets)}
    for module, tensor in found.items():
        if len(ctx.ckpt.tensors[tensor].shape) != 2 or not ctx.ckpt.tensors[tensor].dtype.is_floating_point:
            raise SurgeryError(f"{module}: {method} edits 2-D floating Linear weights, {tensor} is not one")
    return found
