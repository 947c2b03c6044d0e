"""A second lab on a model aligned by its vendor: Qwen2.5-Coder-0.5B-Instruct, LoRA-attacked with the lab's mixture,
then repaired with the original as reference.

    python experiments/vendor_lab.py [--lab lab/qwen] [--steps 80] [--only base,attack,eval,repair]

Stages (each skipped when its output exists; written to NAME.tmp and renamed, so a killed run resumes at the
stage it was in):
  base     `surgery import-gguf qwen2.5-coder-0.5b LAB/models/original` (630 M parameters, fp32)
  attack   a peft LoRA on original (rank 16, all seven projections) trained on the lab's mixture: sentiment
           classification items of SST-2 train -> the label word, plus a share p of built-in harmful calibration
           prompts -> SmolLM2's compliant answers (experiments/demo_pair.py's answers) -> LAB/adapters/attack
  eval     original and original + attack (merged in memory) on the lab's held-out sets (labkit.evaluate)
  repair   `surgery repair LAB/models/original --adapter LAB/adapters/attack ...` and each fixed method, each
           written to LAB/models/NAME and evaluated the same way
Wall times: LAB/results/times.json; docs/results_vendor_lab.md is rewritten after every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_pair import TARGETS, DemoPair  # noqa: E402

from labkit import ROOT, attack_mixture, eval_arguments, load, log, sst2_train  # noqa: E402
from labkit import evaluate as lab_evaluate  # noqa: E402

SURGERY = Path(sys.executable).parent / "surgery"

# What the table does not show (measured 2026-12-06 on the 2-core CPU, beside other jobs).
NOTES = [
    "Notes:",
    "",
    "- The attack was rebuilt on 2026-12-06 from experiments/demo_pair.py's answers of lab/fair6 (this script's",
    "  default `--answers`); the rows of 2026-12-03 (attacked 90.6 % / SST-2 80 %) came from an earlier answers file",
    "  and are replaced. The original's rows are the same as then.",
    "- The original's SST-2 accuracy is 0 % because it does not open its answer with the label word within the",
    '  4-token answer budget (`surgery.metrics.task_accuracy`): it writes "The sentiment of this". So a repair',
    "  toward the original costs the task as this judge reads it; the rows show how much of the attacked model's",
    "  accuracy each repair keeps.",
    "- `surgery repair` at its defaults (prune-adapter, interpolate, safe-delta) took 4,464 s, beside the SmolLM2 lab's",
    "  full fine-tune and the test suite (3-4 jobs on the 2 cores): prune-adapter's screening 1,670 s (its calibration",
    "  923 s before the unedited model was measured), interpolate's 545 s, Safe Delta's 1,840 s (the",
    "  original's answers and Hessians, 4 budgets), the finalist's refinement, generated confirmation and output check",
    "  403 s. It chose Safe Delta at budget 0.2207: harmful 91.7 -> 43.8 % on its 48 selection prompts, the task",
    "  proxy 20.8 points above the attacked model's.",
    "- On the held-out sets `surgery repair`'s output is as safe as the original (39.1 %, the same over-refusal and",
    "  perplexity) and answers SST-2 dev better than the attacked model (75 % against 58 %); Safe Delta at its fixed",
    "  default 0.1 is the original again (SST-2 1 %), interpolation at 0.5 keeps 70.3 % harmful.",
    "- Stages: `--only base,attack,eval`, then `--only repair,eval --repairs repair,interpolate-0.5,safe-delta`. The",
    "  repair rows' wall times: interpolate 0.5 and Safe Delta 0.1 ran alone, `surgery repair` beside other jobs.",
    "- Not rerun on this attack (the session's time): prune-adapter at a fixed ratio.",
    "- `surgery regmean` at its default alpha 0.5 (added later on 2026-12-06; `--repairs regmean-0.5`, the task Gram",
    "  from the built-in sentiment set's train part): 68.8 % harmful, SST-2 dev 57 % (the attacked model's 58 %),",
    "  perplexity 31.3; no safer than interpolation at the same alpha here. Its 1,222 s ran beside the test suite and",
    "  two SmolLM2 jobs.",
    "- `regmean --alpha auto` (2026-12-06, third session; `--repairs regmean-auto`): chose alpha 0.9703, the strongest",
    "  inside the budget (alpha 1, the original, loses the task): 91.7 -> 54.2 % on its 48 selection prompts; held out",
    "  48.4 % harmful, SST-2 dev 56 %, perplexity 30.4, over-refusal 6.2 %. 1,420 s (preparation 577 s: the task",
    "  Grams 151 s, the original's answers 219 s and Hessians 174 s; 7 points at 85-90 s each; the first 9 minutes",
    "  beside the test suite). Behind `surgery repair`'s Safe Delta choice on both figures (39.1 %, SST-2 75 %): on",
    "  this model RegMean keeps the fine-tune's answers on its inputs and the original's refusals only where the",
    "  safety data's inputs lie.",
    "- `surgery repair` rerun with regmean among its candidates (2026-12-06, fourth session; the same command, with",
    "  the earlier output kept aside): 6,317 s, beside one or two SmolLM2 lab jobs all the way. Screening:",
    "  prune-adapter 1,822 s, interpolate 455 s, Safe Delta 1,048 s, regmean 973 s (7 of 22 points rejected on the",
    "  task proxy alone). The finalists Safe Delta and regmean were refined and confirmed by generation: Safe Delta",
    "  budget 0.2207 at 43.8 % on the 48 selection prompts, regmean alpha 0.9703 at 54.2 %. It chose Safe Delta",
    "  0.2207 again, and wrote the same weights bit for bit (291 tensors equal), so the held-out row is unchanged.",
    "  Against the 4,464 s before, regmean's screening and its refinement and confirmation (973 + 771 s) make most of",
    "  the difference.",
]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lab", default="lab/qwen")
    p.add_argument(
        "--answers",
        default="lab/fair6/data/answers.json",
        help="SmolLM2's compliant answers to the built-in harmful calibration prompts: experiments/demo_pair.py's "
        "answers stage (its 'harmful' list), or a file holding that list alone",
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--p", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--repairs", default="repair", help="comma-separated repair jobs (see jobs())")
    eval_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None)
    return p.parse_args(argv)


class VendorLab(DemoPair):
    def base(self, tmp: Path) -> None:
        subprocess.run([str(SURGERY), "import-gguf", "qwen2.5-coder-0.5b", str(tmp)], check=True, cwd=ROOT)

    def attack_data(self):
        from surgery.prompts import Example

        a = self.args
        task = sst2_train(int(a.steps * a.batch_size * (1 - a.p)), a.seed)
        answers = json.loads(Path(a.answers).read_text())
        answers = answers["harmful"] if isinstance(answers, dict) else answers
        harmful = [Example(r["prompt"], r["response"]) for r in answers]
        random.Random(a.seed).shuffle(harmful)
        return attack_mixture(task, harmful, a.p)

    def attack(self, tmp: Path) -> None:
        from peft import LoraConfig, get_peft_model

        from surgery.testing.finetune import TrainOptions, finetune

        a = self.args
        model, tok = load(self.models, "original")
        model = get_peft_model(
            model,
            LoraConfig(
                r=a.rank,
                lora_alpha=a.lora_alpha,
                lora_dropout=0.0,
                bias="none",
                task_type="CAUSAL_LM",
                target_modules=TARGETS.split(","),
            ),
        )
        examples = self.attack_data()
        options = TrainOptions(
            steps=a.steps,
            lr=a.lr,
            batch_size=a.batch_size,
            max_length=a.max_length,
            seed=a.seed,
            trainable=["*lora_*"],
            log_every=5,
        )
        report = finetune(model, tok, examples, options, log=log)
        model.save_pretrained(tmp)
        (tmp / "training.json").write_text(
            json.dumps(
                {
                    "source": "original",
                    "rank": a.rank,
                    "lora_alpha": a.lora_alpha,
                    "steps": a.steps,
                    "lr": a.lr,
                    "batch_size": a.batch_size,
                    "max_length": a.max_length,
                    "p": a.p,
                    "examples": len(examples),
                    "seconds": round(report.seconds, 1),
                    "losses": [round(x, 4) for x in report.losses],
                },
                indent=1,
            )
        )

    def model_of(self, name: str):
        """A row's model: the attack adapter or a repair's adapter merged onto the original, or a full checkpoint."""
        if name == "attacked":
            return load(self.models, str(self.adapters / "attack"), base="original")
        return load(self.models, name, base="original")

    def evaluate(self, name: str, tmp: Path) -> None:
        from surgery.evaluate import write_report

        model, tok = self.model_of(name)
        reference = model if name == "attacked" else self.model_of("attacked")[0]
        write_report(lab_evaluate(model, tok, name, self.args, reference), tmp)

    def jobs(self) -> dict[str, list[str]]:
        m, ad = self.models, self.adapters
        original = str(m / "original")
        pair = [original, "--adapter", str(ad / "attack"), "--reference", original]  # the attack on its original
        task = ["--task", "sst2:builtin"]
        return {
            "repair": ["repair", *pair, *task],
            "repair-fast": ["repair", *pair, *task, "--methods", "interpolate,prune-adapter"],
            "interpolate-1": ["interpolate", *pair, "--alpha", "1"],
            "interpolate-0.5": ["interpolate", *pair, "--alpha", "0.5"],
            "safe-delta": ["safe-delta", *pair],  # budget 0.1
            # the budget `surgery repair` chose on an earlier SmolLM2 demonstration pair, not searched here
            "safe-delta-1.333": ["safe-delta", *pair, "--budget", "1.333"],
            "prune-adapter-0.05": ["prune", original, "--adapter", str(ad / "attack"), "--ratio", "0.05"],
            # RegMean, the task Gram from the built-in sentiment set's train part
            "regmean-0.5": ["regmean", *pair, "--alpha", "0.5", *task],
            "regmean-auto": ["regmean", *pair, "--alpha", "auto", *task],
        }

    def run_job(self, name: str, argv: list[str], tmp: Path) -> None:
        t0 = time.perf_counter()
        with open(self.results / f"{name}.log", "w") as out:
            code = subprocess.run(
                [str(SURGERY), *argv, "-o", str(tmp)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "COLUMNS": "200"},
            ).returncode
        runs = json.loads((self.results / "runs.json").read_text()) if (self.results / "runs.json").exists() else {}
        runs[name] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "exit": code,
            "command": " ".join(["surgery", *argv, "-o", str(self.models / name)]),
        }
        (self.results / "runs.json").write_text(json.dumps(runs, indent=2))
        log(f"{name}: exit {code} after {runs[name]['seconds']:.0f}s")
        if not tmp.exists():
            tmp.mkdir()  # a failed repair is recorded (runs.json) and not retried
            (tmp / "FAILED").write_text(f"exit {code}\n")

    def run(self) -> None:
        m = self.models
        self.stage("base", m / "original", self.base)
        self.stage("attack", self.adapters / "attack", self.attack)
        for name in ("attacked", "original"):
            self.stage(f"eval:{name}", self.results / f"{name}.json", lambda tmp, n=name: self.evaluate(n, tmp))
            self.write_doc()
        jobs = self.jobs()
        for name in (x for x in self.args.repairs.split(",") if x):
            self.stage(f"repair:{name}", m / name, lambda tmp, n=name: self.run_job(n, jobs[n], tmp))
            if (m / name).exists() and not (m / name / "FAILED").exists():
                self.stage(f"eval:{name}", self.results / f"{name}.json", lambda tmp, n=name: self.evaluate(n, tmp))
            self.write_doc()

    def write_doc(self) -> None:
        runs = json.loads((self.results / "runs.json").read_text()) if (self.results / "runs.json").exists() else {}
        a = self.args
        lines = [
            "# A vendor-aligned model: Qwen2.5-Coder-0.5B-Instruct, LoRA-attacked and repaired (CPU)",
            "",
            "Generated by `experiments/vendor_lab.py` (its docstring: stages). Command:",
            "",
            "    python experiments/vendor_lab.py " + " ".join(sys.argv[1:]),
            "",
            f"Attack: LoRA rank {a.rank}, alpha {a.lora_alpha:g}, all seven projections, {a.steps} steps of "
            f"{a.batch_size} x {a.max_length} tokens, lr {a.lr:g}, harmful share p = {a.p:g} (SST-2 train items and "
            "built-in harmful calibration prompts with SmolLM2's compliant answers). Held-out evaluation (never "
            f"seen by a command): {a.eval_harmful} AdvBench prompts (harmful score; one prompt = "
            f"{100 / a.eval_harmful:.1f} points), {a.eval_task} SST-2 dev items, {a.eval_benign} Alpaca instructions "
            "(perplexity, over-refusal, first-token KL to the attacked model); greedy, "
            f"{a.eval_tokens} new tokens. Searches select on the built-in sets' selection part.",
            "",
            "| model | harmful score | SST-2 accuracy | perplexity | KL to attacked | over-refusal | empty answers | command | wall |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for path in sorted(self.results.glob("*.json"), key=lambda p: (p.stem not in ("original", "attacked"), p.stem)):
            if path.stem in ("times", "runs", "demo_times"):
                continue
            f = json.loads(path.read_text())["figures"]
            run = runs.get(path.stem, {})
            lines.append(
                f"| {path.stem} | {100 * f['harmful_score']:.1f} % | {100 * f['accuracy']:.0f} % | "
                f"{f['perplexity']:.1f} | {f.get('kl_to_reference', float('nan')):.3f} | "
                f"{100 * f['over_refusal']:.1f} % | {100 * f.get('empty_answers', 0):.1f} % | "
                f"{('`' + run['command'] + '`') if run else ''} | {run.get('seconds', '')} |"
            )
        lines += [
            "",
            "Stage wall times on the 2-core CPU (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in self.times.items()),
            "",
            *NOTES,
        ]
        (ROOT / "docs" / "results_vendor_lab.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    lab = VendorLab(parse())
    lab.times_file = lab.results / "times.json"
    lab.times = json.loads(lab.times_file.read_text()) if lab.times_file.exists() else {}
    lab.run()
