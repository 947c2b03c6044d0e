"""Hidden states pooled over tokens, for every requested layer, gathered batch by batch (never all tokens kept).

Layer numbering follows transformers' `output_hidden_states`: 0 is the embedding output, i is the
residual stream entering block i, and the last index (= number of blocks) is the final, post-norm state.
"""

from __future__ import annotations

import torch

from surgery.errors import SurgeryError
from surgery.prompts import Example, chat_text, pad_batches

POOLINGS = ("mean", "last")


def render(tokenizer, examples: list[Example], chat: bool, generation_prompt: bool = False) -> list[str]:
    """The text the model reads: chat-rendered (with the response when present) or the plain prompt."""
    if not chat:
        return [ex.prompt if ex.response is None else f"{ex.prompt}\n{ex.response}" for ex in examples]
    if generation_prompt:
        return [chat_text(tokenizer, ex.prompt) for ex in examples]
    return [chat_text(tokenizer, ex.prompt, ex.response) for ex in examples]


def encode_texts(tokenizer, texts: list[str], max_length: int, chat: bool) -> list[list[int]]:
    """Token ids cut to `max_length`; chat text carries its own special tokens."""
    seqs = [tokenizer(t, add_special_tokens=not chat)["input_ids"][:max_length] for t in texts]
    if any(not s for s in seqs):
        raise SurgeryError("an example encodes to zero tokens: remove empty lines from the data")
    return seqs


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[batch, seq, hidden] -> [batch, hidden]: mean over real tokens (the paper's choice) or the last real token."""
    mask = mask.to(hidden.device)
    if pooling == "mean":
        m = mask.unsqueeze(-1).float()
        return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)
    last = mask.sum(1) - 1  # right padding: the last real token sits at length - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


@torch.no_grad()
def pooled_hidden_states(model, sequences: list[list[int]], layers: list[int], pooling: str = "mean",
                         batch_size: int = 8, pad_id: int = 0) -> dict[int, torch.Tensor]:
    """{layer: [n, hidden] fp32 on CPU} for each layer index in `layers` (see the module docstring)."""
    if pooling not in POOLINGS:
        raise SurgeryError(f"--pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)  # the decoder without lm_head: no vocabulary-sized logits to compute
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for ids, mask in pad_batches(sequences, batch_size, pad_id):
        out = body(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, use_cache=False)
        for layer in layers:
            rows[layer].append(pool(out.hidden_states[layer], mask, pooling).cpu())
        del out
    return {layer: torch.cat(r) for layer, r in rows.items()}


def layer_count(model) -> int:
    """Index of the final (post-norm) hidden state = number of decoder blocks."""
    return int(model.config.num_hidden_layers)
