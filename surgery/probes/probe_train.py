"""`surgery probe-train`: read a behaviour off one layer's (or every layer's) pooled hidden states.

Wang et al. 2024 ("Model Surgery", arXiv 2407.08770) §3.1: a 2-class linear probe on the mean of the
final hidden state over the tokens of plain text. --positive is the undesired class (probe row 1).
--pool says which tokens are pooled (with --chat, not the template's own: see surgery.probes.collect),
--pooling how, --classifier which head is fitted (surgery.probes.train).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import open_checkpoint, refuse_nonfinite
from ..errors import SurgeryError
from ..model import load_model, load_tokenizer, resolve_device
from ..prompts import load_examples
from ..writer import check_output_path, staged_output
from .artifact import Probe, ProbeMeta, save_probe
from .collect import POOLINGS, POOLS, default_pool, encode_examples, layer_count, pooled_hidden_states
from .train import CLASSIFIERS, PAPER_EPOCHS, PAPER_LR, fit_paper_probe, fit_probe

PLOT_NAME = "layers.png"
TABLE_NAME = "layers.tsv"


@dataclass
class ProbeOptions:
    layer: str = "final"  # "final", "all", or an index into output_hidden_states
    pooling: str = "mean"  # how the pooled tokens are reduced
    pool: str | None = None  # which tokens: all, content, response; None: content with --chat (response when every
    # example has one), all without
    classifier: str = "logistic"
    epochs: int | None = None  # paper classifier (default: the authors' 9)
    lr: float | None = None  # paper classifier (default: the authors' 1e-4)
    test_fraction: float = 0.2
    seed: int = 0
    chat: bool = False
    positive_name: str = "undesired"
    negative_name: str = "desired"
    column: str | None = None
    response_column: str | None = None
    max_samples: int | None = None  # per class
    max_length: int = 256
    batch_size: int = 8
    c: float | None = None  # None: chosen by cross-validation on the train split
    device: str = "auto"
    adapter: str | None = None  # a peft LoRA folder on the model: the probe reads base + adapter
    allow_pickle: bool = False  # accept pickle-only weights (read weights-only)
    allow_nonfinite: bool = False  # accept weights holding NaN or Inf (refused by default, before any work)

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise SurgeryError(f"--pooling must be one of {', '.join(POOLINGS)}, got '{self.pooling}'")
        if self.pool is not None and self.pool not in POOLS:
            raise SurgeryError(f"--pool must be one of {', '.join(POOLS)}, got '{self.pool}'")
        if self.classifier not in CLASSIFIERS:
            raise SurgeryError(f"--classifier must be one of {', '.join(CLASSIFIERS)}, got '{self.classifier}'")
        if self.classifier == "paper" and self.c is not None:
            raise SurgeryError("--c is the logistic classifier's regularisation; --classifier paper has none")
        if self.classifier != "paper" and (self.epochs is not None or self.lr is not None):
            raise SurgeryError("--epochs and --lr train the paper classifier: add --classifier paper")
        if self.epochs is not None and self.epochs <= 0:
            raise SurgeryError(f"--epochs must be positive, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise SurgeryError(f"--lr must be positive, got {self.lr}")
        if self.layer not in ("final", "all"):
            try:
                int(self.layer)
            except ValueError:
                raise SurgeryError(f"--layer must be a layer index, 'final' or 'all', got '{self.layer}'")
        if not 0.0 < self.test_fraction < 1.0:
            raise SurgeryError(f"--test-fraction must be between 0 and 1 (exclusive), got {self.test_fraction}")
        for name in ("max_length", "batch_size"):
            if getattr(self, name) <= 0:
                raise SurgeryError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.c is not None and self.c <= 0:
            raise SurgeryError(f"--c (inverse regularisation) must be positive, got {self.c}")
        if self.positive_name == self.negative_name:
            raise SurgeryError("--positive-name and --negative-name must differ")

    def layers(self, num_layers: int) -> list[int]:
        if self.layer == "final":
            return [num_layers]
        if self.layer == "all":
            return list(range(num_layers + 1))
        index = int(self.layer)
        index = index + num_layers + 1 if index < 0 else index  # -1 is the final state, as in Python
        if not 0 <= index <= num_layers:
            raise SurgeryError(f"--layer {self.layer} is out of range: this model has hidden states 0..{num_layers}")
        return [index]


@dataclass
class ProbeReport:
    output: Path
    probe: Probe
    layer_accuracy: dict[int, tuple[float, float]] = field(default_factory=dict)  # layer -> (train, test)
    seconds: dict[str, float] = field(default_factory=dict)


def train_probe_checkpoint(
    model_dir: str | Path,
    positive: str | Path,
    negative: str | Path,
    output: str | Path,
    options: ProbeOptions,
    force: bool = False,
) -> ProbeReport:
    """Train and save a probe; the output folder appears complete or not at all."""
    options.validate()
    from ..adapter import with_adapter

    ckpt = with_adapter(open_checkpoint(model_dir, options.allow_pickle), options.adapter, options.allow_pickle)
    if not options.allow_nonfinite:
        refuse_nonfinite(ckpt)
    num_layers = int(ckpt.config.get("num_hidden_layers", 0))
    layers = options.layers(num_layers)
    pos = load_examples(
        positive,
        column=options.column,
        response_column=options.response_column,
        max_samples=options.max_samples,
        seed=options.seed,
    )
    neg = load_examples(
        negative,
        column=options.column,
        response_column=options.response_column,
        max_samples=options.max_samples,
        seed=options.seed,
    )
    if min(len(pos), len(neg)) < 2:
        raise SurgeryError(
            f"a probe needs at least 2 examples per class, got {len(pos)} positive and {len(neg)} negative"
        )
    output = Path(output)
    inputs = [ckpt.path, Path(positive), Path(negative), *([Path(options.adapter)] if options.adapter else [])]
    check_output_path(output, inputs, force)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(ckpt.path)
    model = load_model(ckpt, resolve_device(options.device))
    num_layers = layer_count(model)
    pool = options.pool or default_pool(options.chat, pos + neg)
    seqs, masks = encode_examples(tokenizer, pos + neg, options.chat, pool, options.max_length)
    features = pooled_hidden_states(
        model, seqs, layers, options.pooling, options.batch_size, tokenizer.pad_token_id, masks
    )
    labels = torch.tensor([1] * len(pos) + [0] * len(neg))
    timings["hidden_states"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    epochs, lr = options.epochs or PAPER_EPOCHS, options.lr or PAPER_LR
    if options.classifier == "paper":
        fitted = {
            layer: fit_paper_probe(features[layer], labels, options.test_fraction, options.seed, epochs, lr)
            for layer in layers
        }
    else:
        fitted = {
            layer: fit_probe(features[layer], labels, options.test_fraction, options.seed, options.c)
            for layer in layers
        }
    timings["fit"] = time.perf_counter() - t0
    kept = (
        num_layers if num_layers in fitted else layers[0]
    )  # --layer all saves the final-layer probe (the one `edit` uses)
    best = fitted[kept]
    meta = ProbeMeta(
        fingerprint=ckpt.fingerprint(),
        model=str(ckpt.path.resolve()),
        layer=kept,
        num_layers=num_layers,
        hidden_size=int(best.weight.shape[1]),
        pooling=options.pooling,
        chat=options.chat,
        labels=[options.negative_name, options.positive_name],
        train_accuracy=best.train_accuracy,
        test_accuracy=best.test_accuracy,
        n_train=best.n_train,
        n_test=best.n_test,
        n_positive=len(pos),
        n_negative=len(neg),
        seed=options.seed,
        test_fraction=options.test_fraction,
        c=best.c,
        pool=pool,
        classifier=options.classifier,
        epochs=epochs if options.classifier == "paper" else None,
        lr=lr if options.classifier == "paper" else None,
        steps=best.steps,
        init_share=best.init_share,
        layer_accuracy={
            str(k): {"train": v.train_accuracy, "test": v.test_accuracy, "c": v.c} for k, v in fitted.items()
        }
        if len(layers) > 1
        else {},
    )
    probe = Probe(best.weight, best.bias, meta)
    table = {k: (v.train_accuracy, v.test_accuracy) for k, v in fitted.items()}
    with staged_output(output, inputs, force) as tmp:
        save_probe(probe, tmp)
        if len(layers) > 1:
            write_layer_table(table, tmp / TABLE_NAME)
            plot_layers(
                table,
                tmp / PLOT_NAME,
                f"{options.positive_name} vs {options.negative_name} ({ckpt.path.name}, "
                f"{options.pooling} of {pool} tokens, {options.classifier})",
            )
    return ProbeReport(output, probe, table, timings)


def write_layer_table(table: dict[int, tuple[float, float]], path: Path) -> None:
    lines = ["layer\ttrain_accuracy\ttest_accuracy"] + [
        f"{k}\t{tr:.4f}\t{te:.4f}" for k, (tr, te) in sorted(table.items())
    ]
    path.write_text("\n".join(lines) + "\n")


def plot_layers(table: dict[int, tuple[float, float]], path: Path, title: str) -> None:
    """Held-out (and train) probe accuracy per hidden-state index."""
    from ..plotting import pyplot, save

    xs = sorted(table)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, [table[x][1] for x in xs], marker="o", label="held-out")
    ax.plot(xs, [table[x][0] for x in xs], linestyle="--", alpha=0.6, label="train")
    ax.set_xlabel("hidden state (0 = embeddings, last = final post-norm)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.4, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)
