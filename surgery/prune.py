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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .calibrate import InputNorms
from .checkpoint import open_checkpoint
from .errors import SurgeryError
from .model import linear_targets, load_model, load_tokenizer, meta_model, resolve_device, weight_name
from .prompts import encode_pairs, fill_responses, load_examples, pad_batches

SCORES = ("wanda", "magnitude", "contrastive")
GRANULARITIES = ("row", "matrix")


@dataclass
class PruneOptions:
    ratio: float = 0.05
    score: str = "wanda"
    granularity: str = "row"
    targets: list[str] | None = None
    data: str | None = None
    column: str | None = None
    response_column: str | None = None
    benign_data: str | None = None
    max_samples: int = 128
    max_length: int = 256
    max_new_tokens: int = 64
    batch_size: int = 8  # calibration sequences per forward pass
    generate_batch_size: int = 32  # prompts answered at once (greedy: same answers up to float round-off)
    seed: int = 0
    device: str = "auto"
    kernels: str = "auto"
    allow_pickle: bool = False
    stream: bool | None = None  # None: stream when the fp32 model exceeds the memory budget
    memory_budget_gb: float | None = None  # None: half the machine's memory
    reference: str | None = None  # checkpoint before fine-tuning: score the delta, restore instead of zeroing

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise SurgeryError(f"--ratio must be between 0 and 1 (exclusive), got {self.ratio}")
        if self.score not in SCORES:
            raise SurgeryError(f"--score must be one of {', '.join(SCORES)}, got '{self.score}'")
        if self.granularity not in GRANULARITIES:
            raise SurgeryError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got '{self.granularity}'")
        if self.kernels not in ("auto", "torch", "triton"):
            raise SurgeryError(f"--kernels must be auto, torch or triton, got '{self.kernels}'")
        for name in ("max_length", "max_new_tokens", "batch_size", "generate_batch_size"):
            if getattr(self, name) <= 0:
                raise SurgeryError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


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

    @property
    def removed(self) -> int:
        return sum(m.removed for m in self.modules)


@dataclass
class PruneReport:
    output: Path
    plan: PrunePlan
    sparsity: dict[str, float] = field(default_factory=dict)
    calibration_tokens: int = 0
    calibration_examples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    streamed: bool = False
    restored: bool = False  # weights were restored to a reference checkpoint (sparsity = share restored)


def plan_prune(model_dir: str | Path, options: PruneOptions) -> PrunePlan:
    """What a prune would touch, from the checkpoint's headers alone (nothing is loaded)."""
    from .select import rows_to_remove

    options.validate()
    ckpt = open_checkpoint(model_dir, options.allow_pickle)
    context = ckpt.config.get("max_position_embeddings")
    if context and options.max_length > context:
        raise SurgeryError(f"--max-length {options.max_length} is longer than the model's context ({context} tokens)")
    meta = meta_model(ckpt)
    modules = []
    for name in linear_targets(meta, options.targets):
        tensor = weight_name(ckpt, name)
        rows, cols = ckpt.tensors[tensor].shape
        if options.granularity == "row":
            k = rows_to_remove(cols, options.ratio)
            modules.append(ModulePlan(name, tensor, rows, cols, k, rows * k))
        else:
            modules.append(ModulePlan(name, tensor, rows, cols, None, rows_to_remove(rows * cols, options.ratio)))
    if options.reference is not None:
        check_reference(ckpt, options.reference, [m.tensor for m in modules], options.allow_pickle)
    params = sum(t.numel for t in ckpt.tensors.values())
    hidden = getattr(meta.config, "hidden_size", 0) or 0
    inter = getattr(meta.config, "intermediate_size", 0) or 4 * hidden
    # model in the compute dtype + the largest tensor being edited + one batch's activations (fp32).
    activations = options.batch_size * options.max_length * (4 * hidden + 2 * inter) * 4
    largest = max((ckpt.tensors[m.tensor].nbytes for m in modules), default=0)
    bytes_per = 4 if resolve_device(options.device).type == "cpu" else 2
    return PrunePlan(modules, params, params * bytes_per + 2 * largest + activations)


SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


def check_reference(ckpt, reference: str, tensors: list[str], allow_pickle: bool = False):
    """The reference must be another checkpoint with every target tensor under the same name and shape."""
    ref_path = Path(reference)
    if ref_path.resolve() == ckpt.path.resolve():
        raise SurgeryError("--reference is the model itself: give the checkpoint from before the fine-tuning")
    try:
        ref = open_checkpoint(ref_path, allow_pickle)
    except SurgeryError as e:
        raise SurgeryError(f"--reference: {e}") from None
    for key in SHAPE_KEYS:  # e.g. a deeper model with the same first layers is not the model before a fine-tune
        mine, theirs = ckpt.config.get(key), ref.config.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            raise SurgeryError(f"--reference {reference} has {key} {theirs}, the model has {mine}: not the same architecture")
    for name in tensors:
        if name not in ref.tensors:
            raise SurgeryError(f"--reference {reference} has no tensor {name}: not the same architecture")
        if ref.tensors[name].shape != ckpt.tensors[name].shape:
            raise SurgeryError(
                f"--reference {reference}: {name} has shape {list(ref.tensors[name].shape)}, "
                f"the model has {list(ckpt.tensors[name].shape)}"
            )
    return ref


def collect_norms(model, tokenizer, examples, options: PruneOptions, module_names: list[str]) -> InputNorms:
    """Wanda's ||X_j||_2 for every target, over prompt + response tokens of `examples`."""
    context = getattr(model.config, "max_position_embeddings", None)
    sequences = encode_pairs(tokenizer, examples, options.max_length, context)
    stats = InputNorms(model, module_names)
    return stats.run(pad_batches(sequences, options.batch_size, tokenizer.pad_token_id))


def should_stream(ckpt, options: PruneOptions) -> bool:
    """Stream when asked, or (auto) when the model in fp32 would not fit the memory budget."""
    if options.stream is not None:
        return options.stream
    budget = options.memory_budget_gb * 2**30 if options.memory_budget_gb else 0.5 * _physical_memory()
    return sum(t.numel for t in ckpt.tensors.values()) * 4 > budget


