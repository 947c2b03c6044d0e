"""Antidote (Huang et al. 2024, arXiv 2408.09600): remove the weights most important on harmful data.

Score: Wanda, S_ij = |W_ij| * ||X_j||_2 over harmful calibration tokens (prompt + harmful response + EOS).
Selection: per output row, the top `ratio` of each row by score is set to zero (the paper's rule;
`granularity="matrix"` instead takes the top `ratio` of each whole matrix, an option beyond the paper).

With `reference` (the checkpoint before the harmful fine-tuning) only the fine-tuning delta is scored,
S_ij = |W_ij - R_ij| * ||X_j||_2, and the selected weights are restored to R_ij instead of zeroed. That is
the paper's setting carried over to a merged checkpoint: its code prunes the fine-tuning LoRA weights,
i.e. it resets the most harmful-important entries of the delta, never the pre-trained weights.

Contrastive score: S_ij = |W_ij| * (rms_harmful(X_j) - rms_benign(X_j)), the per-token RMS of input column j
on each set (its norm over the square root of its token count, see `contrast`), so the weights the benign
task also drives are spared.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibrate import InputNorms
from ..errors import SurgeryError
from ..model import linear_targets, meta_model, weight_name
from ..options import option
from ..prompts import calibration_batches, fill_responses
from ..select import prune_matrix, prune_rows, rows_to_remove
from ..splits import examples_for, hold_out
from .base import Edit, Method, Prepared, Strength
from .common import MethodOptions

SCORES = ("wanda", "magnitude", "contrastive")
GRANULARITIES = ("row", "matrix")


@dataclass
class PruneOptions(MethodOptions):
    ratio: float | str = option(
        0.05,
        "Fraction of each row to remove (Antidote default 0.05), or auto: the strongest inside the utility budget.",
        strength=True,
        fraction=True,
    )
    score: str = option(
        "wanda",
        "wanda (|W|·‖X‖ on harmful data), magnitude, or contrastive (|W| times per-token input RMS "
        "on harmful minus on benign data).",
        choices=SCORES,
    )
    granularity: str = option(
        "row",
        "row (the paper: top RATIO of each output row) or matrix (top RATIO of each whole matrix).",
        choices=GRANULARITIES,
    )
    targets: list[str] | None = option(
        None, "Comma-separated globs of Linear modules (default: every Linear in the decoder blocks).", patterns=True
    )
    data: str | None = option(
        None, "Harmful calibration data (.jsonl, .csv, .tsv or .txt); default: the built-in set.", file=True
    )
    column: str | None = option(None, "Prompt column/field in --data.")
    response_column: str | None = option(None, "Response column/field in --data (missing responses are generated).")
    benign_data: str | None = option(
        None, "Benign data for --score contrastive; default: the built-in harmless set.", file=True
    )
    max_samples: int = option(128, "Calibration examples (seeded random subset).", positive=True)
    max_length: int = option(256, "Tokens per calibration example.", positive=True)
    max_new_tokens: int = option(64, "Length of generated responses for prompts without one.", positive=True)
    batch_size: int = option(8, "Calibration sequences per forward pass.", positive=True)
    generate_batch_size: int = option(
        32,
        "Prompts answered at once when the data has no responses (larger is faster, up to "
        "memory; greedy answers are the same up to float round-off).",
        positive=True,
    )
    seed: int = option(0, "Seed of the calibration subset.")
    kernels: str = option("auto", "triton, torch or auto (triton on CUDA).", choices=("auto", "torch", "triton"))
    stream: bool | None = option(
        None,
        "Calibrate one decoder layer at a time (default: when the fp32 model exceeds --memory-budget).",
        flag="--stream/--no-stream",
    )
    memory_budget_gb: float | None = option(
        None, "GiB for the in-memory path (default: half the machine's memory).", flag="--memory-budget", positive=True
    )
    reference: str | None = option(
        None,
        "The checkpoint before the harmful fine-tuning: score only the fine-tuning delta and "
        "restore the selected weights to it instead of zeroing.",
        folder=True,
    )
    merge: bool = option(
        False,
        "With --adapter: write the pruned adapter merged into the base (a full checkpoint) instead "
        "of the pruned adapter folder.",
        flag="--merge",
    )


@dataclass
class ModulePlan:
    module: str
    tensor: str
    rows: int
    cols: int
    per_row: int | None  # weights removed from every row (None: matrix granularity, rows differ)
    removed: int


@dataclass
class PrunePlan:
    modules: list[ModulePlan]
    total_weights: int
    estimated_peak_bytes: int
    pool: str = "the model"  # what total_weights counts

    @property
    def removed(self) -> int:
        return sum(m.removed for m in self.modules)


@dataclass
class PruneReport:
    output: Path | None
    plan: PrunePlan
    sparsity: dict[str, float] = field(default_factory=dict)
    calibration_tokens: int = 0
    calibration_examples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    streamed: bool = False
    restored: bool = False  # weights were restored to a reference checkpoint (sparsity = share restored)
    adapter: bool = False  # the LoRA matrices of an adapter were pruned


def module_plan(module: str, tensor: str, rows: int, cols: int, ratio: float, granularity: str) -> ModulePlan:
    """How many weights a prune at `ratio` removes from one [rows, cols] matrix."""
    if granularity == "row":
        k = rows_to_remove(cols, ratio)
        return ModulePlan(module, tensor, rows, cols, k, rows * k)
    return ModulePlan(module, tensor, rows, cols, None, rows_to_remove(rows * cols, ratio))


def plan_at(plan: PrunePlan, ratio: float, granularity: str) -> PrunePlan:
    """The same modules at another ratio (no meta model: only the counts change)."""
    modules = [module_plan(m.module, m.tensor, m.rows, m.cols, ratio, granularity) for m in plan.modules]
    return PrunePlan(modules, plan.total_weights, plan.estimated_peak_bytes, plan.pool)


def plan_modules(ckpt, options: PruneOptions, ratio: float) -> PrunePlan:
    """What a prune at `ratio` would touch, from the checkpoint's headers alone (nothing is loaded)."""
    from ..model import resolve_device

    context = ckpt.config.get("max_position_embeddings")
    if context and options.max_length > context:
        raise SurgeryError(f"--max-length {options.max_length} is longer than the model's context ({context} tokens)")
    meta = meta_model(ckpt)
    modules = []
    for name in linear_targets(meta, options.targets):
        tensor = weight_name(ckpt, name)
        rows, cols = ckpt.tensors[tensor].shape
        modules.append(module_plan(name, tensor, rows, cols, ratio, options.granularity))
    params = sum(t.numel for t in ckpt.tensors.values())
    hidden = getattr(meta.config, "hidden_size", 0) or 0
    inter = getattr(meta.config, "intermediate_size", 0) or 4 * hidden
    # model in the compute dtype + the largest tensor being edited + one batch's activations (fp32).
    activations = options.batch_size * options.max_length * (4 * hidden + 2 * inter) * 4
    largest = max((ckpt.tensors[m.tensor].nbytes for m in modules), default=0)
    bytes_per = 4 if resolve_device(options.device).type == "cpu" else 2
    return PrunePlan(modules, params, params * bytes_per + 2 * largest + activations)


