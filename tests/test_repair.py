"""`surgery repair`: every applicable method searched under one budget on one shared model; the best is written."""

import json

import pytest

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
    """Each method's candidates reach a planted held-out harmful score (the input's is 0.9), budget always kept."""

    class Fake:
        def __init__(self, ctx, prepared, run, metric):
            kind = "prune" if isinstance(prepared, PreparedPrune) else "ablate" if isinstance(prepared, PreparedAblation) else "?"
            self.after = harmful_after.get(kind, 0.8)  # another method: a planted score that never wins
            self.baseline = {}

        def prompts(self):
            return {"harmful": 4, "harmless": 4}

        def measure_baseline(self):
            self.baseline.update(perplexity=10.0, over_refusal=0.0, harmful_score=0.9)
            return self.baseline

        def measure(self, point):
            point.figures.update(perplexity_ratio=1.1, kl=0.01, over_refusal_points=0.0, harmful_score=self.after)

    monkeypatch.setattr(search, "Measurer", Fake)


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
    planted(monkeypatch, {"prune": 0.2, "ablate": 0.5})
    code, cap = run(["repair", model, "-o", tmp_path / "out", "--reference", ref, "--device", "cpu",
                     "--search-steps", "1"], capsys)
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert code == 0, cap.err
    assert manifest["method"] == "antidote-prune" and manifest["arguments"]["reference"] == str(ref)
    tried = {c["candidate"]: c for c in manifest["report"]["repair"]["candidates"]}
    assert set(tried) == {"prune-restore", "ablate", "ablate-from-reference", "interpolate", "safe-delta"}
    assert manifest["report"]["repair"]["chosen"] == "prune-restore"
    assert (tmp_path / "out" / "repair.png").is_file()
    assert (folder_hashes(model), folder_hashes(ref)) == before
    # MODEL loaded once for every candidate; the reference once more for its direction; the check loads input and output.
    assert sorted(loads) == sorted(["model", "ref", "model", "out"])


def test_repair_gate_fails_when_no_method_reaches_the_bar(monkeypatch, tiny_ckpt, tmp_path, capsys):
    planted(monkeypatch, {"prune": 0.6, "ablate": 0.4})
    code, cap = run(["repair", tiny_ckpt, "-o", tmp_path / "out", "--device", "cpu", "--search-steps", "1",
                     "--max-harmful-score", "0.3"], capsys)
    failed = [line for line in cap.err.splitlines() if line.startswith("failed:")]
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert code == 1 and len(failed) == 1 and "above --max-harmful-score 30.0%" in failed[0]
    assert manifest["method"] == "direction-ablation" and manifest["failed"]  # the best found, written and marked


def test_repair_refuses_unknown_or_unusable_candidates_up_front(tiny_ckpt, tmp_path, capsys):
    for extra, message in [(["--methods", "magic"], "no candidate 'magic'"),
                           (["--methods", "prune-restore"], "it needs --reference"), (["--methods", "edit"], "it needs --probe")]:
        code, cap = run(["repair", tiny_ckpt, "-o", tmp_path / "out", *extra], capsys)
        assert code == 2 and message in cap.err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("planted_scores, chosen", [({"prune": 0.2, "ablate": 0.5}, "prune-adapter"),
                                                    ({"prune": 0.6, "ablate": 0.3}, "ablate")])
def test_repair_on_an_adapter_prunes_the_adapter_or_writes_base_plus_adapter_merged(monkeypatch, tiny_ckpt, tmp_path,
                                                                                    capsys, planted_scores, chosen):
    from .test_adapter import file_adapter

    adapter = file_adapter(tiny_ckpt, tmp_path / "adapter")
    before = folder_hashes(tiny_ckpt), folder_hashes(adapter)
    planted(monkeypatch, planted_scores)
    code, cap = run(["repair", tiny_ckpt, "--adapter", adapter, "-o", tmp_path / "out", "--device", "cpu",
                     "--search-steps", "1", "--no-check"], capsys)
    assert code == 0, cap.err
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    tried = {c["candidate"] for c in manifest["report"]["repair"]["candidates"]}
    assert tried == {"prune-adapter", "ablate"} and manifest["report"]["repair"]["chosen"] == chosen
    written = {p.name for p in (tmp_path / "out").iterdir()}
    if chosen == "prune-adapter":  # the adapter's LoRA matrices pruned: an adapter folder, the same config
        assert "adapter_model.safetensors" in written and "model.safetensors" not in written
        assert (tmp_path / "out" / "adapter_config.json").read_text() == (adapter / "adapter_config.json").read_text()
    else:  # base + adapter merged, then ablated: a full checkpoint naming the adapter
        assert "model.safetensors" in written and manifest["adapter"] == str(adapter.resolve())
    assert (folder_hashes(tiny_ckpt), folder_hashes(adapter)) == before
