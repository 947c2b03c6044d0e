"""What each task set sees of a repair's strength: label figures of a sentiment task at several strengths of a method.

    python experiments/task_signals.py --model lab/fair6/models/attacked --reference lab/fair6/models/aligned \
        --method regmean --strengths 0,0.25,0.5,0.65,0.8,0.889,0.94,0.97,1 \
        --set selection=builtin --set sst2-train=runs/sst2/select.tsv --set evaluation=../shared/data/sst2/dev.tsv:100

Each strength is applied in memory as `surgery repair` applies it (the method prepared once, with `--task
sst2:builtin`). For every set (NAME=PATH[:N], `builtin`: the built-in sentiment set's selection part; N items drawn
with seed 0) one pass at each prompt's last position gives, from the first answer token:
    hard     the search's accuracy proxy (`surgery.search.label_accuracy`)
    expected the mean probability of the right label among the two label words
    margin   the mean log-probability of the right label minus the wrong one (nats)
    kl       first-token KL to the unrepaired model on the set's prompts
Whether a set is a selection or an evaluation set is the caller's naming: the script reads none of the figures to
choose anything. Writes JSON (--out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from labkit import ROOT, log  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--method", default="regmean", choices=("regmean", "interpolate"))
    p.add_argument("--strengths", default="0,0.5,0.8,0.97,1")
    p.add_argument("--set", action="append", default=[], help="NAME=PATH[:N] (repeatable); PATH builtin: built-in")
    p.add_argument("--out", default="runs/task_signals.json")
    return p.parse_args(argv)


def signals(model, tokenizer, prompts, labels, label_ids, base=None) -> tuple[dict, torch.Tensor]:
    from surgery.metrics import mean_kl, next_token_logprobs
    from surgery.search import label_accuracy_of

    logp = next_token_logprobs(model, tokenizer, prompts, 8)
    scores = torch.stack([logp[:, ids].logsumexp(-1) for ids in label_ids], -1)
    y = torch.tensor(labels)
    rows = torch.arange(len(labels))
    found = {
        "hard": label_accuracy_of(logp, labels, label_ids),
        "expected": torch.softmax(scores, -1)[rows, y].mean().item(),
        "margin": (scores[rows, y] - scores[rows, 1 - y]).mean().item(),
        "kl": mean_kl(base, logp) if base is not None else 0.0,
    }
    return found, logp


def main(argv=None) -> None:
    from surgery.evaluate import sst2_items
    from surgery.methods import REGISTRY, RunOptions
    from surgery.methods.base import open_context
    from surgery.metrics import SST2_LABELS
    from surgery.search import applied, label_tokens

    a = parse(argv)
    method = REGISTRY[a.method]
    options = method.Options(reference=str(ROOT / a.reference))
    ctx = open_context(method, str(ROOT / a.model), options, RunOptions(task="sst2:builtin"), log)
    ctx.cache = {}
    prepared = method.prepare(ctx, options)
    model, tokenizer = ctx.model(), ctx.tokenizer()
    label_ids = label_tokens(tokenizer, SST2_LABELS)
    sets = {}
    for spec in a.set or ["selection=builtin"]:
        name, _, where = spec.partition("=")
        path, _, n = where.partition(":")
        path = path if path == "builtin" else str(ROOT / path)
        sets[name] = sst2_items(path, int(n) if n else None, 0, part="selection")
    base = {k: signals(model, tokenizer, *v, label_ids)[1] for k, v in sets.items()}
    table = {}
    for s in (float(x) for x in a.strengths.split(",")):
        t0 = time.perf_counter()
        with applied(model, ctx.target, prepared.at(s)):
            table[s] = {k: signals(model, tokenizer, *v, label_ids, base[k])[0] for k, v in sets.items()}
        log(f"{method.strength.field} {s:g}: {time.perf_counter() - t0:.0f}s")
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"sets": {k: len(v[0]) for k, v in sets.items()}, "points": table}, indent=1))
    print("| " + method.strength.field + " | " + " | ".join(f"{k}: hard / expected / margin / KL" for k in sets) + " |")
    print("|---" * (len(sets) + 1) + "|")
    for s, row in table.items():
        cells = [
            f"{100 * f['hard']:.1f} / {100 * f['expected']:.1f} / {f['margin']:.2f} / {f['kl']:.3f}"
            for f in row.values()
        ]
        print(f"| {s:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