def plan_adapter(adapter, options: PruneOptions, ratio: float) -> PrunePlan:
    """The paper's own targets: every LoRA matrix of the adapter (A and B, each in its own row space), or those whose
    module (e.g. model.layers.0.self_attn.q_proj.lora_A) matches --targets; nothing of the base."""
    from ..adapter import PREFIX, module_of
    from ..arch import matches

    names = sorted(adapter.lora_tensors())
    if options.targets:
        short = {n: n[len(PREFIX) : -len(".weight")] for n in names}
        names = [n for n in names if matches(short[n], options.targets)]
        if not names:
            raise SurgeryError(
                f"--targets {','.join(options.targets)} matches no LoRA matrix of the adapter "
                f"(e.g. {short[sorted(short)[0]]})"
            )
    modules = [module_plan(module_of(n), n, *adapter.tensors[n].shape, ratio, options.granularity) for n in names]
    params = sum(t.numel for t in adapter.base.tensors.values()) + sum(t.numel for t in adapter.tensors.values())
    largest = max((adapter.tensors[n].nbytes for n in names), default=0)
    return PrunePlan(
        modules,
        sum(adapter.tensors[n].numel for n in names),
        params * 4 + 2 * largest,
        "the adapter's pruned LoRA matrices",
    )


def plan_prune(model_dir: str | Path, options: PruneOptions) -> PrunePlan:
    """What `surgery prune --dry-run` shows (a fixed ratio)."""
    from .base import RunOptions, run_repair

    return run_repair(Antidote(), model_dir, None, options, RunOptions(dry_run=True)).plan


