"""LoRA adapters (peft folders) on a base checkpoint: read and check them, apply and merge them with peft.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or, opted in with
--allow-pickle, `adapter_model.bin`, read by torch's weights-only unpickler). A method sees base + adapter
in one of two ways:

- merged (`MergedCheckpoint`): the base checkpoint in which every LoRA target's weight is the merged
  weight and every `modules_to_save` tensor the adapter's copy. The merge is peft's own
  (`merge_and_unload`, on the base loaded in fp32), cast back to the stored dtype. The method edits it like
  any checkpoint and writes a full checkpoint (ablate, edit, eigenshift, resta, revert, eval).
- unmerged (`AdapterCheckpoint`, `apply_adapter`): the adapter's own tensors are what the method scores and
  edits, and the output is an adapter folder `PeftModel.from_pretrained(base, OUT)` loads: Antidote as its
  paper runs it (only the fine-tuning LoRA matrices are pruned), and SafeLoRA.

Nothing here writes; the base and the adapter are only read.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, TensorInfo, _load_weights_only, first_line, read_shard_header
from .errors import SurgeryError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
ADAPTER_NAME = "default"  # the name peft gives the one adapter it loads
LORA_TENSOR = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA-adapted Linear of the base: its A [rank, in] and B [out, rank] tensors in the adapter file."""

    module: str  # the base module, e.g. model.layers.0.self_attn.q_proj
    a: str  # tensor names in the adapter file
    b: str
    rank: int
    in_features: int
    out_features: int

    @property
    def base_tensor(self) -> str:
        return f"{self.module}.weight"


class AdapterCheckpoint(Checkpoint):
    """A peft LoRA folder, indexed like a checkpoint (so the writer and the in-memory search treat it alike):
    `tensors` are the adapter file's, `config` is adapter_config.json, `base` the checkpoint it applies to."""

    base: Checkpoint
    targets: dict[str, LoraTarget]  # base module -> its LoRA pair
    saved: dict[str, str]  # adapter tensor of a modules_to_save copy -> the base tensor it replaces
    state: dict[str, torch.Tensor] | None = None  # pickle weights, read once

    def read(self, name: str) -> torch.Tensor:
        if self.state is not None:
            return self.state[name].clone()
        return super().read(name)

    def weight_files(self) -> list[Path]:
        return [self.path / (self.pickle_files[0] if self.pickle_files else WEIGHTS_NAME)]

    def source_files(self) -> list[Path]:
        return self.base.source_files() + self.weight_files()

    def lora_tensors(self) -> dict[str, LoraTarget]:
        """Every LoRA matrix (A and B) of the adapter -> its target."""
        return {name: t for t in self.targets.values() for name in (t.a, t.b)}

    def parameter_name(self, name: str) -> str:
        """Where an adapter tensor lives in the PeftModel `apply_adapter` builds."""
        return (
            module_of(name) + ".weight"
            if name in self.lora_tensors()
            else f"{PREFIX}{self.saved[name][: -len('.weight')]}.modules_to_save.{ADAPTER_NAME}.weight"
        )


def module_of(tensor: str) -> str:
    """The PeftModel module of a LoRA tensor: `X.lora_A.weight` -> `X.lora_A.default`."""
    return f"{tensor[: -len('.weight')]}.{ADAPTER_NAME}"


