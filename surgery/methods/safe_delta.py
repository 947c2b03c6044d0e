"""Safe Delta (Lu et al., ICML 2025, arXiv 2505.12038): keep as much of the fine-tune delta as a safety budget allows,
and compensate what is kept so each layer's output on safety data stays close to the aligned model's.

For every Linear of the decoder (weight W [rows, cols], input width cols):

    X        the ALIGNED model's inputs to that Linear on the safety calibration set (harmful prompt + safe response,
             prompt and response tokens, padding excluded); modules that read the same input (q/k/v, gate/up) share H
    H        = 2 X Xᵀ / N                        (N: tokens; every rule below is unchanged by the scale of H)
    H'       = H + λI,  λ = DAMP · mean(diag H)  (DAMP 0.01; a column never seen, H_jj = 0, gets H_jj = 1 first)
    U        upper Cholesky factor of H'⁻¹ = UᵀU; d_j = U_jj, so d_j² = [(H'_FF)⁻¹]_jj with F = {j, ..., cols}:
             the inverse-Hessian diagonal of column j once the columns before it are fixed (sequential OBS)
    Δ        = W_ft - W_aligned

Columns are taken in blocks of BLOCK (2048). At the start of a block, with W the working weights (W_aligned
compensated by the earlier blocks):

    cost_ij  = (W_ft,ij - W_ij)² / d_j²          the OBS estimate of the safety loss of giving entry ij its fine-tune value
    order    the block's entries by 1/d_j² ascending (least safety-sensitive columns first; ties: lower flat index)
    eligible all but the last ⌊PROTECT · n⌋ of that order (PROTECT 0.15: the most sensitive entries stay aligned)
    admitted the longest prefix of the eligible entries whose cumulative cost is ≤ ε,
             ε = (BUDGET / 2) · (rows / 4096) · mean_j(1/d_j²)      (the authors' scale: a 4096-wide Llama-2 layer in
                                                                     two 2048-column blocks, each given half of s)

then the OBS/SparseGPT error feedback, column by column in order (exact: each column's error reaches every later
column):

    q_j      = W_ft,·j on the admitted entries, W_·j elsewhere (the entries not admitted keep their aligned value
               plus the compensation they have received)
    e_j      = (W_·j - q_j) / d_j;   W_·j <- q_j;   W_·k -= e_j U_jk for every later column k

So BUDGET 0 writes W_aligned exactly (nothing admitted, nothing to compensate) and an unbounded BUDGET with
PROTECT 0 writes W_ft exactly; a larger budget keeps more of the delta (a weaker repair). The authors' code processes
the columns four at a time, the error of a column reaching only the later groups; this implementation passes every
column's error on (the exact OBS update).

Computed in closed form rather than column by column: e_j is zero where nothing is admitted, so with R = W - W_ft at
the block's start, row by row Σ_{i≤j} e_i U_ij = R_j on the admitted entries, a triangular system in the admitted
columns only (one triangular solve from the right per run of fully admitted columns, a partly admitted column alone;
the selection admits whole columns in order, so there is at most one partial column unless columns tie). Then
W_·k -= Σ_{i≤k} e_i U_ik for every column at once, and the admitted entries are set to W_ft exactly. The weights stay
row-major (no transposed copies), and the admitted prefix is found from column totals, summed in fp64, with only the
column it ends in summed entry by entry. Tested against a column-by-column computation from explicit inverses and a
Python sort (tests/test_safe_delta.py).

The safe responses: the paper uses the aligned model's own answers to the harmful prompts; that is the default here
(`--responses aligned`: generated once, greedily, `--max-new-tokens` long, for prompts without a response);
`--responses refusal` gives every prompt one fixed refusal sentence instead (no generation). The authors' round-robin
of attack system prompts is not reproduced: the prompts are rendered with the model's chat template.

Cost: forward passes of the aligned model over the calibration set (its Hessians, d×d per input width: 576² and
1536² for SmolLM2-135M, computed once), then per strength one Cholesky-factored pass over every target matrix.
"""

from __future__ import annotations

import gc
import math
import time
import weakref
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from ..calibrate import InputNorms
from ..errors import SurgeryError
from ..model import load_model, load_tokenizer
from ..options import option
from ..prompts import Example, calibration_batches, fill_responses
from .antidote import harmful_examples
from .base import Edit, Method, Prepared, Strength
from .pair import REFERENCE, ReferenceOptions, linear_weights, pair_edit, reference_candidates, require_reference

