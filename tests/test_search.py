"""Automatic strength: the search finds the planted boundary, computes statistics once, undoes every
candidate exactly, and fails loudly when nothing repairs inside the budget."""

import json

import pytest
import torch

import surgery.metrics as metrics
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
    """The strengths (or states) a planted search measured, in order, how many times it measured the baseline, and the
    points it confirmed by generation."""

    baselines = 0

    def __init__(self):
        super().__init__()
        self.confirmed = []


def planted(monkeypatch, curve, metric="harmful_score", read=lambda point: point.strength, generated=None):
    """Replace the measurement by `curve(read(point)) -> (perplexity_ratio, metric)`, budget x1.3 (an exact line, as
    perplexity is); record what was read (by default the candidate's strength). Confirmation plants
    `generated(read(point)) -> figures` (default: the proxy's figures stand) and judges the budget on them."""
    tried = Tried()

    class Fake:
        def __init__(self, ctx, prepared, run, metric_, **kw):
            self.baseline, self.run = {}, run

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
                point.breaks("perplexity", "perplexity")

        def confirm(self, point):
            tried.confirmed.append(read(point))
            if generated is not None:
                point.figures.update(generated(read(point)))
                search.judge(point, self.run)
            point.confirmed = True

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
    assert tried[:2] == [0.01, 0.9] and len(tried) == 2 + ctx.run.search_steps  # the weakest first, then the strongest
    assert all(p.within == (p.strength <= 0.3) for p in result.points)
    # confirmed: the chosen point alone; its stronger neighbour breaks perplexity (exact): not generated, and the
    # weaker one (it repairs less) is not generated while the choice passes
    ordered = [p.strength for p in result.points]
    i = ordered.index(result.chosen)
    assert tried.confirmed == [result.chosen]
    assert result.bound.startswith("perplexity: the next stronger point") and str(ordered[i + 1])[:5] in result.bound


def test_generation_overrules_the_proxy_among_the_confirmed_points(monkeypatch, tiny_ckpt):
    """The proxy's choice over-refuses when its answers are generated: its weaker neighbour, confirmed inside, is chosen."""
    tried = planted(
        monkeypatch,
        lambda s: (1 + s, 1 - s),
        generated=lambda s: {"over_refusal_points": 20.0 if s > 0.2 else 0.0, "harmful_score": 1 - s / 2},
    )
    ctx = context(tiny_ckpt, min_improvement=0.0)
    result = search.search_strength(Knob(), ctx, Scale("model.layers.0.self_attn.o_proj.weight"), ctx.run)
    by = {p.strength: p for p in result.points}
    proxy_choice = max(s for s, p in by.items() if not p.proxy_broken)  # 0.2922: the strongest inside on the proxy
    assert 0.29 < proxy_choice < 0.3 and not by[proxy_choice].within and by[proxy_choice].confirmed
    assert "over-refusal +20.0 points > +10" in by[proxy_choice].broken
    weaker = max(s for s in by if s < proxy_choice)
    assert result.chosen == weaker and result.failed is None and by[weaker].confirmed
    assert result.chosen_point().figures["harmful_score"] == pytest.approx(1 - weaker / 2)  # the generated figure
    assert len(tried.confirmed) == 2  # the stronger neighbour breaks perplexity (exact): never generated
    assert result.to_json()["candidates"][0]["confirmed"] is False  # every point says whether it was generated


def test_target_stops_at_the_weakest_strength_that_reaches_it(monkeypatch, tiny_ckpt):
    planted(monkeypatch, lambda s: (1.0, 1 - s))  # harmful = 1 - s, budget never broken
    ctx = context(tiny_ckpt, target_harmful_score=0.6, min_improvement=0.0)
    result = search.search_strength(Knob(), ctx, Scale("model.layers.0.self_attn.o_proj.weight"), ctx.run)
    assert result.failed is None and 0.4 <= result.chosen < 0.4 * 1.25  # harmful <= 0.6 needs s >= 0.4


def test_a_knob_whose_lower_values_are_stronger_is_searched_from_the_top(monkeypatch, tiny_ckpt):
    planted(monkeypatch, lambda a: (1 + (1 - a), a))  # EigenShift-like alpha: budget x1.3 holds for a >= 0.7
    ctx = context(tiny_ckpt, min_improvement=0.0)
    result = search.search_strength(
        Knob(low=0.0, high=0.95, log=False, stronger="lower"),
        ctx,
        Scale("model.layers.0.self_attn.o_proj.weight"),
        ctx.run,
    )
    assert result.points[0].strength == 0.95 and 0.7 <= result.chosen < 0.72


