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

from .errors import SurgeryError

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


def component_scores(toxic: torch.Tensor, nontoxic: torch.Tensor, Vh: torch.Tensor, projection: str = "paper",
                     rank_by: str = "signed") -> torch.Tensor:
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
class EigenShiftOptions:
    prompts: str | None = None
    column: str | None = None
    max_samples: int | None = None
    k: int | None = None
    percentile: float | None = None  # neither k nor percentile: 25 % of the rank (the paper's headline k)
    alpha: float = 0.9  # the paper's "safe" setting; its headline is alpha 0
    projection: str = "paper"
    rank_by: str = "signed"
    signs: str = "canonical"
    judge: str = "profanity"
    threshold: float = 0.5
    max_new_tokens: int = 32
    batch_size: int = 8
    chat: bool = False
    sample: bool = False
    seed: int = 0
    states: str | None = None
    evaluate: bool = True
    eval_prompts: str | None = None
    ppl_text: str | None = None
    max_eval_samples: int = 200
    device: str = "auto"

    def validate(self) -> None:
        """Every user error that needs no model, before anything is loaded."""
        if not 0.0 <= self.alpha <= 1.0:
            raise SurgeryError(f"--alpha must be between 0 and 1 (0 removes the components, 1 leaves them), got {self.alpha}")
        if self.k is not None and self.percentile is not None:
            raise SurgeryError("give --k or --percentile, not both")
        if self.k is not None and self.k <= 0:
            raise SurgeryError(f"--k must be positive, got {self.k}")
        if self.percentile is not None and not 0.0 < self.percentile <= 100.0:
            raise SurgeryError(f"--percentile must be in (0, 100], got {self.percentile}")
        for name, allowed in (("projection", PROJECTIONS), ("rank_by", RANK_BY), ("signs", SIGNS)):
            if getattr(self, name) not in allowed:
                raise SurgeryError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")
        if not 0.0 < self.threshold < 1.0:
            raise SurgeryError(f"--threshold must be between 0 and 1, got {self.threshold}")
        for name in ("max_new_tokens", "batch_size", "max_eval_samples"):
            if getattr(self, name) <= 0:
                raise SurgeryError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("prompts", "eval_prompts", "ppl_text"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise SurgeryError(f"--{name.replace('_', '-')} {value} does not exist")
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
    from .model import meta_model

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
    output: Path
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


def measure(model, tokenizer, eval_prompts: list[str], ppl_texts: list[str], judge, options: EigenShiftOptions) -> dict[str, float]:
    """Toxicity rate of continuations (same judge, threshold and decoding as collection) and perplexity."""
    from .metrics import perplexity
    from .states import continuation_toxicity

    rate, _ = continuation_toxicity(model, tokenizer, eval_prompts, judge, threshold=options.threshold,
                                    max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
                                    chat=options.chat, sample=options.sample, seed=options.seed)
    return {"toxicity": rate, "perplexity": perplexity(model, tokenizer, ppl_texts, batch_size=options.batch_size)}


def set_head(model, weight: torch.Tensor) -> None:
    """Give the loaded model `weight` as its own output head (unties it from the input embedding)."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(weight.to(head.weight.device, head.weight.dtype), requires_grad=False)
    model.config.tie_word_embeddings = False


def eigenshift_checkpoint(model_dir: str | Path, output: str | Path, options: EigenShiftOptions, force: bool = False) -> EigenShiftReport:
    """EigenShift a checkpoint folder into a new folder (the input is never modified)."""
    from .checkpoint import open_checkpoint
    from .judges import toxicity_judge
    from .metrics import tph
    from .model import load_model, load_tokenizer, resolve_device
    from .prompts import load_examples
    from .states import collect_states, load_states, save_states, weights_identity
    from .writer import write_checkpoint

    options.validate()
    ckpt = open_checkpoint(model_dir)
    if Path(output).exists() and not force:
        raise SurgeryError(f"output {output} already exists: pass --force to replace it")
    head = head_tensors(ckpt)
    rank = min(head.shape)
    k = components_for(rank, options.k, options.percentile)
    if options.projection == "legacy" and head.shape[0] < head.shape[1]:
        raise SurgeryError("--projection legacy needs a head with at least as many rows (vocabulary) as columns (hidden)")
    prompts = [e.prompt for e in load_examples(options.prompts, column=options.column, max_samples=options.max_samples,
                                               seed=options.seed)] if options.prompts else []
    eval_prompts = prompts
    if options.eval_prompts:
        eval_prompts = [e.prompt for e in load_examples(options.eval_prompts, column=options.column,
                                                        max_samples=options.max_eval_samples, seed=options.seed)]
    if options.evaluate and not eval_prompts:
        raise SurgeryError("nothing to evaluate on: give --eval-prompts or --prompts, or pass --no-eval")
    ppl_texts = [e.prompt for e in load_examples(options.ppl_text, max_samples=options.max_eval_samples,
                                                 seed=options.seed, builtin="harmless")] if options.evaluate else []
    judge = toxicity_judge(options.judge)
    device = resolve_device(options.device)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    fingerprint, weights = ckpt.fingerprint(), weights_identity(ckpt)
    reuse = bool(options.states) and Path(options.states).is_file()
    model = tokenizer = None
    if not reuse or options.evaluate:
        model, tokenizer = load_model(ckpt, device), load_tokenizer(ckpt.path)
    if reuse:
        states = load_states(options.states, fingerprint, weights, head.shape[1])
    else:
        states = collect_states(model, tokenizer, prompts, judge, threshold=options.threshold, max_new_tokens=options.max_new_tokens,
                                batch_size=options.batch_size, chat=options.chat, sample=options.sample, seed=options.seed)
        if options.states:
            settings = {k_: getattr(options, k_) for k_ in ("prompts", "judge", "threshold", "max_new_tokens", "chat", "sample", "seed")}
            save_states(options.states, states, fingerprint, weights, settings)
    states.check()
    timings["states"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    weight = ckpt.read(head.source)
    d = decompose(weight, options.signs)
    scores = component_scores(states.toxic, states.nontoxic, d.Vh, options.projection, options.rank_by)
    chosen = select_components(scores, k)
    new_head = shifted_head(weight, d, chosen, options.alpha)
    timings["decompose_and_edit"] = time.perf_counter() - t0

    before, after, tph_score = {}, {}, None
    if options.evaluate:
        t0 = time.perf_counter()
        before = measure(model, tokenizer, eval_prompts, ppl_texts, judge, options)
        set_head(model, new_head)
        after = measure(model, tokenizer, eval_prompts, ppl_texts, judge, options)
        tph_score = tph(100 * before["toxicity"], 100 * after["toxicity"], before["perplexity"], after["perplexity"])
        timings["evaluate"] = time.perf_counter() - t0
    del model

    report = EigenShiftReport(
        Path(output), rank, k, options.alpha, chosen.tolist(), scores[chosen].tolist(), head.tied,
        states.toxic.shape[0], states.nontoxic.shape[0], states.prompts, states.toxic_continuations, reuse,
        before, after, tph_score, timings,
    )

    def edit(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return new_head if name == head.target else tensor

    t0 = time.perf_counter()
    added = {head.target: new_head} if head.tied and head.target not in ckpt.tensors else None
    write_checkpoint(
        ckpt, output, edit, method="eigenshift", arguments=dict(asdict(options), k_resolved=k), added=added,
        config_updates={"tie_word_embeddings": False} if head.tied else None, report=report.summary(), force=force,
    )
    report.seconds["write"] = time.perf_counter() - t0
    return report
