"""The probe artifact: probe.safetensors (`weight` [2, hidden], `bias` [2]) + probe.json (what it was trained on).

Row 1 of `weight` is the undesired class (--positive, e.g. "toxic"). A `logistic` probe keeps row 0 at
zero, so that softmax(W h + b)[1] = sigmoid(w·h + b) is exactly the fitted binary logistic regression and
row 1 is the whole logit-difference direction D. A `paper` probe keeps both trained rows, and row 1 is
what the paper adds to gate rows: D/2 plus its random initialisation (surgery.probes.train.fit_paper_probe).
probe.json files written before `pool` and `classifier` existed read as `all` and `logistic`, which is
what they were.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import Checkpoint, read_shard_header
from ..errors import SurgeryError
from .collect import POOLINGS, POOLS
from .train import CLASSIFIERS

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
    pooling: str  # how the pooled tokens are reduced (mean, last)
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
    c: float | None = 1.0  # logistic regression inverse regularisation strength (None: the paper classifier)
    pool: str = "all"  # which tokens were pooled (all, content, response); older probes pooled every token
    classifier: str = "logistic"  # logistic or paper (surgery.probes.train)
    epochs: int | None = None  # paper classifier: the training recipe and how much of row 1 is still random
    lr: float | None = None
    steps: int = 0
    init_share: float = 0.0
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

    @property
    def paper_alpha_per_alpha(self) -> float:
        """The paper's alpha that moves rows as far along the same classifier as alpha 1 does here.

        The paper adds its W[1], about D/2 (D = W[1] - W[0], the logit-difference direction) plus a random
        vector: a paper probe's row 1 is exactly that (factor 1); a logistic probe's row 1 is D (factor 2).
        """
        return 1.0 if self.meta.classifier == "paper" else 2.0

    def predict_proba(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(undesired) for pooled hidden states [n, hidden]."""
        return (hidden.float() @ self.weight.T + self.bias).softmax(-1)[:, self.meta.undesired_row]


def save_probe(probe: Probe, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"weight": probe.weight.contiguous(), "bias": probe.bias.contiguous()},
        str(folder / WEIGHTS_NAME),
        metadata={"undesired_row": str(probe.meta.undesired_row), "fingerprint": probe.meta.fingerprint},
    )
    (folder / META_NAME).write_text(json.dumps(asdict(probe.meta), indent=2) + "\n")
    return folder


def load_probe(folder: str | Path, ckpt: Checkpoint | None = None) -> Probe:
    """Read a probe; with `ckpt`, refuse it unless it was trained on a model of the same fingerprint."""
    folder = Path(folder)
    if not (folder / META_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise SurgeryError(
            f"{folder} is not a probe folder: expected {WEIGHTS_NAME} and {META_NAME} (from `surgery probe-train`)"
        )
    try:
        raw = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise TypeError(f"{META_NAME} is not a JSON object")
        meta = ProbeMeta.from_json(raw)
    except (UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
        raise SurgeryError(f"probe {folder} is corrupt: {e}")
    _check_meta(folder, meta)
    try:
        header = read_shard_header(folder / WEIGHTS_NAME)  # a junk file is refused before safetensors parses it
    except SurgeryError as e:
        raise SurgeryError(f"probe {folder} is corrupt: {e}") from None
    if set(header.tensors) != {"weight", "bias"}:
        raise SurgeryError(
            f"probe {folder} is corrupt: {WEIGHTS_NAME} holds {sorted(header.tensors)}, expected weight and bias"
        )
    tensors = load_file(str(folder / WEIGHTS_NAME))
    weight, bias = tensors["weight"].float(), tensors["bias"].float()
    if weight.ndim != 2 or weight.shape[0] != 2 or bias.shape != (2,) or weight.shape[1] != meta.hidden_size:
        raise SurgeryError(
            f"probe {folder} has weight {tuple(weight.shape)} / bias {tuple(bias.shape)}, expected [2, {meta.hidden_size}] / [2]"
        )
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise SurgeryError(f"probe {folder} is corrupt: its weights are not all finite numbers")
    if ckpt is not None and meta.fingerprint != ckpt.fingerprint():
        raise SurgeryError(
            f"probe {folder} was trained on a different model (fingerprint {meta.fingerprint}, from {meta.model}); "
            f"{ckpt.path} has fingerprint {ckpt.fingerprint()}: train a probe on this architecture"
        )
    return Probe(weight, bias, meta)


def _check_meta(folder: Path, meta: ProbeMeta) -> None:
    """probe.json's fields have the types and ranges probe-train writes; anything else would fail far from here."""

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    problems = [
        (isinstance(meta.fingerprint, str), "fingerprint is not a string"),
        (count(meta.num_layers), f"num_layers {meta.num_layers!r} is not a layer count"),
        (
            count(meta.layer) and (not count(meta.num_layers) or meta.layer <= meta.num_layers),
            f"layer {meta.layer!r} is not a hidden state of the model's 0..{meta.num_layers}",
        ),
        (count(meta.hidden_size) and meta.hidden_size > 0, f"hidden_size {meta.hidden_size!r} is not a positive size"),
        (meta.pooling in POOLINGS, f"pooling {meta.pooling!r} is not one of {', '.join(POOLINGS)}"),
        (meta.pool in POOLS, f"pool {meta.pool!r} is not one of {', '.join(POOLS)}"),
        (meta.classifier in CLASSIFIERS, f"classifier {meta.classifier!r} is not one of {', '.join(CLASSIFIERS)}"),
        (
            isinstance(meta.labels, list) and len(meta.labels) == 2 and all(isinstance(x, str) for x in meta.labels),
            f"labels {meta.labels!r} are not two class names",
        ),
        (
            meta.undesired_row in (0, 1) and not isinstance(meta.undesired_row, bool),
            f"undesired_row {meta.undesired_row!r} is not row 0 or 1 of the probe",
        ),
    ]
    for ok, why in problems:
        if not ok:
            raise SurgeryError(f"probe {folder} is corrupt: {META_NAME} says {why}")