def test_nothing_inside_the_budget_fails_with_the_best_point(monkeypatch, tiny_ckpt):
    tried = planted(monkeypatch, lambda s: (2.0, 0.0))
    ctx = context(tiny_ckpt)
    result = search.search_strength(Knob(), ctx, Scale("model.layers.0.self_attn.o_proj.weight"), ctx.run)
    assert result.failed and "stays inside the budget" in result.failed and result.chosen == 0.01
    assert tried == [0.01] and tried.confirmed == []  # the weakest breaks an exact line: one measurement, no generation


def test_a_method_broken_at_its_weakest_costs_one_cheap_measurement(tiny_ckpt):
    """Real measurement on the tiny model: the weakest edit (o_proj halved) already moves the KL past a planted 1e-6, so the
    search stops after that one candidate, which costs one perplexity pass and the first-token pass with its openings'
    continuation (which gives the over-refusal proxy too; 4 prompts: one batch each)."""
    ctx = context(tiny_ckpt, max_kl=1e-6, search_samples=4, search_tokens=2)
    result = search.search_strength(Knob(low=0.5), ctx, Scale("model.layers.0.self_attn.o_proj.weight"), ctx.run)
    assert [p.strength for p in result.points] == [0.5] and result.points[0].lines == ["kl"]
    assert result.forward_passes == 3 and not result.points[0].confirmed
    # perplexity, then the harmless (first-token distribution and over-refusal proxy) and harmful refusal proxies, each
    # the prompts and then the openings' continuation
    assert ctx.measurer.baseline_passes == 5
    assert ctx.forward_passes == 5 + 3 and "harmful_score" not in result.baseline  # nothing was generated
    assert result.failed and "KL" in result.failed


