"""Selection kernels against the baselines public code uses, on Llama-7B/70B weight shapes.

    python bench/bench_kernels.py --device cuda                       # GPU: Triton kernels + torch baselines
    python bench/bench_kernels.py --device cpu --models 7b --repeats 3  # CPU: the torch paths only

Per-row prune (Antidote/Wanda: zero the top `ratio` of |W|·‖X‖ in each row), for each weight shape:
- `sort`: the wanda reference (score matrix, `torch.sort` of every row, scatter the mask, zero);
- `topk`: `torch.topk` per row, scatter, zero;
- `kthvalue`: `torch.kthvalue` per row to get the threshold, compare, zero (no exact tie rule);
- `reference`: `surgery.select.prune_rows(kernels="torch")` (exact ties, chunked memory);
- `triton`: the fused kernel (`kernels="triton"`; CUDA only).
Global threshold (top `ratio` of all scores of a 7B-sized set, one flat fp32 tensor):
- `topk` / `sort` (fail or take many times the memory), `reference` (radix select in torch), `triton`.

Each row of the output: median wall time, effective bandwidth (bytes the operation must move at the
least, divided by time) as a fraction of the device's copy bandwidth measured in the same run
(`tensor.copy_` of a buffer of the same size), and peak extra device memory (CUDA) or n/a.
Prints markdown tables to paste into docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from surgery.select import global_threshold, prune_rows, rows_to_remove  # noqa: E402

# (out_features, in_features) of the Linear weights in one decoder block.
SHAPES = {
    "7b": {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (11008, 4096), "down_proj": (4096, 11008)},
    "70b": {"q/o_proj": (8192, 8192), "gate/up_proj": (28672, 8192), "down_proj": (8192, 28672)},
}
GLOBAL_7B = 6_476_005_376  # Llama-2-7B's Linear weights inside the decoder blocks (32 × 202,375,168)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, int]:
    """(median seconds, peak extra bytes on CUDA or 0) of fn() after one warm-up call."""
    fn()
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    return statistics.median(times), peak


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int) -> float:
    """Bytes per second of a device-to-device copy (read + write) of an nbytes buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds, _ = timed(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / seconds


# ---- per-row baselines (what public code does) --------------------------------------------------------


def prune_sort(w: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    score = w.abs().float() * scale
    idx = torch.sort(score, dim=-1, stable=True)[1][:, -k:]  # wanda: sort each row, take the top k
    mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
    return w.masked_fill(mask, 0)


def prune_topk(w: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    score = w.abs().float() * scale
    idx = torch.topk(score, k, dim=-1).indices
    mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
    return w.masked_fill(mask, 0)


def prune_kthvalue(w: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    score = w.abs().float() * scale
    kth = score.kthvalue(score.shape[1] - k + 1, dim=1, keepdim=True).values
    return w.masked_fill(score >= kth, 0)  # ties at the threshold all go: not exact


def row_table(args, device: torch.device, copy_bw: float) -> list[str]:
    lines = [
        "| model | weight | shape | dtype | ratio | method | median time | effective GB/s | of copy BW | peak extra memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dtype = getattr(torch, args.dtype)
    for model in args.models:
        for name, (rows, cols) in SHAPES[model].items():
            gen = torch.Generator(device="cpu").manual_seed(0)
            w = (torch.randn(rows, cols, generator=gen) * 0.02).to(device=device, dtype=dtype)
            scale = (torch.rand(cols, generator=gen) + 0.5).to(device)
            moved = 2 * w.numel() * w.element_size() + 4 * cols  # read W and the scale once, write W once
            for ratio in args.ratios:
                k = rows_to_remove(cols, ratio)
                methods = {
                    "sort": lambda: prune_sort(w, scale, k),
                    "topk": lambda: prune_topk(w, scale, k),
                    "kthvalue": lambda: prune_kthvalue(w, scale, k),
                    "reference": lambda: prune_rows(w, scale, ratio, kernels="torch"),
                }
                if device.type == "cuda":
                    methods["triton"] = lambda: prune_rows(w, scale, ratio, kernels="triton")
                for method in args.methods:
                    if method not in methods:
                        continue
                    try:
                        seconds, peak = timed(methods[method], device, args.repeats)
                    except torch.OutOfMemoryError:
                        lines.append(
                            f"| {model} | {name} | {rows}×{cols} | {args.dtype} | {ratio} | {method} | out of memory | | | |"
                        )
                        continue
                    bw = moved / seconds
                    peak_s = f"{peak / 2**20:.0f} MiB" if device.type == "cuda" else "n/a"
                    lines.append(
                        f"| {model} | {name} | {rows}×{cols} | {args.dtype} | {ratio} | {method} | {seconds * 1e3:.1f} ms "
                        f"| {bw / 1e9:.1f} | {bw / copy_bw:.0%} | {peak_s} |"
                    )
                    print(lines[-1], flush=True)
    return lines


def global_table(args, device: torch.device, copy_bw: float) -> list[str]:
    n = args.global_elements
    lines = [
        "| scores | ratio | method | median time | effective GB/s | of copy BW | peak extra memory |",
        "|---|---|---|---|---|---|---|",
    ]
    scores = torch.empty(n, dtype=torch.float32, device=device)
    chunk = 1 << 26
    gen = torch.Generator(device=device).manual_seed(0)
    for i in range(0, n, chunk):  # fill in chunks: randn on the whole tensor would need temporaries
        scores[i : i + chunk].exponential_(generator=gen)
    for ratio in args.ratios:
        k = rows_to_remove(n, ratio)
        methods = {
            "topk": lambda: torch.topk(scores, k).values.min(),
            "sort": lambda: torch.sort(scores).values[n - k],
            "reference": lambda: global_threshold(scores, ratio, kernels="torch"),
        }
        if device.type == "cuda":
            methods["triton"] = lambda: global_threshold(scores, ratio, kernels="triton")
        for method in args.methods:
            if method not in methods:
                continue
            try:
                seconds, peak = timed(methods[method], device, args.repeats)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                reason = "out of memory" if isinstance(e, torch.OutOfMemoryError) else str(e).splitlines()[0][:60]
                lines.append(f"| {n:,} fp32 | {ratio} | {method} | {reason} | | | |")
                print(lines[-1], flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            passes = 4 if method == "triton" else 2 if method == "reference" else 1
            bw = passes * 4 * n / seconds  # every radix pass reads the scores once
            peak_s = f"{peak / 2**20:.0f} MiB" if device.type == "cuda" else "n/a"
            lines.append(
                f"| {n:,} fp32 | {ratio} | {method} | {seconds * 1e3:.1f} ms | {bw / 1e9:.1f} | {bw / copy_bw:.0%} | {peak_s} |"
            )
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["7b", "70b"], choices=sorted(SHAPES))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.05, 0.5])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--methods", nargs="+", default=["triton", "reference", "sort", "topk", "kthvalue"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--global-elements", type=int, default=GLOBAL_7B, help="0 skips the global table")
    args = ap.parse_args()
    device = torch.device(args.device)
    copy_bw = copy_bandwidth(1 << 30, device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; copy bandwidth {copy_bw / 1e9:.1f} GB/s (read+write of 1 GiB)\n", flush=True)
    rows = row_table(args, device, copy_bw)
    print("\n## per-row prune\n" + "\n".join(rows))
    if args.global_elements:
        glob = global_table(args, device, copy_bw)
        print("\n## global threshold\n" + "\n".join(glob))


if __name__ == "__main__":
    main()
