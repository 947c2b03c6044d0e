"""`surgery repair`: every applicable method searched under one budget on one shared model; the best is written."""

import json

import pytest
import torch

import surgery.search as search
from cli.main import main
from surgery.methods.ablation import PreparedAblation
from surgery.methods.antidote import PreparedPrune

from .conftest import folder_hashes


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
        raise SystemExit(0)
    return e.value.code, capsys.readouterr()


def planted(monkeypatch, harmful_after: dict):
    """Each method's candidates reach a planted held-out harmful score (the input's is 0.9), budget always kept. `surgery
    repair` makes one measurer for every candidate (returned: the list of those made): the score follows the candidate
    being searched (`prepared`, set by the search)."""
    made = []

    class Fake:
        baselines = 0  # how many times the unedited model was measured, over every Fake made

        def __init__(self, ctx, prepared, run, metric, **kw):
            self.baseline, self.prepared, self.anchor = {}, prepared, kw.get("anchor")
            made.append(self)

        def adopt(self, other):
            self.baseline = dict(other.baseline)

        @property
        def after(self):
            kind = (
                "prune"
                if isinstance(self.prepared, PreparedPrune)
                else "ablate"
                if isinstance(self.prepared, PreparedAblation)
                else "?"
            )
            return harmful_after.get(kind, 0.8)  # another method: a planted score that never wins

        def prompts(self):
            return {"harmful": 4, "harmless": 4}

        def measure_baseline(self):
            Fake.baselines += 1
            self.baseline.update(perplexity=10.0, over_refusal=0.0, harmful_score=0.9)
            return self.baseline

        def measure(self, point):
            point.figures.update(perplexity_ratio=1.1, kl=0.01, over_refusal_points=0.0, harmful_score=self.after)

        def confirm(self, point):
            point.confirmed = True

    monkeypatch.setattr(search, "Measurer", Fake)
    return made


def test_repair_writes_the_method_with_the_lowest_held_out_harmful_score(monkeypatch, make_ckpt, tmp_path, capsys):
    import surgery.health
    import surgery.methods.ablation
    import surgery.methods.base
    import surgery.model

    model, ref = make_ckpt("model"), make_ckpt("ref")
    before = folder_hashes(model), folder_hashes(ref)
    loads = []
    real = surgery.model.load_model
    for module in (surgery.methods.base, surgery.methods.ablation, surgery.health):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: loads.append(a[0].path.name) or real(*a, **k))
    made = planted(monkeypatch, {"prune": 0.2, "ablate": 0.5})
    code, cap = run(
        ["repair", model, "-o", tmp_path / "out", "--reference", ref, "--device", "cpu", "--search-steps", "1"]
        + ["--methods", "prune-restore,interpolate,safe-delta"],
        capsys,
    )
    assert len(made) == 1 and made[0].anchor is not None  # one measurer (one baseline) for all, KL to the reference too
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert code == 0, cap.err
    assert manifest["method"] == "antidote-prune" and manifest["arguments"]["reference"] == str(ref)
    tried = {c["candidate"]: c for c in manifest["report"]["repair"]["candidates"]}
    assert set(tried) == {"prune-restore", "interpolate", "safe-delta"}
    assert manifest["report"]["repair"]["chosen"] == "prune-restore"
    assert (tmp_path / "out" / "repair.png").is_file()
    assert (folder_hashes(model), folder_hashes(ref)) == before
    # MODEL loaded once for every candidate (the reference is read tensor by tensor); the check loads input and output
    # (the check reads the output in its staged folder, .out.surgery-tmp-*, before the rename)
    assert sorted("out" if n.startswith(".out.") else n for n in loads) == sorted(["model", "model", "out"])


