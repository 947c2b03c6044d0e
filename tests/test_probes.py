import json

import pytest
import torch

from cli.main import main
from surgery.checkpoint import open_checkpoint
from surgery.errors import SurgeryError
from surgery.probes import ProbeOptions, fit_probe, load_probe, pool, pooled_hidden_states, train_probe_checkpoint
from surgery.probes.artifact import META_NAME, WEIGHTS_NAME
from surgery.probes.collect import encode_texts
from surgery.testing.tiny import char_tokenizer, save_tiny_checkpoint, tiny_llama

from .conftest import cli


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
    x = (
        torch.randn(600, 24, generator=g) + (2 * labels - 1).unsqueeze(1) * 3.0 * u
    )  # classes shifted +-3 along u (Bayes accuracy 99.9 %)
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
    from surgery.probes.artifact import save_probe

    save_probe(probe, tmp_path / "again")
    assert load_probe(tmp_path / "again").meta.extra == {"data": "set-a", "future": 3}
    meta_file.write_text(json.dumps({"layer": 2}))  # required fields missing: a clear error, not a TypeError
    with pytest.raises(SurgeryError, match="corrupt"):
        load_probe(tmp_path / "probe")


def test_layer_all_writes_table_and_plot(tiny_ckpt, classes, tmp_path):
    pos, neg = classes
    report = train_probe_checkpoint(
        tiny_ckpt, pos, neg, tmp_path / "probe", opts(layer="all", pooling="last", chat=True)
    )
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


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pooling", "max"], "--pooling must be one of"),
        (["--layer", "7"], "--layer 7 is out of range"),
        (["--layer", "middle"], "--layer must be"),
        (["--test-fraction", "1.5"], "--test-fraction"),
        (["--positive-name", "x", "--negative-name", "x"], "must differ"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(tiny_ckpt, classes, tmp_path, capsys, extra, message):
    pos, neg = classes
    out = tmp_path / "probe"
    code, _, err = cli(
        ["probe-train", str(tiny_ckpt), "--positive", str(pos), "--negative", str(neg), "-o", str(out), *extra], capsys
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".probe*"))


def test_cli_missing_data_and_existing_output(tiny_ckpt, classes, tmp_path, capsys):
    pos, neg = classes
    code, _, err = cli(
        [
            "probe-train",
            str(tiny_ckpt),
            "--positive",
            str(tmp_path / "nope.txt"),
            "--negative",
            str(neg),
            "-o",
            str(tmp_path / "p"),
        ],
        capsys,
    )
    assert code == 2 and "does not exist" in err and not (tmp_path / "p").exists()
    (tmp_path / "p").mkdir()
    code, _, err = cli(
        ["probe-train", str(tiny_ckpt), "--positive", str(pos), "--negative", str(neg), "-o", str(tmp_path / "p")],
        capsys,
    )
    assert code == 2 and "already exists" in err and not any((tmp_path / "p").iterdir())


def test_cli_trains_and_reports(tiny_ckpt, classes, tmp_path, capsys):
    pos, neg = classes
    main(
        [
            "probe-train",
            str(tiny_ckpt),
            "--positive",
            str(pos),
            "--negative",
            str(neg),
            "-o",
            str(tmp_path / "p"),
            "--device",
            "cpu",
        ]
    )
    cap = capsys.readouterr()
    assert "held-out 1.000" in cap.out
    assert (tmp_path / "p" / WEIGHTS_NAME).is_file()


# --- which tokens are pooled (--pool) ---------------------------------------------------------------------
SYSTEM = "{% if messages[0]['role'] != 'system' %}{{ '<|system|>say hello world<|end|>' }}{% endif %}"


def templated_tokenizer():
    """The char tokenizer with a default system prompt (as SmolLM2's template adds one) that repeats the content's words."""
    tok = char_tokenizer()
    tok.chat_template = SYSTEM + tok.chat_template
    return tok


