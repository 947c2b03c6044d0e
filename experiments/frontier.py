"""Can any strength of a method meet a bar on the lab's model? An oracle check on the evaluation sets, not a tuning.

    python experiments/frontier.py NAME METHOD MODEL --strengths 0.15,0.2 [--set key=value ...] [--lab lab/long]
    e.g. python experiments/frontier.py restore prune attacked --set reference=lab/long/models/aligned \
             --set max_samples=32 --set max_new_tokens=32 --strengths 0.12,0.15,0.17,0.19,0.21,0.23,0.25
         python experiments/frontier.py ablate24 ablate attacked --set layer=24 --set reverse=true \
             --strengths 1.25,1.5,1.75,2,2.5,3

The method's statistics are computed once, as the command computes them (its options: the defaults, or --set);
each strength's edit is applied to the model in memory and undone (`surgery.search.applied`: the written
checkpoint's exact weights), and measured on the lab's *evaluation* sets (64 AdvBench, 100 SST-2 dev, 48 Alpaca;
KL to MODEL). Picking a strength this way would be tuning on the evaluation set; the script only asks whether
any point of the method's trade-off meets an issue's bar, and no default is taken from it.
With --selection each strength is also measured as the automatic search measures it (its selection sets), to
show how far the search's figures sit from the evaluation's. Writes LAB/results/frontier-NAME.json (one row per
strength; rows already there are kept, or re-measured when --selection asks for what they lack).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from labkit import ROOT, eval_arguments, log  # noqa: E402
from labkit import evaluate as lab_evaluate  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("method")
    p.add_argument("model", help="a model of LAB/models, or a path")
    p.add_argument("--strengths", required=True)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a method option (as in its dataclass)"
    )
    p.add_argument("--lab", default=str(ROOT / "lab" / "long"))
    p.add_argument(
        "--selection",
        default=None,
        metavar="TASK",
        help="also measure each strength as the search measures it (its held-out selection sets, no budget; "
        "TASK as --task, e.g. sst2:lab/long/data/sst2_select.tsv): how well selection predicts evaluation",
    )
    eval_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    args = parse()
    sys.path.insert(0, str(ROOT))
    from surgery.methods import get_method
    from surgery.methods.base import RunOptions, open_context
    from surgery.search import applied

    lab = Path(args.lab)
    model_dir = lab / "models" / args.model if (lab / "models" / args.model).exists() else Path(args.model)
    out = lab / "results" / f"frontier-{args.name}.json"
    rows = json.loads(out.read_text()) if out.exists() else {}
    method = get_method(args.method)
    strengths = [float(s) for s in args.strengths.split(",")]
    settings = dict(kv.split("=", 1) for kv in args.set)
    options = method.Options(
        device="cpu", **{k: value(v) for k, v in settings.items()}, **{method.strength.field: strengths[0]}
    )
    ctx = open_context(method, model_dir, options, RunOptions(check=False))
    t0 = time.perf_counter()
    prepared = method.prepare(ctx, options)
    log(f"{args.name}: statistics in {time.perf_counter() - t0:.0f}s")
    model, tok = ctx.model(), ctx.tokenizer()
    from surgery.model import load_model

    reference = load_model(ctx.ckpt, ctx.device)
    measurer = None
    if args.selection:
        from surgery.search import Measurer

        unbounded = RunOptions(
            check=False,
            task=args.selection,
            max_perplexity_ratio=1e9,
            max_kl=1e9,
            max_over_refusal=1e9,
            max_accuracy_drop=1e9,
        )  # every figure of every strength, none early-stopped
        measurer = Measurer(ctx, prepared, unbounded, method.repair_metric)
        measurer.measure_baseline()
        measurer.measure_generated_baseline()  # every strength is confirmed below: proxy and generated figures both
    for strength in strengths:
        key = f"{strength:g}"
        if key in rows and (measurer is None or "selection" in rows[key]):
            continue
        t0 = time.perf_counter()
        edit = prepared.at(strength)
        with applied(model, ctx.target, edit):
            figures = (
                rows[key]["figures"]
                if key in rows
                else lab_evaluate(model, tok, f"{args.name}-{key}", args, reference).figures
            )  # evaluated before: kept
            if measurer is not None:
                from surgery.search import Point

                point = Point(strength)
                measurer.measure(point)
                measurer.confirm(point)
        chosen = {k: v for k, v in edit.report().items() if isinstance(v, (int, float, str)) and len(str(v)) < 80}
        row = {
            **rows.get(key, {}),
            "method": args.method,
            "model": str(model_dir),
            "options": settings,
            "strength": strength,
            "edit": chosen,
            "figures": figures,
        }
        row.setdefault("seconds", round(time.perf_counter() - t0, 1))
        if measurer is not None:
            row["selection"] = {**point.figures, "baseline": measurer.baseline, "prompts": measurer.prompts()}
        rows = {**(json.loads(out.read_text()) if out.exists() else {}), key: row}  # another run may have added rows
        out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