def test_with_a_reference_the_default_candidates_are_interpolation_safe_delta_regmean_and_with_unaligned_revert(
    make_ckpt,
):
    """The candidates dominated on the demonstration pair (prune-restore, resta) and the ablations' layer scans are
    tried only when --methods names them."""
    from surgery.repair import RepairOptions, candidates

    ref, base = make_ckpt("ref"), make_ckpt("base")
    labels = lambda **kw: [c.label for c in candidates(RepairOptions(**kw))]  # noqa: E731
    assert labels(reference=ref) == ["interpolate", "safe-delta", "regmean"]
    assert sorted(labels(reference=ref, unaligned=base)) == ["interpolate", "regmean", "revert", "safe-delta"]
    named = ["prune-restore", "resta", "ablate", "revert"]
    assert sorted(labels(reference=ref, unaligned=base, methods=named)) == sorted(named)
    assert labels() == ["prune", "ablate"]  # no reference: the model's own repairs


@pytest.mark.parametrize(
    "runner_up, finalists", [(0.3, ["ablate", "prune-restore"]), (0.5, ["prune-restore"])], ids=["close", "far behind"]
)
def test_repair_screens_every_candidate_and_confirms_only_the_finalists(
    monkeypatch, make_ckpt, tmp_path, capsys, runner_up, finalists
):
    """Five candidates, the ablations named by --methods: each is screened on its cheap figures without generation; the
    best (prune-restore 0.2) is a finalist, and the runner-up (an ablation) too when it is within RUNNER_UP_MARGIN
    (15 points) of it; the finalists' choices alone are confirmed."""
    from surgery import repair

    model, ref = make_ckpt("model"), make_ckpt("ref")
    planted(monkeypatch, {"prune": 0.2, "ablate": runner_up})
    confirmed = []
    real_finish = repair.finish

    def finish(todo, run, say):
        real_finish(todo, run, say)
        confirmed.extend(c.label for c in todo if c.finalist)

    monkeypatch.setattr(repair, "finish", finish)
    methods = "prune-restore,ablate,ablate-from-reference,interpolate,safe-delta"
    argv = ["repair", model, "-o", tmp_path / "out", "--reference", ref, "--device", "cpu", "--methods", methods]
    code, cap = run(argv, capsys)
    assert code == 0, cap.err
    found = json.loads((tmp_path / "out" / "surgery.json").read_text())["report"]["repair"]
    tried = {c["candidate"]: c for c in found["candidates"]}
    assert set(tried) == set(methods.split(","))
    assert sorted(confirmed) == finalists and found["chosen"] == "prune-restore"
    assert {k for k, c in tried.items() if c["confirmed"]} == set(finalists)
    for label in tried:  # a log gets one line when each candidate's screening ends, with its proxy choice
        ends = [line for line in cap.err.splitlines() if f" {label}] screened in " in line]
        assert len(ends) == 1 and "harmful proxy" in ends[0], (label, ends)
        if label not in confirmed:  # not refined since: the report's choice is the screening's
            assert f"{tried[label]['knob']} {tried[label]['chosen']:g}," in ends[0], ends[0]
    # a screened candidate has no generated point; a finalist has exactly its chosen point confirmed
    points = found["points"]
    assert not any(p["confirmed"] for p in points if p["candidate"] not in confirmed)
    for label in confirmed:
        assert [p["strength"] for p in points if p["candidate"] == label and p["confirmed"]] == [tried[label]["chosen"]]


def test_repair_gate_fails_when_no_method_reaches_the_bar(monkeypatch, tiny_ckpt, tmp_path, capsys):
    planted(monkeypatch, {"prune": 0.6, "ablate": 0.4})
    code, cap = run(
        [
            "repair",
            tiny_ckpt,
            "-o",
            tmp_path / "out",
            "--device",
            "cpu",
            "--search-steps",
            "1",
            "--max-harmful-score",
            "0.3",
        ],
        capsys,
    )
    failed = [line for line in cap.err.splitlines() if line.startswith("failed:")]
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert code == 1 and len(failed) == 1 and "above --max-harmful-score 30.0%" in failed[0]
    assert manifest["method"] == "direction-ablation" and manifest["failed"]  # the best found, written and marked


