import torch

from surgery.calibrate import InputNorms
from surgery.prompts import pad_batches
from surgery.testing.tiny import tiny_llama


def test_input_norms_equal_direct_norm_over_real_tokens():
    model = tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    seqs = [[5, 6, 7, 8, 9], [10, 11]]
    stats = InputNorms(model, [name]).run(pad_batches(seqs, 2, pad_id=0))

    captured = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        for seq in seqs:  # one unpadded sequence at a time: the ground truth
            model(input_ids=torch.tensor([seq]))
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
    assert stats.tokens == 7
    torch.testing.assert_close(stats.norms()[name], x.float().norm(dim=0), rtol=1e-4, atol=1e-5)


def test_hooks_are_removed_after_run():
    model = tiny_llama()
    names = ["model.layers.0.self_attn.q_proj"]
    InputNorms(model, names).run(pad_batches([[5, 6]], 1, 0))
    assert not dict(model.named_modules())[names[0]]._forward_hooks


def test_head_is_skipped_unless_targeted_and_head_norms_are_collected_when_it_is():
    model = tiny_llama()
    calls = []
    model.lm_head.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    inner = "model.layers.0.mlp.up_proj"
    InputNorms(model, [inner]).run(pad_batches([[5, 6, 7]], 1, 0))
    assert calls == []  # no logits computed when only decoder Linears are calibrated

    stats = InputNorms(model, [inner, "lm_head"]).run(pad_batches([[5, 6, 7]], 1, 0))
    assert len(calls) == 1
    final = model.model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state
    torch.testing.assert_close(stats.norms()["lm_head"], final[0].float().norm(dim=0), rtol=1e-4, atol=1e-5)


def test_contrastive_statistic_compares_per_token_not_set_size():
    from surgery.methods.antidote import contrast

    model = tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    seqs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    once = InputNorms(model, [name]).run(pad_batches(seqs, 2, pad_id=0))
    thrice = InputNorms(model, [name]).run(pad_batches(seqs * 3, 2, pad_id=0))  # same texts, 3x the tokens
    a, b = once.norms()[name], thrice.norms()[name]
    assert (thrice.tokens, once.tokens) == (30, 10)
    assert (b - a).abs().min() > 0.5 * a.abs().min()  # raw norms differ by sqrt(3): a raw difference measures size
    assert contrast(a, once.tokens, b, thrice.tokens).abs().max() < 1e-5 * a.abs().max()
    # and it is exactly the difference of per-token RMS values
    torch.testing.assert_close(contrast(a, 10, 2 * a, 40), torch.zeros_like(a))
    torch.testing.assert_close(contrast(a, 4, a, 16), a / 2 - a / 4)