@pytest.mark.parametrize("split", [True, False], ids=["common-prefix-shared", "whole-prompts"])
def test_refusal_probability_is_the_teacher_forced_probability_of_the_openings(tiny_ckpt, monkeypatch, split):
    from surgery.prompts import chat_text

    # split: the batch's common prefix runs once and the rest on its cache (every length); else each prompt whole
    monkeypatch.setattr(metrics, "SHARED_PREFIX_MIN", 1 if split else 10**9)
    ctx = context(tiny_ckpt)
    model, tok = ctx.model(), ctx.tokenizer()
    openings = search.refusal_openings(tok)
    assert [tok.eos_token_id] in openings and len(openings) >= 5
    assert not any(a != b and b[: len(a)] == a for a in openings for b in openings)  # disjoint events
    prompts = ["hello there, how are you", "how to"]  # different lengths: padding in one batch
    found = search.refusal_probability(model, tok, prompts, batch_size=2)
    for prompt, got in zip(prompts, found):
        ids = tok(chat_text(tok, prompt), add_special_tokens=False)["input_ids"]
        want = 0.0
        for o in openings:
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids + o])).logits[0].float().log_softmax(-1)
            want += float(sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(o)).exp())
        assert got == pytest.approx(want, rel=1e-4)
    assert 0 < found[0] < 1
    # the first-token distribution from the same pass is each prompt's own, run alone
    again, first = search.refusal_probability(model, tok, prompts, batch_size=2, with_first=True)
    assert again == pytest.approx(found, rel=1e-6)
    for row, prompt in zip(first, prompts):
        ids = tok(chat_text(tok, prompt), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        assert torch.allclose(row, alone, atol=1e-4)
    assert torch.allclose(first, metrics.next_token_logprobs(model, tok, prompts, batch_size=2), atol=1e-5)


def test_opening_paths_cover_every_opening_with_the_fewest_paths():
    openings = [[1, 2, 3], [1, 4, 5], [1, 2, 6], [7], [8, 9], [1, 10]]
    paths, where = search.opening_paths(openings)
    assert sorted(paths) == [[1, 2], [1, 4], [8]]  # [1] (of [1, 10]) is a prefix of [1, 2]: not a path of its own
    for o, (path, n) in zip(openings, where):
        assert n == len(o) - 1 and (n == 0 or paths[path][:n] == o[:-1])


def test_kl_is_measured_to_the_nearer_of_the_input_and_the_reference(tmp_path, tiny_ckpt):
    """A planted reference (the input with a sharper output head): taking the candidate all the way back to it is far from
    the fine-tune (KL to the input above --max-kl) and at the reference (KL 0), so the nearer-KL budget accepts what the
    input-KL budget rejects. Perplexity stays relative to the input."""
    from surgery.testing.tiny import save_tiny_checkpoint, tiny_llama

    sharp = tiny_llama(seed=0)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(8.0)
    reference = open_checkpoint(save_tiny_checkpoint(tmp_path / "reference", model=sharp))
    ckpt = open_checkpoint(tiny_ckpt)

    class Back(Prepared):  # W + s (R - W): s = 1 is the reference
        def at(self, s):
            return Edit(lambda n, w: w + s * (reference.read(n) - w), touched=list(ckpt.tensors))

    figures = {}
    for name, refs in (("nearer", {"reference": reference}), ("input only", {})):
        run = RunOptions(
            max_kl=0.05, max_perplexity_ratio=1e9, max_over_refusal=100.0, search_samples=4, search_tokens=2
        )
        ctx = Context(ckpt, refs, run, "cpu", searching=True)
        measurer = search.Measurer(ctx, Back(), run, "harmful_score")
        measurer.measure_baseline()
        point = search.Point(1.0)
        with search.applied(ctx.model(), ckpt, Back().at(1.0)):
            measurer.measure(point)
        figures[name] = point
    nearer, input_only = figures["nearer"], figures["input only"]
    assert nearer.figures["kl_reference"] < 1e-6 < 0.05 < nearer.figures["kl_input"]
    assert nearer.figures["kl"] == nearer.figures["kl_reference"] and nearer.within
    assert "harmful_score_proxy" in nearer.figures  # measured to the end: every cheap line passed
    assert input_only.lines == ["kl"] and "kl_reference" not in input_only.figures
    assert input_only.figures["kl"] == pytest.approx(nearer.figures["kl_input"])
    assert nearer.figures["perplexity_ratio"] == pytest.approx(input_only.figures["perplexity_ratio"])  # to the input


def test_over_refusal_is_counted_from_the_worse_of_the_input_and_the_reference(tmp_path, tiny_ckpt, monkeypatch):
    """A planted reference that refuses 30 % of the harmless prompts (proxy and generated) where the input refuses none:
    the candidate taken all the way back to it refuses as often as the reference did, which is +30 points above the
    input (broken without the reference) and +0 above the worse of the two (inside with it). A candidate refusing 45 %
    is +15 points above both: broken either way."""
    from surgery.testing.tiny import save_tiny_checkpoint, tiny_llama

    sharp = tiny_llama(seed=0)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(8.0)
    reference = open_checkpoint(save_tiny_checkpoint(tmp_path / "reference", model=sharp))
    ckpt = open_checkpoint(tiny_ckpt)
    head = float(ckpt.read("lm_head.weight").float().norm())
    rates = {}  # the planted refusal share, read off the model's output head: x1 (input) 0, x8 (reference) 0.3

    def rate(model):
        return rates.get(round(float(model.lm_head.weight.detach().float().norm()) / head, 1), 0.0)

    real = search.refusal_probability

    def planted_proxy(model, tok, prompts, batch_size=8, with_first=False):
        found = real(model, tok, prompts, batch_size, with_first=with_first)
        share = [rate(model)] * len(prompts)
        return (share, found[1]) if with_first else share

    monkeypatch.setattr(search, "refusal_probability", planted_proxy)
    monkeypatch.setattr(search.Measurer, "_refused", lambda self, prompts, model=None: rate(model or self.model))

    class Head(Prepared):  # the output head scaled by s
        def at(self, s):
            return Edit(lambda n, w: w * s if n == "lm_head.weight" else w, touched=["lm_head.weight"])

    found = {}
    for name, refs in (("with reference", {"reference": reference}), ("input only", {})):
        rates.clear()
        rates.update({1.0: 0.0, 8.0: 0.3, 12.0: 0.45})
        run = RunOptions(max_kl=1e9, max_perplexity_ratio=1e9, max_over_refusal=10.0, search_samples=4, search_tokens=2)
        ctx = Context(ckpt, refs, run, "cpu", searching=True)
        measurer = search.Measurer(ctx, Head(), run, "harmful_score")
        measurer.measure_baseline()
        measurer.measure_generated_baseline()
        for s in (8.0, 12.0):
            point = search.Point(s)
            with search.applied(ctx.model(), ckpt, Head().at(s)):
                measurer.confirm(point)
            found[name, s] = point
        found[name] = measurer.baseline
    with_ref, alone = found["with reference"], found["input only"]
    assert with_ref["over_refusal_proxy_reference"] == pytest.approx(0.3) and with_ref["over_refusal_reference"] == 0.3
    assert "over_refusal_reference" not in alone
    assert found["with reference", 8.0].figures["over_refusal_points"] == pytest.approx(0.0)
    assert found["with reference", 8.0].figures["over_refusal_proxy_points"] == pytest.approx(0.0)
    assert "over_refusal" not in found["with reference", 8.0].lines
    assert found["input only", 8.0].figures["over_refusal_points"] == pytest.approx(30.0)
    assert "over_refusal" in found["input only", 8.0].lines
    assert found["with reference", 12.0].figures["over_refusal_points"] == pytest.approx(15.0)
    assert "over_refusal" in found["with reference", 12.0].lines
    assert any("above the worse of input and reference" in m for m in found["with reference", 12.0].broken)


@pytest.mark.parametrize(
    "task_items, accuracy_drop, warned", [(48, 2.0, True), (48, 2.5, False), (200, 2.0, False), (20, 4.0, True)]
)
def test_the_search_says_when_a_budget_line_is_finer_than_one_item(task_items, accuracy_drop, warned):
    result = search.SearchResult(
        "ratio",
        "harmful_score",
        {},
        [],
        0.1,
        "",
        {"max_over_refusal_points": 10.0, "max_accuracy_drop_points": accuracy_drop},
        prompts={"harmless": 48, "task": task_items},
    )
    lines = result.resolution()
    assert (
        lines[0]
        == f"held-out sets: 48 harmless (one = 2.1 points), {task_items} task (one = {100 / task_items:.1f} points)"
    )
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
    prepared = Antidote().prepare(
        ctx, PruneOptions(ratio="auto", data=str(harmful_file), max_new_tokens=4, device="cpu")
    )
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
    code, cap = run(
        [
            "prune",
            tiny_ckpt,
            "-o",
            tmp_path / "out",
            "--ratio",
            "auto",
            "--data",
            harmful_file,
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
            "--search-samples",
            "4",
            "--search-tokens",
            "2",
            "--min-improvement",
            "0",
            "--max-kl",
            "1e-5",
        ],
        capsys,
    )
    report = json.loads((tmp_path / "out" / "surgery.json").read_text())["report"]
    found = report["search"]
    # the weakest end breaks the budget (one weight per row of a 32-wide matrix already moves the KL): one measurement,
    # one calibration; bisection itself is tested on planted curves above
    assert len(found["candidates"]) == 1 and calls == [1] and found["forward_passes"] == 3
    chosen = antidote.plan_modules(open_checkpoint(tiny_ckpt), PruneOptions(), found["chosen"])
    assert report["weights_removed"] == chosen.removed  # the count at the chosen ratio, not at the first one tried
    assert (
        code == 1 and (tmp_path / "out" / "search.png").is_file()
    )  # nothing inside the planted budget: exit 1, plot kept


def test_no_repair_inside_the_budget_exits_1_with_one_line(tiny_ckpt, harmful_file, tmp_path, capsys):
    """A random tiny model refuses nothing before or after: the search must say there is no repair."""
    code, cap = run(
        [
            "prune",
            tiny_ckpt,
            "-o",
            tmp_path / "out",
            "--ratio",
            "auto",
            "--data",
            harmful_file,
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
            "--search-samples",
            "4",
            "--search-tokens",
            "2",
        ],
        capsys,
    )
    failed = [line for line in cap.err.splitlines() if line.startswith("failed:")]
    assert code == 1 and len(failed) == 1 and "no repair" in failed[0] and "Traceback" not in cap.err
    assert json.loads((tmp_path / "out" / "surgery.json").read_text())["failed"]


def test_auto_with_dry_run_or_stream_is_refused_up_front(tiny_ckpt, harmful_file, tmp_path, capsys):
    for extra, message in [(["--dry-run"], "--dry-run shows a fixed strength"), (["--stream"], "not with --stream")]:
        code, cap = run(
            ["prune", tiny_ckpt, "-o", tmp_path / "out", "--ratio", "auto", "--data", harmful_file, *extra], capsys
        )
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
    assert {a for _, a in tried} == {0.0} and tried[:2] == [
        (1, 0.0),
        (25, 0.0),
    ]  # stage 1 only: 1, then 25 % of the rank
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


def test_task_proxy_counts_an_answer_right_only_when_the_right_label_would_open_it(monkeypatch):
    """Planted first-token distributions over 6 tokens, labels 0 -> tokens {1, 2}, 1 -> token {3}: a prompt is right when
    its label leads the other label and every token that opens no label (greedy would start with the label)."""
    rows = torch.tensor(
        [
            [0.1, 0.5, 0.1, 0.1, 0.1, 0.1],  # label 0 leads everything: right
            [0.5, 0.2, 0.1, 0.1, 0.05, 0.05],  # label 0 leads label 1 (0.3 > 0.1) but token 0 leads it: wrong
            [0.1, 0.1, 0.1, 0.5, 0.1, 0.1],  # label 1 leads, the answer is label 0: wrong
            [0.05, 0.05, 0.05, 0.3, 0.25, 0.3],  # label 1 (0.3) ties the best other token: not more likely, wrong
        ]
    ).log()
    monkeypatch.setattr(search, "next_token_logprobs", lambda *a, **k: rows)
    found = search.label_accuracy(None, None, ["a", "b", "c", "d"], [0, 0, 0, 1], [[1, 2], [3]])
    assert found == pytest.approx(0.25)


def test_the_task_proxy_counts_one_lost_item_as_exactly_one_item(monkeypatch):
    """46 of 48 right against 47 of 48 is one item, 100/48 points: inside a line drawn at one item. float32 means read
    it as 2.0833373 points and broke that line."""
    from surgery.methods import RunOptions

    def rows(lost: int):
        right = torch.tensor([[0.1, 0.8, 0.1]] * (48 - lost) + [[0.1, 0.1, 0.8]] * lost).log()
        return lambda *a, **k: right

    prompts, labels, tokens = ["p"] * 48, [0] * 48, [[1], [2]]
    monkeypatch.setattr(search, "next_token_logprobs", rows(1))
    before = search.label_accuracy(None, None, prompts, labels, tokens)
    monkeypatch.setattr(search, "next_token_logprobs", rows(2))
    after = search.label_accuracy(None, None, prompts, labels, tokens)
    assert (before, after) == (47 / 48, 46 / 48)
    run = RunOptions(task="sst2:builtin", max_accuracy_drop=100 / 48)
    point = search.Point(1.0, {"perplexity_ratio": 1.0, "kl": 0.0, "accuracy_drop_points": 100 * (before - after)})
    search.judge(point, run)
    assert point.within, point.broken


def test_the_task_line_is_the_drop_given_even_where_the_set_cannot_resolve_it():
    """--max-accuracy-drop 2 with 48 task items (one item: 2.08 points): one item lost breaks it, and the report says
    the line is finer than one item; with 200 items 1.5 points are inside and 2.5 are not."""
    from surgery.methods import RunOptions

    run = RunOptions(task="sst2:builtin", max_accuracy_drop=2.0)
    for drop, inside in [(0.0, True), (100 / 48, False), (2.5, False), (1.5, True)]:
        point = search.Point(1.0, {"perplexity_ratio": 1.0, "kl": 0.0, "accuracy_drop_points": drop})
        search.judge(point, run)
        assert point.within is inside, (drop, point.broken)
    result = search.SearchResult(
        "alpha", "harmful_score", {}, [], 1.0, "", {"max_accuracy_drop_points": 2.0}, prompts={"task": 48}
    )
    lines = result.resolution()
    assert any("finer than one of the 48 task items" in x and "one task item lost breaks it" in x for x in lines)


def test_confirmation_stops_at_the_first_generated_line_it_breaks(monkeypatch):
    """The task is generated first (short answers): broken there, neither the harmless nor the harmful answers are
    generated; broken on over-refusal, the harmful ones are not; inside, all three are, and the point is judged on
    them."""
    from surgery.methods import RunOptions

    m = search.Measurer.__new__(search.Measurer)
    m.run, m.metric, m.prepared = RunOptions(task="sst2:builtin"), "harmful_score", None
    m.baseline = {"over_refusal": 0.0, "accuracy": 0.8, "harmful_score": 0.9}
    m.task, m.harmless, m.harmful = (["x"] * 48, [0] * 48), ["h"] * 48, ["b"] * 48
    calls = []
    monkeypatch.setattr(m, "_cheap", lambda point, stop: point.figures.update(perplexity_ratio=1.0, kl=0.0))
    for accuracy, refused, expected in [
        (0.5, 0.05, ["accuracy"]),
        (0.8, 0.5, ["accuracy", "refused"]),
        (0.8, 0.05, ["accuracy", "refused", "repair"]),
    ]:
        calls.clear()
        monkeypatch.setattr(m, "_refused", lambda prompts, r=refused: calls.append("refused") or r)
        monkeypatch.setattr(m, "_accuracy", lambda a=accuracy: calls.append("accuracy") or a)
        monkeypatch.setattr(m, "_repair", lambda: calls.append("repair") or 0.2)
        point = search.Point(1.0)
        m.confirm(point)
        assert calls == expected and point.confirmed
        inside = len(expected) == 3
        assert point.within is inside and ("harmful_score" in point.figures) is inside
