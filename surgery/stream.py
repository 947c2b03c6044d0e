"""Layer-by-layer calibration: only one decoder layer's weights in memory at a time.

The inputs of the first decoder layer are captured with a forward pre-hook that records all args and
kwargs (attention mask, rotary embeddings, whatever a new architecture passes), then each layer is
loaded from the shards, run over every calibration batch, observed, and dropped. Its outputs are the
next layer's inputs. The statistics equal those of a full forward pass (same ops, same order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch import is_block_list, layer_of, model_family
from .calibrate import InputNorms
from .checkpoint import Checkpoint
from .errors import SurgeryError
from .model import load_config


def return_freed_memory() -> bool:
    """Make glibc hand freed tensors of 1 MiB or more back to the system at once (mmap, not the heap).

    Streaming frees one layer's tensors after another; with glibc's default dynamic threshold those
    land on the heap, which fragments and keeps growing with the number of layers (measured: streamed
    peak RSS 1.01 GB on a 2 GB checkpoint with the default, 0.62 GB with this). A no-op where glibc is
    not the allocator. Returns whether the setting was applied.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD; a fixed value also turns off the dynamic threshold
    return bool(mallopt(m_mmap_threshold, 1 << 20))


class _Captured(Exception):
    pass


@dataclass
class _Batch:
    hidden: torch.Tensor
    kwargs: dict
    mask: torch.Tensor


def skeleton(ckpt: Checkpoint) -> nn.Module:
    """The model with parameters on the meta device and real buffers (rotary frequencies)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(load_config(ckpt))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks, the one the model's family names (surgery/arch.py)."""
    family = model_family(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and is_block_list(name, family):
            return name, module
    raise SurgeryError(
        f"cannot find the decoder blocks ({family.block_list}.N) of architecture '{model.config.model_type}' "
        "for streaming"
    )


def _materialise(model: nn.Module, ckpt: Checkpoint, prefix: str, device, dtype) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in list(model.named_parameters()):
        if name.startswith(prefix):
            set_module_tensor_to_device(model, name, device, value=ckpt.read(name), dtype=dtype)


class LayerwiseNorms:
    """Wanda input norms computed one decoder layer at a time, on demand, in layer order."""

    def __init__(self, ckpt: Checkpoint, batches, module_names: list[str], device: torch.device, dtype=torch.float32):
        self.ckpt = ckpt
        self.device = device
        self.dtype = dtype
        self.model = skeleton(ckpt)
        self.prefix, self.layers = decoder_layers(self.model)
        self.by_layer: dict[int, list[str]] = {}
        for name in module_names:
            self.by_layer.setdefault(layer_of(name, self.prefix), []).append(name)
        if -1 in self.by_layer:
            raise SurgeryError(f"streaming prunes decoder-block modules only; {self.by_layer[-1][0]} is outside them")
        self.done = -1
        self.tokens = 0
        self.norms: dict[str, torch.Tensor] = {}
        self.batches = self._capture(batches)

    @torch.no_grad()
    def _capture(self, batches) -> list[_Batch]:
        """Run the model up to the first decoder layer and keep that layer's full call per batch."""
        embed = self.model.get_input_embeddings()
        embed_name = next(n for n, m in self.model.named_modules() if m is embed)
        _materialise(self.model, self.ckpt, embed_name + ".", self.device, self.dtype)
        captured: list[_Batch] = []
        current: dict = {}

        def grab(_module, args, kwargs):
            current["args"], current["kwargs"] = args, kwargs
            raise _Captured

        handle = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for ids, mask in batches:
                try:
                    self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
                except _Captured:
                    pass
                args, kwargs = current["args"], current["kwargs"]
                kwargs = dict(kwargs)
                hidden = kwargs.pop("hidden_states", None) if not args else args[0]
                captured.append(_Batch(hidden, kwargs, mask.reshape(-1).bool().to(self.device)))
                self.tokens += int(mask.sum())
        finally:
            handle.remove()
        embed.to("meta")  # the embedding is no longer needed: free it
        return captured

    @torch.no_grad()
    def _advance(self) -> None:
        index = self.done + 1
        layer = self.layers[index]
        prefix = f"{self.prefix}.{index}."
        _materialise(self.model, self.ckpt, prefix, self.device, self.dtype)
        stats = InputNorms(self.model, self.by_layer.get(index, []))
        with stats.attached():
            for batch in self.batches:
                stats._mask = batch.mask
                out = layer(batch.hidden, **batch.kwargs)
                batch.hidden = out[0] if isinstance(out, tuple) else out
        self.norms.update(stats.norms())
        layer.to("meta")
        self.done = index

    def get(self, module: str) -> torch.Tensor:
        target = layer_of(module, self.prefix)
        while self.done < target:
            self._advance()
        return self.norms.pop(module)

    def write_order(self) -> list[str]:
        """Tensor names with everything outside the blocks first, then block by block."""
        return sorted(self.ckpt.tensors, key=lambda n: (layer_of(n, self.prefix), n))
