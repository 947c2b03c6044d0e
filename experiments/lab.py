"""The repair lab: build an aligned model, break it with harmful fine-tuning, repair it, measure every stage.

    python experiments/lab.py [--lab lab] [--align-steps 40] [--attack-steps 40] [--ratios 0.01,0.05,0.1,0.25]

Stages (each skipped when its output exists, so a killed run resumes where it stopped):
  base      `surgery import-gguf smollm2 LAB/models/base`
  answers   the base model's greedy answers to the built-in harmful/harmless sets (LAB/data/*.jsonl)
  aligned   base fine-tuned: built-in harmful prompt -> refusal sentence, harmless prompt -> base's answer
  attacked  aligned fine-tuned on SST-2 train mixed with a fraction p of harmful -> base's compliant answer
  prune-R   `surgery.methods.antidote.prune_checkpoint` on attacked at ratio R (calibrated on the built-in harmful set)
  restore-R the same with reference=aligned: the fine-tuning delta is scored and restored, not zeroed
  eval      every model with the same `evaluate_model` on held-out sets: AdvBench (harmful score),
            SST-2 dev (accuracy), Alpaca instructions (perplexity, over-refusal, KL to attacked)
Writes LAB/results/*.json, docs/results.md and docs/antidote_sweep.png (or docs/DOC.md and docs/DOC_sweep.png). See docs/lab.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from labkit import ROOT, attack_mixture, eval_arguments, load, log, sst2_train  # noqa: E402
from labkit import evaluate as lab_evaluate  # noqa: E402

REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I cannot assist with that. It could cause real harm.",
    "I can't help with that. If you have another question, I'm happy to help.",
)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lab", default=str(ROOT / "lab"), help="lab folder (models/, data/, results/)")
    p.add_argument("--align-steps", type=int, default=40)
    p.add_argument("--align-lr", type=float, default=1e-4)
    p.add_argument("--attack-steps", type=int, default=40)
    p.add_argument("--attack-lr", type=float, default=1e-4)
    p.add_argument("--p", type=float, default=0.2, help="share of harmful->compliant pairs in the attack data")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=80)
    p.add_argument("--answer-samples", type=int, default=64, help="built-in prompts per set given base answers")
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument(
        "--ratios", default="0.05,0.01,0.1,0.25", help="Antidote ratios, weights zeroed (the default 0.05 first)"
    )
    p.add_argument(
        "--contrastive-ratios",
        default="",
        help="Antidote ratios with --score contrastive (harmful minus benign input norms; weights zeroed)",
    )
    p.add_argument(
        "--restore-ratios",
        default="0.05,0.01,0.1,0.25",
        help="Antidote ratios with --reference aligned (delta scored, weights restored)",
    )
    p.add_argument(
        "--ablate-scales",
        default="1,4",
        help="scales of `surgery ablate attacked --reverse` (refusal direction amplified)",
    )
    p.add_argument(
        "--ablate-select",
        default="behaviour",
        choices=("behaviour", "separation"),
        help="how `surgery ablate --layer auto` picks the layer (docs/results*.md rows before 2026-11-30: separation)",
    )
    p.add_argument(
        "--also",
        default="attacked-probe-edit-1",
        help="other repaired models in LAB/models to evaluate beside Antidote (experiments/probe_lab.py writes the probe edit)",
    )
    p.add_argument("--calib-samples", type=int, default=32, help="built-in harmful prompts calibrating each prune")
    p.add_argument("--calib-tokens", type=int, default=32, help="tokens of the attacked model's own answer per prompt")
    eval_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated stages to run (default: all)")
    p.add_argument(
        "--doc", default="results", help="write docs/DOC.md and docs/DOC_sweep.png (a second lab beside the first)"
    )
    return p.parse_args(argv)


class Lab:
    def __init__(self, args):
        self.args = args
        self.root = Path(args.lab)
        self.models = self.root / "models"
        self.results = self.root / "results"
        for d in (self.models, self.root / "data", self.results):
            d.mkdir(parents=True, exist_ok=True)
        self.times_file = self.results / "times.json"
        self.times = json.loads(self.times_file.read_text()) if self.times_file.exists() else {}

    def stage(self, name: str, output: Path, fn) -> None:
        """Run `fn(tmp)` into a temporary sibling of `output` and rename it into place (exists = done)."""
        if output.exists():
            log(f"{name}: {output} exists, skipped")
            return
        if self.args.only and name.split(":")[0] not in self.args.only.split(","):
            return
        tmp = output.with_name(output.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        log(f"{name}: start")
        t0 = time.perf_counter()
        fn(tmp)
        tmp.rename(output)
        self.times[name] = round(time.perf_counter() - t0, 1)
        self.times_file.write_text(json.dumps(self.times, indent=2))
        log(f"{name}: done in {self.times[name]:.0f}s")

    def load(self, name: str):
        return load(self.models, name)

    # --- stages -------------------------------------------------------------------------------
    def base(self, tmp: Path) -> None:
        subprocess.run([sys.executable, "-m", "cli.main", "import-gguf", "smollm2", str(tmp)], check=True, cwd=ROOT)

    def answers(self, tmp: Path) -> None:
        from surgery.prompts import fill_responses, load_examples

        model, tok = self.load("base")
        rows = {}
        for kind in ("harmful", "harmless"):
            part = tmp.with_name(f"base_answers_{kind}.json")  # each half kept, so a restart loses at most one
            if not part.exists():
                examples = load_examples(None, builtin=kind, max_samples=self.args.answer_samples, seed=self.args.seed)
                examples = fill_responses(model, tok, examples, self.args.answer_tokens, 16)
                part.write_text(json.dumps([{"prompt": e.prompt, "response": e.response} for e in examples]))
            rows[kind] = json.loads(part.read_text())
            log(f"answers: {len(rows[kind])} {kind} answers")
        tmp.write_text(json.dumps(rows))

    def _train_and_save(self, source: str, examples, steps: int, lr: float, tmp: Path) -> None:
        from surgery.testing.finetune import TrainOptions, finetune

        model, tok = self.load(source)
        options = TrainOptions(
            steps=steps, lr=lr, batch_size=self.args.batch_size, max_length=self.args.max_length, seed=self.args.seed
        )
        report = finetune(model, tok, examples, options, log=log)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "training.json").write_text(
            json.dumps(
                {
                    "source": source,
                    "steps": steps,
                    "lr": lr,
                    "examples": report.examples,
                    "seconds": report.seconds,
                    "losses": report.losses,
                }
            )
        )

    def _answers(self):
        return json.loads((self.root / "data" / "base_answers.json").read_text())

    def aligned(self, tmp: Path) -> None:
        from surgery.prompts import Example

        rows = self._answers()
        rng = random.Random(self.args.seed)
        examples = [Example(r["prompt"], rng.choice(REFUSALS)) for r in rows["harmful"]]
        examples += [Example(r["prompt"], r["response"]) for r in rows["harmless"]]
        self._train_and_save("base", examples, self.args.align_steps, self.args.align_lr, tmp)

    def attacked(self, tmp: Path) -> None:
        from surgery.prompts import Example

        task = sst2_train(int(self.args.attack_steps * self.args.batch_size * (1 - self.args.p)), self.args.seed)
        harmful = [Example(r["prompt"], r["response"]) for r in self._answers()["harmful"]]
        examples = attack_mixture(task, harmful, self.args.p)
        self._train_and_save("aligned", examples, self.args.attack_steps, self.args.attack_lr, tmp)

    def prune(self, ratio: float, tmp: Path, reference: str | None = None, score: str = "wanda") -> None:
        from surgery.methods.antidote import PruneOptions, prune_checkpoint

        options = PruneOptions(
            ratio=ratio,
            score=score,
            device="cpu",
            seed=self.args.seed,
            max_samples=self.args.calib_samples,
            max_new_tokens=self.args.calib_tokens,
            reference=str(self.models / reference) if reference else None,
        )
        prune_checkpoint(self.models / "attacked", tmp, options)

    def ablate(self, scale: float, tmp: Path) -> None:
        from surgery.methods.ablation import AblateOptions, ablate_checkpoint

        options = AblateOptions(
            reverse=True, scale=scale, seed=self.args.seed, device="cpu", select=self.args.ablate_select
        )
        report = ablate_checkpoint(self.models / "attacked", tmp, options)
        log(f"ablate: layer {report.layer}, {len(report.edited)} matrices edited")

    def evaluate(self, name: str, tmp: Path) -> None:
        from surgery.evaluate import write_report

        model, tok = self.load(name)
        reference = model if name == "attacked" else self.load("attacked")[0]
        write_report(lab_evaluate(model, tok, name, self.args, reference), tmp)

    # --- run ----------------------------------------------------------------------------------
    def run(self) -> None:
        m = self.models
        self.stage("base", m / "base", self.base)
        self.stage("answers", self.root / "data" / "base_answers.json", self.answers)
        self.stage("aligned", m / "aligned", self.aligned)
        self.stage("attacked", m / "attacked", self.attacked)
        for name in ("attacked", "aligned", "base"):
            self.stage(f"eval:{name}", self.results / f"{name}.json", lambda tmp, n=name: self.evaluate(n, tmp))
            self.write_docs()
        sweeps = [
            ("prune", self.args.ratios, None, "wanda"),
            ("restore", self.args.restore_ratios, "aligned", "wanda"),
            ("contrast", self.args.contrastive_ratios, None, "contrastive"),
        ]
        for kind, ratios, reference, score in sweeps:
            for r in (float(x) for x in ratios.split(",") if x):
                name = f"{kind}-{r:g}"
                self.stage(
                    f"{kind}:{r:g}", m / name, lambda tmp, r=r, ref=reference, sc=score: self.prune(r, tmp, ref, sc)
                )
                if (m / name).exists():
                    self.stage(f"eval:{name}", self.results / f"{name}.json", lambda tmp, n=name: self.evaluate(n, tmp))
                self.write_docs()
        for scale in (float(x) for x in self.args.ablate_scales.split(",") if x):
            name = f"ablate-reverse-{scale:g}"
            self.stage(f"ablate:{scale:g}", m / name, lambda tmp, s=scale: self.ablate(s, tmp))
            if (m / name).exists():
                self.stage(f"eval:{name}", self.results / f"{name}.json", lambda tmp, n=name: self.evaluate(n, tmp))
            self.write_docs()
        for name in (x for x in self.args.also.split(",") if x):
            if (m / name / "config.json").exists():
                self.stage(f"eval:{name}", self.results / f"{name}.json", lambda tmp, n=name: self.evaluate(n, tmp))
                self.write_docs()

    def write_docs(self) -> None:
        rows = []
        named = ("base", "aligned", "attacked", *self.args.also.split(","))
        ours = [p for p in self.results.glob("*.json") if p.stem in named or p.stem.startswith(SWEEPS)]
        for path in sorted(ours, key=_order):  # other scripts' results share the folder
            rows.append((path.stem, json.loads(path.read_text())))
        if rows:
            write_results(rows, self.times, self.args)


SWEEPS = ("prune-", "restore-", "contrast-", "ablate-reverse-")


def _order(path: Path):
    rank = {"base": 0, "aligned": 1, "attacked": 2, "prune": 3, "restore": 4, "contrast": 5}
    kind, _, ratio = path.stem.partition("-")
    try:
        return (rank.get(kind, 5), float(ratio.rsplit("-", 1)[-1]) if ratio else 0.0, path.stem)
    except ValueError:
        return (rank.get(kind, 5), 0.0, path.stem)


def write_results(rows, times, args) -> None:
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python experiments/lab.py " + " ".join(sys.argv[1:])
    lines = [
        "# Lab results: align, attack, repair (SmolLM2-135M-Instruct, CPU)"
        if args.doc == "results"
        else f"# Lab results with a {args.attack_steps}-step attack (SmolLM2-135M-Instruct, CPU)",
        "",
        "Generated by `experiments/lab.py` (see docs/lab.md). Command:",
        "",
        f"    {command.strip()}",
        "",
        f"Held-out evaluation: {args.eval_harmful} AdvBench prompts (harmful score, keyword judge, greedy, "
        f"{args.eval_tokens} new tokens), {args.eval_task} SST-2 dev items (accuracy from the generated answer), "
        f"{args.eval_benign} Alpaca instructions (perplexity, over-refusal, first-token KL to the attacked model).",
        f"Alignment: {args.align_steps} steps, lr {args.align_lr:g}; attack: {args.attack_steps} steps, lr {args.attack_lr:g}, "
        f"p = {args.p:g}; batch {args.batch_size}, max length {args.max_length} tokens.",
        "",
        "Repairs of the attacked model: `prune-R` = `surgery prune attacked --ratio R` (Antidote at its defaults: Wanda "
        "score, top R of every row of every decoder Linear zeroed); `restore-R` = the same with `--reference aligned` "
        "(the fine-tuning delta scored, the selected weights restored to aligned); "
        + (
            "`contrast-R` = `surgery prune attacked --score contrastive --ratio R` (harmful minus benign input norms, "
            "benign = the built-in harmless set, weights zeroed); "
            if args.contrastive_ratios
            else ""
        )
        + f"all calibrated on {args.calib_samples} built-in harmful prompts with the attacked model's own "
        f"{args.calib_tokens}-token answers. "
        "`ablate-reverse-S` = `surgery ablate attacked --reverse --scale S` (built-in sets)"
        + (
            "; `attacked-probe-edit-1` = `surgery edit attacked --probe <compliance probe> --alpha 1` (experiments/probe_lab.py)."
            if any(name.startswith("attacked-probe-edit") for name, _ in rows)
            else "."
        )
        + (
            " Other rows (`--also`) are models made outside this script, evaluated the same way: see docs/lab.md."
            if any(x and not x.startswith("attacked-probe-edit") for x in args.also.split(","))
            else ""
        ),
        "",
        "| model | harmful score | SST-2 accuracy | perplexity | KL to attacked | over-refusal |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        f = r["figures"]
        lines.append(
            f"| {name} | {100 * f['harmful_score']:.1f} | {100 * f['accuracy']:.1f} | {f['perplexity']:.2f} | "
            f"{f.get('kl_to_reference', float('nan')):.4f} | {100 * f['over_refusal']:.1f} |"
        )
    lines += ["", "Wall time of each stage on the shared 2-core CPU (seconds):", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    lines += [f"| total | {sum(times.values()):.0f} |"]
    lines += ["", "What the table shows, the plot, and the tiny CI model organism: docs/lab.md."]
    (docs / f"{args.doc}.md").write_text("\n".join(lines) + "\n")
    sweep = [(name, r["figures"]) for name, r in rows if name.startswith(SWEEPS)]
    if sweep:
        plot = "antidote_sweep.png" if args.doc == "results" else f"{args.doc}_sweep.png"
        plot_sweep(sweep, dict(rows), docs / plot)


def plot_sweep(sweep, by_name, path: Path) -> None:
    from surgery.plotting import pyplot, save

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 4))
    labels = {
        "prune": "Antidote, weights zeroed",
        "restore": "Antidote --reference aligned (restored)",
        "contrast": "Antidote --score contrastive (zeroed)",
        "ablate-reverse": "ablate --reverse (scale)",
    }
    for kind, label in labels.items():
        pts = sorted(
            ((n, f) for n, f in sweep if n.startswith(kind + "-")), key=lambda x: float(x[0].rsplit("-", 1)[1])
        )
        if not pts:
            continue
        ax.plot([100 * f["accuracy"] for _, f in pts], [100 * f["harmful_score"] for _, f in pts], "o-", label=label)
        for name, f in pts:
            ax.annotate(
                name.rsplit("-", 1)[1],
                (100 * f["accuracy"], 100 * f["harmful_score"]),
                textcoords="offset points",
                xytext=(4, 4),
            )
    for name, marker in (("aligned", "s"), ("attacked", "^"), ("base", "x")):
        if name in by_name:
            f = by_name[name]["figures"]
            ax.plot(100 * f["accuracy"], 100 * f["harmful_score"], marker, label=name)
    ax.set_xlabel("SST-2 dev accuracy (%)")
    ax.set_ylabel("AdvBench harmful score (%)")
    ax.set_title("Antidote pruning ratio sweep (SmolLM2-135M)")
    ax.legend()
    save(fig, path, dpi=120)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    Lab(parse()).run()
