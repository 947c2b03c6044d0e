"""A small causal-LM fine-tuning loop on (prompt, response) chat pairs, loss on response tokens only.

Shared by the lab (aligning and attacking the real model) and the CI model organism.
"""

from __future__ import annotations

import fnmatch
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import SurgeryError
from ..prompts import Example, chat_text


@dataclass
class TrainOptions:
    steps: int = 100
    lr: float = 2e-5
    batch_size: int = 8
    max_length: int = 96
    warmup: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 10
    trainable: list[str] | None = None  # globs of parameter names to train (None: all), e.g. ["*.layers.*_proj.weight"]

    def validate(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise SurgeryError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise SurgeryError(f"learning rate must be positive, got {self.lr}")


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    examples: int = 0


def encode_example(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for prompt + response + EOS; prompt positions are masked with -100.

    Prompt and response are tokenized apart so the boundary is exact whatever the tokenizer merges.
    """
    if example.response is None:
        raise SurgeryError(f"training pair has no response (prompt: {example.prompt[:60]!r})")
    prompt = tokenizer(chat_text(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    ids = (prompt + response)[:max_length]
    labels = ([-100] * len(prompt) + response)[:max_length]
    return ids, labels


def _batch(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (seq, lab) in enumerate(pairs):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(seq)] = 1
    return ids, mask, labels


def response_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens (labels != -100)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def finetune(model, tokenizer, examples: list[Example], options: TrainOptions, log=None) -> TrainReport:
    """Full fine-tuning with AdamW for `options.steps` steps over shuffled epochs of `examples` (in place)."""
    options.validate()
    if not examples:
        raise SurgeryError("no training examples")
    encoded = [encode_example(tokenizer, ex, options.max_length) for ex in examples]
    encoded = [
        e for e in encoded if any(label != -100 for label in e[1])
    ]  # a prompt filling max_length teaches nothing
    if not encoded:
        raise SurgeryError(f"every training prompt is longer than max_length={options.max_length}")
    device = next(model.parameters()).device
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    params = [
        p
        for n, p in model.named_parameters()
        if options.trainable is None or any(fnmatch.fnmatchcase(n, g) for g in options.trainable)
    ]
    if not params:
        raise SurgeryError(f"no parameter matches trainable={options.trainable}")
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(options.warmup, 1)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    report = TrainReport(examples=len(encoded))
    order: list[int] = []
    start = time.perf_counter()
    model.train()
    for step in range(options.steps):
        if len(order) < options.batch_size:
            epoch = list(range(len(encoded)))
            rng.shuffle(epoch)
            order += epoch
        chosen, order = order[: options.batch_size], order[options.batch_size :]
        ids, mask, labels = (t.to(device) for t in _batch([encoded[i] for i in chosen], pad_id))
        loss = response_loss(model, ids, mask, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        report.losses.append(loss.item())
        if log and (step + 1) % options.log_every == 0:
            log(
                f"step {step + 1}/{options.steps} loss {sum(report.losses[-options.log_every :]) / options.log_every:.4f}"
            )
    model.eval()
    report.seconds = time.perf_counter() - start
    return report
