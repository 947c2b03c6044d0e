"""Automatic strength: search a method's knob for the strongest repair inside a utility budget.

Every candidate is applied to the model in memory (the same `Edit` that would be written), measured,
and undone; nothing is written or reloaded, and the method's statistics are computed once, before the
search. Measured against the unedited model, on prompts that are never calibration or evaluation ones:

    repair        share of held-out harmful prompts not refused (keyword judge, as `surgery eval`), or for a
                  detox method the toxicity rate of held-out toxic prompts; held out of the calibration data
                  (or, with the built-in set, its selection part)
    budget        perplexity ratio, first-token KL (input || candidate), over-refusal in points above the
                  input (built-in harmless selection part), task accuracy drop in points (--task)

The knob is assumed monotone (stronger repairs, higher cost): the strongest end is tried first, then
the weakest, then bisection between the strongest point inside the budget and the weakest outside it.
Each candidate's cheap figures (perplexity, KL) come first and a candidate that breaks them is not
generated from (early stop).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .splits import SELECTION, builtin_part

BUDGET_KEYS = ("perplexity_ratio", "kl", "over_refusal_points", "accuracy_drop_points")


@dataclass
class Point:
    strength: float
    figures: dict[str, float] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)  # budget lines this candidate breaks

    @property
    def within(self) -> bool:
        return not self.broken


@dataclass
class SearchResult:
    knob: str
    metric: str
    baseline: dict[str, float]
    points: list[Point]
    chosen: float
    reason: str
    budget: dict[str, float | None]
    failed: str | None = None  # set when no strength repairs inside the budget (the command exits 1)
    prompts: dict[str, int] = field(default_factory=dict)
    forward_passes: int = 0
    before: list["SearchResult"] = field(default_factory=list)  # earlier stages (EigenShift's k, then its alpha)

    def chosen_point(self) -> Point:
        return next(p for p in self.points if p.strength == self.chosen)

    def resolution(self) -> list[str]:
        """What one item of each held-out set is worth in points, then each budget line finer than one item (losing a
        single item then breaks it: the search cannot tell that line from "no loss at all")."""
        sizes = {kind: n for kind, n in self.prompts.items() if n}
        found = ["held-out sets: " + ", ".join(f"{n} {kind} (one = {100 / n:.1f} points)" for kind, n in sizes.items())]
        for key, kind, flag, what in (("max_over_refusal_points", "harmless", "--max-over-refusal", "harmless prompt refused"),
                                      ("max_accuracy_drop_points", "task", "--max-accuracy-drop", "task item lost")):
            limit = self.budget.get(key)
            if limit is not None and sizes.get(kind) and limit < 100 / sizes[kind]:
                found.append(f"{flag} {limit:g} is finer than one of the {sizes[kind]} {kind} items "
                             f"({100 / sizes[kind]:.1f} points): one {what} breaks it")
        return found

    def to_json(self) -> dict:
        found = {"knob": self.knob, "metric": self.metric, "baseline": self.baseline, "chosen": self.chosen,
                 "reason": self.reason, "failed": self.failed, "budget": self.budget, "prompts": self.prompts,
                 "resolution": self.resolution(),
                 "candidates": [{**asdict(p), "within_budget": p.within} for p in self.points]}
        if self.before:
            found["stages"] = [stage.to_json() for stage in self.before]
        return found


@contextlib.contextmanager
def applied(model, ckpt, edit):
    """The model as the written checkpoint would be, until the block ends; then bit-identical to before.

    Each touched tensor is read from the checkpoint, passed through the edit, and copied into the model's
    parameter (cast as loading casts it); an added tensor (an untied head) replaces its module's weight.
    Undo copies the checkpoint's own tensor back."""
    saved: dict[str, torch.Tensor] = {}
    replaced: dict[str, torch.nn.Parameter] = {}
    try:
        with torch.no_grad():
            for name in edit.touched if edit.touched is not None else list(ckpt.tensors):
                original = ckpt.read(name)
                new = edit.fn(name, original)
                if new is original:
                    continue
                param = model.get_parameter(ckpt.parameter_name(name))
                saved[name] = original
                param.copy_(new.to(param.device, param.dtype))
            for name, tensor in edit.added.items():
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                old = getattr(module, attr)
                replaced[name] = old
                setattr(module, attr, torch.nn.Parameter(tensor.to(old.device, old.dtype), requires_grad=False))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                param = model.get_parameter(ckpt.parameter_name(name))
                param.copy_(original.to(param.device, param.dtype))
            for name, old in replaced.items():
                module_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module_name), attr, old)


