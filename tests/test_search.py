"""Automatic strength: the search finds the planted boundary, computes statistics once, undoes every
candidate exactly, and fails loudly when nothing repairs inside the budget."""

import json

import pytest
import torch

import surgery.search as search
from cli.main import main
from surgery.checkpoint import open_checkpoint
from surgery.methods import RunOptions
from surgery.methods.antidote import Antidote, PruneOptions
from surgery.methods.base import Context, Edit, Prepared, Strength
from surgery.model import load_model


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
        raise SystemExit(0)
    return e.value.code, capsys.readouterr()


class Scale(Prepared):
    """Multiplies one o_proj by (1 - s): a real edit whose figures the fake measurer plants."""

    def __init__(self, name):
        self.name = name

    def at(self, s):
        return Edit(lambda n, w: (w.float() * (1 - s)).to(w.dtype) if n == self.name else w, touched=[self.name])


class Knob:
    name, repair_metric = "toy", "harmful_score"

    def __init__(self, low=0.01, high=0.9, log=True, stronger="higher"):
        self.strength = Strength("factor", low, high, log=log, stronger=stronger)


class Tried(list):
    """The strengths (or states) a planted search measured, in order, and how many times it measured the baseline."""

    baselines = 0


def planted(monkeypatch, curve, metric="harmful_score", read=lambda point: point.strength):
    """Replace the measurement by `curve(read(point)) -> (perplexity_ratio, metric)`, budget x1.3; record what was read
    (by default the candidate's strength)."""
    tried = Tried()

    class Fake:
        def __init__(self, ctx, prepared, run, metric_):
            self.baseline = {}

        def prompts(self):
            return {"held-out": 4}

        def measure_baseline(self):
            tried.baselines += 1
            self.baseline.update(perplexity=10.0, over_refusal=0.0, **{metric: 1.0})
            return self.baseline

        def measure(self, point):
            seen = read(point)
            tried.append(seen)
            ratio, value = curve(seen)
            point.figures.update(perplexity_ratio=ratio, kl=0.0, over_refusal_points=0.0, **{metric: value})
            if ratio > 1.3:
                point.broken.append("perplexity")

    monkeypatch.setattr(search, "Measurer", Fake)
    return tried


def context(ckpt, **run):
    return Context(open_checkpoint(ckpt), {}, RunOptions(max_perplexity_ratio=1.3, **run), "cpu", searching=True)


def test_search_returns_the_strongest_strength_inside_a_planted_budget(monkeypatch, tiny_ckpt):
    tried = planted(monkeypatch, lambda s: (1 + s, 1 - s))  # budget x1.3: boundary at s = 0.3
    ctx = context(tiny_ckpt, min_improvement=0.0)
    result = search.search_strength(Knob(), ctx, Scale("model.layers.0.self_attn.o_proj.weight"), ctx.run)
    assert result.failed is None
    assert 0.3 * 0.8 < result.chosen <= 0.3  # bisection on a log scale from [0.01, 0.9]: 6 steps within 20 %
    assert tried[:2] == [0.9, 0.01] and len(tried) == 2 + ctx.run.search_steps
    assert all(p.within == (p.strength <= 0.3) for p in result.points)


def test_target_stops_at_the_weakest_strength_that_reaches_it(monkeypatch, tiny_ckpt):
    planted(monkeypatch, lambda s: (1.0, 1 - s))  # harmful = 1 - s, budget never broken
    ctx = context(tiny_ckpt, target_harmful_score=0.6, min_improvement=0.0)
    result = search.search_strength(Knob(), ctx, Scale("model.layers.0.self_attn.o_proj.weight"), ctx.run)
    assert result.failed is None and 0.4 <= result.chosen < 0.4 * 1.25  # harmful <= 0.6 needs s >= 0.4


def test_a_knob_whose_lower_values_are_stronger_is_searched_from_the_top(monkeypatch, tiny_ckpt):
    planted(monkeypatch, lambda a: (1 + (1 - a), a))  # EigenShift-like alpha: budget x1.3 holds for a >= 0.7
    ctx = context(tiny_ckpt, min_improvement=0.0)
    result = search.search_strength(Knob(low=0.0, high=0.95, log=False, stronger="lower"), ctx,
                                    Scale("model.layers.0.self_attn.o_proj.weight"), ctx.run)
    assert result.points[0].strength == 0.95 and 0.7 <= result.chosen < 0.72


