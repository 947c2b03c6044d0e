"""Everything the toolkit knows about architectures: which tensors are decoder Linears, residual writers,
gates, embeddings and heads, and when two checkpoints are the same architecture.

Names follow the Hugging Face llama family (llama, mistral, qwen2, SmolLM2, ...): decoder blocks are a
numbered list (`model.layers.N.`); other families that number their blocks `h.N.`, `blocks.N.` or
`block.N.` are recognised for the generic rules (decoder Linears), not for the llama-specific ones.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from .errors import SurgeryError

# A decoder block's modules carry a numeric index after the block list's name ("model.layers.3.mlp").
BLOCK = re.compile(r"(^|\.)(layers|h|blocks|block)\.(\d+)\.")
# The matrices that write into the residual stream: attention output and MLP output.
RESIDUAL_WRITER = re.compile(r"(^|\.)(layers|h|blocks|block)\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight$")
TOKEN_EMBEDDING = re.compile(r"(^|\.)embed_tokens\.weight$")
GATE_PROJECTION = re.compile(r"(^|\.)(layers|h|blocks|block)\.(\d+)\.mlp\.gate_proj\.weight$")
LAYER_INDEX = re.compile(r"\.(\d+)\.")

# Config keys that must agree for two checkpoints to be the same architecture (the model before a
# fine-tune, a direction's source, an evaluation reference). A deeper model with the same first layers
# is not the model before a fine-tune.
SHAPE_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def matches(name: str, patterns: list[str]) -> bool:
    """The `--targets` rule: a shell glob matches the whole name or its tail after a dot (`q_proj` is `*.q_proj`)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in patterns)


def is_residual_writer(tensor: str) -> bool:
    return RESIDUAL_WRITER.search(tensor) is not None


def is_token_embedding(tensor: str) -> bool:
    return TOKEN_EMBEDDING.search(tensor) is not None


def gate_projections(tensors) -> dict[str, int]:
    """Every decoder layer's mlp.gate_proj weight tensor and its layer index, in layer order."""
    found = {name: int(m.group(3)) for name in tensors if (m := GATE_PROJECTION.search(name))}
    return dict(sorted(found.items(), key=lambda kv: kv[1]))


def layer_of(name: str, prefix: str) -> int:
    """Decoder layer index of a tensor/module name under the block list `prefix`, or -1 outside the blocks."""
    if not name.startswith(prefix + "."):
        return -1
    m = LAYER_INDEX.match(name[len(prefix) :] + ".")
    return int(m.group(1)) if m else -1


def same_architecture(ckpt, other, role: str, tensors: list[str] | None = None, mine: str = "the model") -> None:
    """Refuse `other` unless it is the same architecture as `ckpt`: every SHAPE_KEYS entry that both configs
    state agrees, and every tensor in `tensors` (default: all of `ckpt`'s) exists in `other` with the same
    shape. `role` names the option in the error ("--reference", "--direction-from", ...). The one
    compatibility rule for every place that compares two checkpoints."""
    for key in SHAPE_KEYS:
        ours, theirs = ckpt.config.get(key), other.config.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            raise SurgeryError(f"{role} {other.path} has {key} {theirs}, {mine} has {ours}: not the same architecture")
    for name in tensors if tensors is not None else sorted(ckpt.tensors):
        if name not in other.tensors:
            raise SurgeryError(f"{role} {other.path} has no tensor {name}: not the same architecture")
        if other.tensors[name].shape != ckpt.tensors[name].shape:
            raise SurgeryError(
                f"{role} {other.path}: {name} has shape {list(other.tensors[name].shape)}, "
                f"{mine} has {list(ckpt.tensors[name].shape)}"
            )


def not_itself(ckpt, path: str | Path, role: str, what: str) -> None:
    if Path(path).resolve() == ckpt.path.resolve():
        raise SurgeryError(f"{role} is the model itself: give {what}")
