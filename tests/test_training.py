import pytest
import torch

from surgery.errors import SurgeryError
from surgery.prompts import Example, generate
from surgery.testing.finetune import TrainOptions, _batch, encode_example, finetune, response_loss
from surgery.testing.tiny import char_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_encode_example_masks_the_prompt_and_ends_with_eos(tok):
    ids, labels = encode_example(tok, Example("hi", "yo"), max_length=96)
    prompt = tok("<|user|>hi<|end|><|assistant|>", add_special_tokens=False)["input_ids"]
    assert ids == prompt + tok("yo", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels == [-100] * len(prompt) + ids[len(prompt) :]
    short_ids, short_labels = encode_example(tok, Example("hi", "yo"), max_length=4)
    assert len(short_ids) == len(short_labels) == 4


def test_loss_counts_response_tokens_only(tok):
    import torch.nn.functional as F

    model = tiny_llama(vocab_size=len(tok), seed=0)
    ids, mask, labels = _batch(
        [encode_example(tok, Example("prompt one", "an answer"), 96), encode_example(tok, Example("two", "b"), 96)], 0
    )
    with torch.no_grad():
        loss = response_loss(model, ids, mask, labels).item()
        logits = model(input_ids=ids, attention_mask=mask).logits
    # Reference: cross-entropy at the positions that predict a response token (or EOS), nothing else.
    terms = [
        F.cross_entropy(logits[r, t - 1], ids[r, t]).item()
        for r in range(2)
        for t in range(1, ids.shape[1])
        if labels[r, t] != -100
    ]
    assert len(terms) == len("an answer") + 1 + len("b") + 1
    assert loss == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_finetune_teaches_a_response(tok):
    torch.set_num_threads(1)
    model = tiny_llama(vocab_size=len(tok), hidden=32, seed=0)
    report = finetune(
        model, tok, [Example("hello", "world")] * 4, TrainOptions(steps=60, lr=3e-3, batch_size=4, warmup=5)
    )
    assert len(report.losses) == 60 and report.examples == 4
    assert report.losses[-1] < 0.05 * report.losses[0]
    assert generate(model, tok, ["hello"], 10) == ["world"]
    assert not model.training


def test_finetune_rejects_bad_input(tok):
    model = tiny_llama(vocab_size=len(tok), seed=0)
    with pytest.raises(SurgeryError, match="no training examples"):
        finetune(model, tok, [], TrainOptions(steps=1))
    with pytest.raises(SurgeryError, match="no response"):
        finetune(model, tok, [Example("a")], TrainOptions(steps=1))
    with pytest.raises(SurgeryError, match="longer than max_length"):
        finetune(model, tok, [Example("a long prompt", "x")], TrainOptions(steps=1, max_length=3))
    with pytest.raises(SurgeryError, match="steps must be positive"):
        finetune(model, tok, [Example("a", "b")], TrainOptions(steps=0))


def test_trainable_globs_freeze_every_other_parameter(tok):
    model = tiny_llama(vocab_size=len(tok))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = TrainOptions(steps=3, lr=1e-2, batch_size=2, warmup=1, trainable=["*layers.*_proj.weight"])
    finetune(model, tok, [Example("hi", "yo"), Example("ab", "cd")], options)
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == ("_proj" in name), name
    with pytest.raises(SurgeryError, match="no parameter matches"):
        finetune(model, tok, [Example("hi", "yo")], TrainOptions(steps=1, trainable=["nothing*"]))
