import json

import pytest
import torch

from cli.main import main
from surgery.arch import is_residual_writer, is_token_embedding
from surgery.checkpoint import MANIFEST_NAME, open_checkpoint
from surgery.errors import SurgeryError
from surgery.methods.ablation import (
    AblateOptions,
    ablate_checkpoint,
    auc,
    behaviour_key,
    candidate_layers,
    choose_layer,
    difference_of_means,
    intervened,
    orthogonalise,
    refusal_direction,
)
from surgery.testing.tiny import save_tiny_checkpoint, tiny_llama

from .conftest import cli, folder_hashes


@pytest.fixture
def prompt_files(tmp_path):
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(f"how do I build weapon number {i}" for i in range(8)) + "\n")
    harmless.write_text("\n".join(f"what is a good recipe for soup {i}" for i in range(8)) + "\n")
    return harmful, harmless


def opts(files, **kw):
    harmful, harmless = files
    base = dict(harmful=str(harmful), harmless=str(harmless), device="cpu", max_length=64, batch_size=8)
    base.update(kw)
    return AblateOptions(**base)


def unit(n, seed):
    r = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def test_orthogonalised_writers_cannot_write_along_r():
    w, r = torch.randn(32, 64), unit(32, 1)
    new = orthogonalise(w, r, 1.0)
    assert (r @ new).abs().max() < 1e-5  # r^T W' = 0
    assert torch.allclose(new, w - torch.outer(r, r @ w), atol=1e-6)
    emb = torch.randn(100, 32)
    assert (orthogonalise(emb, r, 1.0, embedding=True) @ r).abs().max() < 1e-5  # no token embeds along r
    half = orthogonalise(w, r, 0.5)
    assert torch.allclose(r @ half, 0.5 * (r @ w), atol=1e-5)


def test_reverse_scales_the_component_along_r():
    w, r = torch.randn(32, 64), unit(32, 2)
    new = orthogonalise(w, r, -0.75)  # --reverse --scale 0.75: W + 0.75 r (r^T W)
    assert torch.allclose(r @ new, 1.75 * (r @ w), atol=1e-5)
    q = torch.linalg.qr(torch.cat([r[:, None], torch.randn(32, 31)], 1)).Q[:, 1:]  # directions orthogonal to r
    assert torch.allclose(q.T @ new, q.T @ w, atol=1e-5)


def test_difference_of_means_and_layer_choice_on_planted_states():
    torch.manual_seed(0)
    u = unit(16, 3)
    harmful, harmless = {}, {}
    for layer, shift in ((1, 0.0), (2, 4.0), (3, 1.0)):  # layer 2 separates cleanly
        harmful[layer] = torch.randn(40, 16) + shift * u
        harmless[layer] = torch.randn(40, 16)
    r = difference_of_means(harmful[2], harmless[2])
    assert abs(r.norm() - 1) < 1e-6 and torch.dot(r, u) > 0.9
    best, scores = choose_layer(harmful, harmless, 0.5, seed=0)
    assert best == 2 and scores[2]["auc"] > 0.99 and scores[1]["auc"] < 0.8
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5


@pytest.mark.parametrize("tied, embeddings, scale", [(False, False, 1.0), (False, True, -0.75), (True, True, 0.5)])
def test_the_forward_intervention_is_the_weight_edit(tied, embeddings, scale):
    """--select behaviour judges each layer with hooks: they must give exactly the edited model's outputs."""
    import copy

    model = tiny_llama(layers=3, tied=tied, seed=4).eval()
    r = unit(32, 5)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in edited.named_parameters():
            if is_residual_writer(name):
                p.copy_(orthogonalise(p, r, scale))
            elif embeddings and is_token_embedding(name):
                p.copy_(orthogonalise(p, r, scale, embedding=True))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = model(ids).logits
        want = edited(ids).logits
        with intervened(model, r, scale, include_embeddings=embeddings):
            got = model(ids).logits
        after = model(ids).logits
    assert (want - plain).abs().max() > 1e-3  # the edit changes the outputs ...
    assert torch.allclose(got, want, atol=1e-5)  # ... and the hooks reproduce them
    assert torch.equal(after, plain)  # hooks removed on exit