RESPONSES = ("aligned", "refusal")
REFUSAL = "I'm sorry, but I can't help with that."  # --responses refusal: the response every prompt gets
SCALE_ROWS = 4096  # the authors' budget scale: rows / 4096
# The saturation budget is summed in fp64 from fp32 costs, as the selection sums them, but in another order: a margin
# for rounding, so the searched range's weak end admits every eligible entry.
SATURATION_MARGIN = 1.001
BUDGET_SHARE = 0.5  # each 2048-column block of a 4096-wide layer gets half of s (the authors' s / 2)


@dataclass
class SafetyDataOptions(ReferenceOptions):
    """The safety calibration set a reference method runs through the aligned model (Safe Delta's Hessians, RegMean's
    safety Gram): harmful prompts with safe responses."""

    data: str | None = option(
        None,
        "Safety calibration prompts, harmful requests (.jsonl, .csv, .tsv or .txt), with or "
        "without safe responses; default: the built-in harmful set.",
        file=True,
    )
    column: str | None = option(None, "Prompt column/field in --data.")
    response_column: str | None = option(None, "Response column/field in --data.")
    responses: str = option(
        "aligned",
        "Safe responses for prompts without one: aligned (the aligned model's own greedy "
        "answers; Safe Delta's setting) or refusal (one fixed refusal sentence, no generation).",
        choices=RESPONSES,
    )
    max_samples: int = option(
        128, "Safety calibration examples (seeded random subset; 128 as in Safe Delta).", positive=True
    )
    max_length: int = option(256, "Tokens per calibration example.", positive=True)
    max_new_tokens: int = option(32, "--responses aligned: length of the generated answers.", positive=True)
    batch_size: int = option(8, "Calibration sequences per forward pass.", positive=True)
    generate_batch_size: int = option(32, "--responses aligned: prompts answered at once.", positive=True)
    seed: int = option(0, "Seed of the calibration subset.")


SAFETY_DATA_FIELDS = tuple(
    f.name for f in fields(SafetyDataOptions) if f.name not in {g.name for g in fields(ReferenceOptions)}
)


@dataclass
class SafeDeltaOptions(SafetyDataOptions):
    budget: float | str = option(
        0.1,
        "Safety budget s: the OBS safety cost the kept fine-tune delta may add, in the "
        "authors' units (their example: 0.11 for a Llama-2-7B PureBad fine-tune); larger "
        "keeps more of the fine-tune; auto: the strongest (smallest) inside the utility "
        "budget.",
        strength=True,
        non_negative=True,
    )
    protect: float = option(
        0.15,
        "Share of each block's entries, the most safety-sensitive columns, never given the "
        "fine-tune value (the authors' 0.15).",
        low=0.0,
        high=1.0,
    )
    damp: float = option(
        0.01, "Hessian damping: λ = DAMP · mean(diag H) added to the diagonal (the authors' 1%).", positive=True
    )
    block: int = option(2048, "Columns per selection block (the authors' 2048).", positive=True)
    targets: list[str] | None = option(
        None, "Comma-separated globs of Linear modules (default: every Linear in the decoder blocks).", patterns=True
    )


# ---- the method on one matrix -------------------------------------------------------------------------------------


def seen_columns(gram: torch.Tensor, overflow: str) -> torch.Tensor:
    """An input Gram as a new fp64 tensor whose columns never seen (G_jj = 0) have G_jj = 1, so that damping makes it
    positive definite; one error line (`overflow`) when it holds a non-finite value."""
    g = gram.to(torch.float64).clone()
    if not torch.isfinite(g).all():
        raise SurgeryError(overflow)
    dead = torch.diagonal(g) == 0
    g[dead, dead] = 1.0
    return g