def test_repair_refuses_unknown_or_unusable_candidates_up_front(tiny_ckpt, tmp_path, capsys):
    for extra, message in [
        (["--methods", "magic"], "no candidate 'magic'"),
        (["--methods", "prune-restore"], "it needs --reference"),
        (["--methods", "edit"], "it needs --probe"),
    ]:
        code, cap = run(["repair", tiny_ckpt, "-o", tmp_path / "out", *extra], capsys)
        assert code == 2 and message in cap.err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "planted_scores, chosen",
    [({"prune": 0.2, "ablate": 0.5}, "prune-adapter"), ({"prune": 0.6, "ablate": 0.3}, "ablate")],
)
def test_repair_on_an_adapter_prunes_the_adapter_or_writes_base_plus_adapter_merged(
    monkeypatch, tiny_ckpt, tmp_path, capsys, planted_scores, chosen
):
    from .conftest import file_adapter

    adapter = file_adapter(tiny_ckpt, tmp_path / "adapter")
    before = folder_hashes(tiny_ckpt), folder_hashes(adapter)
    made = planted(monkeypatch, planted_scores)
    code, cap = run(
        [
            "repair",
            tiny_ckpt,
            "--adapter",
            adapter,
            "-o",
            tmp_path / "out",
            "--device",
            "cpu",
            "--search-steps",
            "1",
            "--no-check",
        ],
        capsys,
    )
    assert code == 0, cap.err
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    tried = {c["candidate"] for c in manifest["report"]["repair"]["candidates"]}
    assert tried == {"prune-adapter", "ablate"} and manifest["report"]["repair"]["chosen"] == chosen
    # two measurers (the adapter's LoRA matrices, base + adapter merged) of one unedited model: one baseline
    assert len(made) == 2 and type(made[0]).baselines == 1
    written = {p.name for p in (tmp_path / "out").iterdir()}
    if chosen == "prune-adapter":  # the adapter's LoRA matrices pruned: an adapter folder, the same config
        assert "adapter_model.safetensors" in written and "model.safetensors" not in written
        assert (tmp_path / "out" / "adapter_config.json").read_text() == (adapter / "adapter_config.json").read_text()
    else:  # base + adapter merged, then ablated: a full checkpoint naming the adapter
        assert "model.safetensors" in written and manifest["adapter"] == str(adapter.resolve())
    assert (folder_hashes(tiny_ckpt), folder_hashes(adapter)) == before


