"""Everything the toolkit knows about architectures: one description per family of which tensors are the decoder
blocks, residual writers, gates and embedding, and when two checkpoints are the same architecture.

A family is data (`Family`), chosen by the checkpoint's config `model_type`. A model type that no family lists gets
one inferred from its tensor names: its decoder blocks are the numbered list most tensors sit in (`h` for
`transformer.h.N.`), and inside them the llama family's module names, the ones most Hugging Face decoders use.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import SurgeryError


@dataclass(frozen=True)
class Rows:
    """A role's rows of a block module's weight: block `index` of `of` equal row blocks, for a module that fuses
    several projections (phi3's mlp.gate_up_proj holds the gate rows, then the up rows)."""

    module: str
    index: int = 0
    of: int = 1

    def span(self, rows: int) -> range:
        """Which of the tensor's `rows` rows are this role's."""
        size = rows // self.of
        return range(self.index * size, (self.index + 1) * size)


@dataclass(frozen=True)
class Family:
    """One architecture family as tensor-name tails, matched after any prefix (a base model or a peft adapter adds
    or drops leading parts). Block modules are named inside `{block_list}.N.`."""

    name: str
    model_types: tuple[str, ...]
    block_list: str = "layers"
    # Block modules whose output is added to the residual stream: attention output and MLP output.
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    # (writer, norm): a norm the writer's output passes before that addition, which scales coordinate i by
    # norm_offset + weight_i. Gemma2 and gemma3 normalise both outputs so, and their norms compute 1 + weight.
    post_norms: tuple[tuple[str, str], ...] = ()
    norm_offset: float = 0.0
    gate: Rows | None = Rows("mlp.gate_proj")  # the gated MLP: act(gate x) * (up x); None without one
    up: Rows | None = Rows("mlp.up_proj")
    embedding: str = "embed_tokens"


LLAMA = Family("llama", ("llama", "mistral", "qwen2"))  # SmolLM2 is llama
GEMMA2 = Family(
    "gemma2",
    ("gemma2", "gemma3_text"),
    post_norms=(("self_attn.o_proj", "post_attention_layernorm"), ("mlp.down_proj", "post_feedforward_layernorm")),
    norm_offset=1.0,
)
PHI3 = Family("phi3", ("phi3",), gate=Rows("mlp.gate_up_proj", 0, 2), up=Rows("mlp.gate_up_proj", 1, 2))
FAMILIES = (LLAMA, GEMMA2, PHI3)

NUMBERED = re.compile(r"(?:^|\.)([A-Za-z_]\w*)\.\d+\.")  # the first numbered list in a name: "layers" in layers.3.
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


def family_of(model_type: str | None, names: Iterable[str] = ()) -> Family:
    """The family that lists `model_type`, or one inferred from the tensor `names` (the module docstring)."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    lists = Counter(m.group(1) for name in names if (m := NUMBERED.search(name)))
    block_list = lists.most_common(1)[0][0] if lists else LLAMA.block_list
    return replace(LLAMA, name=model_type or "unknown", model_types=(), block_list=block_list)


def model_family(model) -> Family:
    """The family of a loaded (or meta-device) transformers model."""
    return family_of(getattr(model.config, "model_type", None), (n for n, _ in model.named_parameters()))


def describe(family: Family) -> str:
    """The family as an error message names it."""
    if family.model_types:
        return f"the {family.name} family"
    return f"model type '{family.name}' (no family in surgery/arch.py lists it: llama names assumed)"


def _in_block(family: Family, inner: str) -> str:
    return rf"(?:^|\.){re.escape(family.block_list)}\.(\d+)\.{inner}"


def _role(tensor: str, family: Family, module: str) -> re.Match | None:
    return re.search(_in_block(family, rf"{re.escape(module)}\.weight$"), tensor)


def in_block(name: str, family: Family = LLAMA) -> bool:
    """Whether a tensor or module name lies inside a decoder block."""
    return re.search(_in_block(family, ""), name) is not None


def is_block_list(module: str, family: Family = LLAMA) -> bool:
    """Whether a module name is the family's list of decoder blocks."""
    return module == family.block_list or module.endswith("." + family.block_list)


def is_residual_writer(tensor: str, family: Family = LLAMA) -> bool:
    return any(_role(tensor, family, m) for m in family.residual_writers)


def is_token_embedding(tensor: str, family: Family = LLAMA) -> bool:
    return re.search(rf"(?:^|\.){re.escape(family.embedding)}\.weight$", tensor) is not None


def gate_projections(tensors: Iterable[str], family: Family = LLAMA) -> dict[str, int]:
    """Every decoder block's gate tensor and its layer index, in layer order (none without a gated MLP). A fused
    tensor's gate rows are `family.gate.span(rows)`."""
    if family.gate is None:
        return {}
    found = {name: int(m.group(1)) for name in tensors if (m := _role(name, family, family.gate.module))}
    return dict(sorted(found.items(), key=lambda kv: kv[1]))


def post_norm(writer: str, family: Family = LLAMA) -> str | None:
    """The norm tensor a residual writer's output passes before it joins the residual stream; None: it joins as is."""
    for module, norm in family.post_norms:
        if m := _role(writer, family, module):
            return f"{writer[: m.end(1)]}.{norm}.weight"
    return None


def matches(name: str, patterns: list[str]) -> bool:
    """The `--targets` rule: a shell glob matches the whole name or its tail after a dot (`q_proj` is `*.q_proj`)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in patterns)


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
