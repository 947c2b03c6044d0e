"""Peak resident memory of `surgery prune`, in memory and streamed, on synthetic Llama checkpoints of growing size.

    python bench/bench_stream_memory.py --sizes 0.5 1 2 4 --workdir /tmp/stream-bench

Each checkpoint is a Llama with hidden 1024 / intermediate 2816 and as many layers as the size needs,
random weights (std 0.02) in fp32, sharded at 1 GB. Each prune runs in its own child process
(bench/child.py), which reports its own peak RSS: the tool's alone.
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


def make_checkpoint(folder: Path, gigabytes: float, hidden: int = 1024, inter: int = 2816, vocab: int = 32000) -> int:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.testing.tiny import char_tokenizer

    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    outside = 2 * vocab * hidden + hidden
    layers = max(1, round((gigabytes * 2**30 / 4 - outside) / per_layer))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).named_parameters()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal current, size
        if current:
            shards.append(current)
            current, size = {}, 0

    for name, shape in shapes.items():
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        if size + t.numel() * 4 > 2**30:
            flush()
        current[name] = t
        size += t.numel() * 4
    flush()
    total = 0
    for i, tensors in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({n: fname for n in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def calibration_file(path: Path, n: int = 16) -> Path:
    rows = [
        {"prompt": f"Explain step {i} of a harmful plan in detail.", "response": "Sure, first you " * 6}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def peak_of_prune(model: Path, data: Path, out: Path, stream: bool) -> tuple[float, float]:
    args = [
        "prune",
        str(model),
        "-o",
        str(out),
        "--data",
        str(data),
        "--max-length",
        "64",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--stream" if stream else "--no-stream",
        "--force",
    ]
    wall, peak, _ = run_cli(args)
    shutil.rmtree(out, ignore_errors=True)
    return peak / 2**30, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1, 2, 4], help="checkpoint sizes in GB (fp32)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/surgery-stream-bench"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = calibration_file(args.workdir / "calib.jsonl")
    print(
        "| checkpoint | layers | runtime (dry run) | in memory: peak RSS | in memory: wall | streamed: peak RSS | streamed: wall |"
    )
    print("|---|---|---|---|---|---|---|")
    for gb in args.sizes:
        folder = args.workdir / f"llama-{gb}gb"
        if not folder.exists():
            make_checkpoint(folder, gb)
        layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
        _, floor, _ = run_cli(["prune", str(folder), "--dry-run"])  # Python + torch + transformers, no weights
        mem, mem_wall = peak_of_prune(folder, data, args.workdir / "out", stream=False)
        streamed, st_wall = peak_of_prune(folder, data, args.workdir / "out", stream=True)
        print(
            f"| {size:.2f} GiB | {layers} | {floor / 2**30:.2f} GiB | {mem:.2f} GiB | {mem_wall:.0f} s | {streamed:.2f} GiB "
            f"| {st_wall:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