def test_pick_writes_the_same_tensors_as_a_fresh_fixed_strength_run(monkeypatch, make_ckpt, tmp_path, capsys):
    """Every measured point is numbered in surgery.json; --pick N --from writes point N's method at its strength without
    searching, tensor for tensor what that method writes at that fixed strength."""
    from safetensors.torch import load_file

    model, ref = make_ckpt("model"), make_ckpt("ref", seed=1)
    made = planted(monkeypatch, {"prune": 0.2, "ablate": 0.5})
    code, cap = run(
        [
            "repair",
            model,
            "-o",
            tmp_path / "searched",
            "--reference",
            ref,
            "--device",
            "cpu",
            "--search-steps",
            "1",
            "--methods",
            "prune-restore,ablate",
            "--no-check",
        ],
        capsys,
    )
    assert code == 0, cap.err
    points = json.loads((tmp_path / "searched" / "surgery.json").read_text())["report"]["repair"]["points"]
    assert [p["n"] for p in points] == list(range(1, len(points) + 1)) and {p["candidate"] for p in points} == {
        "prune-restore",
        "ablate",
    }
    assert all("figures" in p and "confirmed" in p for p in points) and "every measured point" in cap.out
    # a prune-restore point that was not the chosen one
    n = next(p["n"] for p in points if p["candidate"] == "prune-restore" and not p["chosen"])
    ratio = points[n - 1]["strength"]
    code, cap = run(
        [
            "repair",
            model,
            "-o",
            tmp_path / "picked",
            "--reference",
            ref,
            "--device",
            "cpu",
            "--pick",
            n,
            "--from",
            tmp_path / "searched",
            "--no-check",
        ],
        capsys,
    )
    assert code == 0, cap.err
    assert len(made) == 1  # nothing measured: no measurer made for the pick
    manifest = json.loads((tmp_path / "picked" / "surgery.json").read_text())
    assert manifest["method"] == "antidote-prune" and manifest["arguments"]["ratio"] == ratio
    assert manifest["report"]["repair"]["picked"]["n"] == n and "search" not in manifest["report"]
    code, cap = run(
        [
            "prune",
            model,
            "-o",
            tmp_path / "fixed",
            "--reference",
            ref,
            "--ratio",
            ratio,
            "--device",
            "cpu",
            "--no-check",
        ],
        capsys,
    )
    assert code == 0, cap.err
    picked, fixed = (
        load_file(tmp_path / "picked" / "model.safetensors"),
        load_file(tmp_path / "fixed" / "model.safetensors"),
    )
    assert picked.keys() == fixed.keys() and all(torch.equal(picked[k], fixed[k]) for k in fixed)
    assert any(not torch.equal(picked[k], v) for k, v in load_file(model / "model.safetensors").items())  # it repaired
    for extra, message in [
        (["--pick", "1"], "--pick N and --from PATH go together"),
        (["--pick", "999", "--from", tmp_path / "searched"], "numbers its points 1 to"),
        (["--pick", "1", "--from", tmp_path / "nowhere.json"], "cannot read it"),
    ]:
        code, cap = run(["repair", model, "-o", tmp_path / "bad", "--reference", ref, *extra], capsys)
        assert code == 2 and message in cap.err and not (tmp_path / "bad").exists()
    code, cap = run(
        ["repair", make_ckpt("other"), "-o", tmp_path / "bad", "--pick", "1", "--from", tmp_path / "searched"], capsys
    )
    assert code == 2 and "not " in cap.err and "run `surgery repair` on this model first" in cap.err


def test_prune_restore_and_revert_share_one_calibration(monkeypatch, make_ckpt, tmp_path, capsys):
    """Both need the input norms over the model's own answers to the harmful calibration prompts: generated and
    calibrated once, reused by the second candidate."""
    import surgery.methods.antidote as antidote

    model, ref, base = make_ckpt("model"), make_ckpt("ref", seed=1), make_ckpt("base", seed=2)
    calls = {"norms": 0, "answers": 0}
    real_norms, real_fill = antidote.collect_norms, antidote.fill_responses
    monkeypatch.setattr(
        antidote, "collect_norms", lambda *a, **k: calls.__setitem__("norms", calls["norms"] + 1) or real_norms(*a, **k)
    )
    monkeypatch.setattr(
        antidote,
        "fill_responses",
        lambda *a, **k: calls.__setitem__("answers", calls["answers"] + 1) or real_fill(*a, **k),
    )
    planted(monkeypatch, {"prune": 0.2})
    code, cap = run(
        [
            "repair",
            model,
            "-o",
            tmp_path / "out",
            "--reference",
            ref,
            "--unaligned",
            base,
            "--device",
            "cpu",
            "--search-steps",
            "1",
            "--methods",
            "prune-restore,revert",
            "--no-check",
        ],
        capsys,
    )
    assert code == 0, cap.err
    tried = json.loads((tmp_path / "out" / "surgery.json").read_text())["report"]["repair"]["candidates"]
    assert [c["candidate"] for c in tried] == ["prune-restore", "revert"] and all(c["error"] is None for c in tried)
    assert calls == {"norms": 1, "answers": 1}
    assert all("prepare_seconds" in c and "search_seconds" in c for c in tried)