def collect_norms(model, tokenizer, examples, options: PruneOptions, module_names: list[str]) -> InputNorms:
    """Wanda's ||X_j||_2 for every target, over prompt + response tokens of `examples`."""
    context = getattr(model.config, "max_position_embeddings", None)
    batches = calibration_batches(tokenizer, examples, options.max_length, options.batch_size, context)
    return InputNorms(model, module_names).run(batches)


def harmful_examples(ctx, options) -> list:
    """The harmful calibration examples of `--data` (or the built-in set's calibration part); with a strength search
    on the user's data, its selection prompts held out of them (into `ctx.held_out`). Antidote's and revert's."""
    harmful = examples_for(
        options.data,
        builtin="harmful",
        column=options.column,
        response_column=options.response_column,
        max_samples=options.max_samples,
        seed=options.seed,
    )
    if ctx.searching and options.data is not None:
        harmful, held = hold_out(harmful, ctx.run.search_samples, options.seed)
        ctx.held_out["harmful"] = [e.prompt for e in held]
    return harmful


def calibration_norms(ctx, examples, options, modules: list[str]):
    """Wanda's input norms over `examples` (their missing responses first generated by the model: its own answers), as
    (examples with responses, InputNorms). Kept in `ctx.cache` (`surgery repair` shares one across its candidates)
    under what was asked, so a second method asking the same (prune-restore, then revert) reuses the first's answers
    and norms instead of generating and calibrating again."""
    cache = getattr(ctx, "cache", None)
    if cache is None:
        cache = ctx.cache = {}
    model, tokenizer = ctx.model(), ctx.tokenizer()
    asked = tuple((e.prompt, e.response) for e in examples)
    answers_key = ("responses", asked, options.max_new_tokens, options.generate_batch_size)
    if answers_key not in cache:
        cache[answers_key] = ctx.timed(
            "generate_responses",
            lambda: list(
                fill_responses(model, tokenizer, list(examples), options.max_new_tokens, options.generate_batch_size)
            ),
        )
    filled = list(cache[answers_key])
    norms_key = ("norms", answers_key, tuple(modules), options.max_length, options.batch_size)
    if norms_key not in cache:
        t0 = time.perf_counter()
        stats = collect_norms(model, tokenizer, filled, options, list(modules))
        cache[norms_key] = (stats.norms(), stats.tokens)
        del stats
        ctx.timings["calibrate"] = ctx.timings.get("calibrate", 0.0) + time.perf_counter() - t0
    norms, tokens = cache[norms_key]
    return filled, dict(norms), tokens


def should_stream(ckpt, options: PruneOptions) -> bool:
    """Stream when asked, or (auto) when the model in fp32 would not fit the memory budget."""
    if options.stream is not None:
        return options.stream
    budget = options.memory_budget_gb * 2**30 if options.memory_budget_gb else 0.5 * _physical_memory()
    return sum(t.numel for t in ckpt.tensors.values()) * 4 > budget


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def contrast(harmful: torch.Tensor, harmful_tokens: int, benign: torch.Tensor, benign_tokens: int) -> torch.Tensor:
    """The contrastive input statistic: per-token RMS of each input column on harmful data minus the same on
    benign data. Each side is divided by the square root of its own token count, so two sets of different
    lengths compare like for like (the raw norms grow with the number of tokens; their difference would
    mostly measure which set is longer)."""
    return harmful / max(harmful_tokens, 1) ** 0.5 - benign / max(benign_tokens, 1) ** 0.5


