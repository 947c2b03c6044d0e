"""How well the search's forward-pass proxies agree with the generated judgement (docs/strength.md).

    python experiments/proxy_agreement.py [--model models/demo/attacked --reference models/demo/aligned
        --unaligned models/demo/base] [--methods revert,interpolate,safe-delta,prune-restore] [--points 4]

For each method, `--points` strengths spread over its search range (log or linear as the search spaces them) are
applied in memory exactly as `surgery repair` applies them, and measured twice on the same selection prompts (the
built-in sets' selection part and the built-in sentiment task's selection part, 48 each): the proxies (refusal-opening
probability, over-refusal proxy, label log-probability accuracy) and the generated judgement (greedy answers judged by
the keyword judge). Nothing here is an evaluation set. Writes a JSON of every point and prints a Markdown table:
the rank correlation (Spearman) of proxy and generated harmful score over the points, their mean gap, and how often
both put a point on the same side of each budget line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from labkit import ROOT, log  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/demo/attacked")
    p.add_argument("--reference", default="models/demo/aligned")
    p.add_argument("--unaligned", default="models/demo/base")
    p.add_argument("--methods", default="revert,interpolate,safe-delta,prune-restore")
    p.add_argument("--points", type=int, default=4, help="strengths per method")
    p.add_argument("--task", default="sst2:builtin")
    p.add_argument("--out", default="runs/proxy_agreement.json")
    return p.parse_args(argv)


def _pct(value) -> str:
    """A share as a percentage, or '-' for a figure the point did not get (confirmation stops at a broken line)."""
    return "-" if value is None else f"{100 * value:.1f}%"


def grid(low: float, high: float, n: int, log_scale: bool) -> list[float]:
    if n == 1:
        return [high]
    if log_scale:
        a, b = math.log(low), math.log(high)
        return [float(f"{math.exp(a + (b - a) * i / (n - 1)):.4g}") for i in range(n)]
    return [float(f"{low + (high - low) * i / (n - 1):.4g}") for i in range(n)]


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):  # ties share their mean rank
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")


def main(argv=None) -> None:
    from surgery import figures as F
    from surgery.methods import REGISTRY, RunOptions
    from surgery.methods.base import open_context
    from surgery.repair import RepairOptions, candidates
    from surgery.search import Measurer, Point, applied

    a = parse(argv)
    model = str(ROOT / a.model)
    given = RepairOptions(
        reference=str(ROOT / a.reference), unaligned=str(ROOT / a.unaligned), methods=a.methods.split(",")
    )
    run = RunOptions(task=a.task)
    from surgery.checkpoint import open_checkpoint

    anchor = open_checkpoint(given.reference)
    rows, measurer, shared = [], None, None
    for c in candidates(given):
        method = REGISTRY[c.method]
        t0 = time.perf_counter()
        ctx = open_context(method, model, c.options, run, lambda m: log(f"{c.label}: {m}"), searching=True)
        if shared is not None:
            ctx._model, ctx._tokenizer = shared
        ctx.cache = {}
        prepared = method.prepare(ctx, c.options)
        shared = (ctx.model(), ctx.tokenizer())
        if measurer is None:
            measurer = Measurer(ctx, prepared, run, F.HARMFUL, anchor=anchor)
            measurer.measure_baseline()
            measurer.measure_generated_baseline()
        measurer.ctx, measurer.prepared, measurer.counter = ctx, prepared, ctx
        knob = method.strength
        low, high = prepared.bounds() or (knob.low, knob.high)
        log(f"{c.label}: prepared in {time.perf_counter() - t0:.0f}s")
        for s in grid(low, high, a.points, knob.log):
            s = float(round(s)) if knob.integer else s
            point, t1 = Point(s), time.perf_counter()
            with applied(ctx.model(), ctx.target, prepared.at(s)):
                measurer._cheap(point, stop=False)
                proxy_seconds = time.perf_counter() - t1
                measurer.confirm(point)
            f = point.figures
            rows.append(
                {
                    "candidate": c.label,
                    "strength": s,
                    "figures": f,
                    "proxy_broken": sorted(set(point.proxy_broken)),
                    "broken": point.broken,
                    "proxy_seconds": round(proxy_seconds, 1),
                    "seconds": round(time.perf_counter() - t1, 1),
                }
            )
            log(
                f"{c.label} {knob.field} {s:g}: harmful proxy {_pct(f.get(F.HARMFUL_PROXY))} / generated "
                f"{_pct(f.get(F.HARMFUL))}, over-refusal {f[F.OVER_REFUSAL_PROXY_POINTS]:+.1f} / "
                f"{f[F.OVER_REFUSAL_POINTS]:+.1f}, accuracy drop {f.get(F.ACCURACY_PROXY_DROP_POINTS, 0):+.1f} / "
                f"{f.get(F.ACCURACY_DROP_POINTS, 0):+.1f} ({proxy_seconds:.0f}s proxies, "
                f"{time.perf_counter() - t1:.0f}s in all)"
            )
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"baseline": measurer.baseline, "points": rows}, indent=1))
    report(rows, run)


def sides(f: dict, run) -> dict[str, tuple[bool, bool]]:
    """(proxy says inside, generated says inside) for the two lines that have a proxy."""
    from surgery import figures as F

    return {
        "over-refusal": (
            f[F.OVER_REFUSAL_PROXY_POINTS] <= run.max_over_refusal,
            f[F.OVER_REFUSAL_POINTS] <= run.max_over_refusal,
        ),
        "accuracy": (
            f[F.ACCURACY_PROXY_DROP_POINTS] <= run.max_accuracy_drop,
            f[F.ACCURACY_DROP_POINTS] <= run.max_accuracy_drop,
        ),
    }


def report(rows: list[dict], run) -> None:
    from surgery import figures as F

    print(
        "| method | points | harmful: Spearman proxy vs generated | mean gap (proxy - generated) | "
        "over-refusal side agrees | accuracy side agrees |"
    )
    print("|---|---|---|---|---|---|")
    groups = {}
    for r in rows:
        groups.setdefault(r["candidate"], []).append(r)
    groups["all"] = rows
    for name, rs in groups.items():
        rs = [r for r in rs if F.HARMFUL in r["figures"]]  # a point whose confirmation stopped early has no harmful
        if not rs:
            continue
        x = [r["figures"][F.HARMFUL_PROXY] for r in rs]
        y = [r["figures"][F.HARMFUL] for r in rs]
        gap = 100 * sum(a - b for a, b in zip(x, y)) / len(rs)
        agree = {
            k: sum(sides(r["figures"], run)[k][0] == sides(r["figures"], run)[k][1] for r in rs)
            for k in ("over-refusal", "accuracy")
        }
        print(
            f"| {name} | {len(rs)} | {spearman(x, y):.2f} | {gap:+.1f} pts | {agree['over-refusal']}/{len(rs)} | "
            f"{agree['accuracy']}/{len(rs)} |"
        )


if __name__ == "__main__":
    main()
