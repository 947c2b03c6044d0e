"""Greedy answer generation (what `surgery prune` does for prompts without responses) at several batch sizes.

    python bench/bench_generate.py --model models/smollm2 --prompts 64 --tokens 64 --batch-sizes 32,8

Prints the wall time per batch size and how many answers are identical to the first batch size's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from surgery.checkpoint import open_checkpoint
    from surgery.model import load_model, load_tokenizer
    from surgery.prompts import generate, load_examples

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=64, help="built-in harmful prompts (seeded subset)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="32,8")
    args = ap.parse_args()
    ckpt = open_checkpoint(args.model)
    tokenizer, model = load_tokenizer(ckpt.path), load_model(ckpt, torch.device("cpu"))
    prompts = [e.prompt for e in load_examples(None, builtin="harmful", max_samples=args.prompts, seed=0)]
    answers = {}
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        t0 = time.perf_counter()
        answers[bs] = generate(model, tokenizer, prompts, args.tokens, bs)
        first = next(iter(answers.values()))
        same = sum(a == b for a, b in zip(first, answers[bs]))
        print(
            f"batch {bs}: {time.perf_counter() - t0:.1f} s for {len(prompts)} prompts x {args.tokens} tokens; "
            f"{same}/{len(prompts)} answers identical to batch {next(iter(answers))}",
            flush=True,
        )


if __name__ == "__main__":
    main()
