"""Direction ablation (Arditi et al. 2024, "Refusal in language models is mediated by a single direction").

r = mean(h_harmful) - mean(h_harmless) at the last prompt token (chat template + generation prompt) of
one layer's residual stream, normalised. Every matrix that writes to the residual stream is then
orthogonalised against r: W <- W - scale * r (r^T W) for o_proj and down_proj ([hidden, in]); with
--include-embeddings also the token embedding ([vocab, hidden]): E <- E - scale * (E r) r^T.
After the edit (scale 1) no block can write along r, so the model cannot represent "refuse". Where a family
normalises a writer's output before adding it (gemma2/3's post-norms, surgery/arch.py), the writer is
orthogonalised against the direction that norm's weights turn into r (`writer_directions`).

--reverse scales the component along r instead: W <- W + scale * r (r^T W), i.e. whatever the blocks
write along r is multiplied by (1 + scale). This strengthens a refusal direction that is still written
weakly; it cannot create one that the fine-tuning has removed entirely (activation addition, which adds
a constant r, would need a bias the llama family does not have).

--direction-from REF reads r off another checkpoint of the same shape, typically the aligned model
before a harmful fine-tune, whose refusal direction is the one the fine-tune weakened; the edit is
still applied to MODEL.

--layer auto: the prompts are split (seeded) into fit and held-out halves and r is fit per candidate
layer on the fit half. Candidates are layers 1 .. 0.8 * L, as Arditi et al. exclude the layers next to
the unembedding. Two ways to pick among them (--select):
  behaviour (default)  the way Arditi et al. select: each candidate's edit is applied in the forward pass
                       (hooks that give exactly the edited checkpoint's outputs, no weight written) and
                       the held-out prompts are answered greedily (--select-tokens) and judged by the
                       keyword judge. --reverse keeps the layer with the largest harmful-refused minus
                       harmless-refused share (refuse what is harmful, keep answering the rest); plain
                       ablation the smallest harmful-refused plus harmless-refused share. Ties go to
                       the separation criterion below. A layer whose edit multiplies the perplexity of
                       the held-out harmless prompts by more than --select-max-perplexity-ratio (10)
                       is not eligible: the keyword judge reads a broken model's noise as "not refused"
                       (measured: ablating layer 15 of the aligned lab model looked like 0 % refusals
                       and had perplexity 62,731).
  separation           no generation: the layer whose projection r^T h best separates held-out harmful
                       from harmless prompts (ROC AUC, ties broken by the larger standardised mean gap).
Separation is cheap but blind to what the edit does: after a long harmful fine-tune every layer
separates the two sets almost perfectly, and the one it picked (layer 13 of SmolLM2) was not the one
whose amplification brings refusals back (docs/lab.md).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..arch import describe, is_residual_writer, is_token_embedding, model_family, post_norm
from ..checkpoint import open_checkpoint
from ..errors import SurgeryError
from ..model import load_model, load_tokenizer, resolve_device
from ..options import option
from ..splits import examples_for
from .base import Edit, Method, Prepared, Strength
from .common import MethodOptions

SELECTIONS = ("behaviour", "separation")
AUTO_LAYER_SCALE = 1.0  # with --scale auto, --layer auto is chosen at this scale, then the scale is searched


@dataclass
class AblateOptions(MethodOptions):
    harmful: str | None = option(None, "Harmful prompts (default: the built-in set).", file=True)
    harmless: str | None = option(None, "Harmless prompts (default: the built-in set).", file=True)
    column: str | None = option(None, "Prompt column/field in the data files.")
    layer: str = option("auto", "Residual-stream layer for r, or auto (chosen on held-out prompts, see --select).")
    select: str = option(
        "behaviour",
        "How --layer auto chooses: behaviour (each candidate's edit tried in the forward pass, "
        "held-out answers judged: with --reverse the most harmful-only refusals) or separation "
        "(best held-out AUC of r^T h, no generation).",
        choices=SELECTIONS,
    )
    select_tokens: int = option(
        8, "Tokens of each held-out answer per candidate layer (--select behaviour).", positive=True
    )
    select_max_perplexity_ratio: float = option(
        10.0,
        "--select behaviour: a layer whose edit multiplies the held-out harmless "
        "prompts' perplexity by more than this is not eligible (a broken "
        "model's noise reads as 'not refused').",
        low=1.0,
    )
    scale: float | str = option(
        1.0,
        "W <- W - SCALE r (r^T W); 1 removes the direction entirely; auto: the strongest inside the utility budget.",
        strength=True,
        non_negative=True,
    )
    reverse: bool = option(False, "W <- W + SCALE r (r^T W): amplify what blocks write along r.", flag="--reverse")
    include_embeddings: bool = option(False, "Also orthogonalise the token embedding.", flag="--include-embeddings")
    max_samples: int = option(64, "Prompts per set (seeded subset).", positive=True)
    held_out: float = option(0.5, "Share of prompts held out to choose --layer auto.", fraction=True)
    max_length: int = option(256, "Tokens per prompt.", positive=True)
    batch_size: int = option(8, "Prompts per forward pass.", positive=True)
    seed: int = option(0, "Seed of the prompt subsets and the held-out split.")
    direction_from: str | None = option(
        None,
        "Read the direction off this checkpoint (e.g. the aligned model before the fine-tune) and apply it to MODEL.",
        folder=True,
    )

    @property
    def signed_scale(self) -> float:
        """The `scale` of `orthogonalise`: --reverse adds, W + scale * r (r^T W)."""
        return -self.scale if self.reverse else self.scale

    def validate(self) -> None:
        super().validate()
        if self.layer != "auto":
            try:
                int(self.layer)
            except ValueError:
                raise SurgeryError(f"--layer must be a layer index or 'auto', got '{self.layer}'") from None
        if not self.select_max_perplexity_ratio > 1.0:
            raise SurgeryError(f"--select-max-perplexity-ratio must be above 1, got {self.select_max_perplexity_ratio}")


@dataclass
class AblateReport:
    output: Path | None
    layer: int
    direction: torch.Tensor
    layer_scores: dict[int, dict[str, float]] = field(
        default_factory=dict
    )  # layer -> held-out auc, gap (and refused shares)
    edited: list[str] = field(default_factory=list)
    baseline: dict[str, float] | None = None  # held-out refused shares of the unedited model (--select behaviour)


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """ROC AUC of scores (P[pos > neg], ties count half)."""
    diff = pos.reshape(-1, 1) - neg.reshape(1, -1)
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def standardised_gap(pos: torch.Tensor, neg: torch.Tensor) -> float:
    pooled = ((pos.var(unbiased=False) + neg.var(unbiased=False)) / 2).sqrt().clamp(min=1e-12)
    return float((pos.mean() - neg.mean()) / pooled)


def difference_of_means(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """r = mean(h_harmful) - mean(h_harmless), normalised (fp32)."""
    r = harmful.float().mean(0) - harmless.float().mean(0)
    norm = r.norm()
    if norm == 0 or not torch.isfinite(norm):
        raise SurgeryError("harmful and harmless prompts give the same mean hidden state: no direction to ablate")
    return r / norm


def held_out_split(n_harmful: int, n_harmless: int, held_out: float, seed: int):
    """Labels (1 = harmful, harmful first) and the seeded, stratified fit / held-out indices."""
    from ..probes.train import split_indices

    labels = np.array([1] * n_harmful + [0] * n_harmless)
    fit, test = split_indices(labels, held_out, seed)
    return labels, fit, test


def fit_directions(
    harmful: dict[int, torch.Tensor], harmless: dict[int, torch.Tensor], labels, fit
) -> dict[int, torch.Tensor]:
    """Each layer's r from the fit half only."""
    out = {}
    for layer in harmful:
        h = torch.cat([harmful[layer], harmless[layer]])
        out[layer] = difference_of_means(h[fit][labels[fit] == 1], h[fit][labels[fit] == 0])
    return out


