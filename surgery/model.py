"""Load a checkpoint as a transformers model, and name the modules a method may touch."""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint
from .errors import SurgeryError

# A decoder block's modules carry a numeric index after the block list's name ("model.layers.3.mlp").
_BLOCK = re.compile(r"(^|\.)(layers|h|blocks|block)\.\d+\.")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SurgeryError("--device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SurgeryError(f"unknown device '{device}': use cpu, cuda or auto")
    return torch.device(device)


def compute_dtype(device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """fp32 on CPU (half-precision matmuls are slow and lossy there); the stored dtype on GPU."""
    if device.type == "cpu" or stored is None or not stored.is_floating_point:
        return torch.float32
    return stored


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader uses tqdm directly
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_config(ckpt: Checkpoint):
    from transformers import AutoConfig

    _quiet_transformers()
    try:
        return AutoConfig.from_pretrained(str(ckpt.path))
    except (ValueError, KeyError) as e:
        raise SurgeryError(
            f"unknown architecture '{ckpt.model_type}' in {ckpt.path / 'config.json'}: "
            f"this transformers cannot build it ({str(e).splitlines()[0][:120]})"
        )


def meta_model(ckpt: Checkpoint) -> nn.Module:
    """The model's module tree on the meta device: names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    config = load_config(ckpt)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise SurgeryError(f"architecture '{ckpt.model_type}' is not a causal language model: {str(e).splitlines()[0]}")


def load_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the checkpoint for calibration/evaluation, in eval mode, on `device`."""
    from transformers import AutoModelForCausalLM

    load_config(ckpt)  # turns an unknown architecture into one clear line
    if dtype is None:
        stored = next((t.dtype for t in ckpt.tensors.values() if t.dtype.is_floating_point), None)
        dtype = compute_dtype(device, stored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=dtype, use_safetensors=not ckpt.pickle_files)
        except (OSError, ValueError, RuntimeError) as e:
            raise SurgeryError(f"transformers cannot load {ckpt.path}: {str(e).splitlines()[0][:200]}")
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise SurgeryError(f"no usable tokenizer in {path}: {str(e).splitlines()[0][:200]}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def linear_targets(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Names of the nn.Linear modules to edit.

    Default: every Linear inside the decoder blocks (attention and MLP projections); embeddings and
    lm_head only when a pattern names them. Patterns are shell globs matched against module names.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not patterns:
        return [n for n in names if _BLOCK.search(n)]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, f"*.{p}") for p in patterns)]
    if not chosen:
        raise SurgeryError(f"--targets {','.join(patterns)} matches no Linear module (e.g. {names[0] if names else 'none'})")
    return chosen


def weight_name(ckpt: Checkpoint, module: str) -> str:
    """The checkpoint tensor holding `module`'s weight; tied heads resolve to the embedding."""
    name = f"{module}.weight"
    if name not in ckpt.tensors:
        raise SurgeryError(f"module {module} has no tensor {name} in the checkpoint (tied or renamed weights)")
    return name
