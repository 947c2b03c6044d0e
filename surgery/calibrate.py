"""Calibration statistics gathered with forward hooks, never by storing activations."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


class InputNorms:
    """Running sum of squares of every input column of the chosen Linear modules, in fp32, over real tokens.

    `norms()` gives ||X_j||_2 over all calibration tokens, the Wanda statistic (padding excluded).
    """

    def __init__(self, model: nn.Module, module_names: list[str]):
        self.model = model
        self.modules = dict(model.named_modules())
        self.names = module_names
        self.sumsq: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._mask: torch.Tensor | None = None

    def _hook(self, name: str):
        def hook(module: nn.Linear, args, _output):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if self._mask is not None and self._mask.numel() == x.shape[0]:
                x = x[self._mask]
            sq = x.float().pow(2).sum(dim=0)
            if name in self.sumsq:
                self.sumsq[name] += sq
            else:
                self.sumsq[name] = sq

        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator["InputNorms"]:
        handles = [self.modules[n].register_forward_hook(self._hook(n)) for n in self.names]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _runner(self) -> nn.Module:
        """The decoder stack without the output head when no target lies outside it.

        The head's logits (batch x length x vocab in fp32) are the largest activation of a forward pass and
        Wanda never needs them, so skipping the head keeps calibration memory to the hidden states.
        """
        prefix = getattr(self.model, "base_model_prefix", "")
        base = getattr(self.model, prefix, None) if prefix else None
        if isinstance(base, nn.Module) and all(n.startswith(prefix + ".") for n in self.names):
            return base
        return self.model

    @torch.no_grad()
    def run(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> "InputNorms":
        device = next(self.model.parameters()).device
        runner = self._runner()
        with self.attached():
            for ids, mask in batches:
                self._mask = mask.reshape(-1).bool().to(device)
                self.tokens += int(self._mask.sum())
                runner(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        self._mask = None
        return self

    def norms(self) -> dict[str, torch.Tensor]:
        return {n: s.sqrt().cpu() for n, s in self.sumsq.items()}