def test_content_pool_masks_exactly_the_templates_tokens():
    from surgery.probes.collect import encode_examples
    from surgery.prompts import Example

    tok = templated_tokenizer()
    ex = [Example("hello world", "ok fine")]
    ids, content = encode_examples(tok, ex, chat=True, pool="content", max_length=64)
    _, response = encode_examples(tok, ex, chat=True, pool="response", max_length=64)
    _, every = encode_examples(tok, ex, chat=True, pool="all", max_length=64)
    # <|system|> "say hello world" <|end|> <|user|> "hello world" <|end|> <|assistant|> "ok fine" <|end|>: one token a character
    system, user, answer = 1 + 15 + 1, 1 + 11 + 1, 1 + 7 + 1
    assert len(ids[0]) == system + user + answer and ids == encode_texts(
        tok,
        [
            tok.apply_chat_template(
                [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "ok fine"}],
                tokenize=False,
            )
        ],
        64,
        True,
    )
    prompt_at = list(range(system + 1, system + 12))
    answer_at = list(range(system + user + 1, system + user + 8))
    assert [i for i, m in enumerate(content[0]) if m] == prompt_at + answer_at  # not the system prompt's "hello world"
    assert [i for i, m in enumerate(response[0]) if m] == answer_at
    assert every[0] == [1] * len(ids[0])
    # Without a response the generation prompt is the template's too. Plain text has no template: content is every
    # token but the line break that joins prompt and response.
    ids, content = encode_examples(tok, [Example("hello world")], chat=True, pool="content", max_length=64)
    assert [i for i, m in enumerate(content[0]) if m] == prompt_at and len(ids[0]) == system + user + 1
    _, plain = encode_examples(tok, [Example("hello world", "ok fine")], chat=False, pool="content", max_length=64)
    assert (
        plain[0] == [1] * 11 + [0] + [1] * 7
        and sum(
            encode_examples(tok, [Example("hello world", "ok fine")], chat=False, pool="response", max_length=64)[1][0]
        )
        == 7
    )
    with pytest.raises(SurgeryError, match="no content tokens within the first 10"):
        encode_examples(tok, [Example("hello world")], chat=True, pool="content", max_length=10)
    with pytest.raises(SurgeryError, match="--pool response needs a response"):
        encode_examples(tok, [Example("hello world")], chat=True, pool="response", max_length=64)


def test_default_pool_follows_chat_and_responses():
    from surgery.probes.collect import default_pool
    from surgery.prompts import Example

    assert default_pool(False, [Example("a", "b")]) == "all"
    assert default_pool(True, [Example("a", "b"), Example("c", "d")]) == "response"
    assert default_pool(True, [Example("a", "b"), Example("c")]) == "content"


def test_last_pooling_takes_the_last_masked_token():
    hidden = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    chosen = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0]])  # content in the middle, template at both ends
    assert torch.equal(pool(hidden, chosen, "last"), torch.stack([hidden[0, 2], hidden[1, 3]]))
    assert torch.allclose(pool(hidden, chosen, "mean")[0], hidden[0, 1:3].mean(0))


def test_content_pooling_recovers_a_planted_direction_that_all_pooling_misses():
    """Per token: the template's tokens carry a constant offset c, the content's carry the class along u; undesired
    examples are shorter, so with every token pooled the template's share (and c) tells the classes apart too."""
    import random

    from surgery.probes.collect import encode_examples
    from surgery.prompts import Example

    tok, rng, g = templated_tokenizer(), random.Random(0), torch.Generator().manual_seed(0)
    n, d = 200, 16
    labels = torch.arange(n) % 2
    examples = [
        Example("".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8) if y else rng.randint(12, 20))))
        for y in labels.tolist()
    ]
    ids, masks = encode_examples(tok, examples, chat=True, pool="content", max_length=64)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    c = torch.randn(d, generator=g)
    c -= (c @ u) * u
    c = 5 * c / c.norm()
    width = max(map(len, ids))
    hidden, content, real = torch.zeros(n, width, d), torch.zeros(n, width), torch.zeros(n, width)
    for i, (seq, mask) in enumerate(zip(ids, masks)):
        m = torch.tensor(mask, dtype=torch.float32)[:, None]
        sign = 2 * float(labels[i]) - 1
        hidden[i, : len(seq)] = torch.randn(len(seq), d, generator=g) + m * 0.6 * sign * u + (1 - m) * c
        content[i, : len(seq)], real[i, : len(seq)] = m[:, 0], 1
    by_content = fit_probe(pool(hidden, content, "mean"), labels, 0.25, 0).weight[1]
    by_all = fit_probe(pool(hidden, real, "mean"), labels, 0.25, 0).weight[1]
    cos = torch.nn.functional.cosine_similarity
    assert cos(by_content, u, dim=0) > 0.85 and abs(cos(by_content, c, dim=0)) < 0.3
    assert cos(by_all, u, dim=0) < 0.5 and cos(by_all, c, dim=0) > 0.7  # it learned the template's share


