"""The smallest repair method, kept for the contract suite and docs/architecture.md: W <- (1 - factor) W
for every matrix that writes the residual stream (o_proj, down_proj)."""

from __future__ import annotations

from dataclasses import dataclass

from surgery.arch import is_residual_writer
from surgery.methods import Edit, Method, Prepared, Strength
from surgery.methods.common import MethodOptions
from surgery.options import option


@dataclass
class ScaleOptions(MethodOptions):
    factor: float | str = option(
        0.1,
        "W <- (1 - FACTOR) W for o_proj and down_proj; auto: the strongest inside the utility budget.",
        strength=True,
        low=0.0,
        high=1.0,
    )


class PreparedScale(Prepared):
    def __init__(self, writers: list[str]):
        self.writers = writers

    def at(self, factor: float) -> Edit:
        def scale(name, weight):
            return (weight.float() * (1.0 - factor)).to(weight.dtype) if name in self.writers else weight

        return Edit(scale, touched=self.writers, summary={"scaled": len(self.writers), "factor": factor})


class Scale(Method):
    name = "scale"
    manifest_id = "toy-scale"
    summary = "Toy: scale every residual-stream writer by (1 - factor)."
    Options = ScaleOptions
    strength = Strength("factor", low=0.0, high=0.5)
    printer = None  # no cli/commands/scale.py: the command prints only the check line

    def prepare(self, ctx, options: ScaleOptions) -> PreparedScale:
        return PreparedScale([n for n in ctx.ckpt.tensors if is_residual_writer(n, ctx.ckpt.family)])