def inverse_factor(hessian: torch.Tensor, damp: float = 0.01, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + λI)⁻¹ (λ = damp · mean(diag H)), in `dtype`; columns never seen
    (H_jj = 0) get H_jj = 1 first. Factorised in fp64."""
    h = seen_columns(
        hessian, "the safety calibration gave a non-finite Hessian: the aligned model's activations overflow"
    )
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    try:
        lower = torch.linalg.cholesky(h)
        inverse = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(inverse, upper=True).to(dtype)
    except torch.linalg.LinAlgError:
        raise SurgeryError(
            "the safety calibration Hessian is not positive definite even after damping: raise --damp"
        ) from None


def block_limit(inverse_sq: torch.Tensor, rows: int, budget: float) -> float:
    """ε of one block: (budget / 2) · (rows / 4096) · mean_j(1/d_j²)."""
    return float(inverse_sq.mean()) * budget * BUDGET_SHARE * rows / SCALE_ROWS


def admitted_entries(cost: torch.Tensor, inverse_sq: torch.Tensor, limit: float, protect: float) -> torch.Tensor:
    """Bool mask [rows, count]: least sensitive columns first (1/d² ascending, ties by flat index), all but the last
    ⌊protect · n⌋ eligible, the longest eligible prefix whose cumulative cost (summed in fp64) is at most `limit`."""
    rows, count = cost.shape
    n = rows * count
    eligible = n - int(protect * n)
    if not limit >= 0 or eligible == 0:
        return torch.zeros(rows, count, dtype=torch.bool, device=cost.device)
    if torch.unique(inverse_sq).numel() < count:  # tied columns: entry by entry in flat order
        order = torch.argsort(inverse_sq.expand(rows, count).reshape(-1), stable=True)[:eligible]
        kept = int(torch.count_nonzero(torch.cumsum(cost.reshape(-1)[order].double(), 0) <= limit))
        mask = torch.zeros(n, dtype=torch.bool, device=cost.device)
        mask[order[:kept]] = True
        return mask.view(rows, count)
    # Distinct columns: whole columns in turn, rows in order. Column totals find the last whole column that fits;
    # only the column after it is summed entry by entry.
    columns = torch.argsort(inverse_sq, stable=True)
    whole = eligible // rows  # columns wholly eligible (the next one has eligible % rows rows)
    ends = torch.cumsum(cost.sum(0, dtype=torch.float64)[columns[:whole]], 0)
    full = int(torch.searchsorted(ends, torch.tensor([limit], dtype=torch.float64), right=True))
    mask = torch.zeros(rows, count, dtype=torch.bool, device=cost.device)
    mask[:, columns[:full]] = True
    if full < count:
        column, allowed = int(columns[full]), rows if full < whole else eligible % rows
        before = float(ends[full - 1]) if full else 0.0
        inside = before + torch.cumsum(cost[:allowed, column].double(), 0) <= limit
        mask[: int(torch.count_nonzero(inside)), column] = True
    return mask


def saturation_budget(
    aligned: torch.Tensor, tuned: torch.Tensor, factor: torch.Tensor, protect: float = 0.15, block: int = 2048
) -> float | None:
    """The smallest budget at which `admitted_entries` admits every eligible entry of this weight: every larger budget
    writes the same weight. Exact for a weight of one block (cols <= block); None for more blocks (a later block's
    costs depend on the compensation the earlier blocks received, so on the budget)."""
    rows, cols = tuned.shape
    if cols > block:
        return None
    inverse_sq = 1.0 / torch.diagonal(factor).float() ** 2
    cost = (aligned.float() - tuned.float()).square_().mul_(inverse_sq)  # as safe_delta_tensor computes it
    eligible = admitted_entries(cost, inverse_sq, math.inf, protect)
    unit = block_limit(inverse_sq, rows, 1.0)  # ε per unit of budget
    return float(cost[eligible].sum(dtype=torch.float64)) / unit if unit > 0 else None


def block_errors(residual: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The OBS errors e [rows, count] of one block: residual = W - W_ft on the block at its start, u = the block's
    part of U, mask = admitted entries. Column by column the sequential rule
    e_j = m_j (residual_j - Σ_{i<j} U_ij e_i) / d_j is a triangular system on the admitted columns only (a column with
    nothing admitted has e_j = 0 and feeds nothing on), so the columns are solved in runs: every run of fully
    admitted columns by one triangular solve (E U_AA = R_A, from the right), a partly admitted column by itself."""
    rows, count = residual.shape
    errors = torch.zeros(rows, count, dtype=residual.dtype, device=residual.device)
    full = mask.all(0).tolist()
    some = torch.nonzero(mask.any(0)).flatten().tolist()
    i = 0
    while i < len(some):
        k = i + 1
        if full[some[i]]:
            while k < len(some) and full[some[k]]:
                k += 1
        run = torch.tensor(some[i:k], device=residual.device)
        first = some[i]
        right = residual[:, run]
        if first:
            right = right - errors[:, :first] @ u[:first, run]  # errors of the earlier columns (0 where none)
        if full[first]:
            errors[:, run] = torch.linalg.solve_triangular(u[run][:, run], right, upper=True, left=False)
        else:
            errors[:, first] = torch.where(mask[:, first], right[:, 0] / u[first, first], 0.0)
        i = k
    return errors


