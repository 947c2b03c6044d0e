"""Hidden states at the output layer, collected while the model continues prompts (EigenShift's Φ and Ψ).

A forward hook on the output head records its input (the final hidden state) at every generation step,
so the state that produced generated token t is known exactly. Toxic states Φ: the steps whose token
belongs to a word the judge scores toxic on its own (when a toxic continuation has no such word, the
word whose addition raised the judge's score of the prefix the most). Non-toxic states Ψ: the last
prompt position of prompts whose continuation is not toxic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SurgeryError
from .prompts import chat_text, pad_batches

WORD = re.compile(r"[A-Za-z0-9']+")


@dataclass
class Continuation:
    prompt: str
    ids: list[int]  # generated tokens, cut at the first end-of-sequence
    text: str
    states: torch.Tensor | None  # [len(ids), hidden] fp32: the head's input at the step that produced each token


def _encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        return tokenizer(chat_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]  # plain-text continuation, as RealToxicityPrompts is run


@torch.no_grad()
def continue_prompts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    chat: bool = False,
    sample: bool = False,
    seed: int = 0,
    capture: bool = False,
) -> list[Continuation]:
    """Continue each prompt (greedy, or seeded nucleus sampling), optionally keeping the head's input per step."""
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    encoded = [_encode_prompt(tokenizer, p, chat) for p in prompts]
    if any(not e for e in encoded):
        raise SurgeryError("a prompt encodes to no tokens: remove empty prompts from the file")
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(e) for e in encoded)
    if context and longest + max_new_tokens > context:
        raise SurgeryError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's context ({context})"
        )
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch with little padding
    steps: list[torch.Tensor] = []

    def hook(_module, args, _output):
        steps.append(args[0][:, -1, :].detach().float().cpu())  # the position whose logits pick the next token

    eos = tokenizer.eos_token_id
    results: list[Continuation | None] = [None] * len(prompts)
    if sample:
        torch.manual_seed(seed)
    handle = head.register_forward_hook(hook) if capture else None
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = next(pad_batches([encoded[i] for i in idx], len(idx), tokenizer.pad_token_id, left=True))
            steps.clear()
            kwargs = dict(do_sample=True, top_p=0.9, temperature=1.0, top_k=0) if sample else dict(do_sample=False)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **kwargs,
            )
            new = out[:, ids.shape[1] :].cpu()
            stacked = torch.stack(steps[: new.shape[1]], dim=1) if capture else None  # [batch, steps, hidden]
            for row, i in enumerate(idx):
                tokens = new[row].tolist()
                if eos is not None and eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                states = stacked[row, : len(tokens)].clone() if capture else None
                if capture and not tokens:
                    states = stacked[row, :1].clone()  # keep the last prompt position even when the model stops at once
                results[i] = Continuation(prompts[i], tokens, text, states)
    finally:
        if handle is not None:
            handle.remove()
    return results  # type: ignore[return-value]


