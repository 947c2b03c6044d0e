"""`surgery repair`: try every registered method that applies, each at its automatic strength under one
budget, and write the one with the lowest held-out harmful score.

What applies depends on what the user gives (each method's `repair_candidates`): with a reference (the
checkpoint before the harmful fine-tune) Antidote restores the fine-tune delta and the refusal direction
can be read off the reference; without one, Antidote zeroes and the direction is the model's own; with
the reference and the model it was aligned from (`--unaligned`), RESTA and the sign-conflict revert
join; with a probe, the probe edit joins; with an adapter, Antidote prunes the adapter's LoRA matrices (the
paper) and every other candidate works on base + adapter merged. EigenShift lowers toxicity, not the harmful score, so it is not compared here.

All candidates are measured on the same selection prompts (the built-in sets' selection part) against
the same unedited model, which is loaded once and shared: each candidate's search leaves it bit-identical.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from .errors import SurgeryError
from .methods import REGISTRY, RunOptions
from .methods.base import open_context, prepare_and_search, refuse_nonfinite_inputs, refuse_output, write_repair
from .methods.common import MethodOptions
from .options import option, validate_fields


# What a user may give `surgery repair` besides MODEL: each candidate is offered for some of these.
INPUTS = ("reference", "unaligned", "probe", "adapter")


def offers() -> dict[str, list[frozenset[str]]]:
    """Candidate label -> every combination of INPUTS with which a registered method offers it, found by asking each
    method's `repair_candidates` with placeholder paths (it depends only on which inputs are given). In registry order;
    methods whose repair figure is not the harmful score (EigenShift: toxicity) are not compared, so not listed."""
    found: dict[str, list[frozenset[str]]] = {}
    combos = [frozenset(c) for size in range(len(INPUTS) + 1) for c in itertools.combinations(INPUTS, size)]
    for method in REGISTRY.values():
        if method.repair_metric != "harmful_score":
            continue
        for combo in combos:
            given = SimpleNamespace(**{k: (f"<{k}>" if k in combo else None) for k in INPUTS}, methods=None,
                                    max_harmful_score=None, device="auto", allow_pickle=False)
            for label, _ in method.repair_candidates(given):
                found.setdefault(label, []).append(combo)
    return found


def needs(label: str) -> str:
    """What `--methods LABEL` needs from the user, in words, from `offers` (empty for an unknown label)."""
    combos = offers().get(label)
    if not combos:
        return ""
    minimal = [c for c in combos if not any(other < c for other in combos)]
    def flags(names) -> str:
        spelled = [f"--{n}" for n in INPUTS if n in names]
        return ", ".join(spelled[:-1]) + " and " + spelled[-1] if len(spelled) > 1 else "".join(spelled)

    excluded = [n for n in INPUTS if all(n not in m and (m | {n}) not in combos for m in minimal)]
    if all(not m for m in minimal):
        return f"it is offered only without {flags(excluded)}" if excluded else ""
    hint = "it needs " + " or ".join(flags(m) for m in minimal if m)
    return hint + (f" (and no {flags(excluded)})" if excluded else "")


@dataclass
class RepairOptions(MethodOptions):
    reference: str | None = option(None, "The checkpoint before the harmful fine-tuning: Antidote restores the fine-tune "
                                         "delta to it, and the refusal direction is also read off it.", folder=True)
    unaligned: str | None = option(None, "The model the reference was aligned from (e.g. the base of an -Instruct model): "
                                         "with --reference, RESTA and the sign-conflict revert join the candidates.", folder=True)
    probe: str | None = option(None, "A probe from `surgery probe-train`: the probe edit joins the candidates.", folder=True)
    methods: list[str] | None = option(None, "Comma-separated candidates to try (default: every one that applies): "
                                             f"{', '.join(offers())}.", patterns=True)
    max_harmful_score: float | None = option(None, "CI gate: exit 1 unless the chosen repair's held-out harmful score is at "
                                                   "most this share (0-1).", low=0.0, high=1.0)


@dataclass
class Candidate:
    label: str
    method: str
    options: object
    search: object = None
    prepared: object = None
    ctx: object = None
    error: str | None = None
    seconds: float = 0.0

    def figure(self, key: str) -> float | None:
        return self.search.chosen_point().figures.get(key) if self.search is not None else None

    @property
    def inside(self) -> bool:
        return self.search is not None and self.search.failed is None

    def to_json(self) -> dict:
        return {"candidate": self.label, "method": self.method, "seconds": round(self.seconds, 1), "error": self.error,
                "chosen": self.search.chosen if self.search else None,
                "inside_budget": self.inside, "failed": self.search.failed if self.search else self.error,
                "figures": self.search.chosen_point().figures if self.search else {}}


def candidates(options: RepairOptions) -> list[Candidate]:
    """What every registered method offers for what the user gave (`Method.repair_candidates`), strength on auto;
    methods whose repair figure is not the harmful score (EigenShift: toxicity) are not compared here."""
    offered = [Candidate(label, name, opts) for name, method in REGISTRY.items() if method.repair_metric == "harmful_score"
               for label, opts in method.repair_candidates(options)]
    wanted = options.methods
    if not wanted:
        return offered
    known = {c.label for c in offered}
    for w in wanted:
        if w not in known:
            hint = needs(w)
            hint = f": {hint}" if hint else f" (with what was given: {', '.join(sorted(known))})"
            raise SurgeryError(f"--methods: no candidate '{w}'{hint}")
    return [c for c in offered if c.label in wanted]


@dataclass
class RepairAllReport:
    output: Path | None
    candidates: list[Candidate]
    winner: Candidate | None
    result: object = None  # the written method's RepairReport
    failed: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def repair_checkpoint(model_dir: str | Path, output: str | Path, options: RepairOptions, run: RunOptions | None = None,
                      progress: Callable[[str], None] | None = None) -> RepairAllReport:
    """Search every applicable method, write the best inside the budget (see the module docstring)."""
    run = run or RunOptions()
    validate_fields(options)
    validate_fields(run)
    run.validate()
    if run.dry_run:
        raise SurgeryError("surgery repair searches on the model: --dry-run is not available (use a method's own --dry-run)")
    todo = candidates(options)
    refuse_output(Path(output), [Path(model_dir), *[Path(p) for p in (options.reference, options.unaligned, options.probe,
                                                                       options.adapter) if p]], run.force)
    for c in todo:  # every candidate's own rules, before any model is loaded
        REGISTRY[c.method].validate(c.options)
        validate_fields(c.options)
    if not run.allow_nonfinite:  # bad weights: one error before any work (each candidate would refuse them alike)
        refuse_nonfinite_inputs(model_dir, options)
    say = progress or (lambda message: None)
    shared = {}  # the unedited model, by how the candidate sees an adapter (merged, or its own LoRA matrices)
    for i, c in enumerate(todo):
        method = REGISTRY[c.method]
        t0 = time.perf_counter()
        try:
            c.ctx = open_context(method, model_dir, c.options, run, lambda m, c=c, i=i: say(f"[{i + 1}/{len(todo)} {c.label}] {m}"),
                                 searching=True)
            kind = "adapter" if c.ctx.adapter is not None else "model"
            if kind in shared:
                c.ctx._model, c.ctx._tokenizer = shared[kind]
            c.prepared, c.search = prepare_and_search(method, c.ctx, c.options, run)
            shared[kind] = (c.ctx.model(), c.ctx.tokenizer())
        except SurgeryError as e:
            c.error = str(e)
        c.seconds = time.perf_counter() - t0
    inside = [c for c in todo if c.inside]
    pool = inside or [c for c in todo if c.search is not None]
    if not pool:
        raise SurgeryError("no candidate repair could be measured: " + "; ".join(f"{c.label}: {c.error}" for c in todo))
    winner = min(pool, key=lambda c: (round(c.figure("harmful_score") if c.figure("harmful_score") is not None else 1.0, 6),
                                      c.figure("perplexity_ratio") or 1.0))
    failed = None
    if not inside:
        failed = "no method repairs inside the budget: " + "; ".join(
            f"{c.label}: {c.search.failed if c.search else c.error}" for c in todo)
    elif options.max_harmful_score is not None and winner.figure("harmful_score") > options.max_harmful_score:
        failed = (f"the best repair ({winner.label}, held-out harmful score {100 * winner.figure('harmful_score'):.1f}%) "
                  f"is above --max-harmful-score {100 * options.max_harmful_score:.1f}%")
    comparison = {"repair": {"chosen": winner.label, "candidates": [c.to_json() for c in todo], "failed": failed}}
    result = write_repair(REGISTRY[winner.method], winner.ctx, winner.prepared, winner.options, run, output, winner.search,
                          extra_report=comparison, failed=failed,
                          extra_files={"repair.png": lambda path: plot_candidates(todo, winner, path)})
    return RepairAllReport(Path(output), todo, winner, result, result.failed or failed)


def plot_candidates(todo: list[Candidate], winner: Candidate, path: Path) -> Path | None:
    """Every candidate's search points (held-out harmful score against perplexity ratio), the written one marked."""
    from .plotting import pyplot, save

    try:
        plt = pyplot()
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in todo:
        if c.search is None:
            continue
        pts = sorted((p for p in c.search.points if "harmful_score" in p.figures), key=lambda p: p.figures["perplexity_ratio"])
        ax.plot([p.figures["perplexity_ratio"] for p in pts], [100 * p.figures["harmful_score"] for p in pts], "o-",
                label=c.label + (" (written)" if c is winner else ""), linewidth=2.5 if c is winner else 1)
    if winner.search is not None:
        ax.scatter([1.0], [100 * winner.search.baseline["harmful_score"]], marker="s", c="black", label="input")
    ax.set_xlabel("perplexity ratio (held-out harmless)")
    ax.set_ylabel("held-out harmful score (%)")
    ax.legend(fontsize=8)
    return save(fig, path)
