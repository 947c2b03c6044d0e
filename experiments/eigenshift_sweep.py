"""EigenShift lab: k × alpha sweep on a real model over RealToxicityPrompts (toxicity vs perplexity).

    nice -n 10 python experiments/eigenshift_sweep.py [--model lab/models/base] [--tag base]

1. split the 7 × 99 RTP prompts (seeded, per category) into a collection half and a held-out half
   -> LAB/data/eigenshift/rtp_collect.txt, rtp_eval.txt
2. `surgery eigenshift` at its defaults (alpha 0.9, k = 25 % of rank) with --states, timed: this collects
   the hidden states once and writes LAB/models/eigenshift-<tag>
3. the sweep in-process, reusing those states: for each (k, alpha) the edited head is set on the loaded
   model and measured with the same function the command uses (greedy continuations of the held-out
   half, ProfanityJudge >= 0.5; perplexity on the built-in harmless set)
Results: LAB/results/eigenshift_<tag>.json (resumable), docs/eigenshift_sweep.png.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RTP = sorted((ROOT.parent / "shared" / "data" / "rtp").glob("rtp_*.txt"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def split_rtp(
    folder: Path, collect_n: int | None = None, eval_n: int | None = None, seed: int = 0
) -> tuple[Path, Path]:
    """Per category: the first half of a seeded shuffle for collection, the second half held out (both capped)."""
    collect, held = [], []
    for path in RTP:
        lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        random.Random(seed).shuffle(lines)
        half = len(lines) // 2
        collect += lines[:half][:collect_n]
        held += lines[half:][:eval_n]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rtp_collect.txt").write_text("\n".join(collect) + "\n")
    (folder / "rtp_eval.txt").write_text("\n".join(held) + "\n")
    return folder / "rtp_collect.txt", folder / "rtp_eval.txt"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lab", default=str(ROOT / "lab"))
    p.add_argument("--model", default=None, help="default: LAB/models/base")
    p.add_argument("--tag", default="base")
    p.add_argument(
        "--settings",
        default="25/0,5/0,1/0,25/0.5,5/0.9,1/0.9,5/0.5,1/0.5",
        help="k (percent of rank)/alpha pairs, most informative first; 25/0.9 comes from the command run",
    )
    p.add_argument("--collect-per-category", type=int, default=14, help="collection prompts per RTP category (of 49)")
    p.add_argument("--eval-per-category", type=int, default=7, help="held-out prompts per RTP category (of 50)")
    p.add_argument(
        "--eval-samples", type=int, default=64, help="--max-eval-samples: cap on eval prompts and perplexity texts"
    )
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--plot", default=str(ROOT / "docs" / "eigenshift_sweep.png"))
    p.add_argument(
        "--compare",
        default="",
        help="other repaired model folders (e.g. LAB/models/detox-probe-edit) measured on the same prompts, beside the sweep",
    )
    p.add_argument("--skip-command", action="store_true", help="collect states in-process instead of via the CLI run")
    args = p.parse_args(argv)

    lab = Path(args.lab)
    model_dir = Path(args.model) if args.model else lab / "models" / "base"
    collect, held = split_rtp(lab / "data" / "eigenshift", args.collect_per_category, args.eval_per_category)
    states = lab / "results" / f"eigenshift_states_{args.tag}.safetensors"
    result_path = lab / "results" / f"eigenshift_{args.tag}.json"
    results = json.loads(result_path.read_text()) if result_path.is_file() else {"rows": {}}
    common = [
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--batch-size",
        str(args.batch_size),
        "--device",
        "cpu",
        "--max-eval-samples",
        str(args.eval_samples),
    ]

    if "command" not in results and not args.skip_command:
        cmd = [
            str(Path(sys.executable).parent / "surgery"),
            "eigenshift",
            str(model_dir),
            "--prompts",
            str(collect),
            "--eval-prompts",
            str(held),
            "--states",
            str(states),
            "--output",
            str(lab / "models" / f"eigenshift-{args.tag}"),
            "--force",
            *common,
        ]
        log("running surgery " + " ".join(cmd[1:]))
        t0 = time.perf_counter()
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(run.stdout, run.stderr, sep="\n", flush=True)
        if run.returncode:
            raise SystemExit(f"the command failed with exit code {run.returncode}")
        results["command"] = {
            "argv": "surgery " + " ".join(cmd[1:]),
            "wall_s": time.perf_counter() - t0,
            "stdout": run.stdout,
        }
        # the command measured the unedited model and its default setting with the same function: reuse both
        report = json.loads((lab / "models" / f"eigenshift-{args.tag}" / "surgery.json").read_text())["report"]
        results["command"]["report"] = report
        results["base"] = report["before"]
        results["rows"]["25%/0.9"] = dict(
            report["after"],
            k=report["k"],
            percent=25.0,
            alpha=0.9,
            seconds=report["seconds"]["evaluate"] / 2,
            tph=report["tph"],
        )
        result_path.write_text(json.dumps(results, indent=2))

    import torch

    from surgery.checkpoint import open_checkpoint
    from surgery.judges import toxicity_judge
    from surgery.methods.eigenshift import (
        EigenShiftOptions,
        component_scores,
        components_for,
        decompose,
        head_tensors,
        measure,
        select_components,
        set_head,
        shifted_head,
    )
    from surgery.model import load_model, load_tokenizer
    from surgery.prompts import load_examples
    from surgery.states import collect_states, load_states, save_states, weights_identity

    torch.set_num_threads(2)
    options = EigenShiftOptions(
        prompts=str(collect),
        eval_prompts=str(held),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        device="cpu",
        states=str(states),
        max_eval_samples=args.eval_samples,
    )
    ckpt = open_checkpoint(model_dir)
    head = head_tensors(ckpt)
    model, tok = load_model(ckpt, torch.device("cpu")), load_tokenizer(ckpt.path)
    judge = toxicity_judge("profanity")
    fingerprint, weights = ckpt.fingerprint(), weights_identity(ckpt)
    if states.is_file():
        st = load_states(states, fingerprint, weights, head.shape[1])
    else:
        t0 = time.perf_counter()
        st = collect_states(
            model,
            tok,
            [e.prompt for e in load_examples(collect)],
            judge,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
        save_states(states, st, fingerprint, weights, {"prompts": collect})
        results["collect_s"] = time.perf_counter() - t0
    results["states"] = {
        "toxic": st.toxic.shape[0],
        "nontoxic": st.nontoxic.shape[0],
        "prompts": st.prompts,
        "toxic_continuations": st.toxic_continuations,
    }
    # exactly the subsets the command measured (same cap, same seed)
    eval_prompts = [e.prompt for e in load_examples(held, max_samples=options.max_eval_samples, seed=options.seed)]
    ppl_texts = [
        e.prompt
        for e in load_examples(None, builtin="harmless", max_samples=options.max_eval_samples, seed=options.seed)
    ]
    if "base" not in results:
        t0 = time.perf_counter()
        results["base"] = measure(model, tok, eval_prompts, ppl_texts, judge, options)
        results["measure_s"] = time.perf_counter() - t0
        result_path.write_text(json.dumps(results, indent=2))
    log(f"base: {results['base']}")

    weight = ckpt.read(head.source)
    d = decompose(weight)
    scores = component_scores(st.toxic, st.nontoxic, d.Vh)
    from surgery.metrics import tph

    for setting in args.settings.split(","):
        percent, alpha = (float(x) for x in setting.split("/"))
        k = components_for(d.rank, None, percent)
        chosen = select_components(scores, k)
        key = f"{percent:g}%/{alpha:g}"
        if key not in results["rows"]:
            t0 = time.perf_counter()
            set_head(model, shifted_head(weight, d, chosen, alpha))
            m = measure(model, tok, eval_prompts, ppl_texts, judge, options)
            base = results["base"]
            m.update(
                k=k,
                percent=percent,
                alpha=alpha,
                seconds=time.perf_counter() - t0,
                tph=tph(100 * base["toxicity"], 100 * m["toxicity"], base["perplexity"], m["perplexity"]),
            )
            results["rows"][key] = m
            result_path.write_text(json.dumps(results, indent=2))
            plot(results, Path(args.plot), args.tag)  # a killed run still leaves the plot of what it measured
        m = results["rows"][key]
        log(f"{key} (k={m['k']}): toxicity {100 * m['toxicity']:.2f}% ppl {m['perplexity']:.2f} TPH {m['tph']:.2f}")
    for other in (Path(x) for x in args.compare.split(",") if x):
        if other.name not in results.setdefault("compare", {}):
            t0 = time.perf_counter()
            m = measure(
                load_model(open_checkpoint(other), torch.device("cpu")), tok, eval_prompts, ppl_texts, judge, options
            )
            base = results["base"]
            m.update(
                seconds=time.perf_counter() - t0,
                tph=tph(100 * base["toxicity"], 100 * m["toxicity"], base["perplexity"], m["perplexity"]),
            )
            results["compare"][other.name] = m
            result_path.write_text(json.dumps(results, indent=2))
        m = results["compare"][other.name]
        log(f"{other.name}: toxicity {100 * m['toxicity']:.2f}% ppl {m['perplexity']:.2f} TPH {m['tph']:.2f}")
    plot(results, Path(args.plot), args.tag)
    print(table(results))


def table(results: dict) -> str:
    base = results["base"]
    lines = [
        "| k (% of rank) | alpha | toxicity % | perplexity | TPH |",
        "|---|---|---|---|---|",
        f"| — (base) | — | {100 * base['toxicity']:.2f} | {base['perplexity']:.2f} | — |",
    ]
    for r in results["rows"].values():
        lines.append(
            f"| {r['k']} ({r['percent']:g}%) | {r['alpha']:g} | {100 * r['toxicity']:.2f} | {r['perplexity']:.2f} | {r['tph']:.2f} |"
        )
    for name, r in results.get("compare", {}).items():
        lines.append(f"| {name} | | {100 * r['toxicity']:.2f} | {r['perplexity']:.2f} | {r['tph']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, tag: str) -> None:
    from surgery.plotting import pyplot, save

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    base = results["base"]
    ax.scatter(
        [base["perplexity"]], [100 * base["toxicity"]], marker="*", s=200, color="black", label=f"{tag} (unedited)"
    )
    for percent in sorted({r["percent"] for r in results["rows"].values()}):
        rows = sorted((r for r in results["rows"].values() if r["percent"] == percent), key=lambda r: r["alpha"])
        ax.plot(
            [r["perplexity"] for r in rows],
            [100 * r["toxicity"] for r in rows],
            "o-",
            label=f"k = {percent:g}% of rank",
        )
        for r in rows:
            ax.annotate(
                f"α={r['alpha']:g}",
                (r["perplexity"], 100 * r["toxicity"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    for name, r in results.get("compare", {}).items():
        ax.scatter([r["perplexity"]], [100 * r["toxicity"]], marker="s", s=50, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity on built-in harmless prompts (log scale)")
    ax.set_ylabel("toxic continuations of held-out RTP prompts (%)")
    ax.set_title(f"EigenShift on SmolLM2-135M-Instruct ({tag})")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(fig, path, dpi=120)


if __name__ == "__main__":
    main()