def _physical_memory() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def prune_checkpoint(model_dir: str | Path, output: str | Path, options: PruneOptions, force: bool = False) -> PruneReport:
    """Antidote pruning of a checkpoint folder into a new folder (the input is never modified)."""
    from .select import prune_matrix, prune_rows
    from .writer import write_checkpoint

    plan = plan_prune(model_dir, options)
    ckpt = open_checkpoint(model_dir, options.allow_pickle)
    torch.manual_seed(options.seed)
    timings: dict[str, float] = {}
    modules = [m.module for m in plan.modules]
    norm_of = None  # module name -> ||X_j||_2 (None: magnitude score)
    order = None
    tokens = n_examples = 0
    streamed = should_stream(ckpt, options)
    from .stream import return_freed_memory

    return_freed_memory()  # large freed buffers go back to the OS (streamed: else the heap grows per layer)
    if options.score != "magnitude":
        t0 = time.perf_counter()
        harmful = load_examples(
            options.data, column=options.column, response_column=options.response_column,
            max_samples=options.max_samples, seed=options.seed,
        )
        benign = None
        if options.score == "contrastive":
            benign = load_examples(options.benign_data, max_samples=options.max_samples, seed=options.seed, builtin="harmless")
        device = resolve_device(options.device)
        tokenizer = load_tokenizer(ckpt.path)
        if streamed:
            sources = [_layerwise(ckpt, tokenizer, ex, options, modules, device) for ex in filter(None, (harmful, benign))]
            order = sources[0].write_order()
            tokens = sources[0].tokens
            norm_of = sources[0].get if len(sources) == 1 else (
                lambda m: contrast(sources[0].get(m), sources[0].tokens, sources[1].get(m), sources[1].tokens))
        else:
            model = load_model(ckpt, device)
            harmful = fill_responses(model, tokenizer, harmful, options.max_new_tokens, options.generate_batch_size)
            timings["generate_responses"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            stats = collect_norms(model, tokenizer, harmful, options, modules)
            norms = stats.norms()
            tokens = stats.tokens
            if benign is not None:
                # Contrastive: harmful-data importance minus benign-data importance spares what the task needs.
                benign = fill_responses(model, tokenizer, benign, options.max_new_tokens, options.generate_batch_size)
                benign_stats = collect_norms(model, tokenizer, benign, options, modules)
                benign_norms = benign_stats.norms()
                norms = {n: contrast(norms[n], tokens, benign_norms[n], benign_stats.tokens) for n in norms}
                del benign_stats
            norm_of = norms.__getitem__
            timings["calibrate"] = time.perf_counter() - t0
            del model, stats  # the statistics hold the model: drop both so its weights are unmapped before writing
            gc.collect()
        n_examples = len(harmful)

    by_tensor = {m.tensor: m for m in plan.modules}
    sparsity: dict[str, float] = {}  # share of zeros; with a reference: share of weights restored
    reference = open_checkpoint(options.reference, options.allow_pickle) if options.reference else None

    def edit(name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in by_tensor:
            return weight
        module = by_tensor[name].module
        prune = prune_rows if options.granularity == "row" else prune_matrix
        scale = norm_of(module) if norm_of else None
        if reference is None:
            pruned, _mask = prune(weight, scale, options.ratio, options.kernels)
            sparsity[module] = (pruned == 0).float().mean().item()
            return pruned
        ref = reference.read(name).to(device=weight.device, dtype=weight.dtype)
        _, mask = prune(weight.float() - ref.float(), scale, options.ratio, options.kernels)
        sparsity[module] = mask.float().mean().item()
        return torch.where(mask, ref, weight)

    t0 = time.perf_counter()
    arguments = dict(asdict(options), streamed=streamed)
    summary = {
        "calibration_examples": n_examples,
        "calibration_tokens": tokens,
        "weights_removed": plan.removed,
        ("restored" if reference else "sparsity"): sparsity,
        "note": "selected weights restored to the reference checkpoint's values" if reference
        else "zeros are stored densely: the output files are the same size as the input",
    }
    write_checkpoint(ckpt, output, edit, method="antidote-prune", arguments=arguments, report=summary, force=force, order=order)
    timings["calibrate_and_write" if streamed else "write"] = time.perf_counter() - t0
    return PruneReport(Path(output), plan, sparsity, tokens, n_examples, timings, streamed, restored=reference is not None)


def contrast(harmful: torch.Tensor, harmful_tokens: int, benign: torch.Tensor, benign_tokens: int) -> torch.Tensor:
    """The contrastive input statistic: per-token RMS of each input column on harmful data minus the same on
    benign data. Each side is divided by the square root of its own token count, so two sets of different
    lengths compare like for like (the raw norms grow with the number of tokens; their difference would
    mostly measure which set is longer)."""
    return harmful / max(harmful_tokens, 1) ** 0.5 - benign / max(benign_tokens, 1) ** 0.5


def _layerwise(ckpt, tokenizer, examples, options: PruneOptions, modules, device):
    from .stream import LayerwiseNorms

    if any(ex.response is None for ex in examples):
        raise SurgeryError(
            "streamed pruning calibrates on the data's own responses: give --data with a response column "
            "(prompts alone would need the whole model in memory to generate answers), or use --no-stream"
        )
    context = ckpt.config.get("max_position_embeddings")
    sequences = encode_pairs(tokenizer, examples, options.max_length, context)
    return LayerwiseNorms(ckpt, pad_batches(sequences, options.batch_size, tokenizer.pad_token_id), modules, device)