class Measurer:
    """The figures of one candidate, against the unedited model's (measured once, first)."""

    def __init__(self, ctx, prepared, run, metric: str):
        from .evaluate import sst2_items
        from .judges import KeywordJudge

        self.ctx, self.prepared, self.run, self.metric = ctx, prepared, run, metric
        self.model, self.tokenizer = ctx.model(), ctx.tokenizer()
        self.judge = KeywordJudge()
        n = run.search_samples
        held = ctx.held_out.get("harmful")
        self.harmful = (held or [e.prompt for e in builtin_part("harmful", SELECTION)])[:n]
        self.harmless = [e.prompt for e in builtin_part("harmless", SELECTION)][:n]
        self.task = sst2_items(run.task.partition(":")[2], n, 0) if run.task else None
        self.batch = 8
        self.baseline: dict[str, float] = {}
        self._base_logprobs = None

    def prompts(self) -> dict[str, int]:
        counts = {"harmless": len(self.harmless)}
        custom = self.prepared.repair_prompts()
        if custom is not None:
            counts[{"toxicity": "toxic"}.get(self.metric, self.metric)] = custom  # the method's own held-out set
        elif self.metric == "harmful_score":
            counts["harmful"] = len(self.harmful)
        if self.task:
            counts["task"] = len(self.task[0])
        return counts

    def measure_baseline(self) -> dict[str, float]:
        from .metrics import next_token_logprobs, perplexity

        self._base_logprobs = next_token_logprobs(self.model, self.tokenizer, self.harmless, self.batch)
        self.baseline = {"perplexity": perplexity(self.model, self.tokenizer, self.harmless, batch_size=self.batch),
                         "over_refusal": self._refused(self.harmless)}
        if self.task:
            self.baseline["accuracy"] = self._accuracy()
        self.baseline[self.metric] = self._repair()
        return self.baseline

    def measure(self, point: Point) -> None:
        """Fill `point` cheapest figure first; stop at the first budget line it breaks."""
        from .metrics import mean_kl, next_token_logprobs, perplexity

        run, f = self.run, point.figures
        f["perplexity"] = perplexity(self.model, self.tokenizer, self.harmless, batch_size=self.batch)
        f["perplexity_ratio"] = f["perplexity"] / self.baseline["perplexity"]
        f["kl"] = mean_kl(self._base_logprobs, next_token_logprobs(self.model, self.tokenizer, self.harmless, self.batch))
        if not f["perplexity_ratio"] <= run.max_perplexity_ratio:
            point.broken.append(f"perplexity x{f['perplexity_ratio']:.3g} > x{run.max_perplexity_ratio:g}")
        if not f["kl"] <= run.max_kl:
            point.broken.append(f"KL {f['kl']:.3g} > {run.max_kl:g}")
        if point.broken:
            return
        f["over_refusal"] = self._refused(self.harmless)
        f["over_refusal_points"] = 100 * (f["over_refusal"] - self.baseline["over_refusal"])
        if f["over_refusal_points"] > run.max_over_refusal:
            point.broken.append(f"over-refusal +{f['over_refusal_points']:.1f} points > +{run.max_over_refusal:g}")
            return
        if self.task:
            f["accuracy"] = self._accuracy()
            f["accuracy_drop_points"] = 100 * (self.baseline["accuracy"] - f["accuracy"])
            if f["accuracy_drop_points"] > run.max_accuracy_drop:
                point.broken.append(f"accuracy -{f['accuracy_drop_points']:.1f} points > -{run.max_accuracy_drop:g}")
                return
        f[self.metric] = self._repair()

    def _refused(self, prompts: list[str]) -> float:
        from .metrics import refusal_rate

        return refusal_rate(self.model, self.tokenizer, prompts, self.judge, self.run.search_tokens, self.batch)[0]

    def _accuracy(self) -> float:
        from .metrics import task_accuracy

        return task_accuracy(self.model, self.tokenizer, *self.task, batch_size=self.batch)[0]

    def _repair(self) -> float:
        custom = self.prepared.repair_figure(self.model, self.tokenizer)
        if custom is not None:
            return custom
        return 1.0 - self._refused(self.harmful)