def safe_delta_tensor(
    aligned: torch.Tensor,
    tuned: torch.Tensor,
    factor: torch.Tensor,
    budget: float,
    protect: float = 0.15,
    block: int = 2048,
    compute: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The method on one weight [rows, cols]: returns (new weight in the tuned weight's dtype and device, admitted
    mask). `factor` is U of `inverse_factor` for this weight's input (cols x cols); computed on `device`.

    The sequential pass is computed in closed form: the errors of a block by `block_errors`, then every column at
    once, W_·k -= Σ_{i≤k} e_i U_ik (for an admitted entry this lands on W_ft, set exactly afterwards; for the rest it
    is the compensation the column-by-column pass gives). Row-major throughout: the weights are not transposed."""
    device = device or tuned.device
    w = aligned.to(device=device, dtype=compute, copy=True)
    target = tuned.to(device=device, dtype=compute)
    u = factor.to(device=w.device, dtype=compute)
    rows, cols = w.shape
    d = torch.diagonal(u)
    admitted = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        inverse_sq = 1.0 / d[i1:i2] ** 2
        residual = w[:, i1:i2] - target[:, i1:i2]
        cost = residual.square().mul_(inverse_sq)
        mask = admitted_entries(cost, inverse_sq, block_limit(inverse_sq, rows, budget), protect)
        del cost
        if not mask.any():
            continue
        admitted[:, i1:i2] = mask
        errors = block_errors(residual, u[i1:i2, i1:i2], mask)
        w[:, i1:] -= errors @ u[i1:i2, i1:]
        w[:, i1:i2] = torch.where(mask, target[:, i1:i2], w[:, i1:i2])
    return w.to(device=tuned.device, dtype=tuned.dtype), admitted.cpu()


# ---- calibration: the aligned model's Hessians ----------------------------------------------------------------------


class InputHessians(InputNorms):
    """2 X Xᵀ / N of every chosen Linear's input over real tokens (fp32, forward hooks, no stored activations).
    Modules called with the same input tensor (found on the first batch, checked on every later one) share one H."""

    def __init__(self, model: nn.Module, module_names: list[str]):
        super().__init__(model, module_names)
        self.sums: dict[str, torch.Tensor] = {}
        self.leader: dict[str, str] = {}  # module -> the module whose H it shares (itself for the first of a group)
        self._inputs: dict[str, weakref.ref] = {}  # each leader's latest input, held weakly (activations are freed)

    def _hook(self, name: str):
        def hook(module: nn.Linear, args, _output):
            x = args[0]
            if name not in self.leader:  # first batch: share with an earlier module fed this very tensor
                self.leader[name] = next((m for m, seen in self._inputs.items() if seen() is x), name)
            leader = self.leader[name]
            if leader != name:
                seen = self._inputs.get(leader)
                if seen is None or seen() is not x:
                    raise SurgeryError(
                        f"{name} and {leader} read the same input on the first batch but not later: "
                        "cannot share their Hessian"
                    )
                return
            self._inputs[name] = weakref.ref(x)
            flat = x.detach().reshape(-1, x.shape[-1])
            if self._mask is not None and self._mask.numel() == flat.shape[0]:
                flat = flat[self._mask]
            flat = flat.float()
            product = flat.T @ flat
            if name in self.sums:
                self.sums[name] += product
            else:
                self.sums[name] = product

        return hook

    def hessians(self) -> dict[str, torch.Tensor]:
        """Module -> its H (one tensor object per group of modules that read the same input)."""
        missing = [m for m in self.names if m not in self.leader]
        if missing:
            raise SurgeryError(f"{missing[0]} was not called by the calibration forward passes: no Hessian for it")
        shared = {m: (2.0 / max(self.tokens, 1)) * s.cpu() for m, s in self.sums.items()}
        self._inputs.clear()
        return {m: shared[self.leader[m]] for m in self.names}


def input_hessians(model, tokenizer, examples: list[Example], options, modules: list[str]):
    """(module -> 2 X Xᵀ / N of its input over `examples`' real tokens, N): the examples encoded as prompt + response
    (`options.max_length`, `options.batch_size`), run once through `model` (Safe Delta's aligned model, RegMean's
    fine-tuned one)."""
    context = getattr(model.config, "max_position_embeddings", None)
    stats = InputHessians(model, modules)
    stats.run(calibration_batches(tokenizer, examples, options.max_length, options.batch_size, context))
    return stats.hessians(), stats.tokens


def calibration_hessians(ctx, options: SafetyDataOptions, modules: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The aligned model's H per module on the safety calibration set, and the figures of that set (examples,
    tokens, responses). The one place Safe Delta reads data and loads a model (tests plant H here). Kept in
    `ctx.cache` under what was asked: in `surgery repair`, RegMean's safety Gram is the same computation."""
    cache = getattr(ctx, "cache", None)
    key = (
        "safety_hessians",
        str(ctx.references["reference"].path),
        *(getattr(options, f) for f in SAFETY_DATA_FIELDS),
        tuple(modules),
    )
    if cache is not None and key in cache:
        return cache[key]
    found = _calibration_hessians(ctx, options, modules)
    if cache is not None:
        cache[key] = found
    return found


def _calibration_hessians(ctx, options: SafetyDataOptions, modules: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    reference = ctx.references["reference"]
    examples = harmful_examples(ctx, options)
    if options.responses == "refusal":
        examples = [e if e.response is not None else Example(e.prompt, REFUSAL) for e in examples]
    ctx.progress(f"loading the aligned model {reference.path.name} for its Hessians")
    model = load_model(reference, ctx.device)
    tokenizer = load_tokenizer(reference.path)
    if options.responses == "aligned":
        examples = ctx.timed(
            "generate_responses",
            lambda: fill_responses(model, tokenizer, examples, options.max_new_tokens, options.generate_batch_size),
        )
    t0 = time.perf_counter()
    hessians, tokens = input_hessians(model, tokenizer, examples, options, modules)
    ctx.timings["calibrate"] = time.perf_counter() - t0
    figures = {"calibration_examples": len(examples), "calibration_tokens": tokens, "responses": options.responses}
    model = None  # the aligned model is needed for prepare only
    gc.collect()
    return hessians, figures


# ---- the method -----------------------------------------------------------------------------------------------------


@dataclass
class SafeDeltaPlan:
    modules: dict[str, str]  # module -> its weight tensor
    shapes: dict[str, tuple[int, ...]]
    entries: int
    budget: float | str
    widths: dict[int, int]  # input width -> modules reading an input of that width


@dataclass
class SafeDeltaReport:
    budget: float
    protect: float
    entries: dict[str, int] = field(default_factory=dict)  # tensor -> entries
    changed: dict[str, int] = field(default_factory=dict)  # tensor -> non-zero entries of Δ
    admitted: dict[str, int] = field(default_factory=dict)  # tensor -> entries given the fine-tune value
    calibration: dict = field(default_factory=dict)
    hessians: int = 0  # distinct Hessians (modules reading the same input share one)

    def totals(self) -> dict:
        return {
            "entries": sum(self.entries.values()),
            "changed": sum(self.changed.values()),
            "admitted": sum(self.admitted.values()),
        }

    def to_json(self) -> dict:
        return {
            "budget": self.budget,
            "protect": self.protect,
            **self.totals(),
            "hessians": self.hessians,
            **self.calibration,
            "per_tensor": {
                n: {"entries": self.entries[n], "changed": self.changed[n], "admitted": self.admitted[n]}
                for n in self.entries
            },
            "note": "admitted entries take W_ft; the rest are W_aligned plus the OBS compensation of the admitted "
            "ones on the aligned model's safety-data Hessian",
        }


class PreparedSafeDelta(Prepared):
    def __init__(
        self,
        ctx,
        options: SafeDeltaOptions,
        modules: dict[str, str],
        factors: dict[str, torch.Tensor],
        calibration: dict,
        distinct: int,
    ):
        self.options, self.modules, self.factors = options, modules, factors
        self.reference, self.target, self.device = ctx.references["reference"], ctx.target, ctx.device
        self.module_of = {tensor: module for module, tensor in modules.items()}
        self.calibration, self.distinct = calibration, distinct
        self.changed: dict[str, int] = {}  # tensor -> non-zero entries of Δ
        self.report = None
        self._bounds: tuple[float, float] | None | bool = False  # not computed yet

    def bounds(self) -> tuple[float, float] | None:
        """The budget range searched: from the knob's low end to the saturation budget (`saturation_budget`, the
        largest over the target weights, plus 0.1 % for rounding), past which every budget writes the same model.
        On SmolLM2's demonstration pairs it is 1.963 and 2.198 where the knob's range ends at 100: the bisection's
        points all fall where the budget still changes the output. None (the knob's range) when a weight spans several
        blocks, where no budget is known to saturate, or when the saturation budget lies outside the knob's range."""
        if self._bounds is False:
            self._bounds = self._saturation_range()
        return self._bounds

    def _saturation_range(self) -> tuple[float, float] | None:
        low, high = SafeDelta.strength.low, SafeDelta.strength.high
        options, widest = self.options, 0.0
        for name, module in self.module_of.items():
            saturated = saturation_budget(
                self.reference.read(name), self.target.read(name), self.factors[module], options.protect, options.block
            )
            if saturated is None:
                return None
            widest = max(widest, saturated)
        top = widest * SATURATION_MARGIN
        return (low, top) if low < top < high else None

    def at(self, budget: float) -> Edit:
        options = self.options
        report = self.report = SafeDeltaReport(
            budget, options.protect, calibration=self.calibration, hessians=self.distinct
        )

        def change(name: str, weight: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
            factor = self.factors[self.module_of[name]]
            new, admitted = safe_delta_tensor(
                aligned, weight, factor, budget, options.protect, options.block, device=self.device
            )
            report.entries[name] = weight.numel()
            if name not in self.changed:  # the same at every budget
                self.changed[name] = int(torch.count_nonzero(weight.float() != aligned.float()))
            report.changed[name] = self.changed[name]
            report.admitted[name] = int(admitted.sum())
            return new

        edit, recorded = pair_edit(self.module_of, change, report, (self.reference,))
        return Edit(edit, touched=list(self.module_of), summary={"safe_delta": recorded})


class SafeDelta(Method):
    name = "safe-delta"
    manifest_id = "safe-delta"
    summary = (
        "Safe Delta: keep the fine-tune delta entries a safety budget allows, least safety-sensitive first, with "
        "OBS compensation on the aligned model's safety-data Hessian."
    )
    paper = "Lu et al. 2025, Safe Delta (ICML 2025), arXiv 2505.12038"
    Options = SafeDeltaOptions
    references = REFERENCE
    # A larger budget keeps more of the fine-tune (a weaker repair); on a log scale, as the useful s spans decades
    # with the size of the delta. 0 (the aligned model) is not searched.
    strength = Strength("budget", low=0.001, high=100.0, log=True, stronger="lower")

    def repair_candidates(self, given):
        """With `surgery repair --reference ALIGNED`."""
        return reference_candidates("safe-delta", SafeDeltaOptions, "budget", given)

    def validate(self, options: SafeDeltaOptions) -> None:
        require_reference(options)

    def modules(self, ctx, options: SafeDeltaOptions) -> dict[str, str]:
        return linear_weights(ctx, options.targets, "Safe Delta")

    def plan(self, ctx, options: SafeDeltaOptions) -> SafeDeltaPlan:
        modules = self.modules(ctx, options)
        shapes = {t: tuple(ctx.ckpt.tensors[t].shape) for t in modules.values()}
        widths: dict[int, int] = {}
        for shape in shapes.values():
            widths[shape[1]] = widths.get(shape[1], 0) + 1
        return SafeDeltaPlan(modules, shapes, sum(math.prod(s) for s in shapes.values()), options.budget, widths)

    def prepare(self, ctx, options: SafeDeltaOptions) -> PreparedSafeDelta:
        modules = self.modules(ctx, options)
        torch.manual_seed(options.seed)
        hessians, calibration = calibration_hessians(ctx, options, list(modules))
        factors: dict[int, torch.Tensor] = {}  # id of a shared H -> its factor (computed once per group)
        by_module = {}
        for module in modules:
            h = hessians[module]
            cols = ctx.ckpt.tensors[modules[module]].shape[1]
            if tuple(h.shape) != (cols, cols):
                raise SurgeryError(f"{module}: its Hessian is {list(h.shape)}, the weight has {cols} input columns")
            if id(h) not in factors:
                factors[id(h)] = inverse_factor(h, options.damp)
            by_module[module] = factors[id(h)]
        return PreparedSafeDelta(ctx, options, modules, by_module, calibration, len(factors))