def open_adapter(
    path: str | Path, base: Checkpoint, allow_pickle: bool = False, role: str = "--adapter"
) -> AdapterCheckpoint:
    """Validate a peft LoRA folder against `base` from headers alone: every tensor a LoRA matrix of a Linear the
    base has, with its shapes, or a modules_to_save copy of a base tensor of the same shape."""
    path = Path(path)
    if not path.exists():
        raise SurgeryError(f"{role} {path} does not exist")
    if not path.is_dir():
        raise SurgeryError(
            f"{role} {path} is not a folder: give the adapter folder (adapter_config.json + {WEIGHTS_NAME})"
        )
    if path.resolve() == base.path.resolve():
        raise SurgeryError(f"{role} is the base model itself: give a peft LoRA adapter folder")
    config = _read_config(path / CONFIG_NAME, role)
    if (path / WEIGHTS_NAME).is_file():
        header = read_shard_header(path / WEIGHTS_NAME)
        adapter = AdapterCheckpoint(
            path, config, header.tensors, [WEIGHTS_NAME], False, {WEIGHTS_NAME: header.metadata}
        )
    elif (path / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise SurgeryError(
                f"{role} {path} holds only pickle weights ({PICKLE_NAME}); loading them can run arbitrary "
                "code. Convert to safetensors, or pass --allow-pickle if you trust the file"
            )
        state = _load_weights_only(path / PICKLE_NAME)
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise SurgeryError(f"{role} {path / PICKLE_NAME} is not a plain mapping of tensor names to tensors")
        tensors = {
            k: TensorInfo(k, WEIGHTS_NAME, v.dtype, tuple(v.shape), 0, v.numel() * v.element_size())
            for k, v in state.items()
        }
        adapter = AdapterCheckpoint(path, config, tensors, [WEIGHTS_NAME], False, {}, [PICKLE_NAME])
        adapter.state = state
    else:
        raise SurgeryError(f"{role} {path} has no weights: expected {WEIGHTS_NAME}")
    adapter.base = base
    adapter.targets, adapter.saved = _index(adapter, base, role)
    return adapter


def _read_config(path: Path, role: str) -> dict:
    if not path.is_file():
        raise SurgeryError(f"{role} {path.parent} is not a peft adapter folder: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SurgeryError(f"{role}: {path} is not valid JSON ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise SurgeryError(f"{role}: {path} is not a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise SurgeryError(
            f"{role}: {path} is a {kind or 'typeless'} adapter; only LoRA adapters (peft_type LORA) are supported"
        )
    if config.get("use_dora"):
        raise SurgeryError(f"{role}: {path} is a DoRA adapter (use_dora); only plain LoRA is supported")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise SurgeryError(f"{role}: {path} has rank r={config.get('r')!r}, not a positive integer")
    return config


def _index(adapter: AdapterCheckpoint, base: Checkpoint, role: str) -> tuple[dict[str, LoraTarget], dict[str, str]]:
    halves: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    for name, info in adapter.tensors.items():
        m = LORA_TENSOR.match(name)
        if m:
            halves.setdefault(m.group(1), {})[m.group(2)] = name
            continue
        if name.startswith(PREFIX) and name[len(PREFIX) :] in base.tensors:
            original = name[len(PREFIX) :]
            if tuple(base.tensors[original].shape) != tuple(info.shape):
                raise SurgeryError(
                    f"{role}: {name} has shape {list(info.shape)}, the base's {original} has "
                    f"{list(base.tensors[original].shape)}: the adapter was trained on another base"
                )
            saved[name] = original
            continue
        raise SurgeryError(
            f"{role}: tensor {name} is neither a LoRA matrix of a Linear layer nor a copy of a base tensor "
            "(embedding LoRA, biases and other tuners are not supported, or the base is another model)"
        )
    targets = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise SurgeryError(f"{role}: {module} has no {missing} matrix: the adapter file is incomplete")
        weight = f"{module}.weight"
        if weight not in base.tensors:
            raise SurgeryError(
                f"{role}: the adapter targets {module}, which the base {base.path} does not store as "
                f"{weight} (another base, or a tied weight)"
            )
        out_features, in_features = base.tensors[weight].shape[:2] if len(base.tensors[weight].shape) == 2 else (0, 0)
        a, b = adapter.tensors[pair["lora_A"]].shape, adapter.tensors[pair["lora_B"]].shape
        if len(a) != 2 or len(b) != 2 or a[1] != in_features or b[0] != out_features or a[0] != b[1]:
            raise SurgeryError(
                f"{role}: {module} has lora_A {list(a)} and lora_B {list(b)}, but the base's {weight} is "
                f"{list(base.tensors[weight].shape)}: the adapter was trained on another base"
            )
        targets[module] = LoraTarget(module, pair["lora_A"], pair["lora_B"], a[0], in_features, out_features)
    if not targets:
        raise SurgeryError(f"{role}: {adapter.path} holds no LoRA matrices")
    return targets, saved


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def lora_config(adapter: AdapterCheckpoint):
    from peft import LoraConfig

    with _quiet():
        try:
            config = LoraConfig.from_pretrained(str(adapter.path))
        except Exception as e:  # noqa: BLE001 - peft's reasons for refusing a config are the file's fault
            raise SurgeryError(f"--adapter: peft cannot read {adapter.path / CONFIG_NAME}: {first_line(e)}") from None
    config.inference_mode = True
    return config


def apply_adapter(model, adapter: AdapterCheckpoint, state: dict[str, torch.Tensor] | None = None):
    """`model` (the base, loaded) wrapped by peft with the adapter's tensors (or `state`, edited ones), unmerged, in
    eval mode. Every tensor must land: a key peft does not place, or a LoRA matrix left at its initial value, is an
    error (peft itself only warns)."""
    from peft import PeftModel, set_peft_model_state_dict

    config = lora_config(adapter)
    tensors = state if state is not None else {name: adapter.read(name) for name in adapter.tensors}
    with _quiet():
        try:
            wrapped = PeftModel(model, config, adapter_name=ADAPTER_NAME)
            result = set_peft_model_state_dict(wrapped, tensors, adapter_name=ADAPTER_NAME)
        except Exception as e:  # noqa: BLE001 - a config peft cannot apply to this base
            raise SurgeryError(f"--adapter: peft cannot apply {adapter.path} to the base: {first_line(e)}") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if f".{ADAPTER_NAME}." in k or "lora_" in k]
    if unexpected or missing:
        first = (unexpected or missing)[0]
        raise SurgeryError(
            f"--adapter: peft could not place every adapter tensor on the base ({first}): "
            "its target_modules do not match the file, or it was trained on another base"
        )
    device = next(model.parameters()).device
    return wrapped.to(device).eval()


def merged_tensors(adapter: AdapterCheckpoint, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The base tensors the adapter changes, merged by peft (`merge_and_unload` on the base loaded in fp32 on the
    CPU), each cast to the base's stored dtype."""
    from .model import load_model

    base = adapter.base
    model = load_model(base, torch.device("cpu"), torch.float32)
    with _quiet():
        merged = apply_adapter(model, adapter, state).merge_and_unload()
    params = dict(merged.named_parameters())
    names = [t.base_tensor for t in adapter.targets.values()] + list(adapter.saved.values())
    out = {n: params[n].detach().to(base.tensors[n].dtype).clone() for n in names}
    del model, merged, params
    return out


class MergedCheckpoint(Checkpoint):
    """The base checkpoint with an adapter merged in: what a method that edits full checkpoints sees. Reads of the
    tensors the adapter changes return the merged tensor (computed once, on first read); every other read is the
    base's. Its weight files are the base's; its sources add the adapter's (the manifest hashes both)."""

    def __init__(self, adapter: AdapterCheckpoint, state: dict[str, torch.Tensor] | None = None):
        base = adapter.base
        super().__init__(
            base.path, base.config, base.tensors, base.shards, base.sharded, base.shard_metadata, base.pickle_files
        )
        self.base, self.adapter, self._state, self._merged = base, adapter, state, None
        if hasattr(base, "state"):
            self.state = base.state

    def overrides(self) -> dict[str, torch.Tensor]:
        if self._merged is None:
            self._merged = merged_tensors(self.adapter, self._state)
        return self._merged

    def read(self, name: str) -> torch.Tensor:
        merged = self.overrides()
        return merged[name].clone() if name in merged else self.base.read(name)

    def weight_files(self) -> list[Path]:
        return self.base.weight_files()

    def source_files(self) -> list[Path]:
        return self.base.source_files() + self.adapter.weight_files()


def with_adapter(ckpt: Checkpoint, adapter: str | Path | None, allow_pickle: bool = False) -> Checkpoint:
    """The model a command measures or reads: `ckpt`, or with an adapter the base with it merged in."""
    return MergedCheckpoint(open_adapter(adapter, ckpt, allow_pickle)) if adapter else ckpt