def separation_scores(
    harmful: dict[int, torch.Tensor],
    harmless: dict[int, torch.Tensor],
    labels,
    test,
    directions: dict[int, torch.Tensor],
) -> dict[int, dict[str, float]]:
    """Held-out AUC and standardised gap of each layer's fit-half projection r^T h."""
    scores: dict[int, dict[str, float]] = {}
    for layer, r in directions.items():
        h = torch.cat([harmful[layer], harmless[layer]])
        proj = h[test] @ r
        pos, neg = proj[labels[test] == 1], proj[labels[test] == 0]
        scores[layer] = {"auc": auc(pos, neg), "gap": standardised_gap(pos, neg)}
    return scores


def choose_layer(harmful: dict[int, torch.Tensor], harmless: dict[int, torch.Tensor], held_out: float, seed: int):
    """The candidate layer whose fit-half direction best separates the held-out half (see the module docstring)."""
    labels, fit, test = held_out_split(
        len(next(iter(harmful.values()))), len(next(iter(harmless.values()))), held_out, seed
    )
    scores = separation_scores(harmful, harmless, labels, test, fit_directions(harmful, harmless, labels, fit))
    return max(scores, key=lambda k: separation_key(scores[k])), scores


def separation_key(score: dict[str, float]) -> tuple[float, float]:
    return (round(score["auc"], 6), score["gap"])


