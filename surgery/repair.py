"""`surgery repair`: try every registered method that applies, each at its automatic strength under one
budget, and write the one with the lowest held-out harmful score.

What applies depends on what the user gives (each method's `repair_candidates`): with a reference (the
checkpoint before the harmful fine-tune) interpolation and Safe Delta; with the reference and the model it was
aligned from (`--unaligned`), the sign-conflict revert joins; without a reference, Antidote zeroes and the refusal
direction is the model's own; with a probe, the probe edit joins; with an adapter, Antidote prunes the adapter's
LoRA matrices (the paper) and every other candidate works on base + adapter merged. EigenShift lowers toxicity, not
the harmful score, so it is not compared here.

With a reference, four candidates are tried only when `--methods` names them (each method's
`on_request_with_reference`): prune-restore, resta, ablate and ablate-from-reference. On the demonstration pair (docs/performance.md) every one of them was dominated by Safe Delta
at a fraction of its cost in the default run (prune-restore: harmful proxy 75.2 % after a 220 s calibration; resta:
86.7 % at perplexity x1.46; Safe Delta 26.6 %), and the ablations' layer scans generate for every layer.

All candidates are measured on the same selection prompts (the built-in sets' selection part) against
the same unedited model, which is loaded once and shared: each candidate's search leaves it bit-identical. One
Measurer serves every candidate (one baseline; with --reference, the reference's first-token log-probabilities once),
and one calibration cache (`ctx.cache`): two methods asking for the same statistic (prune-restore and revert: the
model's own answers to the harmful calibration prompts and the input norms over them) compute it once.

Every measured point of every method is numbered in surgery.json (`report.repair.points`); `--pick N --from
OUT/surgery.json` writes point N's method at its strength without searching (the same tensors as that method run at
that fixed strength).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from . import figures as F
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
        if method.repair_metric != F.HARMFUL:
            continue
        for combo in combos:
            given = SimpleNamespace(
                **{k: (f"<{k}>" if k in combo else None) for k in INPUTS},
                max_harmful_score=None,
                device="auto",
                allow_pickle=False,
            )
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
    reference: str | None = option(
        None,
        "The checkpoint before the harmful fine-tuning: Antidote restores the fine-tune "
        "delta to it, and the refusal direction is also read off it.",
        folder=True,
    )
    unaligned: str | None = option(
        None,
        "The model the reference was aligned from (e.g. the base of an -Instruct model): "
        "with --reference, RESTA and the sign-conflict revert join the candidates.",
        folder=True,
    )
    probe: str | None = option(
        None, "A probe from `surgery probe-train`: the probe edit joins the candidates.", folder=True
    )
    methods: list[str] | None = option(
        None,
        f"Comma-separated candidates to try (default: every one that applies): {', '.join(offers())}.",
        patterns=True,
    )
    max_harmful_score: float | None = option(
        None,
        "CI gate: exit 1 unless the chosen repair's held-out harmful score is at most this share (0-1).",
        low=0.0,
        high=1.0,
    )
    pick: int | None = option(
        None,
        "Write point N of an earlier `surgery repair`'s report (its numbered table; --from "
        "names its surgery.json) at its strength, without searching.",
        positive=True,
    )
    pick_from: str | None = option(
        None,
        "With --pick: the surgery.json (or the output folder) of the earlier `surgery repair` of this MODEL.",
        flag="--from",
    )


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
    resolved: dict = field(default_factory=dict)  # options the preparation resolved (ablation's layer): for --pick
    finalist: bool = False  # its choice was confirmed by generation (else: screened on the proxies only)

    def figure(self, key: str) -> float | None:
        return self.search.chosen_point().figures.get(key) if self.search is not None else None

    @property
    def inside(self) -> bool:
        return self.search is not None and self.search.failed is None

    def to_json(self) -> dict:
        timings = self.ctx.timings if self.ctx is not None else {}
        return {
            "candidate": self.label,
            "method": self.method,
            "seconds": round(self.seconds, 1),
            "prepare_seconds": round(timings.get("prepare", 0.0), 1),
            "search_seconds": round(timings.get("search", 0.0), 1),
            "error": self.error,
            "knob": self.search.knob if self.search else None,
            "chosen": self.search.chosen if self.search else None,
            "inside_budget": self.inside,
            "confirmed": self.finalist,
            "failed": self.search.failed if self.search else self.error,
            "bound": self.search.bound if self.search else None,
            "forward_passes": self.search.forward_passes if self.search else None,
            "figures": self.search.chosen_point().figures if self.search else {},
        }


def measured_points(todo: list[Candidate]) -> list[dict]:
    """Every measured point of every candidate, numbered from 1 (what --pick N names), with its figures: the proxies
    for every point, the generated ones where it was confirmed."""
    rows: list[dict] = []
    for c in todo:
        if c.search is None:
            continue
        for stage in [*c.search.before, c.search]:
            for p in stage.points:
                rows.append(
                    {
                        "n": len(rows) + 1,
                        "candidate": c.label,
                        "method": c.method,
                        "knob": stage.knob,
                        "strength": p.strength,
                        "chosen": stage is c.search and p.strength == c.search.chosen,
                        "within_budget": p.within,
                        "confirmed": p.confirmed,
                        "broken": p.broken,
                        "proxy_broken": p.proxy_broken,
                        "figures": p.figures,
                        "resolved": c.resolved,
                    }
                )
    return rows


def candidates(options: RepairOptions) -> list[Candidate]:
    """What every registered method offers for what the user gave (`Method.repair_candidates`), strength on auto;
    methods whose repair figure is not the harmful score (EigenShift: toxicity) are not compared here. With a
    reference and no --methods, the labels a method lists in `on_request_with_reference` are left out."""
    offered = [
        Candidate(label, name, opts)
        for name, method in REGISTRY.items()
        if method.repair_metric == F.HARMFUL
        for label, opts in method.repair_candidates(options)
    ]
    wanted = options.methods
    if not wanted:
        if options.reference is None:
            return offered
        return [c for c in offered if c.label not in REGISTRY[c.method].on_request_with_reference]
    known = {c.label for c in offered}
    for w in wanted:
        if w not in known:
            hint = needs(w)
            hint = f": {hint}" if hint else f" (with what was given: {', '.join(sorted(known))})"
            raise SurgeryError(f"--methods: no candidate '{w}'{hint}")
    return [c for c in offered if c.label in wanted]


# `surgery repair` with several candidates: each is screened on the forward-pass figures with at most SCREEN_STEPS
# bisection steps and no generation; the FINALISTS best by the harmful proxy (inside the budget on the proxies) are
# searched on with the full --search-steps (the screened points reused) and their proxy choice confirmed by generation.
SCREEN_STEPS = 2
FINALISTS = 2
# A runner-up is confirmed only when its harmful proxy is within RUNNER_UP_MARGIN points of the best one's: on the
# demonstration pair the proxy read 4-15 points above the generated figure (docs/strength.md), so a wider gap did not
# close by generation there.
RUNNER_UP_MARGIN = 15.0


def proxy_harmful(c: "Candidate") -> float:
    f = c.search.chosen_point().figures
    return f.get(F.HARMFUL_PROXY, f.get(F.HARMFUL, 1.0))  # a method's own figure where it has no proxy


def close(runner_up: "Candidate", best: "Candidate") -> bool:
    return 100 * (proxy_harmful(runner_up) - proxy_harmful(best)) <= RUNNER_UP_MARGIN


def rank_key(c: Candidate):
    """Screening order: inside the budget on the proxies first, then the lowest harmful proxy, then the lower
    perplexity ratio."""
    f = c.search.chosen_point().figures
    return (c.search.failed is not None, round(proxy_harmful(c), 6), f.get(F.PERPLEXITY_RATIO, 1.0))


def screening_line(c: Candidate, several: bool) -> str:
    """The line a log gets when a candidate's screening (or, alone, its search) ends: its seconds, its choice on the
    proxies and whether that is inside the budget."""
    if c.error is not None or c.search is None:
        return f"failed after {c.seconds:.0f}s: {c.error}"
    s = c.search
    where = "inside the budget" if c.inside else "nothing inside the budget"
    return (
        f"{'screened' if several else 'searched'} in {c.seconds:.0f}s: {s.knob} {s.chosen:g}, harmful proxy "
        f"{100 * proxy_harmful(c):.1f}%, {len(s.points)} points measured, {where}"
    )


def finish(todo: list[Candidate], run, say) -> None:
    """The finalists' searches completed and confirmed by generation (see SCREEN_STEPS); the others keep their
    screening (proxy) figures and are marked so in the report."""
    from . import search

    screened = sorted((c for c in todo if c.search is not None), key=rank_key)
    passed = [c for c in screened if c.search.failed is None]
    finalists = passed[:1] + [c for c in passed[1:FINALISTS] if close(c, passed[0])]
    finalists = finalists or screened[:1]  # nothing passed: the best is confirmed to say why it fails
    for j, c in enumerate(finalists):
        method = REGISTRY[c.method]
        c.ctx.progress = lambda m, c=c, j=j: say(f"[finalist {j + 1}/{len(finalists)} {c.label}] {m}")
        c.ctx.progress(f"refining and confirming {c.search.knob} {c.search.chosen:g}")
        t0 = time.perf_counter()
        c.ctx.confirm = "chosen"
        known = {p.strength: p for p in c.search.points}
        try:
            c.search = search.search_strength(method, c.ctx, c.prepared, run, known=known)
            setattr(c.options, method.strength.field, c.search.chosen)
            c.finalist = True
        except SurgeryError as e:
            c.error = str(e)
        spent = time.perf_counter() - t0
        c.seconds += spent
        c.ctx.timings["search"] = c.ctx.timings.get("search", 0.0) + spent


@dataclass
class RepairAllReport:
    output: Path | None
    candidates: list[Candidate]
    winner: Candidate | None
    result: object = None  # the written method's RepairReport
    failed: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    points: list[dict] = field(default_factory=list)  # every measured point, numbered (measured_points)
    picked: dict | None = None  # --pick: the point written


def repair_checkpoint(
    model_dir: str | Path,
    output: str | Path,
    options: RepairOptions,
    run: RunOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> RepairAllReport:
    """Search every applicable method, write the best inside the budget (see the module docstring)."""
    run = run or RunOptions()
    validate_fields(options)
    validate_fields(run)
    run.validate()
    if run.dry_run:
        raise SurgeryError(
            "surgery repair searches on the model: --dry-run is not available (use a method's own --dry-run)"
        )
    if (options.pick is None) != (options.pick_from is None):
        raise SurgeryError(
            "--pick N and --from PATH go together: --from names the surgery.json of an earlier `surgery "
            "repair`, --pick the number of its point to write"
        )
    if options.pick is not None:
        return pick_checkpoint(model_dir, output, options, run, progress)
    todo = candidates(options)
    refuse_output(
        Path(output),
        [
            Path(model_dir),
            *[Path(p) for p in (options.reference, options.unaligned, options.probe, options.adapter) if p],
        ],
        run.force,
    )
    for c in todo:  # every candidate's own rules, before any model is loaded
        REGISTRY[c.method].validate(c.options)
        validate_fields(c.options)
    if not run.allow_nonfinite:  # bad weights: one error before any work (each candidate would refuse them alike)
        refuse_nonfinite_inputs(model_dir, options)
    say = progress or (lambda message: None)
    from . import search
    from .checkpoint import open_checkpoint

    anchor = open_checkpoint(options.reference, options.allow_pickle) if options.reference else None
    # By how the candidate sees an adapter (merged, or its own LoRA matrices): the unedited model, one Measurer (one
    # baseline for every candidate) and one calibration cache.
    shared, measurers, caches = {}, {}, {}
    several = len(todo) > 1
    screen = replace(run, search_steps=min(run.search_steps, SCREEN_STEPS)) if several else run
    for i, c in enumerate(todo):
        method = REGISTRY[c.method]
        t0 = time.perf_counter()
        try:
            c.ctx = open_context(
                method,
                model_dir,
                c.options,
                run,
                lambda m, c=c, i=i: say(f"[{i + 1}/{len(todo)} {c.label}] {m}"),
                searching=True,
            )
            kind = "adapter" if c.ctx.adapter is not None else "model"
            if kind in shared:
                c.ctx._model, c.ctx._tokenizer = shared[kind]
            c.ctx.cache = caches.setdefault(kind, {})
            if kind not in measurers:
                measurers[kind] = search.Measurer(c.ctx, None, run, F.HARMFUL, anchor=anchor)
                for other in (m for k, m in measurers.items() if k != kind):
                    measurers[kind].adopt(other)  # the same unedited model: one baseline for both kinds
            c.ctx.measurer = measurers[kind]
            shared[kind] = (c.ctx.model(), c.ctx.tokenizer())
            c.ctx.confirm = "none" if several else "neighbours"  # several: screened on the proxies, finalists below
            c.ctx.progress("preparing")  # before a method's silent calibration, if it has one
            c.prepared, c.search = prepare_and_search(method, c.ctx, c.options, screen)
            resolved = getattr(c.prepared, "resolved", None)
            c.resolved = resolved() if resolved else {}
        except SurgeryError as e:
            c.error = str(e)
        c.seconds = time.perf_counter() - t0
        say(f"[{i + 1}/{len(todo)} {c.label}] {screening_line(c, several)}")
    if several:
        finish(todo, run, say)
    else:
        for c in todo:
            c.finalist = c.search is not None
    inside = [c for c in todo if c.finalist and c.inside]
    pool = inside or [c for c in todo if c.finalist]
    if not pool:
        raise SurgeryError("no candidate repair could be measured: " + "; ".join(f"{c.label}: {c.error}" for c in todo))
    winner = min(
        pool,
        key=lambda c: (
            round(c.figure(F.HARMFUL) if c.figure(F.HARMFUL) is not None else 1.0, 6),
            c.figure(F.PERPLEXITY_RATIO) or 1.0,
        ),
    )
    failed = None
    if not inside:
        failed = "no method repairs inside the budget: " + "; ".join(
            f"{c.label}: {(c.search.failed or 'screened inside on the proxies, not a finalist') if c.search else c.error}"
            for c in todo
        )
    elif options.max_harmful_score is not None and winner.figure(F.HARMFUL) > options.max_harmful_score:
        failed = (
            f"the best repair ({winner.label}, held-out harmful score {100 * winner.figure(F.HARMFUL):.1f}%) "
            f"is above --max-harmful-score {100 * options.max_harmful_score:.1f}%"
        )
    points = measured_points(todo)
    comparison = {
        "repair": {
            "chosen": winner.label,
            "candidates": [c.to_json() for c in todo],
            "points": points,
            "failed": failed,
        }
    }
    result = write_repair(
        REGISTRY[winner.method],
        winner.ctx,
        winner.prepared,
        winner.options,
        run,
        output,
        winner.search,
        extra_report=comparison,
        failed=failed,
        extra_files={"repair.png": lambda path: plot_candidates(todo, winner, path)},
    )
    return RepairAllReport(Path(output), todo, winner, result, result.failed or failed, points=points)


def read_point(path: str | Path, n: int, model_dir) -> tuple[Path, dict]:
    """Point `n` of an earlier `surgery repair`'s surgery.json (a file, or the output folder holding it), which must have
    measured MODEL."""
    path = Path(path)
    path = path / "surgery.json" if path.is_dir() else path
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SurgeryError(f"--from {path}: cannot read it as a surgery.json ({type(e).__name__}: {e})") from None
    points = ((manifest.get("report") or {}).get("repair") or {}).get("points") if isinstance(manifest, dict) else None
    if not points:
        raise SurgeryError(f"--from {path}: not the output of a `surgery repair` (no report.repair.points)")
    if not 1 <= n <= len(points):
        raise SurgeryError(f"--pick {n}: {path} numbers its points 1 to {len(points)}")
    measured = manifest.get("input")
    if measured and Path(measured).resolve() != Path(model_dir).resolve():
        raise SurgeryError(
            f"--from {path} measured {measured}, not {Path(model_dir).resolve()}: run `surgery repair` on "
            "this model first"
        )
    return path, points[n - 1]


def pick_checkpoint(model_dir, output, options: RepairOptions, run: RunOptions, progress=None) -> RepairAllReport:
    """--pick N --from PATH: point N's method at its strength, written as that method's fixed-strength run would write it
    (its statistics prepared once; nothing measured)."""
    path, point = read_point(options.pick_from, options.pick, model_dir)
    try:
        (c,) = candidates(replace(options, methods=[str(point.get("candidate"))]))
    except SurgeryError:
        hint = needs(str(point.get("candidate")))
        raise SurgeryError(
            f"--pick {options.pick}: point {options.pick} is {point.get('candidate')}, not a candidate with "
            f"what was given" + (f" ({hint})" if hint else "")
        ) from None
    method = REGISTRY[c.method]
    if not method.strength or point.get("knob") != method.strength.field:
        raise SurgeryError(
            f"--pick {options.pick}: point {options.pick} is a {point.get('knob')} stage of {c.label}, not its strength"
        )
    setattr(c.options, method.strength.field, float(point["strength"]))
    for name, value in (point.get("resolved") or {}).items():
        setattr(c.options, name, value)
    method.validate(c.options)
    validate_fields(c.options)
    refuse_output(
        Path(output),
        [
            Path(model_dir),
            *[Path(p) for p in (options.reference, options.unaligned, options.probe, options.adapter) if p],
        ],
        run.force,
    )
    if not run.allow_nonfinite:
        refuse_nonfinite_inputs(model_dir, options)
    say = progress or (lambda message: None)
    t0 = time.perf_counter()
    c.ctx = open_context(method, model_dir, c.options, run, lambda m: say(f"[pick {options.pick} {c.label}] {m}"))
    c.prepared, _ = prepare_and_search(method, c.ctx, c.options, run)
    picked = {**point, "from": str(path)}
    result = write_repair(
        method, c.ctx, c.prepared, c.options, run, output, None, extra_report={"repair": {"picked": picked}}
    )
    c.seconds = time.perf_counter() - t0
    return RepairAllReport(Path(output), [c], c, result, result.failed, picked=picked)


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
        # the confirmed points (generated and judged): the proxies of the others are in surgery.json
        pts = sorted(
            (p for p in c.search.points if F.HARMFUL in p.figures), key=lambda p: p.figures[F.PERPLEXITY_RATIO]
        )
        ax.plot(
            [p.figures[F.PERPLEXITY_RATIO] for p in pts],
            [100 * p.figures[F.HARMFUL] for p in pts],
            "o-",
            label=c.label + (" (written)" if c is winner else ""),
            linewidth=2.5 if c is winner else 1,
        )
    if winner.search is not None and F.HARMFUL in winner.search.baseline:
        ax.scatter([1.0], [100 * winner.search.baseline[F.HARMFUL]], marker="s", c="black", label="input")
    ax.set_xlabel("perplexity ratio (held-out harmless)")
    ax.set_ylabel("held-out harmful score (%)")
    ax.legend(fontsize=8)
    return save(fig, path)