# --- the paper's classifier (--classifier paper) ------------------------------------------------------------
def planted(n=600, d=24, shift=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    labels = torch.arange(n) % 2
    return torch.randn(n, d, generator=g) + (2 * labels - 1).unsqueeze(1) * shift * u, labels, u


def test_paper_classifier_reaches_the_planted_accuracy():
    from surgery.probes.train import fit_paper_probe

    x, labels, u = planted()  # classes +-3 along u: Bayes accuracy 99.9 %
    fitted = fit_paper_probe(x, labels, test_fraction=0.25, seed=0, epochs=40, lr=1e-2)
    assert (
        fitted.classifier == "paper" and fitted.test_accuracy >= 0.97 and fitted.steps == 40 * 29
    )  # 450 / 16 -> 29 batches
    assert fitted.init_share < 0.3  # trained: row 1 moved several times the length of its random start
    learned = fitted.weight[1] - fitted.weight[0]
    assert torch.nn.functional.cosine_similarity(learned, u, dim=0) > 0.9
    # Softmax gradients of the two rows are opposite, so W[0] + W[1] keeps the seeded nn.Linear-style initialisation.
    g = torch.Generator().manual_seed(0)
    init = (torch.rand(2, 24, generator=g) * 2 - 1) / 24**0.5
    assert torch.allclose(fitted.weight.sum(0), init.sum(0), atol=1e-4)
    again = fit_paper_probe(x, labels, test_fraction=0.25, seed=0, epochs=40, lr=1e-2)
    assert torch.equal(again.weight, fitted.weight)  # seeded


def test_paper_recipe_on_little_data_leaves_a_mostly_random_row():
    """The authors' 9 epochs at lr 1e-4 on 160 training examples are 90 Adam steps: W[1] is still mostly its init."""
    from surgery.probes.train import MOSTLY_RANDOM, PAPER_EPOCHS, PAPER_LR, fit_paper_probe

    x, labels, _ = planted(n=200, d=64, shift=1.0)
    fitted = fit_paper_probe(x, labels, 0.2, 0, PAPER_EPOCHS, PAPER_LR)
    assert fitted.steps == 9 * 10 and fitted.init_share > MOSTLY_RANDOM


def test_cli_pool_and_classifier_are_recorded(tiny_ckpt, tmp_path, capsys):
    rows = [json.dumps({"prompt": f"question {i}", "response": f"zzz qqq {i}"}) for i in range(12)]
    pos = tmp_path / "pos.jsonl"
    pos.write_text("\n".join(rows) + "\n")
    neg = tmp_path / "neg.jsonl"
    neg.write_text("\n".join(r.replace("zzz qqq", "aaa eee") for r in rows) + "\n")
    main(
        [
            "probe-train",
            str(tiny_ckpt),
            "--positive",
            str(pos),
            "--negative",
            str(neg),
            "-o",
            str(tmp_path / "p"),
            "--device",
            "cpu",
            "--chat",
            "--classifier",
            "paper",
            "--epochs",
            "3",
        ]
    )
    cap = capsys.readouterr()
    meta = json.loads((tmp_path / "p" / META_NAME).read_text())
    assert meta["pool"] == "response" and meta["classifier"] == "paper" and meta["epochs"] == 3 and meta["lr"] == 1e-4
    assert meta["steps"] == 3 * 2 and meta["c"] is None and 0.5 < meta["init_share"] < 1
    assert "mean of response tokens, paper" in cap.out and "paper's alpha 1·A" in cap.out
    assert "more random initialisation than learned" in cap.err  # 6 Adam steps at lr 1e-4
    probe = load_probe(tmp_path / "p")
    assert probe.paper_alpha_per_alpha == 1.0 and not torch.equal(probe.weight[0], torch.zeros(32))
    main(
        [
            "probe-train",
            str(tiny_ckpt),
            "--positive",
            str(pos),
            "--negative",
            str(neg),
            "-o",
            str(tmp_path / "q"),
            "--device",
            "cpu",
            "--chat",
            "--pool",
            "content",
        ]
    )
    meta = json.loads((tmp_path / "q" / META_NAME).read_text())
    assert (
        meta["pool"] == "content"
        and meta["classifier"] == "logistic"
        and load_probe(tmp_path / "q").paper_alpha_per_alpha == 2.0
    )


def test_probe_json_from_before_pool_and_classifier_loads_as_all_and_logistic(tiny_ckpt, classes, tmp_path):
    pos, neg = classes
    train_probe_checkpoint(tiny_ckpt, pos, neg, tmp_path / "probe", opts())
    meta_file = tmp_path / "probe" / META_NAME
    old = {
        k: v
        for k, v in json.loads(meta_file.read_text()).items()
        if k not in ("pool", "classifier", "epochs", "lr", "steps", "init_share")
    }
    meta_file.write_text(json.dumps(old))
    probe = load_probe(tmp_path / "probe", open_checkpoint(tiny_ckpt))
    assert (probe.meta.pool, probe.meta.classifier, probe.meta.extra) == ("all", "logistic", {})
    meta_file.write_text(json.dumps({**old, "pool": "tokens"}))
    with pytest.raises(SurgeryError, match="pool 'tokens' is not one of all, content, response"):
        load_probe(tmp_path / "probe")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pool", "middle"], "--pool must be one of"),
        (["--classifier", "svm"], "--classifier must be one of"),
        (["--classifier", "paper", "--c", "1"], "--classifier paper has none"),
        (["--epochs", "5"], "add --classifier paper"),
        (["--classifier", "paper", "--lr", "0"], "--lr must be positive"),
        (["--pool", "response"], "--pool response needs a response"),
    ],
)
def test_cli_pool_and_classifier_errors(tiny_ckpt, classes, tmp_path, capsys, extra, message):
    pos, neg = classes
    out = tmp_path / "probe"
    code, _, err = cli(
        [
            "probe-train",
            str(tiny_ckpt),
            "--positive",
            str(pos),
            "--negative",
            str(neg),
            "-o",
            str(out),
            "--device",
            "cpu",
            *extra,
        ],
        capsys,
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