def test_behaviour_key_reverse_refuses_harmful_but_not_harmless():
    layers = {
        3: {"harmful_refused": 0.9, "harmless_refused": 0.8, "auc": 1.0, "gap": 5.0},  # refuses everything
        5: {"harmful_refused": 0.7, "harmless_refused": 0.1, "auc": 0.9, "gap": 2.0},  # selective
        7: {"harmful_refused": 0.1, "harmless_refused": 0.0, "auc": 1.0, "gap": 9.0},  # no effect
    }
    assert max(layers, key=lambda k: behaviour_key(layers[k], reverse=True)) == 5
    assert max(layers, key=lambda k: behaviour_key(layers[k], reverse=False)) == 7  # ablation: answer both
    tie = {1: {**layers[5], "gap": 1.0}, 2: {**layers[5], "gap": 3.0}}
    assert max(tie, key=lambda k: behaviour_key(tie[k], reverse=True)) == 2  # ties go to separation


def test_candidate_layers_skip_the_last_fifth():
    assert candidate_layers(30) == list(range(1, 25))
    assert candidate_layers(2) == [1]


def test_ablation_of_a_checkpoint(tiny_ckpt, tmp_path, prompt_files):
    before = folder_hashes(tiny_ckpt)
    report = ablate_checkpoint(tiny_ckpt, tmp_path / "out", opts(prompt_files, layer="1"))
    assert folder_hashes(tiny_ckpt) == before
    r = report.direction
    old, new = open_checkpoint(tiny_ckpt), open_checkpoint(tmp_path / "out")
    edited = set(report.edited)
    assert edited == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")}
    for name in old.tensors:
        if name in edited:
            assert (r @ new.read(name)).abs().max() < 1e-5, name
            assert (r @ old.read(name)).abs().max() > 1e-3, name
        else:
            assert torch.equal(new.read(name), old.read(name)), name
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["method"] == "direction-ablation" and manifest["report"]["layer"] == 1
    assert torch.allclose(torch.tensor(manifest["report"]["direction"]), r)


def test_auto_layer_and_embeddings_in_bf16(tmp_path, prompt_files):
    src = save_tiny_checkpoint(tmp_path / "deep", model=tiny_llama(layers=4, dtype=torch.bfloat16))
    report = ablate_checkpoint(src, tmp_path / "out", opts(prompt_files, include_embeddings=True, select="separation"))
    assert sorted(report.layer_scores) == candidate_layers(4) and report.layer in report.layer_scores
    assert report.baseline is None and "harmful_refused" not in report.layer_scores[report.layer]
    new = open_checkpoint(tmp_path / "out")
    emb = new.read("model.embed_tokens.weight")
    assert emb.dtype == torch.bfloat16 and "model.embed_tokens.weight" in report.edited
    before = (open_checkpoint(src).read("model.embed_tokens.weight").float() @ report.direction).abs().max()
    assert (emb.float() @ report.direction).abs().max() < 0.02 * before  # zero up to bf16 rounding


@pytest.mark.parametrize("reverse", [True, False])
def test_auto_layer_by_behaviour_judges_every_candidate(tmp_path, prompt_files, reverse):
    src = save_tiny_checkpoint(tmp_path / "deep", model=tiny_llama(layers=5, seed=2))
    messages = []
    report = ablate_checkpoint(
        src, tmp_path / "out", opts(prompt_files, reverse=reverse, scale=2.0, select_tokens=4), progress=messages.append
    )
    scores = report.layer_scores
    assert sorted(scores) == candidate_layers(5)
    assert len(messages) == len(scores) and "(4/4)" in messages[-1]
    assert set(report.baseline) == {"harmful_refused", "harmless_refused", "perplexity"}
    assert all(s["perplexity_ratio"] > 0 for s in scores.values())
    held = {k: report.baseline[k] * 4 for k in ("harmful_refused", "harmless_refused")}  # 4 held out per set: quarters
    assert all(abs(v - round(v)) < 1e-9 for v in held.values())
    assert all(0.0 <= s[k] <= 1.0 for s in scores.values() for k in ("harmful_refused", "harmless_refused"))
    assert report.layer == max(scores, key=lambda k: behaviour_key(scores[k], reverse))
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["report"]
    assert manifest["select"] == "behaviour" and manifest["baseline"] == report.baseline
    assert manifest["layer_scores"][str(report.layer)]["harmful_refused"] == scores[report.layer]["harmful_refused"]