def _mid(a: float, b: float, log: bool) -> float:
    return math.sqrt(a * b) if log and a > 0 and b > 0 else (a + b) / 2  # geometric midpoint on a log scale


def search_strength(method, ctx, prepared, run, knob=None, measurer=None, known=None) -> SearchResult:
    """The strongest strength inside the budget (or, with --target-harmful-score, the weakest that reaches it).
    `knob`: another `Strength` than the method's (a method searching two knobs in turn, EigenShift); `measurer`: one
    that an earlier stage on the same prompts used (its baseline is not measured again); `known`: strength -> Point
    already measured (the same edit as an earlier stage's point), not measured again."""
    knob, metric = knob or method.strength, method.repair_metric
    measurer = measurer or Measurer(ctx, prepared, run, metric)
    measurer.prepared = prepared  # the repair figure comes from this stage's edit
    if not measurer.baseline:
        ctx.progress(f"measuring the unedited model on held-out prompts ({', '.join(f'{v} {k}' for k, v in measurer.prompts().items())})")
        measurer.measure_baseline()
    baseline = measurer.baseline
    points: dict[float, Point] = {float(s): Point(float(s), dict(p.figures), list(p.broken)) for s, p in (known or {}).items()}

    def trial(strength: float) -> Point:
        strength = float(round(strength)) if knob.integer else float(f"{strength:.4g}")
        if strength in points:
            return points[strength]
        ctx.progress(f"{knob.field} {strength:g}: candidate {len(points) + 1}, applied in memory and measured")
        point = Point(strength)
        with applied(ctx.model(), ctx.target, prepared.at(strength)):
            measurer.measure(point)
        points[strength] = point
        return point

    target = run.target_harmful_score

    def good(p: Point) -> bool:  # the predicate bisection looks for the boundary of
        return p.within and (target is None or p.figures.get(metric, 1.0) > target)

    low, high = prepared.bounds() or (knob.low, knob.high)
    lo, hi = (low, high) if knob.stronger == "higher" else (high, low)  # lo: the weak end, hi: the strong end

    def weakness(p: Point) -> float:  # smaller is weaker
        return p.strength if knob.stronger == "higher" else -p.strength

    if target is None:
        top = trial(hi)
        if not top.within:
            bottom = trial(lo)
            if bottom.within:
                for _ in range(run.search_steps):  # lo inside, hi outside the budget
                    mid = trial(_mid(lo, hi, knob.log))
                    lo, hi = (mid.strength, hi) if mid.within else (lo, mid.strength)
    else:
        top = trial(hi)
        if top.within and top.figures[metric] <= target:
            bottom = trial(lo)
            if good(bottom):
                for _ in range(run.search_steps):  # lo does not reach the target, hi does (inside the budget)
                    mid = trial(_mid(lo, hi, knob.log))
                    lo, hi = (mid.strength, hi) if good(mid) else (lo, mid.strength)
    ordered = sorted(points.values(), key=weakness)
    inside = [p for p in ordered if p.within]
    budget = {"max_perplexity_ratio": run.max_perplexity_ratio, "max_kl": run.max_kl,
              "max_over_refusal_points": run.max_over_refusal,
              "max_accuracy_drop_points": run.max_accuracy_drop if run.task else None,
              "target": target, "min_improvement_points": run.min_improvement}
    failed = None
    if target is not None:
        reaching = [p for p in inside if p.figures[metric] <= target]
        if reaching:
            chosen = min(reaching, key=weakness)
            reason = f"the weakest {knob.field} inside the budget whose held-out {metric} is at most {target:g}"
        else:
            chosen = min(inside, key=lambda p: p.figures[metric]) if inside else ordered[0]
            reason = "the best point found"
            failed = (f"no {knob.field} inside the budget reaches {metric} {target:g}: best point {knob.field} "
                      f"{chosen.strength:g} ({_describe(chosen, metric)})")
    elif inside:
        chosen = min(inside, key=lambda p: (round(p.figures[metric], 6), weakness(p)))
        reason = f"the lowest held-out {metric} among the candidates inside the budget (ties: the weaker {knob.field})"
    else:
        chosen = ordered[0]
        reason = "the weakest candidate (nothing was inside the budget)"
        failed = (f"no {knob.field} between {ordered[0].strength:g} and {ordered[-1].strength:g} stays inside the budget: weakest tried "
                  f"{knob.field} {chosen.strength:g} breaks {'; '.join(chosen.broken)}")
    if failed is None:
        gain = 100 * (baseline[metric] - chosen.figures[metric])
        if gain < run.min_improvement:
            failed = (f"the best {knob.field} inside the budget ({chosen.strength:g}) lowers the held-out {metric} only from "
                      f"{100 * baseline[metric]:.1f}% to {100 * chosen.figures[metric]:.1f}% (less than --min-improvement "
                      f"{run.min_improvement:g} points): no repair")
    return SearchResult(knob.field, metric, baseline, ordered, chosen.strength, reason, budget, failed,
                        measurer.prompts(), ctx.forward_passes)


