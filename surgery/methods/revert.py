"""Sign-conflict revert: the identify-and-remove steps of IRR (Wu, Lu, Zhao, Qin, ACL Findings 2025, arXiv 2412.11041).

    Δ = W_ft - W_aligned,  V = W_aligned - W_unaligned
    conflicting entries:   Δ_ij ≠ 0, V_ij ≠ 0, sign(Δ_ij) ≠ sign(V_ij)     (the fine-tune moved against alignment)
    score:                 wanda |Δ_ij| · ||X_j|| over harmful calibration tokens, or magnitude |Δ_ij|
    reverted:              per tensor, the k = n - int(n · (1 - FRACTION)) highest-scored of its n conflicting entries
                           (ties: the lower flat index), set back to W_aligned exactly; every other entry is W_ft

The fraction is per tensor, not global over the model: each matrix gives up the same share of its conflicts, so
one matrix with large deltas (an embedding, a late MLP) cannot take the whole budget, and the count is exact and
known tensor by tensor while the checkpoint streams. The count rule is `select.rows_to_remove` (Antidote's, in binary
floating point), the one every selection of the toolkit uses, so the selection is `select.select_global` with its
exact tie rule. FRACTION = 1 reverts every conflicting entry, IRR's default (its `sparsity` p keeps the
lowest-scored share p of the conflicts, so FRACTION = 1 - p); the score is then irrelevant and no data is read.
IRR scores with a diagonal Fisher on safe responses; the Wanda input norm (over the fine-tuned model's own answers
to harmful prompts, as Antidote localises) and the magnitude are the data-light scores this toolkit already has.

Not done: IRR's third step, "recalibrate", a SparseGPT/OBS update of the kept delta entries that uses the layer
Hessian H = X Xᵀ of the fine-tuned model's inputs on task data to keep the task outputs where they were. It needs
task data and a per-layer Cholesky solve, and is out of scope here; the output is W_aligned + Δ with the selected
entries of Δ removed and nothing compensated.

Targets: every Linear weight in the decoder blocks (`model.linear_targets`), or the Linear modules `--targets`
names. With `--score magnitude` (or FRACTION = 1) no model is loaded and the edit streams tensor by tensor.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

from ..deltas import check_pair, difference, pair_candidates, same_values, sign_conflicts, top_of
from ..model import linear_targets, meta_model, weight_name
from ..options import is_auto, option
from ..select import rows_to_remove
from ..stream import return_freed_memory
from .antidote import calibration_norms, harmful_examples
from .base import Edit, Method, Prepared, Strength
from .pair import PAIR, PairOptions, pair_edit, require_pair

SCORES = ("wanda", "magnitude")


@dataclass
class RevertOptions(PairOptions):
    fraction: float | str = option(
        1.0,
        "Share of each tensor's sign-conflicting delta entries reverted to the aligned values, "
        "highest score first (1: all of them, IRR's default); auto: the strongest inside "
        "the utility budget.",
        strength=True,
        low=0.0,
        high=1.0,
    )
    score: str = option(
        "wanda",
        "wanda (|Δ|·‖X‖, ‖X‖ the input norm on harmful data) or magnitude (|Δ|: no data, no model).",
        choices=SCORES,
    )
    targets: list[str] | None = option(
        None, "Comma-separated globs of Linear modules (default: every Linear in the decoder blocks).", patterns=True
    )
    data: str | None = option(
        None,
        "Harmful calibration data for --score wanda (.jsonl, .csv, .tsv or .txt); default: the built-in set.",
        file=True,
    )
    column: str | None = option(None, "Prompt column/field in --data.")
    response_column: str | None = option(None, "Response column/field in --data (missing responses are generated).")
    max_samples: int = option(128, "Calibration examples (seeded random subset).", positive=True)
    max_length: int = option(256, "Tokens per calibration example.", positive=True)
    max_new_tokens: int = option(64, "Length of generated responses for prompts without one.", positive=True)
    batch_size: int = option(8, "Calibration sequences per forward pass.", positive=True)
    generate_batch_size: int = option(32, "Prompts answered at once when the data has no responses.", positive=True)
    seed: int = option(0, "Seed of the calibration subset.")


@dataclass
class RevertPlan:
    modules: dict[str, str]  # module -> its weight tensor
    shapes: dict[str, tuple[int, ...]]
    entries: int
    score: str
    fraction: float


@dataclass
class RevertReport:
    fraction: float
    score: str
    conflicting: dict[str, int] = field(default_factory=dict)  # tensor -> sign-conflicting entries
    reverted: dict[str, int] = field(default_factory=dict)  # tensor -> entries set back to the aligned value
    changed: dict[str, int] = field(default_factory=dict)  # tensor -> non-zero entries of Δ
    entries: dict[str, int] = field(default_factory=dict)  # tensor -> entries
    zero_vector: list[str] = field(default_factory=list)  # targets where V = 0 (nothing conflicts)
    calibration_examples: int = 0
    calibration_tokens: int = 0

    def totals(self) -> dict[str, int]:
        return {
            "entries": sum(self.entries.values()),
            "changed": sum(self.changed.values()),
            "conflicting": sum(self.conflicting.values()),
            "reverted": sum(self.reverted.values()),
        }

    def to_json(self) -> dict:
        return {
            "fraction": self.fraction,
            "score": self.score,
            **self.totals(),
            "per_tensor": {
                name: {
                    "entries": self.entries[name],
                    "changed": self.changed[name],
                    "conflicting": self.conflicting[name],
                    "reverted": self.reverted[name],
                }
                for name in self.entries
            },
            "tensors_with_zero_vector": self.zero_vector,
            "calibration_examples": self.calibration_examples,
            "calibration_tokens": self.calibration_tokens,
            "note": "conflicting: Δ and V non-zero with opposite signs; reverted per tensor: floor(fraction · conflicting), "
            "highest score first, set to W_aligned; no recalibration (IRR's third step) is done",
        }


def revert_tensor(
    weight: torch.Tensor,
    aligned: torch.Tensor,
    unaligned: torch.Tensor,
    fraction: float,
    column_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The method on one weight: its sign-conflicting delta entries found, the top `fraction` of them by
    |Δ| (times the input column norm, Wanda) set back to the aligned values. Returns the new weight (the
    weight itself when nothing is reverted) and the counts."""
    delta = difference(weight, aligned)
    conflicts = sign_conflicts(delta, difference(aligned, unaligned))
    counts = {"changed": int(delta.count_nonzero()), "conflicting": int(conflicts.sum())}
    counts["reverted"] = rows_to_remove(counts["conflicting"], fraction)
    if counts["reverted"] == 0:
        return weight, counts
    scores = delta.abs_()
    if column_norm is not None and counts["reverted"] < counts["conflicting"]:
        scores.mul_(column_norm.to(scores.device, torch.float32))  # Wanda: |Δ_ij| · ||X_j||, broadcast over rows
    chosen = top_of(scores, conflicts, fraction)
    return torch.where(chosen, aligned.to(weight.dtype), weight), counts