def antidote_edit(
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    ratio: float,
    granularity: str = "row",
    kernels: str = "auto",
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The method in one function: S = |W - R|·||X|| (R = 0 without a reference), the top `ratio` of each row
    (or matrix) selected, and those weights set to R. Returns (new weight, selection mask)."""
    prune = prune_rows if granularity == "row" else prune_matrix
    if reference is None:
        pruned, mask = prune(weight, scale, ratio, kernels)
        return pruned, mask
    _, mask = prune(weight.float() - reference.float(), scale, ratio, kernels)
    return torch.where(mask, reference, weight), mask


class PreparedPrune(Prepared):
    def __init__(
        self,
        ctx,
        options: PruneOptions,
        plan: PrunePlan,
        norm_of,
        report: PruneReport,
        order=None,
        streamed: bool = False,
    ):
        self.ctx, self.options, self.plan, self.norm_of = ctx, options, plan, norm_of
        self.report, self.order, self.streamed = report, order, streamed
        self.reference = ctx.references.get("reference")

    def at(self, ratio: float) -> Edit:
        options, reference = self.options, self.reference
        by_tensor = {m.tensor: m for m in self.plan.modules}
        sparsity: dict[str, float] = {}  # share of zeros; with a reference: share of weights restored

        def edit(name: str, weight: torch.Tensor) -> torch.Tensor:
            if name not in by_tensor:
                return weight
            module = by_tensor[name].module
            scale = self.norm_of(module) if self.norm_of else None
            ref = reference.read(name).to(device=weight.device, dtype=weight.dtype) if reference is not None else None
            new, mask = antidote_edit(weight, scale, ratio, options.granularity, options.kernels, ref)
            sparsity[module] = (mask.float().mean() if ref is not None else (new == 0).float().mean()).item()
            return new

        plan = plan_at(self.plan, ratio, options.granularity)  # the counts at this ratio (prepare planned another)
        self.report.plan, self.report.sparsity, self.report.restored = plan, sparsity, reference is not None
        summary = {
            "calibration_examples": self.report.calibration_examples,
            "calibration_tokens": self.report.calibration_tokens,
            "weights_removed": plan.removed,
            ("restored" if reference is not None else "sparsity"): sparsity,
            "note": "selected weights restored to the reference checkpoint's values"
            if reference is not None
            else "zeros are stored densely: the output files are the same size as the input",
        }
        if self.ctx.adapter is not None:
            summary["pruned"] = (
                "the adapter's LoRA matrices only (lora_A and lora_B, each per output row, Wanda statistics "
                "at each one's own input); the base is untouched"
            )
        return Edit(
            edit,
            touched=list(by_tensor),
            order=self.order,
            summary=summary,
            arguments={"streamed": self.streamed},
            streamed=self.streamed,
        )


class Antidote(Method):
    name = "prune"
    manifest_id = "antidote-prune"
    summary = "Antidote: zero (or, with --reference, restore) the weights most important on harmful data."
    paper = "Huang et al. 2024, Antidote, arXiv 2408.09600"
    Options = PruneOptions
    references = {"reference": "the checkpoint before the harmful fine-tuning"}
    strength = Strength("ratio", low=1e-3, high=0.5, log=True)
    adapter_mode = "adapter"  # the paper prunes the fine-tuning LoRA matrices, never the base
    on_request_with_reference = frozenset({"prune-restore"})

    def repair_candidates(self, given):
        """With an adapter: prune its LoRA matrices (the paper); with a reference: restore the fine-tune delta; with
        neither: zero (the paper's edit, on a merged checkpoint)."""
        if given.adapter is not None:
            return [
                (
                    "prune-adapter",
                    PruneOptions(
                        ratio="auto", adapter=given.adapter, device=given.device, allow_pickle=given.allow_pickle
                    ),
                )
            ]
        if given.reference is not None:
            return [
                (
                    "prune-restore",
                    PruneOptions(
                        ratio="auto", reference=given.reference, device=given.device, allow_pickle=given.allow_pickle
                    ),
                )
            ]
        return [("prune", PruneOptions(ratio="auto", device=given.device, allow_pickle=given.allow_pickle))]

    def validate(self, options: PruneOptions) -> None:
        if options.stream and options.ratio == "auto":
            raise SurgeryError("--ratio auto tries each ratio on the model in memory: not with --stream")
        if options.adapter is not None and options.reference is not None:
            raise SurgeryError(
                "--reference is not needed with --adapter: the base is the model before the fine-tune, and "
                "the adapter's own LoRA matrices are what is pruned (drop --reference)"
            )
        if options.adapter is not None and options.stream:
            raise SurgeryError(
                "--stream calibrates a full checkpoint layer by layer: not with --adapter (base + adapter "
                "are calibrated in memory)"
            )
        if options.merge and options.adapter is None:
            raise SurgeryError("--merge writes a pruned adapter merged into its base: it needs --adapter")

    def plan(self, ctx, options: PruneOptions) -> PrunePlan:
        if ctx.adapter is not None:
            return plan_adapter(ctx.adapter, options, options.ratio)
        return plan_modules(ctx.ckpt, options, options.ratio)

    def prepare(self, ctx, options: PruneOptions) -> PreparedPrune:
        ratio = options.ratio if isinstance(options.ratio, float) else self.strength.high
        plan = (
            plan_adapter(ctx.adapter, options, ratio)
            if ctx.adapter is not None
            else plan_modules(ctx.ckpt, options, ratio)
        )
        report = PruneReport(None, plan, adapter=ctx.adapter is not None)
        modules = [m.module for m in plan.modules]
        streamed = ctx.adapter is None and should_stream(ctx.ckpt, options)
        if streamed and ctx.searching:
            raise SurgeryError(
                "--ratio auto tries each ratio on the model in memory, and this model is streamed: "
                "pass --no-stream (with enough memory) or a fixed --ratio"
            )
        from ..stream import return_freed_memory

        return_freed_memory()  # large freed buffers go back to the OS (streamed: else the heap grows per layer)
        torch.manual_seed(options.seed)
        if options.score == "magnitude":
            return PreparedPrune(ctx, options, plan, None, report, streamed=streamed)
        harmful = harmful_examples(ctx, options)
        benign = None
        if options.score == "contrastive":
            benign = examples_for(
                options.benign_data, builtin="harmless", max_samples=options.max_samples, seed=options.seed
            )
        tokenizer = ctx.tokenizer()
        if streamed:
            sources = [_layerwise(ctx, tokenizer, ex, options, modules) for ex in filter(None, (harmful, benign))]
            report.calibration_tokens = sources[0].tokens
            report.calibration_examples, report.streamed = len(harmful), True
            norm_of = (
                sources[0].get
                if len(sources) == 1
                else (lambda m: contrast(sources[0].get(m), sources[0].tokens, sources[1].get(m), sources[1].tokens))
            )
            return PreparedPrune(ctx, options, plan, norm_of, report, order=sources[0].write_order(), streamed=True)
        model = ctx.model()
        harmful, norms, tokens = calibration_norms(ctx, harmful, options, modules)
        if benign is not None:
            # Contrastive: harmful-data importance minus benign-data importance spares what the task needs.
            t0 = time.perf_counter()
            benign = fill_responses(model, tokenizer, benign, options.max_new_tokens, options.generate_batch_size)
            benign_stats = collect_norms(model, tokenizer, benign, options, modules)
            benign_norms = benign_stats.norms()
            norms = {n: contrast(norms[n], tokens, benign_norms[n], benign_stats.tokens) for n in norms}
            del benign_stats
            ctx.timings["calibrate"] = ctx.timings.get("calibrate", 0.0) + time.perf_counter() - t0
        gc.collect()
        report.calibration_tokens, report.calibration_examples = tokens, len(harmful)
        report.seconds = ctx.timings
        return PreparedPrune(ctx, options, plan, norms.__getitem__, report)


def prune_checkpoint(
    model_dir: str | Path, output: str | Path, options: PruneOptions, force: bool = False
) -> PruneReport:
    """Antidote pruning of a checkpoint folder into a new folder (the input is never modified; no after-write check)."""
    from .base import RunOptions, run_repair

    result = run_repair(Antidote(), model_dir, output, options, RunOptions(force=force, check=False))
    result.report.output = Path(output)
    return result.report


def _layerwise(ctx, tokenizer, examples, options: PruneOptions, modules):
    from ..stream import LayerwiseNorms

    if any(ex.response is None for ex in examples):
        raise SurgeryError(
            "streamed pruning calibrates on the data's own responses: give --data with a response column "
            "(prompts alone would need the whole model in memory to generate answers), or use --no-stream"
        )
    context = ctx.ckpt.config.get("max_position_embeddings")
    batches = calibration_batches(tokenizer, examples, options.max_length, options.batch_size, context)
    return LayerwiseNorms(ctx.ckpt, batches, modules, ctx.device)
