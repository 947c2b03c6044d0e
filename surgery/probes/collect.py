"""Hidden states pooled over tokens, for every requested layer, gathered batch by batch (never all tokens kept).

Layer numbering follows transformers' `output_hidden_states`: 0 is the embedding output, i is the
residual stream entering block i, and the last index (= number of blocks) is the final, post-norm state.

Two choices make a pooled state: which tokens (`POOLS`: every token; the example's own text without the
tokens the chat template adds; the answer only) and how they are reduced (`POOLINGS`: mean or last).
"""

from __future__ import annotations

import torch

from ..errors import SurgeryError
from ..prompts import Example, chat_text, pad_batches

POOLINGS = ("mean", "last")  # how the chosen tokens are reduced
POOLS = ("all", "content", "response")  # which tokens are reduced
_SENTINELS = ("\ue000prompt\ue001", "\ue000response\ue001")  # private-use characters: no template or text holds them


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


def default_pool(chat: bool, examples: list[Example]) -> str:
    """Plain text has no template: every token. A chat render: the answer when every example has one, else the content."""
    if not chat:
        return "all"
    return "response" if examples and all(ex.response is not None for ex in examples) else "content"


def text_spans(tokenizer, example: Example, chat: bool) -> tuple[str, dict[str, tuple[int, int]]]:
    """The text the model reads and the character spans of the example's own prompt and response in it.

    The chat template is rendered once around sentinels, which shows where it puts each message; whatever
    lies outside those places (the system prompt a template adds by default, role markers, the generation
    prompt) is the template's own text, even where it repeats words of the message.
    """
    if not chat:
        text = render(tokenizer, [example], chat=False)[0]
        spans = {"prompt": (0, len(example.prompt))}
        if example.response is not None:
            spans["response"] = (len(example.prompt) + 1, len(text))
        return text, spans
    text = chat_text(tokenizer, example.prompt, example.response)
    marked = chat_text(tokenizer, _SENTINELS[0], None if example.response is None else _SENTINELS[1])
    parts = [("prompt", example.prompt)] + ([("response", example.response)] if example.response is not None else [])
    spans, cursor, start = {}, 0, 0
    for (name, content), sentinel in zip(parts, _SENTINELS):
        at = marked.find(sentinel, cursor)
        if at < 0:
            raise SurgeryError(
                f"the chat template of {tokenizer.name_or_path} drops the {name}: --pool content/response "
                "cannot find it (use --pool all)"
            )
        start += at - cursor  # the template text between the previous message and this one is the same in both renders
        found = text.find(content, start)
        if found != start:  # a template that edits the message (strips it, say): look for what is left of it
            found = text.find(content.strip(), start)
            if found < 0 or not content.strip():
                raise SurgeryError(
                    f"the chat template of {tokenizer.name_or_path} changes the {name} text: --pool "
                    "content/response cannot tell its tokens from the template's (use --pool all)"
                )
            content = content.strip()
        spans[name] = (found, found + len(content))
        cursor, start = at + len(sentinel), found + len(content)
    return text, spans


def encode_examples(
    tokenizer, examples: list[Example], chat: bool, pool: str, max_length: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(token ids, pool masks) cut to `max_length`: mask 1 on the tokens `pool` reads.

    `content`: every token with a character of the prompt or the response (the template's own tokens and
    the special tokens a tokenizer adds carry none); `response`: those of the response only.
    """
    if pool not in POOLS:
        raise SurgeryError(f"--pool must be one of {', '.join(POOLS)}, got '{pool}'")
    if pool == "all":
        seqs = encode_texts(tokenizer, render(tokenizer, examples, chat), max_length, chat)
        return seqs, [[1] * len(s) for s in seqs]
    if not getattr(tokenizer, "is_fast", False):
        raise SurgeryError(
            f"--pool {pool} needs a fast tokenizer (character offsets); this model's is not: use --pool all"
        )
    if pool == "response" and any(ex.response is None for ex in examples):
        raise SurgeryError(
            "--pool response needs a response for every example (a response column or field): use --pool content"
        )
    seqs, masks = [], []
    for ex in examples:
        text, spans = text_spans(tokenizer, ex, chat)
        keep = [spans["response"]] if pool == "response" else list(spans.values())
        enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"][:max_length], enc["offset_mapping"][:max_length]
        mask = [int(b > a and any(a < e and b > s for s, e in keep)) for a, b in offsets]
        if not ids:
            raise SurgeryError("an example encodes to zero tokens: remove empty lines from the data")
        if not any(mask):
            raise SurgeryError(
                f"an example has no {pool} tokens within the first {max_length} (--max-length): '{ex.prompt[:60]}'"
            )
        seqs.append(ids)
        masks.append(mask)
    return seqs, masks


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[batch, seq, hidden] -> [batch, hidden]: mean over the masked tokens (the paper's choice) or the last of them."""
    mask = mask.to(hidden.device)
    if pooling == "mean":
        m = mask.unsqueeze(-1).float()
        return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=hidden.device)
    last = (positions * (mask > 0)).argmax(1)  # the last masked position (right padding: length - 1 for every token)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


def padded_masks(masks: list[list[int]], batch_size: int):
    """Pool masks batched and right-padded with zeros, as `pad_batches` pads the ids."""
    for ids, _ in pad_batches(masks, batch_size, 0):
        yield ids


@torch.no_grad()
def pooled_hidden_states(
    model,
    sequences: list[list[int]],
    layers: list[int],
    pooling: str = "mean",
    batch_size: int = 8,
    pad_id: int = 0,
    masks: list[list[int]] | None = None,
) -> dict[int, torch.Tensor]:
    """{layer: [n, hidden] fp32 on CPU} for each layer index in `layers` (see the module docstring).

    `masks` (from `encode_examples`): which tokens of each sequence are pooled; None: every real token.
    """
    if pooling not in POOLINGS:
        raise SurgeryError(f"--pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)  # the decoder without lm_head: no vocabulary-sized logits to compute
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    pooled = padded_masks(masks, batch_size) if masks is not None else None
    for ids, mask in pad_batches(sequences, batch_size, pad_id):
        out = body(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, use_cache=False)
        chosen = next(pooled) if pooled is not None else mask
        for layer in layers:
            rows[layer].append(pool(out.hidden_states[layer], chosen, pooling).cpu())
        del out
    return {layer: torch.cat(r) for layer, r in rows.items()}


def layer_count(model) -> int:
    """Index of the final (post-norm) hidden state = number of decoder blocks."""
    return int(model.config.num_hidden_layers)