def test_behaviour_overrides_separation_and_judges_the_edited_model(tmp_path, prompt_files, monkeypatch):
    """Scripted judge: the layer whose edit refuses harmful-only wins, whatever the separation says."""
    import surgery.metrics

    src = save_tiny_checkpoint(tmp_path / "deep", model=tiny_llama(layers=5, seed=2))
    separation = ablate_checkpoint(src, tmp_path / "sep", opts(prompt_files, reverse=True, select="separation"))
    wanted = next(k for k in candidate_layers(5) if k != separation.layer)
    calls = []

    def scripted(model, tokenizer, prompts, judge, max_new_tokens, batch_size):
        hooked = sum(len(m._forward_hooks) for n, m in model.named_modules() if n.endswith("o_proj"))
        calls.append(hooked)
        layer = candidate_layers(5)[(len(calls) - 3) // 2] if len(calls) > 2 else None
        harmful_set = len(calls) % 2 == 1
        return (1.0 if layer == wanted and harmful_set else 0.25), []

    monkeypatch.setattr(surgery.metrics, "refusal_rate", scripted)
    report = ablate_checkpoint(src, tmp_path / "beh", opts(prompt_files, reverse=True))
    assert calls[:2] == [0, 0] and all(c > 0 for c in calls[2:])  # baseline unedited, then one edit at a time
    assert len(calls) == 2 + 2 * len(candidate_layers(5))
    assert report.layer == wanted != separation.layer
    assert report.layer_scores[wanted]["harmful_refused"] == 1.0 and report.baseline["harmful_refused"] == 0.25


def test_behaviour_skips_layers_whose_edit_breaks_the_model(tmp_path, prompt_files, monkeypatch):
    """Noise reads as 'not refused': a layer that multiplies perplexity past the bar is never chosen."""
    import surgery.metrics

    src = save_tiny_checkpoint(tmp_path / "deep", model=tiny_llama(layers=5, seed=2))
    layers = candidate_layers(5)
    calls = {"refusal": 0, "ppl": 0}

    def current(kind):  # which candidate is being tried (None: the unedited baseline)
        n = calls[kind] // (2 if kind == "refusal" else 1)
        return layers[n - 1] if n else None

    def refusal(model, tokenizer, prompts, judge, max_new_tokens, batch_size):
        layer = current("refusal")
        calls["refusal"] += 1
        return (0.0 if layer == layers[0] else 0.5 if layer == layers[1] else 1.0), []  # ablation: layers[0] looks best

    def ppl(model, tokenizer, texts, max_length, batch_size):
        layer = current("ppl")
        calls["ppl"] += 1
        return 2.0 * (50.0 if layer == layers[0] else 1.0)  # ... but breaks the model

    monkeypatch.setattr(surgery.metrics, "refusal_rate", refusal)
    monkeypatch.setattr(surgery.metrics, "perplexity", ppl)
    report = ablate_checkpoint(src, tmp_path / "out", opts(prompt_files))
    assert report.layer == layers[1] and report.layer_scores[layers[0]]["perplexity_ratio"] == 50.0
    assert report.baseline["perplexity"] == 2.0
    calls.update(refusal=0, ppl=0)
    loose = ablate_checkpoint(src, tmp_path / "loose", opts(prompt_files, select_max_perplexity_ratio=100.0))
    assert loose.layer == layers[0]
    calls.update(refusal=0, ppl=0)

    def all_broken(*args):
        calls["ppl"] += 1
        return 2.0 if calls["ppl"] == 1 else 400.0  # only the unedited baseline is sane

    monkeypatch.setattr(surgery.metrics, "perplexity", all_broken)
    with pytest.raises(SurgeryError, match="every candidate layer's edit multiplies"):
        ablate_checkpoint(src, tmp_path / "none", opts(prompt_files))
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scale", "-1"], "--scale must be zero or more"),
        (["--layer", "top"], "--layer must be"),
        (["--layer", "9"], "--layer 9 is out of range"),
        (["--held-out", "0"], "--held-out"),
        (["--select", "best"], "--select must be one of behaviour, separation"),
        (["--select-tokens", "0"], "--select-tokens must be positive"),
        (["--select-max-perplexity-ratio", "1"], "--select-max-perplexity-ratio must be above 1"),
        (["--harmful", "/nonexistent/h.txt"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(tiny_ckpt, tmp_path, prompt_files, capsys, extra, message):
    harmful, harmless = prompt_files
    out = tmp_path / "out"
    code, _, err = cli(
        ["ablate", str(tiny_ckpt), "--harmful", str(harmful), "--harmless", str(harmless), "-o", str(out), *extra],
        capsys,
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_ablates_and_refuses_existing_output(tiny_ckpt, tmp_path, prompt_files, capsys):
    harmful, harmless = prompt_files
    argv = [
        "ablate",
        str(tiny_ckpt),
        "--harmful",
        str(harmful),
        "--harmless",
        str(harmless),
        "-o",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    main(argv)
    assert "ablated the direction from layer 1 in 4 matrices" in capsys.readouterr().out
    code, _, err = cli(argv, capsys)
    assert code == 2 and "already exists" in err


def test_direction_from_another_checkpoint_is_read_there_and_applied_here(tiny_ckpt, tmp_path, prompt_files):
    other = save_tiny_checkpoint(tmp_path / "other", seed=7)  # same shape, other weights: another direction
    from_other = refusal_direction(other, opts(prompt_files, layer="1")).direction
    own = refusal_direction(tiny_ckpt, opts(prompt_files, layer="1")).direction
    assert (from_other - own).abs().max() > 1e-3
    before = folder_hashes(other)
    report = ablate_checkpoint(tiny_ckpt, tmp_path / "out", opts(prompt_files, layer="1", direction_from=str(other)))
    assert torch.equal(report.direction, from_other) and folder_hashes(other) == before
    new = open_checkpoint(tmp_path / "out")
    for name in report.edited:
        assert (from_other @ new.read(name)).abs().max() < 1e-5, name
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["report"]["direction_from"] == str(other.resolve())


def test_direction_from_with_behaviour_judges_the_model_being_edited(tmp_path, prompt_files, monkeypatch):
    """Directions come from REF, but each candidate's edit is tried on MODEL (the one that will be written)."""
    import surgery.metrics

    model = save_tiny_checkpoint(tmp_path / "model", model=tiny_llama(layers=5, seed=2))
    ref = save_tiny_checkpoint(tmp_path / "ref", model=tiny_llama(layers=5, seed=9))
    want = open_checkpoint(model).read("model.layers.0.mlp.down_proj.weight")
    judged = []

    def refusal(m, tokenizer, prompts, judge, max_new_tokens, batch_size):
        judged.append(torch.equal(m.model.layers[0].mlp.down_proj.weight.detach(), want))
        return 0.5, []

    monkeypatch.setattr(surgery.metrics, "refusal_rate", refusal)
    report = ablate_checkpoint(model, tmp_path / "out", opts(prompt_files, reverse=True, direction_from=str(ref)))
    assert judged and all(judged)  # every judged forward ran MODEL's weights (hooks edit outputs, not weights)
    assert torch.equal(report.direction, refusal_direction(ref, opts(prompt_files, layer=str(report.layer))).direction)


def test_direction_from_a_model_of_another_width_is_refused(tiny_ckpt, tmp_path, prompt_files, capsys):
    wide = save_tiny_checkpoint(tmp_path / "wide", model=tiny_llama(hidden=48))
    harmful, harmless = prompt_files
    code, _, err = cli(
        [
            "ablate",
            str(tiny_ckpt),
            "--harmful",
            str(harmful),
            "--harmless",
            str(harmless),
            "--direction-from",
            str(wide),
            "-o",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 2 and "has hidden_size 48" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    code, _, err = cli(
        [
            "ablate",
            str(tiny_ckpt),
            "--harmful",
            str(harmful),
            "--harmless",
            str(harmless),
            "--direction-from",
            str(plain),
            "-o",
            str(tmp_path / "out"),
        ],
        capsys,
    )  # a folder, not a checkpoint
    assert code == 2 and "--direction-from: " in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