def behaviour_key(score: dict[str, float], reverse: bool) -> tuple:
    """Larger is better. --reverse: refuse harmful, answer harmless; ablation: answer both. Ties: separation."""
    harm, safe = score["harmful_refused"], score["harmless_refused"]
    objective = harm - safe if reverse else -(harm + safe)
    return (round(objective, 6), *separation_key(score))


def writer_directions(r: torch.Tensor, writers, family, read) -> dict[str, torch.Tensor]:
    """Writer tensor -> the unit direction u projected off its output: r, or where a norm of weight g scales the
    output by (offset + g) before it is added to the residual stream, u = (offset + g) * r normalised. Then
    r . ((offset + g) * y) = |(offset + g) * r| (u . y), so removing u removes r from what the block adds (the
    norm's division by the RMS is a scalar). `read(name)` gives a tensor of the model."""
    found = {}
    for name in writers:
        norm = post_norm(name, family)
        if norm is None:
            found[name] = r
        else:
            u = (family.norm_offset + read(norm).float().to(r.device)) * r
            found[name] = u / u.norm().clamp_min(1e-12)
    return found


@contextmanager
def intervened(model, r: torch.Tensor, scale: float, include_embeddings: bool = False):
    """Run `model` as the edited checkpoint would run, without writing a weight (forward hooks).

    A writer's output y = W x + b becomes y - scale * u (u^T (y - b)) = (W - scale u u^T W) x + b, the
    output of `orthogonalise(W, u, scale)` with u its `writer_directions` entry; with include_embeddings the
    token embedding's rows e -> e - scale (e . r) r likewise, and a tied output head sees its input projected
    the same way.
    """
    handles = []
    family, params = model_family(model), dict(model.named_parameters())
    r = r.float().to(next(model.parameters()).device)
    writers = [n + ".weight" for n, _ in model.named_modules() if is_residual_writer(n + ".weight", family)]
    directions = writer_directions(r, writers, family, lambda name: params[name].detach())

    def project(x: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        v = x.float() - (bias.float() if bias is not None else 0.0)
        return (x.float() - scale * (v @ d)[..., None] * d).to(x.dtype)

    def along(d: torch.Tensor):
        return lambda module, args, output: project(output, d, getattr(module, "bias", None))

    try:
        for name, module in model.named_modules():
            if name + ".weight" in directions:
                handles.append(module.register_forward_hook(along(directions[name + ".weight"])))
            elif include_embeddings and is_token_embedding(name + ".weight", family):
                handles.append(module.register_forward_hook(along(r)))
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if include_embeddings and head is not None and embed is not None and head.weight is embed.weight:
            handles.append(head.register_forward_pre_hook(lambda m, args: (project(args[0], r), *args[1:])))
        yield model
    finally:
        for h in handles:
            h.remove()


def choose_layer_by_behaviour(
    model,
    tokenizer,
    directions: dict[int, torch.Tensor],
    harmful: list[str],
    harmless: list[str],
    options: AblateOptions,
    scores: dict[int, dict[str, float]],
    progress=None,
    scale: float | None = None,
):
    """Apply each candidate's edit in the forward pass and judge held-out answers (see the module docstring).

    Adds harmful_refused, harmless_refused and perplexity_ratio (held-out harmless prompts, edited over
    unedited) to `scores`, which holds each layer's separation figures; returns the chosen layer and the
    unedited model's shares and perplexity."""
    from .. import metrics
    from ..judges import KeywordJudge

    judge = KeywordJudge()

    def measure() -> dict[str, float]:
        out = {
            name: metrics.refusal_rate(model, tokenizer, prompts, judge, options.select_tokens, options.batch_size)[0]
            for name, prompts in (("harmful_refused", harmful), ("harmless_refused", harmless))
        }
        out["perplexity"] = metrics.perplexity(model, tokenizer, harmless, options.max_length, options.batch_size)
        return out

    baseline = measure()
    for i, (layer, r) in enumerate(directions.items()):
        if progress is not None:
            progress(
                f"trying the edit of layer {layer} ({i + 1}/{len(directions)}) on {len(harmful) + len(harmless)} held-out prompts"
            )
        signed = options.signed_scale if scale is None else (-scale if options.reverse else scale)
        with intervened(model, r, signed, options.include_embeddings):
            shares = measure()
        ratio = shares.pop("perplexity") / baseline["perplexity"]
        scores[layer].update(shares, perplexity_ratio=ratio)
    eligible = [k for k in scores if scores[k]["perplexity_ratio"] <= options.select_max_perplexity_ratio]  # NaN: not
    if not eligible:
        worst = min(scores[k]["perplexity_ratio"] for k in scores)
        raise SurgeryError(
            f"every candidate layer's edit multiplies the held-out harmless prompts' perplexity by more than "
            f"{options.select_max_perplexity_ratio:g} (at best x{worst:.3g}): lower --scale, or pass --layer N"
        )
    best = max(eligible, key=lambda k: behaviour_key(scores[k], options.reverse))
    return best, baseline


def candidate_layers(num_layers: int) -> list[int]:
    return list(range(1, max(2, int(0.8 * num_layers) + 1)))


def orthogonalise(weight: torch.Tensor, r: torch.Tensor, scale: float, embedding: bool = False) -> torch.Tensor:
    """W - scale * r (r^T W) for [hidden, in] writers, E - scale * (E r) r^T for [vocab, hidden] embeddings (fp32, cast back)."""
    w = weight.float()
    if embedding:
        new = w - scale * torch.outer(w @ r, r)
    else:
        new = w - scale * torch.outer(r, r @ w)
    return new.to(weight.dtype)


def last_token_states(
    model, tokenizer, prompts: list[str], layers: list[int], options: AblateOptions
) -> dict[int, torch.Tensor]:
    """Residual stream at the last prompt token (chat template with the generation prompt)."""
    from ..probes.collect import encode_texts, pooled_hidden_states, render
    from ..prompts import Example

    texts = render(tokenizer, [Example(p) for p in prompts], chat=True, generation_prompt=True)
    seqs = encode_texts(tokenizer, texts, options.max_length, chat=True)
    return pooled_hidden_states(model, seqs, layers, "last", options.batch_size, tokenizer.pad_token_id)


def refusal_direction(
    model_dir: str | Path, options: AblateOptions, target: str | Path | None = None, progress=None
) -> AblateReport:
    """Find r (and its layer) without writing anything.

    r is read off `model_dir`; with --select behaviour the candidates' edits are tried on `target` (the
    model that will be edited; default `model_dir`)."""
    options.validate()
    source = open_checkpoint(model_dir, options.allow_pickle)
    device = resolve_device(options.device)
    edited = None
    if target is not None and Path(target).resolve() != source.path.resolve():
        edited = open_checkpoint(target, options.allow_pickle)

    def target_model():
        ckpt = edited or source
        return load_model(ckpt, device), load_tokenizer(ckpt.path)

    return find_direction(source, options, device, target_model, progress)


def find_direction(
    source, options: AblateOptions, device, target_model, progress=None, scale: float | None = None, source_model=None
) -> AblateReport:
    """r and its layer read off the checkpoint `source`; `target_model()` gives the (model, tokenizer) whose
    behaviour the candidates' edits are judged on, loaded only when --select behaviour needs it;
    `source_model()`, when given, the source's (model, tokenizer) (default: loaded here)."""
    num_layers = int(source.config.get("num_hidden_layers", 0))
    if options.layer == "auto":
        layers = candidate_layers(num_layers)
    else:
        index = int(options.layer)
        if not 1 <= index < num_layers:
            raise SurgeryError(f"--layer {index} is out of range: residual-stream layers are 1..{num_layers - 1}")
        layers = [index]
    harmful = [
        e.prompt
        for e in examples_for(
            options.harmful,
            builtin="harmful",
            column=options.column,
            max_samples=options.max_samples,
            seed=options.seed,
        )
    ]
    harmless = [
        e.prompt
        for e in examples_for(
            options.harmless,
            builtin="harmless",
            column=options.column,
            max_samples=options.max_samples,
            seed=options.seed,
        )
    ]
    if min(len(harmful), len(harmless)) < 2:
        raise SurgeryError("direction ablation needs at least 2 harmful and 2 harmless prompts")
    model, tokenizer = source_model() if source_model else (load_model(source, device), load_tokenizer(source.path))
    h_harm = last_token_states(model, tokenizer, harmful, layers, options)
    h_safe = last_token_states(model, tokenizer, harmless, layers, options)
    scores: dict[int, dict[str, float]] = {}
    layer, baseline = layers[0], None
    if len(layers) > 1:
        labels, fit, test = held_out_split(len(harmful), len(harmless), options.held_out, options.seed)
        directions = fit_directions(h_harm, h_safe, labels, fit)
        scores = separation_scores(h_harm, h_safe, labels, test, directions)
        layer = max(scores, key=lambda k: separation_key(scores[k]))
        if options.select == "behaviour":
            del model
            model, tokenizer = target_model()
            prompts = harmful + harmless
            layer, baseline = choose_layer_by_behaviour(
                model,
                tokenizer,
                directions,
                [prompts[i] for i in test if labels[i] == 1],
                [prompts[i] for i in test if labels[i] == 0],
                options,
                scores,
                progress,
                scale,
            )
    del model
    r = difference_of_means(h_harm[layer], h_safe[layer])  # the final direction uses every prompt
    return AblateReport(None, layer, r, scores, baseline=baseline)


class PreparedAblation(Prepared):
    def __init__(self, ckpt, report: AblateReport, options: AblateOptions, source: Path):
        self.ckpt, self.report, self.options, self.source = ckpt, report, options, source
        family = ckpt.family
        writers = [n for n in ckpt.tensors if is_residual_writer(n, family)]
        self.writers = writer_directions(report.direction, writers, family, ckpt.read)
        self.embeddings = [n for n in ckpt.tensors if options.include_embeddings and is_token_embedding(n, family)]

    def resolved(self) -> dict:
        """Options this preparation resolved (`surgery repair --pick`: a fixed-strength run given them prepares the same
        direction): --layer auto's chosen layer."""
        return {"layer": str(self.report.layer)} if self.options.layer == "auto" else {}

    def at(self, scale: float) -> Edit:
        options, r = self.options, self.report.direction
        signed = -scale if options.reverse else scale
        writers, embeddings = self.writers, self.embeddings
        touched = [n for n in self.ckpt.tensors if n in writers or n in embeddings]
        self.report.edited = list(touched)
        summary = {
            "layer": self.report.layer,
            "direction_from": str(self.source.resolve()),
            "select": options.select if options.layer == "auto" else None,
            "layer_scores": {str(k): v for k, v in self.report.layer_scores.items()},
            "baseline": self.report.baseline,
            "direction": r.tolist(),
            "tied_embeddings_note": "with tied embeddings, --include-embeddings edits the output head too"
            if self.ckpt.tied_embeddings
            else "",
        }

        def edit(name: str, weight: torch.Tensor) -> torch.Tensor:
            """Residual writers W - scale u (u^T W), the embedding (opt-in) E - scale (E r) r^T."""
            if name in writers:
                return orthogonalise(weight, writers[name], signed)
            if name in embeddings:
                return orthogonalise(weight, r, signed, embedding=True)
            return weight

        return Edit(edit, touched=touched, summary=summary)


class DirectionAblation(Method):
    name = "ablate"
    manifest_id = "direction-ablation"
    summary = "Direction ablation: remove (or with --reverse add back) a behaviour direction from every matrix that writes the residual stream."
    paper = "Arditi et al. 2024, Refusal in language models is mediated by a single direction"
    Options = AblateOptions
    references = {"direction_from": "a checkpoint of the same architecture to read the direction off"}
    strength = Strength("scale", low=0.05, high=4.0, log=True)
    on_request_with_reference = frozenset({"ablate", "ablate-from-reference"})

    def validate(self, options: AblateOptions) -> None:
        options.validate()

    def repair_candidates(self, given):
        """Without a reference: the model's own refusal direction amplified. With one, the reference-based repairs
        are tried by default and these two only when `--methods` names them (`ablate`, `ablate-from-reference`): their
        layer scan generates for every candidate layer (about 6 min each on SmolLM2-135M on the 2-core CPU, more than
        the whole search of every reference-based method together)."""
        common = {
            "scale": "auto",
            "reverse": True,
            "device": given.device,
            "allow_pickle": given.allow_pickle,
            "adapter": given.adapter,
        }
        found = [("ablate", AblateOptions(**common))]
        if given.reference is not None:
            found.append(("ablate-from-reference", AblateOptions(direction_from=given.reference, **common)))
        return found

    def prepare(self, ctx, options: AblateOptions) -> PreparedAblation:
        ckpt, family = ctx.ckpt, ctx.ckpt.family
        if not any(is_residual_writer(n, family) for n in ckpt.tensors):
            raise SurgeryError(
                f"{ckpt.path} has no residual writers ({' and '.join(family.residual_writers)} in each "
                f"{family.block_list}.N block, as {describe(family)} names them): direction ablation edits them"
            )
        source = ctx.references.get("direction_from", ckpt)
        scale = options.scale if isinstance(options.scale, float) else AUTO_LAYER_SCALE
        own = lambda: (ctx.model(), ctx.tokenizer())  # noqa: E731
        report = find_direction(
            source, options, ctx.device, own, ctx.progress, scale, source_model=own if source is ckpt else None
        )
        return PreparedAblation(ckpt, report, options, source.path)


def ablate_checkpoint(
    model_dir: str | Path, output: str | Path, options: AblateOptions, force: bool = False, progress=None
) -> AblateReport:
    """`progress(message)`, when given, is called as --select behaviour tries each layer (no after-write check)."""
    from .base import RunOptions, run_repair

    result = run_repair(DirectionAblation(), model_dir, output, options, RunOptions(force=force, check=False), progress)
    result.report.output = Path(output)
    return result.report