class PreparedRevert(Prepared):
    def __init__(self, ctx, options: RevertOptions, modules: dict[str, str], norms: dict | None, report: RevertReport):
        self.ctx, self.options, self.modules, self.norms = ctx, options, modules, norms
        self.aligned, self.unaligned = ctx.references["aligned"], ctx.references["unaligned"]
        self.module_of = {tensor: module for module, tensor in modules.items()}
        self.calibration = report
        self.report = report

    def at(self, fraction: float) -> Edit:
        score = (
            self.options.score
            if self.norms is not None or self.options.score == "magnitude"
            else "none (fraction 1 reverts every conflicting entry)"
        )
        report = self.report = RevertReport(
            fraction,
            score,
            calibration_examples=self.calibration.calibration_examples,
            calibration_tokens=self.calibration.calibration_tokens,
        )

        def change(name: str, weight: torch.Tensor, aligned: torch.Tensor, unaligned: torch.Tensor) -> torch.Tensor:
            norm = self.norms[self.module_of[name]] if self.norms is not None else None
            if same_values(aligned, unaligned):
                report.zero_vector.append(name)
            new, counts = revert_tensor(weight, aligned, unaligned, fraction, norm)
            report.entries[name] = weight.numel()
            for key, value in counts.items():
                getattr(report, key)[name] = value
            return new

        edit, recorded = pair_edit(self.module_of, change, report, (self.aligned, self.unaligned))
        return Edit(edit, touched=list(self.module_of), summary={"revert": recorded})


class SignConflictRevert(Method):
    name = "revert"
    manifest_id = "irr-revert"
    summary = "IRR identify-and-remove: revert the fine-tune delta entries that oppose the safety vector, most important first."
    paper = "Wu, Lu, Zhao, Qin 2025, IRR (Identify, Remove, and Recalibrate), arXiv 2412.11041"
    Options = RevertOptions
    references = PAIR
    # Log scale from 1% of each tensor's conflicts to all of them: the high-score end carries most of the effect.
    strength = Strength("fraction", low=0.01, high=1.0, log=True)

    def repair_candidates(self, given):
        """With `surgery repair --reference ALIGNED --unaligned BASE`: this method joins the candidates, ranked by
        magnitude (no calibration: the wanda norms cost 96 s of a 698 s run on the demonstration pair, and IRR's
        fraction 1, the default and that run's choice, reverts every conflict whatever the score)."""
        found = pair_candidates("revert", RevertOptions, "fraction", given)
        for _, options in found:
            options.score = "magnitude"
        return found

    def validate(self, options: RevertOptions) -> None:
        require_pair(options)

    def modules(self, ctx, options: RevertOptions) -> dict[str, str]:
        return {m: weight_name(ctx.ckpt, m) for m in linear_targets(meta_model(ctx.ckpt), options.targets)}

    def plan(self, ctx, options: RevertOptions) -> RevertPlan:
        modules = self.modules(ctx, options)
        check_pair(ctx.ckpt, ctx.references["aligned"], ctx.references["unaligned"], list(modules.values()))
        shapes = {t: ctx.ckpt.tensors[t].shape for t in modules.values()}
        return RevertPlan(
            modules, shapes, sum(ctx.ckpt.tensors[t].numel for t in modules.values()), options.score, options.fraction
        )

    def prepare(self, ctx, options: RevertOptions) -> PreparedRevert:
        modules = self.modules(ctx, options)
        check_pair(ctx.ckpt, ctx.references["aligned"], ctx.references["unaligned"], list(modules.values()))
        report = RevertReport(options.fraction, options.score)
        return_freed_memory()  # each tensor's buffers go back to the OS when freed (else the heap grows tensor by tensor)
        ranked = is_auto(options.fraction) or options.fraction < 1.0  # at 1 every conflict goes: no ranking, no data
        if options.score == "magnitude" or not ranked:
            return PreparedRevert(ctx, options, modules, None, report)
        torch.manual_seed(options.seed)
        harmful = harmful_examples(ctx, options)
        harmful, norms, tokens = calibration_norms(
            ctx, harmful, options, list(modules)
        )  # shared with prune's in repair
        report.calibration_examples, report.calibration_tokens = len(harmful), tokens
        gc.collect()
        return PreparedRevert(ctx, options, modules, norms, report)