def test_nothing_inside_the_budget_fails_with_the_best_point(monkeypatch, tiny_ckpt):
    planted(monkeypatch, lambda s: (2.0, 0.0))
    ctx = context(tiny_ckpt)
    result = search.search_strength(Knob(), ctx, Scale("model.layers.0.self_attn.o_proj.weight"), ctx.run)
    assert result.failed and "stays inside the budget" in result.failed and result.chosen == 0.01


@pytest.mark.parametrize("task_items, accuracy_drop, warned", [(48, 2.0, True), (48, 2.5, False), (200, 2.0, False),
                                                             (20, 4.0, True)])
def test_the_search_says_when_a_budget_line_is_finer_than_one_item(task_items, accuracy_drop, warned):
    result = search.SearchResult("ratio", "harmful_score", {}, [], 0.1, "", {"max_over_refusal_points": 10.0,
                                 "max_accuracy_drop_points": accuracy_drop}, prompts={"harmless": 48, "task": task_items})
    lines = result.resolution()
    assert lines[0] == f"held-out sets: 48 harmless (one = 2.1 points), {task_items} task (one = {100 / task_items:.1f} points)"
    notes = [line for line in lines[1:] if "--max-accuracy-drop" in line]
    assert bool(notes) == warned and not any("--max-over-refusal" in line for line in lines)  # 10 points > 2.1
    assert result.to_json()["resolution"] == lines


def test_the_held_out_counts_name_the_methods_own_repair_set(tiny_ckpt):
    class Toxic(Scale):
        def repair_prompts(self):
            return 24

    ctx = context(tiny_ckpt)
    assert search.Measurer(ctx, Toxic("x"), ctx.run, "toxicity").prompts() == {"harmless": 48, "toxic": 24}
    assert search.Measurer(ctx, Scale("x"), ctx.run, "harmful_score").prompts() == {"harmless": 48, "harmful": 48}


