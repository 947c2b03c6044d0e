import json

import pytest
import torch

from cli.main import main
from probes import ProbeOptions, fit_probe, load_probe, pool, pooled_hidden_states, train_probe_checkpoint
from probes.artifact import META_NAME, WEIGHTS_NAME
from probes.collect import encode_texts
from surgery.checkpoint import open_checkpoint
from surgery.errors import SurgeryError
from surgery.testing.tiny import char_tokenizer, save_tiny_checkpoint, tiny_llama


@pytest.fixture
def classes(tmp_path):
    """Two trivially separable text classes (different characters), 16 lines each."""
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(f"zzz qqq xxx {i} zzz" for i in range(20)) + "\n")
    neg.write_text("\n".join(f"aaa eee ooo {i} aaa" for i in range(20)) + "\n")
    return pos, neg


def opts(**kw):
    base = dict(device="cpu", batch_size=8, max_length=64, positive_name="toxic", negative_name="non-toxic")
    base.update(kw)
    return ProbeOptions(**base)


def test_probe_on_planted_data_recovers_the_plant():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(24, generator=g)
    u[5] = 0  # dimension 5 carries only huge noise (a massive-activation dimension, as real hidden states have)
    u /= u.norm()
    labels = torch.arange(600) % 2
    x = torch.randn(600, 24, generator=g) + (2 * labels - 1).unsqueeze(1) * 3.0 * u  # classes shifted +-3 along u (Bayes accuracy 99.9 %)
    x[:, 5] += 1000 * torch.randn(600, generator=g)
    fitted = fit_probe(x, labels, test_fraction=0.25, seed=0)
    assert fitted.test_accuracy >= 0.97 and 1e-4 <= fitted.c <= 100
    raw = ((x @ fitted.weight[1] + fitted.bias[1] > 0).long() == labels).float().mean()
    assert raw >= 0.97  # the saved weights classify raw (unstandardised) states
    assert fitted.n_test == 150 and fitted.n_train == 450
    assert torch.equal(fitted.weight[0], torch.zeros(24))  # row 0: the reference class
    cos = torch.nn.functional.cosine_similarity(fitted.weight[1], u, dim=0)
    assert cos > 0.9  # row 1 (undesired) points along the planted direction, with its sign


def test_probe_needs_two_examples_per_class():
    with pytest.raises(SurgeryError, match="at least 2"):
        fit_probe(torch.randn(5, 4), torch.tensor([1, 0, 0, 0, 0]))


def test_mean_and_last_pooling_ignore_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.allclose(pool(hidden, mask, "mean")[1], hidden[1, :2].mean(0))
    assert torch.equal(pool(hidden, mask, "last")[1], hidden[1, 1])
    assert torch.equal(pool(hidden, mask, "last")[0], hidden[0, 3])


def test_batched_states_equal_one_at_a_time():
    model, tok = tiny_llama(layers=2), char_tokenizer()
    seqs = encode_texts(tok, ["a short one", "a much longer sentence here", "mid length"], 64, chat=False)
    batched = pooled_hidden_states(model, seqs, [0, 1, 2], "mean", batch_size=3, pad_id=tok.pad_token_id)
    for i, s in enumerate(seqs):
        alone = pooled_hidden_states(model, [s], [0, 1, 2], "mean", batch_size=1, pad_id=tok.pad_token_id)
        for layer in (0, 1, 2):
            assert torch.allclose(batched[layer][i], alone[layer][0], atol=1e-5)
    # The last index is the final post-norm state: the input of lm_head.
    ids = torch.tensor([seqs[0]])
    out = model(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(model.lm_head(out.hidden_states[2]), out.logits, atol=1e-5)


def test_train_saves_artifact_with_metadata(tiny_ckpt, classes, tmp_path):
    pos, neg = classes
    report = train_probe_checkpoint(tiny_ckpt, pos, neg, tmp_path / "probe", opts())
    meta = json.loads((tmp_path / "probe" / META_NAME).read_text())
    assert meta["fingerprint"] == open_checkpoint(tiny_ckpt).fingerprint()
    assert meta["layer"] == meta["num_layers"] == 2 and meta["pooling"] == "mean"
    assert meta["labels"] == ["non-toxic", "toxic"] and meta["undesired_row"] == 1
    assert meta["n_positive"] == meta["n_negative"] == 20 and meta["n_test"] == 8  # 20 % of each class held out
    assert meta["test_accuracy"] == 1.0 and meta["train_accuracy"] == 1.0
    probe = load_probe(tmp_path / "probe", open_checkpoint(tiny_ckpt))
    assert probe.weight.shape == (2, 32) and probe.bias.shape == (2,)
    assert torch.equal(probe.direction, report.probe.weight[1])
    # The saved probe classifies fresh states of the two classes correctly.
    model, tok = tiny_llama(), char_tokenizer()
    ckpt = open_checkpoint(tiny_ckpt)
    model.load_state_dict({n: ckpt.read(n) for n in ckpt.tensors}, strict=False)
    seqs = encode_texts(tok, ["zzz qqq xxx 99 zzz", "aaa eee ooo 99 aaa"], 64, chat=False)
    p = probe.predict_proba(pooled_hidden_states(model, seqs, [2], "mean", 2, tok.pad_token_id)[2])
    assert p[0] > 0.5 > p[1]


def test_probe_json_with_unknown_keys_loads_and_keeps_them(tiny_ckpt, classes, tmp_path):
    # A newer version's fields (or a script's notes) in probe.json must not make the probe unreadable.
    pos, neg = classes
    train_probe_checkpoint(tiny_ckpt, pos, neg, tmp_path / "probe", opts())
    meta_file = tmp_path / "probe" / META_NAME
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "data": "set-a", "future": 3}))
    probe = load_probe(tmp_path / "probe", open_checkpoint(tiny_ckpt))
    assert probe.meta.extra == {"data": "set-a", "future": 3} and probe.meta.layer == 2
    from probes.artifact import save_probe
    save_probe(probe, tmp_path / "again")
    assert load_probe(tmp_path / "again").meta.extra == {"data": "set-a", "future": 3}
    meta_file.write_text(json.dumps({"layer": 2}))  # required fields missing: a clear error, not a TypeError
    with pytest.raises(SurgeryError, match="corrupt"):
        load_probe(tmp_path / "probe")