def token_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token inside decode(ids), by decoding growing prefixes (robust to byte-level BPE)."""
    spans, previous = [], 0
    for t in range(1, len(ids) + 1):
        end = len(tokenizer.decode(ids[:t], skip_special_tokens=True))
        spans.append((previous, max(end, previous)))
        previous = max(end, previous)
    return spans


def toxic_words(text: str, judge, threshold: float) -> list[tuple[int, int]]:
    """Character spans of the words that make `text` toxic.

    Rule: every word the judge scores >= threshold on its own; if there is none, the one word whose
    addition raised the judge's score of the prefix the most (the context made it toxic).
    """
    words = [(m.start(), m.end()) for m in WORD.finditer(text)]
    if not words:
        return []
    alone = judge.toxicity([text[s:e] for s, e in words])
    hits = [w for w, p in zip(words, alone) if p >= threshold]
    if hits:
        return hits
    prefixes = judge.toxicity([text[:e] for _, e in words])
    jumps = [prefixes[0]] + [b - a for a, b in zip(prefixes, prefixes[1:])]
    return [words[max(range(len(words)), key=jumps.__getitem__)]]


def toxic_steps(tokenizer, ids: list[int], judge, threshold: float) -> list[int]:
    """Generation steps whose token overlaps a toxic word of the continuation decode(ids)."""
    spans = token_spans(tokenizer, ids)
    words = toxic_words(tokenizer.decode(ids, skip_special_tokens=True), judge, threshold)
    return [t for t, (a, b) in enumerate(spans) if b > a and any(a < we and b > ws for ws, we in words)]


@dataclass
class CollectedStates:
    toxic: torch.Tensor  # Φ: [n_toxic_steps, hidden]
    nontoxic: torch.Tensor  # Ψ: [n_nontoxic_prompts, hidden]
    prompts: int = 0
    toxic_continuations: int = 0

    def check(self) -> None:
        if self.toxic.shape[0] == 0:
            raise SurgeryError(
                f"none of the {self.prompts} continuations was judged toxic: EigenShift needs toxic generations "
                "(use more or more provocative prompts, --sample, or a lower --threshold)"
            )
        if self.nontoxic.shape[0] == 0:
            raise SurgeryError(
                f"all {self.prompts} continuations were judged toxic: EigenShift needs non-toxic ones too"
            )


def collect_states(
    model,
    tokenizer,
    prompts: list[str],
    judge,
    *,
    threshold: float = 0.5,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    chat: bool = False,
    sample: bool = False,
    seed: int = 0,
) -> CollectedStates:
    """Φ and Ψ for `prompts` (see the module docstring for the rule)."""
    conts = continue_prompts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat=chat,
        sample=sample,
        seed=seed,
        capture=True,
    )
    scores = judge.toxicity([c.text for c in conts])
    toxic, nontoxic, n_toxic = [], [], 0
    for c, score in zip(conts, scores):
        if score >= threshold and c.ids:
            n_toxic += 1
            steps = toxic_steps(tokenizer, c.ids, judge, threshold)
            if steps:
                toxic.append(c.states[steps])
        elif score < threshold:
            nontoxic.append(c.states[:1])  # step 0 reads the last prompt position
    hidden = model.get_output_embeddings().weight.shape[1]
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, hidden)  # noqa: E731
    return CollectedStates(cat(toxic), cat(nontoxic), len(prompts), n_toxic)


def weights_identity(ckpt) -> str:
    """SHA-256 over the checkpoint's weight files (and an adapter's): states depend on every weight, not only the
    architecture."""
    import hashlib

    from .checkpoint import sha256_file

    return hashlib.sha256("".join(sha256_file(p) for p in ckpt.source_files()).encode()).hexdigest()[:16]


def save_states(path: str | Path, states: CollectedStates, fingerprint: str, weights: str, settings: dict) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "fingerprint": fingerprint,
        "weights": weights,
        "hidden_size": str(states.toxic.shape[1]),
        "prompts": str(states.prompts),
        "toxic_continuations": str(states.toxic_continuations),
    }
    meta.update({f"setting.{k}": str(v) for k, v in settings.items()})  # kept apart from the counts above
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"toxic": states.toxic.contiguous(), "nontoxic": states.nontoxic.contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)  # a half-written states file would be reused later as if complete


def load_states(path: str | Path, fingerprint: str, weights: str, hidden_size: int) -> CollectedStates:
    """Read a states file, refusing one collected on a different architecture or hidden size."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            toxic, nontoxic = f.get_tensor("toxic"), f.get_tensor("nontoxic")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's bad --states
        raise SurgeryError(
            f"--states {path} is not a states file written by surgery eigenshift ({str(e).splitlines()[0][:120]})"
        )
    if toxic.shape[-1] != hidden_size or nontoxic.shape[-1] != hidden_size:
        raise SurgeryError(
            f"--states {path} holds states of size {toxic.shape[-1]}, but the model's hidden size is {hidden_size}"
        )
    if meta.get("fingerprint") != fingerprint:
        raise SurgeryError(
            f"--states {path} was collected on a different model (fingerprint {meta.get('fingerprint')}, this one {fingerprint})"
        )
    if meta.get("weights") != weights:
        raise SurgeryError(
            f"--states {path} was collected on other weights of this architecture: delete it or give another path to collect anew"
        )
    return CollectedStates(
        toxic.float(), nontoxic.float(), int(meta.get("prompts", 0)), int(meta.get("toxic_continuations", 0))
    )


def continuation_toxicity(
    model,
    tokenizer,
    prompts: list[str],
    judge,
    *,
    threshold: float = 0.5,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    chat: bool = False,
    sample: bool = False,
    seed: int = 0,
):
    """Share of continuations the judge scores >= threshold, and the continuations (RealToxicityPrompts style)."""
    conts = continue_prompts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat=chat,
        sample=sample,
        seed=seed,
    )
    texts = [c.text for c in conts]
    scores = judge.toxicity(texts)
    return sum(s >= threshold for s in scores) / max(len(scores), 1), texts
