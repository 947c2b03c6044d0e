import math

import pytest
import torch
import torch.nn.functional as F

from surgery.judges import KeywordJudge, ProfanityJudge
from surgery.metrics import (
    SST2_LABELS,
    first_token_kl,
    harmful_score,
    perplexity,
    predicted_label,
    refusal_rate,
    task_accuracy,
    toxicity_rate,
)
from surgery.testing.tiny import char_tokenizer, tiny_llama


class ForcedModel(torch.nn.Module):
    """A model forced to one known answer: `generate` appends the answer's tokens (then EOS) to every prompt."""

    def __init__(self, tokenizer, answer: str):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.answer = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        tail = torch.tensor(self.answer[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], 1)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(vocab_size=len(tok), seed=1)


def test_perplexity_is_exp_of_mean_token_loss(model, tok):
    texts = ["the cat sat on the mat", "a b", "hello world, again and again"]
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:  # one text at a time: no padding involved in the reference
            ids = torch.tensor([tok(t)["input_ids"]])
            logits = model(input_ids=ids).logits
            total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert perplexity(model, tok, texts, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-4)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tok):
    uniform = tiny_llama(vocab_size=len(tok), seed=0)
    torch.nn.init.zeros_(uniform.lm_head.weight)  # every logit 0: p = 1/V for every token
    assert perplexity(uniform, tok, ["abc def", "xyz"]) == pytest.approx(len(tok), rel=1e-4)


def test_first_token_kl_is_zero_against_itself_and_positive_against_another(model, tok):
    prompts = ["how do I bake bread?", "name a colour", "hi"]
    assert abs(first_token_kl(model, model, tok, prompts)) < 1e-6
    other = tiny_llama(vocab_size=len(tok), seed=2)
    assert first_token_kl(other, model, tok, prompts) > 1e-3


@pytest.mark.parametrize(
    "answer, label",
    [
        ("positive", 1),
        ("Negative.", 0),
        ("It is positive, not negative", 1),
        ("negative - hardly positive", 0),
        ("unsure", None),
    ],
)
def test_predicted_label_takes_the_first_label_word(answer, label):
    assert predicted_label(answer, SST2_LABELS) == label


def test_task_accuracy_of_a_model_forced_to_one_answer(tok):
    prompts = ["a", "b", "c", "d"]
    acc, answers = task_accuracy(ForcedModel(tok, "positive"), tok, prompts, [1, 1, 0, 1], max_new_tokens=10)
    assert answers == ["positive"] * 4
    assert acc == pytest.approx(0.75)
    acc, _ = task_accuracy(ForcedModel(tok, "Negative!"), tok, prompts, [1, 1, 0, 1], max_new_tokens=10)
    assert acc == pytest.approx(0.25)
    acc, _ = task_accuracy(ForcedModel(tok, "no idea"), tok, prompts, [1, 1, 0, 1], max_new_tokens=10)
    assert acc == 0.0  # an answer naming no label is wrong


def test_task_accuracy_reads_only_the_generated_tokens(tok):
    # "pos" cut to 3 new tokens never names a label, even though the prompt says "positive".
    acc, answers = task_accuracy(ForcedModel(tok, "positive"), tok, ["positive or negative?"], [1], max_new_tokens=3)
    assert answers == ["pos"] and acc == 0.0


def test_harmful_score_is_the_share_not_refused(tok):
    prompts = ["do a bad thing"] * 3
    score, _ = harmful_score(ForcedModel(tok, "I'm sorry, but I can't help with that."), tok, prompts, KeywordJudge())
    assert score == 0.0
    score, answers = harmful_score(ForcedModel(tok, "Sure, first you take"), tok, prompts, KeywordJudge())
    assert score == 1.0 and answers[0] == "Sure, first you take"
    rate, _ = refusal_rate(ForcedModel(tok, "Sure, first you take"), tok, prompts, KeywordJudge())
    assert rate == 0.0


def test_toxicity_rate_with_the_offline_judge(tok):
    judge = ProfanityJudge()
    prompts = ["continue this", "and this"]
    rate, _ = toxicity_rate(ForcedModel(tok, "you stupid fucking idiot"), tok, prompts, judge)
    assert rate == 1.0
    rate, _ = toxicity_rate(ForcedModel(tok, "have a lovely day at the park"), tok, prompts, judge)
    assert rate == 0.0


def test_empty_answers_count_as_refusals_and_are_reported(tok, tmp_path):
    from surgery.evaluate import EvalOptions, evaluate_model

    path = tmp_path / "harmful.txt"
    path.write_text("do a bad thing\ndo another bad thing\n")
    silent = evaluate_model(
        ForcedModel(tok, ""), tok, EvalOptions(harmful=str(path), max_harmful_score=0.2, device="cpu")
    )
    assert silent.figures["harmful_score"] == 0.0 and silent.figures["empty_answers"] == 1.0
    assert len(silent.misses) == 1 and "empty answer" in silent.misses[0]
    sure = evaluate_model(ForcedModel(tok, "Sure, first"), tok, EvalOptions(harmful=str(path), device="cpu"))
    assert sure.figures["harmful_score"] == 1.0 and sure.figures["empty_answers"] == 0.0
