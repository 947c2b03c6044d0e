"""The probe artifact: probe.safetensors (`weight` [2, hidden], `bias` [2]) + probe.json (what it was trained on).

Row 1 of `weight` is the undesired class (--positive, e.g. "toxic"); row 0 is the other class, kept at
zero so that softmax(W h + b)[1] = sigmoid(w·h + b) is exactly the fitted binary logistic regression.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from surgery.checkpoint import Checkpoint
from surgery.errors import SurgeryError

WEIGHTS_NAME = "probe.safetensors"
META_NAME = "probe.json"
UNDESIRED_ROW = 1


@dataclass
class ProbeMeta:
    fingerprint: str  # Checkpoint.fingerprint() of the model the probe was trained on
    model: str
    layer: int  # index into output_hidden_states; == num_layers means the final post-norm state
    num_layers: int
    hidden_size: int
    pooling: str
    chat: bool
    labels: list[str]  # [row 0 name, row 1 name]; row 1 is the undesired class
    undesired_row: int = UNDESIRED_ROW
    train_accuracy: float = 0.0
    test_accuracy: float = 0.0
    n_train: int = 0
    n_test: int = 0
    n_positive: int = 0
    n_negative: int = 0
    seed: int = 0
    test_fraction: float = 0.2
    c: float = 1.0  # logistic regression inverse regularisation strength
    layer_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # --layer all: per-layer figures
    extra: dict = field(default_factory=dict)  # keys this version does not know (newer versions, user notes): kept

    @classmethod
    def from_json(cls, raw: dict) -> "ProbeMeta":
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {**raw.get("extra", {}), **{k: v for k, v in raw.items() if k not in known and k != "extra"}}
        return cls(**{k: v for k, v in raw.items() if k in known}, extra=extra)


@dataclass
class Probe:
    weight: torch.Tensor
    bias: torch.Tensor
    meta: ProbeMeta

    @property
    def direction(self) -> torch.Tensor:
        """The undesired-class row w, unnormalised (what `surgery edit` adds to gate_proj rows)."""
        return self.weight[self.meta.undesired_row]

    def predict_proba(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(undesired) for pooled hidden states [n, hidden]."""
        return (hidden.float() @ self.weight.T + self.bias).softmax(-1)[:, self.meta.undesired_row]


def save_probe(probe: Probe, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"weight": probe.weight.contiguous(), "bias": probe.bias.contiguous()}, str(folder / WEIGHTS_NAME),
              metadata={"undesired_row": str(probe.meta.undesired_row), "fingerprint": probe.meta.fingerprint})
    (folder / META_NAME).write_text(json.dumps(asdict(probe.meta), indent=2) + "\n")
    return folder


def load_probe(folder: str | Path, ckpt: Checkpoint | None = None) -> Probe:
    """Read a probe; with `ckpt`, refuse it unless it was trained on a model of the same fingerprint."""
    folder = Path(folder)
    if not (folder / META_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise SurgeryError(f"{folder} is not a probe folder: expected {WEIGHTS_NAME} and {META_NAME} (from `surgery probe-train`)")
    try:
        meta = ProbeMeta.from_json(json.loads((folder / META_NAME).read_text()))
        tensors = load_file(str(folder / WEIGHTS_NAME))
        weight, bias = tensors["weight"].float(), tensors["bias"].float()
    except (json.JSONDecodeError, TypeError, AttributeError, KeyError, OSError, RuntimeError) as e:
        raise SurgeryError(f"probe {folder} is corrupt: {e}")
    if weight.ndim != 2 or weight.shape[0] != 2 or bias.shape != (2,) or weight.shape[1] != meta.hidden_size:
        raise SurgeryError(f"probe {folder} has weight {tuple(weight.shape)} / bias {tuple(bias.shape)}, expected [2, {meta.hidden_size}] / [2]")
    if ckpt is not None and meta.fingerprint != ckpt.fingerprint():
        raise SurgeryError(
            f"probe {folder} was trained on a different model (fingerprint {meta.fingerprint}, from {meta.model}); "
            f"{ckpt.path} has fingerprint {ckpt.fingerprint()}: train a probe on this architecture"
        )
    return Probe(weight, bias, meta)
