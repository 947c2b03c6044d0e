"""Did a repair leave the model working? A quick before/after check on harmless prompts.

Every repair command writes a new checkpoint; this measures, on a few built-in harmless prompts, the
perplexity of the input and of the output and the first-token KL divergence between them. The driver
runs it on the staged output, before the output is renamed into place, and puts the figures in its
manifest (surgery.methods.base.write_repair). It exists because the
lab showed a repair at its published defaults can break a small model outright (Antidote zeroing at
5 % took SmolLM2-135M's perplexity from 40 to 2.6 million) while the command reported success: the
user should hear that from the command, not from production.

One model is loaded at a time, so the check's memory is one model plus activations, never two.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, open_checkpoint
from .metrics import mean_kl, next_token_logprobs, perplexity
from .model import load_model, load_tokenizer, resolve_device
from .splits import CHECK, builtin_part

BROKEN_PERPLEXITY_RATIO = 10.0  # perplexity grown more than this: the output is called broken
DEFAULT_MAX_PERPLEXITY_RATIO = 2.0  # the default budget: past it a repair command exits 1
CHECK_SAMPLES = 32


@dataclass
class HealthCheck:
    prompts: int
    perplexity_before: float
    perplexity_after: float
    kl: float  # mean KL(before || after) of the first response token's distribution
    max_perplexity_ratio: float = DEFAULT_MAX_PERPLEXITY_RATIO

    @property
    def passed(self) -> bool:
        return self.perplexity_ratio <= self.max_perplexity_ratio  # NaN fails

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity_after / self.perplexity_before

    @property
    def broken(self) -> bool:
        return not self.perplexity_ratio <= BROKEN_PERPLEXITY_RATIO  # NaN counts as broken

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "perplexity_ratio": self.perplexity_ratio,
            "broken": self.broken,
            "broken_if_perplexity_ratio_above": BROKEN_PERPLEXITY_RATIO,
            "passed": self.passed,
            "prompts_from": "built-in harmless set, check part (never calibration or selection)",
        }

    def summary(self) -> str:
        line = (
            f"check on {self.prompts} built-in harmless prompts: perplexity {self.perplexity_before:.2f} -> "
            f"{self.perplexity_after:.2f} (x{self.perplexity_ratio:.2f}), first-token KL {self.kl:.4f}"
        )
        if self.broken:
            line += (
                "\nwarning: the output looks broken (perplexity grew more than "
                f"{BROKEN_PERPLEXITY_RATIO:g}x); measure it with `surgery eval` before using it"
            )
        return line


def _measure(
    model_dir: str | Path | Checkpoint,
    prompts: list[str],
    device: torch.device,
    batch_size: int,
    allow_pickle: bool = False,
) -> tuple[float, torch.Tensor]:
    ckpt = model_dir if isinstance(model_dir, Checkpoint) else open_checkpoint(model_dir, allow_pickle)
    tokenizer = load_tokenizer(ckpt.path)
    model = load_model(ckpt, device)
    ppl = perplexity(model, tokenizer, prompts, batch_size=batch_size)
    logprobs = next_token_logprobs(model, tokenizer, prompts, batch_size)
    del model
    gc.collect()
    return ppl, logprobs


def health_check(
    before: str | Path | Checkpoint,
    after: str | Path | Checkpoint,
    samples: int = CHECK_SAMPLES,
    device: str = "auto",
    batch_size: int = 4,
    allow_pickle: bool = False,
    max_perplexity_ratio: float = DEFAULT_MAX_PERPLEXITY_RATIO,
) -> HealthCheck:
    """Perplexity of `before` and `after` and their first-token KL on `samples` built-in harmless prompts
    (the check part of the set: never calibration or selection prompts)."""
    prompts = [e.prompt for e in builtin_part("harmless", CHECK)[:samples]]
    dev = resolve_device(device)
    ppl_before, p = _measure(before, prompts, dev, batch_size, allow_pickle)
    ppl_after, q = _measure(after, prompts, dev, batch_size)
    return HealthCheck(len(prompts), ppl_before, ppl_after, mean_kl(p, q), max_perplexity_ratio)