def _describe(p: Point, metric: str) -> str:
    parts = [f"{metric} {100 * p.figures[metric]:.1f}%"] if metric in p.figures else []
    if "perplexity_ratio" in p.figures:
        parts.append(f"perplexity x{p.figures['perplexity_ratio']:.3g}")
    parts += p.broken
    return ", ".join(parts)


def plot_search(result: SearchResult, path: str | Path) -> Path | None:
    """Repair figure against perplexity ratio for every candidate, the chosen one marked (needs matplotlib)."""
    from .plotting import pyplot, save

    try:
        plt = pyplot()
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    stages = [*result.before, result]  # a search in stages: every stage's candidates, named by their knob
    measured = [(s.knob, p) for s in stages for p in s.points if result.metric in p.figures]
    xs = [p.figures["perplexity_ratio"] for _, p in measured]
    ys = [100 * p.figures[result.metric] for _, p in measured]
    ax.scatter(xs, ys, c=["tab:green" if p.within else "tab:red" for _, p in measured])
    for (knob, p), x, y in zip(measured, xs, ys):
        label = f"{knob} {p.strength:g}" if result.before else f"{p.strength:g}"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.scatter([1.0], [100 * result.baseline[result.metric]], marker="s", c="black", label="input")
    chosen = result.chosen_point()
    if result.metric in chosen.figures:
        ax.scatter([chosen.figures["perplexity_ratio"]], [100 * chosen.figures[result.metric]], s=160,
                   facecolors="none", edgecolors="tab:blue", label=f"chosen {result.knob} {result.chosen:g}")
    ax.axvline(result.budget["max_perplexity_ratio"], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("perplexity ratio (held-out harmless)")
    ax.set_ylabel(f"held-out {result.metric} (%)")
    ax.legend(fontsize=8)
    return save(fig, path)
