"""EigenShift ("Redefining Experts", arXiv 2509.16660): damp the output-layer components that drive toxic text.

Decompose the head, W_U = U Σ Vᵀ (fp32 SVD). Score each component by how much more toxic-step states
than non-toxic states load on it, Δ_i = mean_Φ(v_iᵀh) − mean_Ψ(v_iᵀh); scale the top-k singular values
by α, written as the rank-k update W' = W − Σ_{i∈T} (1−α) σ_i u_i v_iᵀ. The layers that read and
"detect" toxicity are untouched; only how the final state is turned into tokens changes.

Sign convention: singular vectors are defined up to a joint sign flip of (u_i, v_i), which flips Δ_i.
We flip each pair so that the entry of largest magnitude in u_i is positive (scikit-learn's
`svd_flip` rule): it depends on the weights alone, so the choice is the same for any data and any
SVD backend, and a positive Δ_i then means toxic states push the logits toward the token that
component i promotes most. `--rank-by abs` ranks by |Δ_i| and needs no convention.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import figures as F
from ..errors import SurgeryError
from ..options import option
from .base import Edit, Method, Prepared, Strength
from .common import MethodOptions

PROJECTIONS = ("paper", "legacy")
RANK_BY = ("signed", "abs")
SIGNS = ("canonical", "svd")


@dataclass
class Decomposition:
    U: torch.Tensor  # [vocab, r]
    S: torch.Tensor  # [r]
    Vh: torch.Tensor  # [r, hidden]; row i is v_iᵀ

    @property
    def rank(self) -> int:
        return self.S.shape[0]


def decompose(weight: torch.Tensor, signs: str = "canonical") -> Decomposition:
    """Thin SVD of the head in fp32 (the paper's W_U = U Σ Vᵀ), signs canonicalised unless `signs="svd"`."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return canonical_signs(Decomposition(U, S, Vh)) if signs == "canonical" else Decomposition(U, S, Vh)


def canonical_signs(d: Decomposition) -> Decomposition:
    """Flip each (u_i, v_i) so that the largest-|.| entry of u_i is positive (U Σ Vᵀ is unchanged)."""
    rows = d.U.abs().argmax(dim=0)
    sign = torch.sign(d.U[rows, torch.arange(d.rank)])
    sign[sign == 0] = 1
    return Decomposition(d.U * sign, d.S, d.Vh * sign[:, None])


def project(states: torch.Tensor, Vh: torch.Tensor, projection: str = "paper") -> torch.Tensor:
    """Coordinates of each state on each component, [n, r].

    paper: v_iᵀh (Vᵀh, as the paper writes it). legacy: the released code's (Vᵀ)ᵀh = V h, whose i-th
    entry is the i-th coordinate of every right singular vector — the rows of V, not its columns.
    """
    states = states.float()
    if projection == "paper":
        return states @ Vh.T
    if projection == "legacy":
        if Vh.shape[0] != Vh.shape[1]:
            raise SurgeryError(f"--projection legacy needs a square V (rank {Vh.shape[0]} = hidden {Vh.shape[1]})")
        return states @ Vh  # (V h)_i = Σ_j V_ij h_j = Σ_j Vh_ji h_j
    raise SurgeryError(f"--projection must be one of {', '.join(PROJECTIONS)}, got '{projection}'")


def component_scores(
    toxic: torch.Tensor, nontoxic: torch.Tensor, Vh: torch.Tensor, projection: str = "paper", rank_by: str = "signed"
) -> torch.Tensor:
    """Δ_i = mean_Φ(v_iᵀh) − mean_Ψ(v_iᵀh) for every component (|Δ_i| with rank_by="abs")."""
    delta = project(toxic, Vh, projection).mean(0) - project(nontoxic, Vh, projection).mean(0)
    return delta.abs() if rank_by == "abs" else delta


def select_components(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, highest first (ties: the lower index first)."""
    order = sorted(range(scores.shape[0]), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(order[:k], dtype=torch.long)


def components_for(rank: int, k: int | None, percentile: float | None) -> int:
    """How many components to edit: --k as given, or --percentile percent of the rank (rounded up)."""
    if k is None:
        k = math.ceil(rank * (25.0 if percentile is None else percentile) / 100.0)
    if k > rank:
        raise SurgeryError(f"--k {k} is larger than the head's rank ({rank} components)")
    return max(k, 1)


def shifted_head(weight: torch.Tensor, d: Decomposition, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """W − Σ_{i∈T} (1−α) σ_i u_i v_iᵀ in fp32, cast back to the head's dtype (a rank-k update, no rebuild)."""
    scale = (1.0 - alpha) * d.S[indices]
    update = (d.U[:, indices] * scale) @ d.Vh[indices]
    return (weight.float() - update).to(weight.dtype)


def reconstruct(d: Decomposition, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """U Σ' Vᵀ with σ_i ← α σ_i for i in `indices` (the full rebuild the rank-k update avoids; for checks)."""
    S = d.S.clone()
    S[indices] *= alpha
    return (d.U * S) @ d.Vh


# --- the method on a checkpoint folder ---------------------------------------------------------------


@dataclass
class EigenShiftOptions(MethodOptions):
    prompts: str | None = option(
        None, "Prompts to continue (.txt one per line, .jsonl, .csv/.tsv), e.g. RealToxicityPrompts.", file=True
    )
    column: str | None = option(None, "Prompt column/field in --prompts and --eval-prompts.")
    max_samples: int | None = option(None, "Use a seeded random subset of this many prompts.", positive=True)
    k: int | None = option(
        None,
        "Components to damp (default: 25% of the rank, the paper's headline; with --alpha auto and "
        "neither --k nor --percentile, k is searched first, at alpha 0).",
        flag="--k",
        positive=True,
    )
    percentile: float | None = option(
        None, "Components to damp, as a percent of the rank (instead of --k).", low=0.0, high=100.0
    )
    alpha: float | str = option(
        0.9,
        "Scale for the chosen singular values, in [0, 1]: 0.9 the paper's safe setting, 0 its "
        "headline; auto: the strongest inside the utility budget.",
        strength=True,
        low=0.0,
        high=1.0,
    )
    projection: str = option("paper", "paper (v_iᵀh) or legacy (the released code's V h).", choices=PROJECTIONS)
    rank_by: str = option("signed", "signed (Δ_i, signs canonicalised) or abs (|Δ_i|).", choices=RANK_BY)
    signs: str = option(
        "canonical", "canonical (largest |u_i| entry positive) or svd (as the SVD returns them).", choices=SIGNS
    )
    judge: str = option(
        "profanity",
        "Toxicity judge: profanity (alt-profanity-check), compliance (an answer that does not refuse, by the keyword "
        "judge: for harmful requests with --chat) or classifier:PATH[@LABEL].",
    )
    threshold: float = option(0.5, "Judge probability at or above which a text is toxic.", fraction=True)
    max_new_tokens: int = option(32, "Length of each continuation.", positive=True)
    batch_size: int = option(8, "Prompts per generation batch.", positive=True)
    chat: bool = option(
        False, "Render prompts with the chat template (default: plain-text continuation).", flag="--chat"
    )
    sample: bool = option(False, "Seeded nucleus sampling (top-p 0.9) instead of greedy decoding.", flag="--sample")
    seed: int = option(0, "Seed of the prompt subset and of sampling.")
    states: str | None = option(None, "Hidden-state file (safetensors): reused if it exists, else collected and saved.")
    evaluate: bool = option(True, "Measure toxicity and perplexity before and after.", flag="--eval/--no-eval")
    eval_prompts: str | None = option(
        None, "Held-out prompts for the toxicity figure (default: the collection prompts).", file=True
    )
    ppl_text: str | None = option(None, "Texts for perplexity (default: the built-in harmless set).", file=True)
    max_eval_samples: int = option(200, "At most this many eval prompts and perplexity texts.", positive=True)

    def validate(self) -> None:
        """Every user error that needs no model, before anything is loaded."""
        super().validate()
        if self.k is not None and self.percentile is not None:
            raise SurgeryError("give --k or --percentile, not both")
        if self.percentile is not None and not self.percentile > 0.0:
            raise SurgeryError(f"--percentile must be in (0, 100], got {self.percentile}")
        if self.states is not None and Path(self.states).exists() and not Path(self.states).is_file():
            raise SurgeryError(f"--states {self.states} is not a file")
        if self.prompts is None and not (self.states and Path(self.states).is_file()):
            raise SurgeryError("--prompts is required to collect hidden states (or give an existing --states file)")


@dataclass
class HeadInfo:
    source: str  # the tensor holding the head's weights now
    target: str  # the tensor the edited head is written to
    tied: bool
    shape: tuple[int, ...]


def head_tensors(ckpt) -> HeadInfo:
    """Where the output head lives; a tied head is read from the input embedding and written as its own tensor."""
    from ..model import meta_model

    meta = meta_model(ckpt)
    names = {id(m): n for n, m in meta.named_modules()}
    head = meta.get_output_embeddings()
    if head is None or id(head) not in names:
        raise SurgeryError(f"architecture '{ckpt.model_type}' has no output head to decompose")
    target = f"{names[id(head)]}.weight"
    tied = bool(getattr(meta.config, "tie_word_embeddings", False)) or target not in ckpt.tensors
    source = target
    if tied:
        source = f"{names[id(meta.get_input_embeddings())]}.weight"
    if source not in ckpt.tensors:
        raise SurgeryError(f"the checkpoint has no tensor {source} for the output head")
    return HeadInfo(source, target, tied, ckpt.tensors[source].shape)


@dataclass
class EigenShiftReport:
    output: Path | None
    rank: int
    k: int
    alpha: float
    components: list[int]
    scores: list[float]
    tied: bool
    toxic_states: int
    nontoxic_states: int
    prompts: int
    toxic_continuations: int
    states_reused: bool
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    tph: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        return d


def measure(
    model, tokenizer, eval_prompts: list[str], ppl_texts: list[str], judge, options: EigenShiftOptions
) -> dict[str, float]:
    """Toxicity rate of continuations (same judge, threshold and decoding as collection) and perplexity."""
    from ..metrics import perplexity
    from ..states import continuation_toxicity

    rate, _ = continuation_toxicity(
        model,
        tokenizer,
        eval_prompts,
        judge,
        threshold=options.threshold,
        max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size,
        chat=options.chat,
        sample=options.sample,
        seed=options.seed,
    )
    return {"toxicity": rate, "perplexity": perplexity(model, tokenizer, ppl_texts, batch_size=options.batch_size)}


def set_head(model, weight: torch.Tensor) -> None:
    """Give the loaded model `weight` as its own output head (unties it from the input embedding)."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(weight.to(head.weight.device, head.weight.dtype), requires_grad=False)
    model.config.tie_word_embeddings = False


class PreparedShift(Prepared):
    def __init__(
        self,
        ctx,
        options: EigenShiftOptions,
        head: HeadInfo,
        weight,
        d: Decomposition,
        scores,
        k: int,
        states,
        reuse: bool,
        judge,
        eval_prompts,
        ppl_texts,
        held_out: list[str],
    ):
        self.ctx, self.options, self.head, self.weight, self.d, self.scores, self.k = (
            ctx,
            options,
            head,
            weight,
            d,
            scores,
            k,
        )
        self.states, self.reuse, self.judge, self.eval_prompts, self.ppl_texts = (
            states,
            reuse,
            judge,
            eval_prompts,
            ppl_texts,
        )
        self.held_out = held_out
        self.chosen = select_components(scores, k)
        self.report = None
        # --alpha auto with neither --k nor --percentile: EigenShift.search chooses k too
        self.k_free = ctx.searching and options.k is None and options.percentile is None

    def use(self, k: int) -> None:
        """Damp the top `k` components from now on (the k stage of the search, then the chosen k)."""
        self.k, self.chosen = k, select_components(self.scores, k)

    def at(self, alpha: float) -> Edit:
        head, _options = self.head, self.options
        new_head = shifted_head(self.weight, self.d, self.chosen, alpha)
        self.new_head, self.alpha = new_head, alpha
        tied_new = head.tied and head.target not in self.ctx.ckpt.tensors
        self._make_report(alpha)
        return Edit(
            lambda name, tensor: new_head if name == head.target else tensor,
            touched=[] if tied_new else [head.target],
            added={head.target: new_head} if tied_new else {},
            config_updates={"tie_word_embeddings": False} if head.tied else {},
            summary=self.report.summary,
            arguments={"k_resolved": self.k},
        )  # read once, after finish

    def _make_report(self, alpha: float) -> None:
        d, states = self.d, self.states
        self.report = EigenShiftReport(
            None,
            d.rank,
            self.k,
            alpha,
            self.chosen.tolist(),
            self.scores[self.chosen].tolist(),
            self.head.tied,
            states.toxic.shape[0],
            states.nontoxic.shape[0],
            states.prompts,
            states.toxic_continuations,
            self.reuse,
            seconds=self.ctx.timings,
        )

    def repair_figure(self, model, tokenizer) -> float:
        """--alpha auto lowers the toxicity rate of the prompts held out of the collection set."""
        from ..states import continuation_toxicity

        o = self.options
        return continuation_toxicity(
            model,
            tokenizer,
            self.held_out,
            self.judge,
            threshold=o.threshold,
            max_new_tokens=o.max_new_tokens,
            batch_size=o.batch_size,
            chat=o.chat,
            sample=o.sample,
            seed=o.seed,
        )[0]

    def repair_prompts(self) -> int:
        return len(self.held_out)

    def finish(self, edit: Edit) -> None:
        """--eval: toxicity and perplexity before and after, on the loaded model (its head swapped in memory)."""
        from ..metrics import tph

        if not self.options.evaluate:
            return
        t0 = time.perf_counter()
        model, tokenizer = self.ctx.model(), self.ctx.tokenizer()
        n = len(self.eval_prompts)
        self.ctx.progress(f"measuring toxicity on {n} prompts and perplexity, before the shift")
        before = measure(model, tokenizer, self.eval_prompts, self.ppl_texts, self.judge, self.options)
        set_head(model, self.new_head)
        self.ctx.progress(f"measuring toxicity on {n} prompts and perplexity, after the shift")
        after = measure(model, tokenizer, self.eval_prompts, self.ppl_texts, self.judge, self.options)
        self.report.before, self.report.after = before, after
        self.report.tph = tph(
            100 * before["toxicity"], 100 * after["toxicity"], before["perplexity"], after["perplexity"]
        )
        self.ctx.timings["evaluate"] = time.perf_counter() - t0

    def failure(self, run) -> str | None:
        """--eval at a fixed strength fails like a search: toxicity must fall by --min-improvement points."""
        before, after = self.report.before, self.report.after
        if not before or not after or 100 * (before["toxicity"] - after["toxicity"]) >= run.min_improvement:
            return None
        return (
            f"toxicity of the continuations of {len(self.eval_prompts)} held-out prompts went only from "
            f"{100 * before['toxicity']:.1f}% to {100 * after['toxicity']:.1f}% (less than --min-improvement "
            f"{run.min_improvement:g} points): no repair"
        )


class ComponentsAt(Prepared):
    """The k stage of `--alpha auto`: the top-k components removed outright (alpha fixed), k the knob."""

    def __init__(self, prepared: PreparedShift, alpha: float):
        self.prepared, self.alpha = prepared, alpha

    def bounds(self) -> tuple[float, float]:
        return 1.0, float(max(1, math.ceil(self.prepared.d.rank * 0.25)))  # up to the paper's headline 25 %

    def at(self, k: float) -> Edit:
        self.prepared.use(int(round(k)))
        return self.prepared.at(self.alpha)

    def repair_figure(self, model, tokenizer) -> float:
        return self.prepared.repair_figure(model, tokenizer)

    def repair_prompts(self) -> int:
        return self.prepared.repair_prompts()


COMPONENTS = Strength("k", low=1, high=1, log=True, integer=True)


class EigenShift(Method):
    name = "eigenshift"
    manifest_id = "eigenshift"
    summary = "EigenShift: SVD the output head and damp the components toxic generations load on."
    paper = "EigenShift (Redefining Experts), arXiv 2509.16660"
    Options = EigenShiftOptions
    strength = Strength("alpha", low=0.0, high=0.95, stronger="lower")
    repair_metric = F.TOXICITY

    def search(self, ctx, prepared: PreparedShift, run):
        """`--alpha auto`: with k given (--k, --percentile), alpha at that k. Otherwise two stages on the same
        held-out prompts: k (1 to 25 % of the rank, log scale) with the components removed (alpha 0, the paper's
        headline), then alpha at the chosen k. Without --target-harmful-score the second stage's answer is alpha 0
        whenever a k stayed inside the budget (the strongest end, already measured), so it is not re-measured;
        when no k did (even one component removed breaks the budget), alpha is searched at k = 1."""
        from dataclasses import replace

        from ..search import Measurer, Point, search_strength

        if not prepared.k_free:
            return super().search(ctx, prepared, run)
        measurer = Measurer(ctx, prepared, run, self.repair_metric)  # both stages: one baseline, the same prompts
        stage = search_strength(self, ctx, ComponentsAt(prepared, 0.0), run, knob=COMPONENTS, measurer=measurer)
        prepared.use(int(stage.chosen))
        point = stage.chosen_point()  # k components at alpha 0: the second stage's alpha 0, measured already
        if run.target_harmful_score is None and stage.failed is None:
            return replace(
                stage,
                knob="alpha",
                points=[Point(0.0, dict(point.figures), [])],
                chosen=0.0,
                reason=f"alpha 0 (the components removed) at the chosen k {prepared.k}: {stage.reason}",
                before=[stage],
            )
        result = search_strength(self, ctx, prepared, run, measurer=measurer, known={0.0: point})
        result.before = [stage]
        return result

    def validate(self, options: EigenShiftOptions) -> None:
        options.validate()
        if options.alpha == "auto" and not options.prompts:
            raise SurgeryError("--alpha auto holds out part of --prompts to measure toxicity on: give --prompts")

    def prepare(self, ctx, options: EigenShiftOptions) -> PreparedShift:
        from ..judges import toxicity_judge
        from ..prompts import load_examples
        from ..splits import hold_out
        from ..states import collect_states, load_states, save_states, weights_identity

        ckpt = ctx.ckpt
        if options.states and not Path(options.states).is_file():
            from ..writer import check_side_file

            check_side_file(options.states, [ckpt.path])  # the states file is written: never inside the input
        head = head_tensors(ckpt)
        rank = min(head.shape)
        k = components_for(rank, options.k, options.percentile)
        if options.projection == "legacy" and head.shape[0] < head.shape[1]:
            raise SurgeryError(
                "--projection legacy needs a head with at least as many rows (vocabulary) as columns (hidden)"
            )
        examples = (
            load_examples(options.prompts, column=options.column, max_samples=options.max_samples, seed=options.seed)
            if options.prompts
            else []
        )
        held = []
        if ctx.searching:
            examples, held_examples = hold_out(examples, ctx.run.search_samples, options.seed)
            held = [e.prompt for e in held_examples]
            if len(held) < 2:
                raise SurgeryError(
                    "--alpha auto needs at least 8 --prompts (a quarter is held out to measure toxicity)"
                )
        prompts = [e.prompt for e in examples]
        eval_prompts = prompts
        if options.eval_prompts:
            eval_prompts = [
                e.prompt
                for e in load_examples(
                    options.eval_prompts, column=options.column, max_samples=options.max_eval_samples, seed=options.seed
                )
            ]
        if options.evaluate and not eval_prompts:
            raise SurgeryError("nothing to evaluate on: give --eval-prompts or --prompts, or pass --no-eval")
        ppl_texts = (
            [
                e.prompt
                for e in load_examples(
                    options.ppl_text, max_samples=options.max_eval_samples, seed=options.seed, builtin="harmless"
                )
            ]
            if options.evaluate
            else []
        )
        judge = toxicity_judge(options.judge)
        t0 = time.perf_counter()
        fingerprint, weights = ckpt.fingerprint(), weights_identity(ckpt)
        reuse = bool(options.states) and Path(options.states).is_file()
        if reuse:
            states = load_states(options.states, fingerprint, weights, head.shape[1])
        else:
            ctx.progress(f"continuing {len(prompts)} prompts and collecting the head's input states")
            states = collect_states(
                ctx.model(),
                ctx.tokenizer(),
                prompts,
                judge,
                threshold=options.threshold,
                max_new_tokens=options.max_new_tokens,
                batch_size=options.batch_size,
                chat=options.chat,
                sample=options.sample,
                seed=options.seed,
            )
            if options.states:
                settings = {
                    k_: getattr(options, k_)
                    for k_ in ("prompts", "judge", "threshold", "max_new_tokens", "chat", "sample", "seed")
                }
                save_states(options.states, states, fingerprint, weights, settings)
        states.check()
        ctx.timings["states"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        weight = ckpt.read(head.source)
        d = decompose(weight, options.signs)
        scores = component_scores(states.toxic, states.nontoxic, d.Vh, options.projection, options.rank_by)
        ctx.timings["decompose"] = time.perf_counter() - t0
        return PreparedShift(
            ctx, options, head, weight, d, scores, k, states, reuse, judge, eval_prompts, ppl_texts, held
        )


def eigenshift_checkpoint(
    model_dir: str | Path, output: str | Path, options: EigenShiftOptions, force: bool = False
) -> EigenShiftReport:
    """EigenShift a checkpoint folder into a new folder (the input is never modified; no after-write check)."""
    from .base import RunOptions, run_repair

    result = run_repair(EigenShift(), model_dir, output, options, RunOptions(force=force, check=False))
    result.report.output = Path(output)
    return result.report