def test_candidates_leave_the_model_bit_identical(tiny_ckpt, harmful_file):
    ckpt = open_checkpoint(tiny_ckpt)
    model = load_model(ckpt, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = Context(ckpt, {}, RunOptions(), "cpu", searching=True)
    prepared = Antidote().prepare(ctx, PruneOptions(ratio="auto", data=str(harmful_file), max_new_tokens=4, device="cpu"))
    ctx._model = model
    for ratio in (0.5, 0.1):
        with search.applied(model, ckpt, prepared.at(ratio)):
            changed = sum(not torch.equal(before[k], v) for k, v in model.state_dict().items())
            assert changed == 14  # every decoder Linear is pruned while the candidate is applied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_statistics_are_computed_once_per_search(monkeypatch, tiny_ckpt, harmful_file, tmp_path, capsys):
    import surgery.methods.antidote as antidote

    calls = []
    real = antidote.collect_norms
    monkeypatch.setattr(antidote, "collect_norms", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, cap = run(["prune", tiny_ckpt, "-o", tmp_path / "out", "--ratio", "auto", "--data", harmful_file, "--device", "cpu",
                     "--max-new-tokens", "4", "--search-samples", "4", "--search-tokens", "2", "--min-improvement", "0",
                     "--max-kl", "1e-5"], capsys)
    report = json.loads((tmp_path / "out" / "surgery.json").read_text())["report"]
    found = report["search"]
    # both ends measured (the budget breaks at each: one weight per row of a 32-wide matrix already moves the KL),
    # one calibration; bisection itself is tested on planted curves above
    assert len(found["candidates"]) >= 2 and calls == [1]
    chosen = antidote.plan_modules(open_checkpoint(tiny_ckpt), PruneOptions(), found["chosen"])
    assert report["weights_removed"] == chosen.removed  # the count at the chosen ratio, not at the first one tried
    assert code == 1 and (tmp_path / "out" / "search.png").is_file()  # nothing inside the planted budget: exit 1, plot kept


def test_no_repair_inside_the_budget_exits_1_with_one_line(tiny_ckpt, harmful_file, tmp_path, capsys):
    """A random tiny model refuses nothing before or after: the search must say there is no repair."""
    code, cap = run(["prune", tiny_ckpt, "-o", tmp_path / "out", "--ratio", "auto", "--data", harmful_file, "--device", "cpu",
                     "--max-new-tokens", "4", "--search-samples", "4", "--search-tokens", "2"], capsys)
    failed = [line for line in cap.err.splitlines() if line.startswith("failed:")]
    assert code == 1 and len(failed) == 1 and "no repair" in failed[0] and "Traceback" not in cap.err
    assert json.loads((tmp_path / "out" / "surgery.json").read_text())["failed"]


def test_auto_with_dry_run_or_stream_is_refused_up_front(tiny_ckpt, harmful_file, tmp_path, capsys):
    for extra, message in [(["--dry-run"], "--dry-run shows a fixed strength"), (["--stream"], "not with --stream")]:
        code, cap = run(["prune", tiny_ckpt, "-o", tmp_path / "out", "--ratio", "auto", "--data", harmful_file, *extra], capsys)
        assert code == 2 and message in cap.err and not (tmp_path / "out").exists()
    code, cap = run(["prune", tiny_ckpt, "-o", tmp_path / "out", "--ratio", "lots"], capsys)
    assert code == 2 and "--ratio must be a number or 'auto'" in cap.err


class FakeShift(Prepared):
    """EigenShift's statistics stood in for: the edit does nothing, the planted curve reads (k, alpha)."""

    k_free = True

    def __init__(self, rank=100):
        from types import SimpleNamespace

        self.d, self.k, self.state = SimpleNamespace(rank=rank), None, None

    def use(self, k):
        self.k = k

    def at(self, alpha):
        self.state = (self.k, alpha)
        return Edit(lambda n, w: w, touched=[])


def planted_shift(monkeypatch, prepared, curve):
    """The measurement as `curve(k, alpha) -> (perplexity_ratio, toxicity)`, budget x1.3; records each (k, alpha)."""
    return planted(monkeypatch, lambda state: curve(*state), "toxicity", lambda point: prepared.state)


def test_eigenshift_alpha_auto_chooses_k_first_with_the_components_removed(monkeypatch, tiny_ckpt):
    from surgery.methods.eigenshift import EigenShift

    prepared = FakeShift(rank=100)
    tried = planted_shift(monkeypatch, prepared, lambda k, a: (1 + k * (1 - a) / 50, 1 - k * (1 - a) / 100))
    ctx = context(tiny_ckpt, min_improvement=0.0)
    result = EigenShift().search(ctx, prepared, ctx.run)
    stage = result.before[0]
    assert stage.knob == "k" and all(float(p.strength).is_integer() for p in stage.points)
    assert {a for _, a in tried} == {0.0} and tried[0] == (25, 0.0)  # stage 1 only, from 25 % of the rank
    assert stage.chosen == 15 and prepared.k == 15  # k·1/50 <= 0.3: the most components inside the budget
    assert result.knob == "alpha" and result.chosen == 0.0 and result.failed is None
    assert result.to_json()["stages"][0]["chosen"] == 15


def test_eigenshift_alpha_auto_falls_back_to_alpha_at_one_component(monkeypatch, tiny_ckpt):
    from surgery.methods.eigenshift import EigenShift

    prepared = FakeShift(rank=100)
    tried = planted_shift(monkeypatch, prepared, lambda k, a: (1 + 0.5 * k * (1 - a), 1 - 0.1 * k * (1 - a)))
    ctx = context(tiny_ckpt, min_improvement=0.0)
    result = EigenShift().search(ctx, prepared, ctx.run)
    assert result.before[0].failed is not None and prepared.k == 1  # even one component removed breaks x1.3
    assert result.knob == "alpha" and result.failed is None and 0.4 <= result.chosen < 0.45  # 1 + 0.5(1 - a) <= 1.3
    # the two stages share one baseline, and k 1 at alpha 0 (stage 1's point, stage 2's strong end) is measured once
    assert tried.baselines == 1 and tried.count((1, 0.0)) == 1
    assert any(p.strength == 0.0 and not p.within for p in result.points)  # still reported, with its figures
