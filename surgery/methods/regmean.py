"""RegMean merge of the fine-tune and its reference (Jin et al., ICLR 2023, arXiv 2212.09849), each model weighted by
the inputs of its own job: the fine-tune by its task data, the aligned reference by safety data. The recalibration
idea of IRR (arXiv 2412.11041: keep the fine-tuned model's outputs on task inputs) and Safe Delta's (keep the aligned
model's outputs on safety inputs) in one least-squares problem per Linear weight:

    W = argmin (1 - α) ||(W - W_ft) X_t||² / N_t  +  α ||(W - W_ref) X_s||² / N_s

    X_t      the FINE-TUNED model's inputs to that Linear on the task data (prompt and response tokens)
    X_s      the ALIGNED model's inputs to that Linear on the safety data (harmful prompt + safe response; the
             Hessians Safe Delta reads: `safe_delta.calibration_hessians`)
    G        = X Xᵀ / N, scaled to a mean diagonal of 1, plus DAMP · I (a column never seen, G_jj = 0, gets 1 first)
    M        = (1 - α) G_t + α G_s

    W        = ((1 - α) W_ft G_t + α W_ref G_s) M⁻¹  =  W_ft + α (W_ref - W_ft) G_s M⁻¹

α = 0 writes W_ft and α = 1 writes W_ref, bit for bit (no rounding through the solve); with G_t = G_s = I the rule is
interpolation (`surgery interpolate`) at the same α. Where the two sets use different input directions, each model
keeps its own: the task's directions follow the fine-tune, the safety data's follow the reference, and a direction
both use is shared in proportion to α and to how much each set uses it. RegMean's own setting weighs the two models
equally: α = 0.5 is the default; `--alpha auto` searches for the strongest inside the utility budget.

Every other floating tensor where the fine-tune differs from the reference (embeddings, norms, the head: weights with
no input Gram) is interpolated at the same α, RegMean's rule for them.

The task data, in this order: `--task-data FILE` (prompts with or without responses: what the fine-tune learned,
responses missing are the fine-tuned model's own greedy answers); with any `--task sst2:...`, the built-in sentiment
set's train part (prompt -> label word; the search measures the built-in set's selection part or the user's file,
disjoint from it either way); otherwise the built-in harmless instructions' calibration part answered by the
fine-tuned model (its general use).

Cost: forward passes of the fine-tuned model over the task data and of the aligned model over the safety data (shared
with Safe Delta in `surgery repair`), then per strength one Cholesky factorisation per input width group and one
matrix product per weight.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..deltas import floating, same_values
from ..errors import SurgeryError
from ..metrics import SST2_LABELS, SST2_TEMPLATE
from ..options import option
from ..prompts import Example, fill_responses
from ..splits import examples_for, sample
from ..stream import return_freed_memory
from ..tasks import TRAIN, sentiment_part
from . import safe_delta
from .base import Edit, Method, Prepared, Strength
from .interpolate import interpolated
from .pair import REFERENCE, linear_weights, pair_edit, reference_candidates, require_reference

TASK_SOURCES = ("file", "built-in sentiment train part", "harmless instructions")


@dataclass
class RegMeanOptions(safe_delta.SafetyDataOptions):
    alpha: float | str = option(
        0.5,
        "The reference's weight: W = ((1-A) W_ft G_task + A W_ref G_safety)((1-A) G_task + "
        "A G_safety)^-1; 0 is the fine-tune, 1 the reference (RegMean: 0.5); auto: the "
        "strongest inside the utility budget.",
        strength=True,
        low=0.0,
        high=1.0,
    )
    task_data: str | None = option(
        None,
        "The fine-tune's task examples (.jsonl, .csv, .tsv or .txt), with or without responses "
        "(missing: the fine-tuned model's own answers); default: with --task sst2:builtin its "
        "train part, else the built-in harmless instructions.",
        file=True,
    )
    task_column: str | None = option(None, "Prompt column/field in --task-data.")
    task_response_column: str | None = option(None, "Response column/field in --task-data.")
    task_samples: int = option(128, "Task examples (seeded random subset).", positive=True)
    damp: float = option(
        0.01, "Gram damping: DAMP · I added to each Gram scaled to a mean diagonal of 1.", positive=True
    )
    targets: list[str] | None = option(
        None,
        "Comma-separated globs of Linear modules merged with their Grams (default: every Linear in the decoder "
        "blocks); every other tensor that differs is interpolated.",
        patterns=True,
    )


# ---- the method on one weight ---------------------------------------------------------------------------------------


def normalised(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """G scaled to a mean diagonal of 1, plus damp · I, in fp64 (a column never seen gets G_jj = 1 first)."""
    g = safe_delta.seen_columns(
        gram, "a calibration set gave a non-finite Gram matrix: the model's activations overflow"
    )
    g /= float(torch.diagonal(g).mean())
    g.diagonal().add_(damp)
    return g


def reference_share(task: torch.Tensor, safety: torch.Tensor, alpha: float) -> torch.Tensor:
    """K = α G_s ((1-α) G_t + α G_s)⁻¹ (solved in fp64, returned in fp32), so that W = W_ft + (W_ref - W_ft) K."""
    task, safety = task.double(), safety.double()
    m = (1.0 - alpha) * task + alpha * safety
    try:
        lower = torch.linalg.cholesky(m)
    except torch.linalg.LinAlgError:
        raise SurgeryError("the merged Gram matrix is not positive definite even after damping: raise --damp") from None
    # K = α G_s M⁻¹ = (M⁻¹ α G_s)ᵀ, both symmetric
    return torch.cholesky_solve(alpha * safety, lower).T.contiguous().float()


def regmean_tensor(tuned: torch.Tensor, reference: torch.Tensor, share: torch.Tensor | None, alpha: float):
    """The merged weight in the tuned weight's dtype: W_ft + (W_ref - W_ft) K, or interpolation at α where there is
    no Gram (share None); the ends exactly (interpolation's)."""
    if share is None or alpha in (0, 1):
        return interpolated(tuned, reference, alpha)
    ft = tuned.float()
    return torch.addmm(ft, reference.float() - ft, share).to(tuned.dtype)


# ---- calibration: the fine-tuned model on the task ------------------------------------------------------------------


def sentiment_examples(part: str = TRAIN) -> list[Example]:
    """A part of the built-in sentiment set as classification prompts answered by their label word."""
    return [Example(SST2_TEMPLATE.format(s), SST2_LABELS[y]) for s, y in sentiment_part(part)]


def task_examples(ctx, options: RegMeanOptions) -> tuple[list[Example], str]:
    """The task data (see the module docstring) and which source it came from."""
    if options.task_data is None and (ctx.run.task or "").partition(":")[0] == "sst2":
        # Sentiment data for a sentiment task, whichever set the search measures: the built-in set's selection part,
        # or the user's own held-out file (disjoint from this train part either way).
        return sample(sentiment_examples(), options.task_samples, options.seed), TASK_SOURCES[1]
    found = examples_for(
        options.task_data,
        builtin="harmless",
        column=options.task_column,
        response_column=options.task_response_column,
        max_samples=options.task_samples,
        seed=options.seed,
    )
    return found, TASK_SOURCES[0] if options.task_data is not None else TASK_SOURCES[2]


def task_grams(ctx, options: RegMeanOptions, modules: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The fine-tuned model's input Gram per module on the task data, and that data's figures (tests plant Grams
    here). Modules that read the same input share one tensor."""
    examples, source = task_examples(ctx, options)
    model, tokenizer = ctx.model(), ctx.tokenizer()
    if any(e.response is None for e in examples):
        examples = ctx.timed(
            "generate_task_responses",
            lambda: fill_responses(model, tokenizer, examples, options.max_new_tokens, options.generate_batch_size),
        )
    t0 = time.perf_counter()
    grams, tokens = safe_delta.input_hessians(model, tokenizer, examples, options, modules)
    ctx.timings["calibrate_task"] = time.perf_counter() - t0
    gc.collect()
    return grams, {"task_source": source, "task_examples": len(examples), "task_tokens": tokens}


# ---- the method -----------------------------------------------------------------------------------------------------


@dataclass
class RegMeanPlan:
    modules: dict[str, str]  # module -> its weight tensor (merged with Grams)
    others: list[str]  # other floating tensors (interpolated where they differ)
    entries: int
    alpha: float | str


@dataclass
class RegMeanReport:
    alpha: float
    merged: list[str] = field(default_factory=list)  # Linear weights merged with their Grams
    interpolated: list[str] = field(default_factory=list)  # other tensors that differ: interpolated at alpha
    unchanged: list[str] = field(default_factory=list)  # targets where the fine-tune equals the reference
    entries: int = 0
    calibration: dict = field(default_factory=dict)
    groups: int = 0  # distinct input Grams (modules reading the same input share one)

    def to_json(self) -> dict:
        return {
            "alpha": self.alpha,
            "weights_merged": len(self.merged),
            "tensors_interpolated": len(self.interpolated),
            "tensors_equal_to_reference": len(self.unchanged),
            "entries": self.entries,
            "input_groups": self.groups,
            **self.calibration,
            "note": "W = W_ft + alpha (W_ref - W_ft) G_s ((1 - alpha) G_t + alpha G_s)^-1 on each Linear weight (G_t: the "
            "fine-tuned model's inputs on the task data, G_s: the aligned model's on the safety data); other tensors "
            "W_ref + (1 - alpha)(W_ft - W_ref)",
        }


class PreparedRegMean(Prepared):
    def __init__(self, ctx, options, modules: dict[str, str], others: list[str], grams: dict, calibration: dict):
        self.options, self.others, self.calibration = options, others, calibration
        self.reference = ctx.references["reference"]
        self.module_of = {tensor: module for module, tensor in modules.items()}
        self.grams = grams  # module -> (G_t, G_s), normalised and damped, one pair object per input group
        self.groups = len({id(g) for g in grams.values()})
        self.report = None

    def at(self, alpha: float) -> Edit:
        report = self.report = RegMeanReport(alpha, calibration=self.calibration, groups=self.groups)
        shares: dict[int, torch.Tensor] = {}  # id of a Gram pair -> K at this alpha (one per input group)
        # modules of each group still to be written: a group's K is dropped after its last one (recomputed, the same,
        # should a tensor come through again)
        left = Counter(id(self.grams[m]) for m in self.module_of.values())

        def change(name: str, weight: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
            if same_values(weight, reference):
                report.unchanged.append(name)
                return weight
            report.entries += weight.numel()
            module = self.module_of.get(name)
            if module is None:
                report.interpolated.append(name)
                return regmean_tensor(weight, reference, None, alpha)
            report.merged.append(name)
            pair = self.grams[module]
            if 0 < alpha < 1 and id(pair) not in shares:
                shares[id(pair)] = reference_share(*pair, alpha)
            merged = regmean_tensor(weight, reference, shares.get(id(pair)), alpha)
            left[id(pair)] -= 1
            if left[id(pair)] <= 0:
                shares.pop(id(pair), None)
            return merged

        edit, recorded = pair_edit([*self.module_of, *self.others], change, report, (self.reference,))
        return Edit(edit, touched=[*self.module_of, *self.others], summary={"regmean": recorded})


class RegMean(Method):
    name = "regmean"
    manifest_id = "regmean"
    summary = (
        "RegMean merge of the fine-tune and the reference: each Linear weight solved so the fine-tune's outputs on task "
        "data and the reference's on safety data are both kept (least squares on their input Grams)."
    )
    paper = (
        "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean), arXiv 2212.09849"
    )
    Options = RegMeanOptions
    references = REFERENCE
    # 0 is no repair (the fine-tune), so it is not searched; 1 is the reference itself.
    strength = Strength("alpha", low=0.05, high=1.0)

    def repair_candidates(self, given):
        """With `surgery repair --reference ALIGNED` (the task data from --task sst2:builtin, or the harmless
        instructions)."""
        return reference_candidates("regmean", RegMeanOptions, "alpha", given)

    def validate(self, options: RegMeanOptions) -> None:
        require_reference(options)

    def modules(self, ctx, options: RegMeanOptions) -> dict[str, str]:
        return linear_weights(ctx, options.targets, "RegMean")

    def others(self, ctx, modules: dict[str, str]) -> list[str]:
        merged = set(modules.values())
        return [t for t in floating(ctx.ckpt, list(ctx.ckpt.tensors)) if t not in merged]

    def plan(self, ctx, options: RegMeanOptions) -> RegMeanPlan:
        modules = self.modules(ctx, options)
        others = self.others(ctx, modules)
        entries = sum(ctx.ckpt.tensors[t].numel for t in [*modules.values(), *others])
        return RegMeanPlan(modules, others, entries, options.alpha)

    def prepare(self, ctx, options: RegMeanOptions) -> PreparedRegMean:
        modules = self.modules(ctx, options)
        names = list(modules)
        torch.manual_seed(options.seed)
        task, task_figures = task_grams(ctx, options, names)
        safety, safety_figures = safe_delta.calibration_hessians(ctx, options, names)
        pairs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # one normalised pair per input group
        grams = {}
        for module in names:
            cols = ctx.ckpt.tensors[modules[module]].shape[1]
            for g in (task[module], safety[module]):
                if tuple(g.shape) != (cols, cols):
                    raise SurgeryError(f"{module}: its Gram is {list(g.shape)}, the weight has {cols} input columns")
            key = (id(task[module]), id(safety[module]))
            if key not in pairs:
                # kept in fp32 (half the memory: on SmolLM2-135M 0.8 GB for both sets), solved in fp64 per strength
                pairs[key] = tuple(normalised(g[module], options.damp).float() for g in (task, safety))
            grams[module] = pairs[key]
        return_freed_memory()
        calibration = {**task_figures, **{f"safety_{k}": v for k, v in safety_figures.items()}}
        return PreparedRegMean(ctx, options, modules, self.others(ctx, modules), grams, calibration)