def test_layer_all_writes_table_and_plot(tiny_ckpt, classes, tmp_path):
    pos, neg = classes
    report = train_probe_checkpoint(tiny_ckpt, pos, neg, tmp_path / "probe", opts(layer="all", pooling="last", chat=True))
    assert sorted(report.layer_accuracy) == [0, 1, 2]
    lines = (tmp_path / "probe" / "layers.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["layer", "train_accuracy", "test_accuracy"] and len(lines) == 4
    assert (tmp_path / "probe" / "layers.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((tmp_path / "probe" / META_NAME).read_text())
    assert meta["layer"] == 2 and set(meta["layer_accuracy"]) == {"0", "1", "2"} and meta["chat"] is True


def test_probe_from_another_model_is_refused(tiny_ckpt, classes, tmp_path):
    pos, neg = classes
    train_probe_checkpoint(tiny_ckpt, pos, neg, tmp_path / "probe", opts())
    other = save_tiny_checkpoint(tmp_path / "other", model=tiny_llama(hidden=48, intermediate=96))
    with pytest.raises(SurgeryError, match="different model"):
        load_probe(tmp_path / "probe", open_checkpoint(other))


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr()


@pytest.mark.parametrize("extra, message", [
    (["--pooling", "max"], "--pooling must be one of"),
    (["--layer", "7"], "--layer 7 is out of range"),
    (["--layer", "middle"], "--layer must be"),
    (["--test-fraction", "1.5"], "--test-fraction"),
    (["--positive-name", "x", "--negative-name", "x"], "must differ"),
])
def test_cli_errors_are_one_line_and_write_nothing(tiny_ckpt, classes, tmp_path, capsys, extra, message):
    pos, neg = classes
    out = tmp_path / "probe"
    code, cap = run_cli(["probe-train", str(tiny_ckpt), "--positive", str(pos), "--negative", str(neg), "-o", str(out), *extra], capsys)
    assert code == 2 and message in cap.err and len(cap.err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".probe*"))


def test_cli_missing_data_and_existing_output(tiny_ckpt, classes, tmp_path, capsys):
    pos, neg = classes
    code, cap = run_cli(["probe-train", str(tiny_ckpt), "--positive", str(tmp_path / "nope.txt"), "--negative", str(neg), "-o", str(tmp_path / "p")], capsys)
    assert code == 2 and "does not exist" in cap.err and not (tmp_path / "p").exists()
    (tmp_path / "p").mkdir()
    code, cap = run_cli(["probe-train", str(tiny_ckpt), "--positive", str(pos), "--negative", str(neg), "-o", str(tmp_path / "p")], capsys)
    assert code == 2 and "already exists" in cap.err and not any((tmp_path / "p").iterdir())


def test_cli_trains_and_reports(tiny_ckpt, classes, tmp_path, capsys):
    pos, neg = classes
    main(["probe-train", str(tiny_ckpt), "--positive", str(pos), "--negative", str(neg), "-o", str(tmp_path / "p"), "--device", "cpu"])
    cap = capsys.readouterr()
    assert "held-out 1.000" in cap.out
    assert (tmp_path / "p" / WEIGHTS_NAME).is_file()
