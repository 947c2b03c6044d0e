"""Peak resident memory of `surgery resta` (fixed beta, streamed, --no-check) on synthetic checkpoints of growing size.

    python bench/bench_resta_memory.py --sizes 50 100 200 800 --workdir /tmp/resta-bench

Each size is three checkpoints (fine-tuned, aligned, unaligned) of random fp32 tensors (std 0.02, norms 1) under
Llama names: hidden 512, intermediate 1408, vocabulary 8000 (the embedding and the untied head, 16 MiB each, are
the largest tensors at every size) and as many decoder layers as the size needs, sharded at 200 MB. Each run is a
child process (bench/child.py) reporting its own peak RSS (VmHWM). The dry run is the same command with --dry-run:
the interpreter, torch and transformers, and the one tensor pair the V = 0 check reads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child import run_cli  # noqa: E402

HIDDEN, INTER, VOCAB, HEADS = 512, 1408, 8000, 8
SHARD_BYTES = 200 * 10**6


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of an untied Llama with `layers` decoder layers (no model is built)."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,)})
        shapes.update({p + f"self_attn.{m}_proj.weight": (HIDDEN, HIDDEN) for m in "qkvo"})
        shapes.update(
            {
                p + "mlp.gate_proj.weight": (INTER, HIDDEN),
                p + "mlp.up_proj.weight": (INTER, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, INTER),
            }
        )
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return shapes


def layers_for(megabytes: float) -> int:
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN
    outside = 2 * VOCAB * HIDDEN + HIDDEN
    return max(1, round((megabytes * 10**6 / 4 - outside) / per_layer))


def make_checkpoint(folder: Path, layers: int, seed: int) -> int:
    """A sharded fp32 safetensors folder with a Llama config.json; returns its weight bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        tie_word_embeddings=False,
    ).save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in llama_shapes(layers).items():
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        if size + t.numel() * 4 > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 4
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[50, 100, 200, 800], help="checkpoint sizes in MB (fp32)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/surgery-resta-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    largest = VOCAB * HIDDEN * 4
    print(
        "| checkpoint (fp32) | layers | largest tensor | dry run: peak RSS | resta: peak RSS | above the dry run "
        "| in largest tensors | wall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mb in args.sizes:
        layers = layers_for(mb)
        folders = {role: args.workdir / f"{role}-{mb:g}mb" for role in ("tuned", "aligned", "unaligned")}
        for seed, folder in enumerate(folders.values()):
            if not folder.exists():
                make_checkpoint(folder, layers, seed)
        size = sum(p.stat().st_size for p in folders["tuned"].glob("*.safetensors"))
        command = [
            "resta",
            folders["tuned"],
            "--aligned",
            folders["aligned"],
            "--unaligned",
            folders["unaligned"],
            "--beta",
            "1",
            "--device",
            "cpu",
            "--no-check",
        ]
        _, floor, _ = run_cli([*command, "--dry-run"])
        out = args.workdir / "out"
        wall, peak, _ = run_cli([*command, "-o", out, "--force"])
        shutil.rmtree(out, ignore_errors=True)
        above = peak - floor
        print(
            f"| {size / 2**20:.0f} MiB | {layers} | {largest / 2**20:.1f} MiB | {floor / 2**20:.0f} MiB "
            f"| {peak / 2**20:.0f} MiB | {above / 2**20:.0f} MiB | {above / largest:.1f} | {wall:.0f} s |",
            flush=True,
        )
        if not args.keep:
            for folder in folders.values():
                shutil.rmtree(folder)


if __name__ == "__main__":
    main()
