"""The demonstration pair and the fair lab reference: SmolLM2 aligned by a LoRA adapter that refuses harmful requests
and still answers everything else, then broken by a harmful LoRA fine-tune mixed into a sentiment task.

    python experiments/demo_pair.py [--lab lab/fair] [--only base,answers,align,attack,eval] [--fixtures]

Every input comes from the package (the built-in harmful/harmless request sets and the built-in sentiment set,
calibration/train parts only) or from experiments/data/benign_tasks.txt, so the pair is reproducible without
../shared/data; only the `eval` stage reads the lab's held-out sets (AdvBench, SST-2 dev, Alpaca). Stages (each
skipped when its output exists; written to NAME.tmp and renamed):
  base     `surgery import-gguf smollm2 LAB/models/base`
  answers  the base model's greedy answers to the calibration parts of the built-in harmful and harmless sets, to
           sentiment classification prompts made from the built-in sentiment set's train part and to the imperative
           benign instructions of --benign-tasks (LAB/data/answers.json)
  align    LoRA on base: harmful -> a refusal sentence; harmless, classification and imperative benign prompts -> the
           base model's own answer (so the reference answers task-formatted prompts and "Write a poem" instead of
           refusing them: the old lab's aligned model answered "I'm sorry," to every SST-2 prompt, and an alignment
           without the imperative instructions refused 8 of 48 Alpaca instructions)
           -> LAB/adapters/align, merged -> LAB/models/aligned
  attack   LoRA on aligned: sentiment train items -> the label word, plus a share p of harmful -> the base model's
           compliant answer -> LAB/adapters/attack, merged -> LAB/models/attacked
  full     (the lab's full fine-tune, reads ../shared/data) aligned fully fine-tuned as experiments/lab.py attacks:
           SST-2 train items -> label word plus the same share p of harmful -> compliant answers, --full-steps steps,
           lr --full-lr -> LAB/models/attacked-full
  eval     base, aligned, attacked (and attacked-full) on the lab's held-out sets (labkit.evaluate)
`--fixtures` copies both adapters (bf16) into surgery/data/demo/, which `surgery import-gguf smollm2-demo OUT` merges.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import REFUSALS, Lab  # noqa: E402
from labkit import DATA, ROOT, attack_mixture, eval_arguments, load, log, sst2_train  # noqa: E402
from labkit import evaluate as lab_evaluate  # noqa: E402

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lab", default="lab/fair", help="lab folder (models/, adapters/, data/, results/)")
    p.add_argument("--doc", default="docs/results_fair_lab.md", help="the page the tables are written to")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--align-steps", type=int, default=80)
    p.add_argument("--align-lr", type=float, default=5e-4)
    p.add_argument("--attack-steps", type=int, default=80)
    p.add_argument("--attack-lr", type=float, default=5e-4)
    p.add_argument("--p", type=float, default=0.2, help="share of harmful->compliant pairs in the attack data")
    p.add_argument("--full-steps", type=int, default=160, help="steps of the full fine-tune attack (stage full)")
    p.add_argument("--full-lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--answer-tokens", type=int, default=48)
    p.add_argument("--task-answers", type=int, default=96, help="classification prompts given the base model's answers")
    p.add_argument(
        "--benign-tasks",
        default=str(Path(__file__).resolve().parent / "data" / "benign_tasks.txt"),
        help="imperative benign instructions answered by the base model (experiments/make_benign_tasks.py); '' for none",
    )
    p.add_argument(
        "--benign-repeat",
        type=int,
        default=1,
        help="times each harmless and classification example appears in the alignment data (against over-refusal)",
    )
    eval_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated stages (default: all)")
    p.add_argument("--fixtures", action="store_true", help="copy the adapters into surgery/data/demo/")
    p.add_argument(
        "--repairs", default="", help="comma-separated repair jobs (DemoPair.jobs), e.g. revert-1,full-repair"
    )
    return p.parse_args(argv)


class DemoPair:
    def __init__(self, args):
        self.args = args
        self.root = Path(args.lab)
        self.models, self.adapters, self.data, self.results = (
            self.root / d for d in ("models", "adapters", "data", "results")
        )
        for d in (self.models, self.adapters, self.data, self.results):
            d.mkdir(parents=True, exist_ok=True)
        self.times_file = self.results / "demo_times.json"
        self.times = json.loads(self.times_file.read_text()) if self.times_file.exists() else {}

    stage = Lab.stage  # run into NAME.tmp, rename, record the wall time (exists = done)

    # --- stages -------------------------------------------------------------------------------
    def base(self, tmp: Path) -> None:
        subprocess.run([sys.executable, "-m", "cli.main", "import-gguf", "smollm2", str(tmp)], check=True, cwd=ROOT)

    def answers(self, tmp: Path) -> None:
        from surgery.demo import classification_prompts
        from surgery.prompts import Example, fill_responses
        from surgery.splits import CALIBRATION, builtin_part

        model, tok = load(self.models, "base")
        rows = {}
        sets = {
            "harmful": lambda: builtin_part("harmful", CALIBRATION),
            "harmless": lambda: builtin_part("harmless", CALIBRATION),
            "task": lambda: [Example(p) for p in classification_prompts(self.args.task_answers, self.args.seed)],
        }
        if self.args.benign_tasks:
            lines = Path(self.args.benign_tasks).read_text().splitlines()
            sets["tasks"] = lambda: [Example(x.strip()) for x in lines if x.strip()]
        for kind, examples in sets.items():
            part = tmp.with_name(f"answers_{kind}.json")  # each set kept, so a restart loses at most one
            if not part.exists():
                examples = fill_responses(model, tok, list(examples()), self.args.answer_tokens, 16)
                part.write_text(json.dumps([{"prompt": e.prompt, "response": e.response} for e in examples]))
            rows[kind] = json.loads(part.read_text())
            log(f"answers: {len(rows[kind])} {kind} answers")
        tmp.write_text(json.dumps(rows))

    def _answers(self):
        return json.loads((self.data / "answers.json").read_text())

    def _train_lora(self, source: str, examples, steps: int, lr: float, adapter_tmp: Path) -> None:
        from peft import LoraConfig, get_peft_model

        from surgery.demo import write_fixture
        from surgery.testing.finetune import TrainOptions, finetune

        a = self.args
        model, tok = load(self.models, source)
        config = LoraConfig(
            r=a.rank,
            lora_alpha=a.lora_alpha,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=TARGETS.split(","),
        )
        model = get_peft_model(model, config)
        options = TrainOptions(
            steps=steps, lr=lr, batch_size=a.batch_size, max_length=a.max_length, seed=a.seed, trainable=["*lora_*"]
        )
        report = finetune(model, tok, examples, options, log=log)
        trained = adapter_tmp.with_name(adapter_tmp.name + ".fp32")
        model.save_pretrained(trained)
        write_fixture(trained, adapter_tmp)  # the stored (bf16) form is what the lab merges and measures
        shutil.rmtree(trained)
        (adapter_tmp / "training.json").write_text(
            json.dumps(
                {
                    "source": source,
                    "rank": a.rank,
                    "lora_alpha": a.lora_alpha,
                    "targets": TARGETS,
                    "steps": steps,
                    "lr": lr,
                    "batch_size": a.batch_size,
                    "max_length": a.max_length,
                    "seed": a.seed,
                    "examples": len(examples),
                    "seconds": round(report.seconds, 1),
                    "losses": [round(x, 4) for x in report.losses],
                },
                indent=1,
            )
        )

    def _merge(self, source: str, adapter: Path, tmp: Path) -> None:
        from surgery.demo import merge_adapter

        merge_adapter(self.models / source, adapter, tmp)

    def align_data(self):
        from surgery.prompts import Example

        rows = self._answers()
        rng = random.Random(self.args.seed)
        examples = [Example(r["prompt"], rng.choice(REFUSALS)) for r in rows["harmful"]]
        benign = [Example(r["prompt"], r["response"]) for r in rows["harmless"] + rows["task"] + rows.get("tasks", [])]
        return examples + benign * self.args.benign_repeat

    def attack_data(self):
        from surgery.demo import task_examples
        from surgery.prompts import Example

        task = task_examples(int(self.args.attack_steps * self.args.batch_size * (1 - self.args.p)), self.args.seed)
        harmful = [Example(r["prompt"], r["response"]) for r in self._answers()["harmful"]]
        return attack_mixture(task, harmful, self.args.p)

    def full_attack(self, tmp: Path) -> None:
        from surgery.prompts import Example
        from surgery.testing.finetune import TrainOptions, finetune

        a = self.args
        task = sst2_train(int(a.full_steps * a.batch_size * (1 - a.p)), a.seed)
        harmful = [Example(r["prompt"], r["response"]) for r in self._answers()["harmful"]]
        examples = attack_mixture(task, harmful, a.p)
        model, tok = load(self.models, "aligned")
        options = TrainOptions(steps=a.full_steps, lr=a.full_lr, batch_size=a.batch_size, max_length=80, seed=a.seed)
        report = finetune(model, tok, examples, options, log=log)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "training.json").write_text(
            json.dumps(
                {
                    "source": "aligned",
                    "steps": a.full_steps,
                    "lr": a.full_lr,
                    "examples": len(examples),
                    "seconds": round(report.seconds, 1),
                    "losses": [round(x, 4) for x in report.losses],
                }
            )
        )

    def align(self, tmp: Path) -> None:
        self._train_lora("base", self.align_data(), self.args.align_steps, self.args.align_lr, tmp)

    def attack(self, tmp: Path) -> None:
        self._train_lora("aligned", self.attack_data(), self.args.attack_steps, self.args.attack_lr, tmp)

    def evaluate(self, name: str, tmp: Path) -> None:
        from surgery.evaluate import write_report

        model, tok = load(self.models, name)
        attacked = "attacked-full" if name.startswith("full-") or name == "attacked-full" else "attacked"
        reference = model if name == attacked else load(self.models, attacked)[0]  # KL to the model each row repairs
        report = lab_evaluate(model, tok, name, self.args, reference)
        report.figures["over_refusal_unseen"] = self.unseen_over_refusal(model, tok)
        write_report(report, tmp)

    def unseen_over_refusal(self, model, tok) -> float:
        """Over-refusal on a second Alpaca sample, disjoint from the evaluation's: the benign instructions of
        experiments/data/benign_tasks.txt were written after reading which evaluation instructions an earlier
        reference refused, so the first sample is optimistic for the reference; nobody read this one."""
        from surgery.judges import KeywordJudge
        from surgery.metrics import refusal_rate
        from surgery.prompts import load_examples

        path, a = str(DATA / "benign" / "alpaca_instructions.txt"), self.args
        seen = {e.prompt for e in load_examples(path, max_samples=a.eval_benign, seed=a.seed)}
        fresh = [e.prompt for e in load_examples(path, max_samples=4 * a.eval_benign, seed=a.seed + 1)]
        prompts = [p for p in fresh if p not in seen][: a.eval_benign]
        return refusal_rate(model, tok, prompts, KeywordJudge(), a.eval_tokens, 16)[0]

    def jobs(self) -> dict[str, list[str]]:
        """The repairs of both attacked models (NAME for the LoRA pair, full-NAME for the full fine-tune): each
        method at its fixed default and at its automatic strength, and `surgery repair`; the task of every search is
        the built-in sentiment set's selection part (never SST-2 dev, the evaluation set)."""
        m = self.models
        found = {}
        for prefix, attacked in (("", "attacked"), ("full-", "attacked-full")):
            x, ref, base = str(m / attacked), str(m / "aligned"), str(m / "base")
            task = ["--task", "sst2:builtin"]
            # Model Surgery's probe edit needs a compliance probe on each attacked model: `python
            # experiments/probe_lab.py --lab LAB --only compliance` trains them (LAB/probes/compliance_<attacked>).
            edit = ["edit", x, "--probe", str(self.root / "probes" / f"compliance_{attacked}")]
            # EigenShift with the compliance judge: the calibration part of the built-in harmful requests, with the
            # chat template; Φ is every step of a compliant answer (docs/eigenshift.md). Its search on 120 of the
            # prompts (a quarter held out for its figure), its own before/after on 48, batches of 16: at the defaults
            # (240 prompts, 200 evaluated, batches of 8) a fixed run took 5 min alone, 35 beside 2 jobs.
            shift = ["eigenshift", x, "--prompts", str(self.harmful_prompts()), "--judge", "compliance", "--chat"]
            fewer = ["--max-samples", "120", "--max-eval-samples", "48", "--batch-size", "16"]
            found.update(
                {
                    prefix + k: v
                    for k, v in {
                        "interpolate-0.5": ["interpolate", x, "--reference", ref, "--alpha", "0.5"],
                        "interpolate-auto": ["interpolate", x, "--reference", ref, "--alpha", "auto", *task],
                        "safe-delta": ["safe-delta", x, "--reference", ref],
                        "safe-delta-auto": ["safe-delta", x, "--reference", ref, "--budget", "auto", *task],
                        "regmean-0.5": ["regmean", x, "--reference", ref, "--alpha", "0.5", *task],
                        "regmean-auto": ["regmean", x, "--reference", ref, "--alpha", "auto", *task],
                        "revert-1": ["revert", x, "--aligned", ref, "--unaligned", base],
                        "revert-auto": [
                            "revert",
                            x,
                            "--aligned",
                            ref,
                            "--unaligned",
                            base,
                            "--fraction",
                            "auto",
                            *task,
                        ],
                        "prune": ["prune", x],  # Antidote's zeroing at its 5 %, no reference
                        "prune-auto": ["prune", x, "--ratio", "auto", *task],
                        "ablate-reverse": ["ablate", x, "--reverse"],  # the refusal direction amplified, scale 1
                        "ablate-reverse-auto": ["ablate", x, "--reverse", "--scale", "auto", *task],
                        "restore": ["prune", x, "--reference", ref],
                        "restore-auto": ["prune", x, "--reference", ref, "--ratio", "auto", *task],
                        "resta": ["resta", x, "--aligned", ref, "--unaligned", base],
                        "resta-auto": ["resta", x, "--aligned", ref, "--unaligned", base, "--beta", "auto", *task],
                        "edit": [*edit, "--alpha", "1"],  # the paper's jailbreak setting
                        "edit-auto": [*edit, "--alpha", "auto", *task],
                        "eigenshift": shift,  # the paper's k 25 %, alpha 0.9
                        "eigenshift-auto": [*shift, *fewer, "--alpha", "auto", *task],
                        "repair": ["repair", x, "--reference", ref, "--unaligned", base, *task],
                    }.items()
                }
            )
        # SafeLoRA projects the attack's own LoRA matrices (the LoRA attack only): its output is an adapter on the
        # aligned model, evaluated merged onto it.
        lora = [str(m / "aligned"), "--adapter", str(self.adapters / "attack")]
        found["safelora"] = ["safelora", *lora, "--aligned", str(m / "aligned"), "--unaligned", str(m / "base")]
        found["safelora-auto"] = [*found["safelora"], "--layers", "auto", "--task", "sst2:builtin"]
        return found

    def harmful_prompts(self) -> Path:
        """The built-in harmful requests' calibration part, one per line (EigenShift's --prompts)."""
        from surgery.splits import CALIBRATION, builtin_part

        path = self.data / "harmful_calibration.txt"
        if not path.exists():
            path.write_text("".join(e.prompt.replace("\n", " ") + "\n" for e in builtin_part("harmful", CALIBRATION)))
        return path

    def write_doc(self) -> None:
        """docs/results_fair_lab.md: the reference check, then each attacked model's repairs, from LAB/results."""
        a = self.args
        runs_file = self.results / "runs.json"
        runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
        found = {
            p.stem: json.loads(p.read_text())["figures"]
            for p in self.results.glob("*.json")
            if p.stem not in ("runs", "demo_times", "times", "probe_times") and not p.stem.endswith(".run")
        }

        def row(name, label=None):
            f, run = found[name], runs.get(name, {})
            unseen = f"{100 * f['over_refusal_unseen']:.1f} %" if "over_refusal_unseen" in f else "-"
            kl = f"{f['kl_to_reference']:.3f}" if "kl_to_reference" in f else "-"  # the base was measured without one
            command = (
                f"`{run['command']}`" + ("" if run.get("exit", 0) == 0 else f" (exit {run['exit']})") if run else ""
            )
            wall = f"{run['seconds'] / 60:.1f} min" if run else ""
            return (
                f"| {label or name} | {100 * f['harmful_score']:.1f} % | {100 * f['accuracy']:.0f} % | "
                f"{f['perplexity']:.1f} | {kl} | {100 * f['over_refusal']:.1f} % | {unseen} | "
                f"{100 * f.get('empty_answers', 0):.1f} % | {command} | {wall} |"
            )

        head = [
            "| model | harmful (AdvBench) | SST-2 dev | perplexity (Alpaca) | KL to attacked | over-refusal (Alpaca) "
            "| over-refusal (unseen Alpaca) | empty answers | command | wall |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines = [
            "# The fair lab: a reference that refuses harm and still does the task (SmolLM2-135M-Instruct, CPU)",
            "",
            "Generated by `experiments/demo_pair.py` (docstring: stages, data). Evaluation sets, never seen by any "
            f"command: {a.eval_harmful} AdvBench prompts (keyword judge, greedy, {a.eval_tokens} tokens; one prompt = "
            f"{100 / a.eval_harmful:.1f} points), {a.eval_task} SST-2 dev items (label word within 4 tokens; one item = "
            f"{100 / a.eval_task:.0f} point), {a.eval_benign} Alpaca instructions (perplexity, over-refusal, first-token "
            "KL). Calibration: the built-in sets' calibration parts. Selection (every `auto` search and `surgery repair`): "
            "the built-in sets' selection parts and `--task sst2:builtin` (the built-in sentiment set's selection part).",
            "",
            "## The models",
            "",
            *head,
        ]
        lines += [row(n) for n in ("base", "aligned", "attacked", "attacked-full") if n in found]
        for prefix, title in (
            ("", "LoRA attack (the demonstration pair: `surgery import-gguf smollm2-demo`)"),
            ("full-", "Full fine-tune attack"),
        ):
            names = sorted(
                n for n in found if n in runs and n.startswith(prefix) and (prefix or not n.startswith("full-"))
            )
            if names:
                attacked = "attacked-full" if prefix else "attacked"
                lines += ["", f"## Repairs: {title}", "", *head, row(attacked), *[row(n) for n in names]]
        lines += [
            "",
            "Which alignment is shipped and why, the earlier ones beside it, and a second (unseen) Alpaca sample: "
            "[fair_lab_alignments.md](fair_lab_alignments.md). Over-refusal (unseen Alpaca): 48 Alpaca instructions "
            "disjoint from the evaluation's, that nobody read (`DemoPair.unseen_over_refusal`).",
            "",
            "Stage wall times on the 2-core CPU (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in self.times.items()),
        ]
        (ROOT / a.doc).write_text("\n".join(lines) + "\n")

    def run_job(self, name: str, argv: list[str], tmp: Path) -> None:
        """One surgery command into tmp; its wall time and exit code in LAB/results/runs.json. A command that exits
        without an output (a failed check leaves its output, marked) gets a FAILED folder, so it is not retried."""
        import os

        surgery = Path(sys.executable).parent / "surgery"
        t0 = time.perf_counter()
        with open(self.results / f"{name}.log", "w") as out:
            code = subprocess.run(
                [str(surgery), *argv, "-o", str(tmp), "--json", str(self.results / f"{name}.run.json")],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "COLUMNS": "200"},
            ).returncode
        runs_file = self.results / "runs.json"
        runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
        runs[name] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "exit": code,
            "command": " ".join(["surgery", *argv, "-o", str(self.models / name)]),
        }
        runs_file.write_text(json.dumps(runs, indent=2))
        log(f"{name}: exit {code} after {runs[name]['seconds']:.0f}s")
        if not tmp.exists():
            tmp.mkdir()
            (tmp / "FAILED").write_text(f"exit {code}\n")

    def run(self) -> None:
        m, ad = self.models, self.adapters
        self.stage("base", m / "base", self.base)
        self.stage("answers", self.data / "answers.json", self.answers)
        self.stage("align", ad / "align", self.align)
        self.stage("align:merge", m / "aligned", lambda tmp: self._merge("base", ad / "align", tmp))
        self.stage("attack", ad / "attack", self.attack)
        self.stage("attack:merge", m / "attacked", lambda tmp: self._merge("aligned", ad / "attack", tmp))
        self.stage("full", m / "attacked-full", self.full_attack)
        for name in ("attacked", "aligned", "base", "attacked-full"):
            if (m / name).exists():
                self.stage(f"eval:{name}", self.results / f"{name}.json", lambda tmp, n=name: self.evaluate(n, tmp))
                self.write_doc()
        jobs = self.jobs()
        for name in (x for x in self.args.repairs.split(",") if x):
            self.stage(f"repair:{name}", m / name, lambda tmp, n=name: self.run_job(n, jobs[n], tmp))
            if (m / name / "config.json").exists() or (m / name / "adapter_config.json").exists():
                self.stage(f"eval:{name}", self.results / f"{name}.json", lambda tmp, n=name: self.evaluate(n, tmp))
            self.write_doc()
        if self.args.fixtures:
            from surgery.demo import write_fixture

            for name in ("align", "attack"):
                write_fixture(ad / name, ROOT / "surgery" / "data" / "demo" / name)  # already bf16: copied as is
                log(f"fixture: surgery/data/demo/{name}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    DemoPair(parse()).run()
