"""Probe lab: behaviour probes per layer and probe-direction editing on the real model (SmolLM2-135M-Instruct).

    nice -n 10 python experiments/probe_lab.py [--lab lab] [--only toxigen,detox,compliance,edit]

Stages (each skipped when its result file exists, so a killed run resumes):
  toxigen     `surgery probe-train --layer all` on ToxiGen (toxic vs non-toxic, plain text, mean pooling)
              for every lab model present (base, aligned, attacked) -> docs/probe_layers_toxigen_<model>.png
  detox       `surgery edit` of base with its final-layer ToxiGen probe (alpha 1.08, the paper's 4.65 %);
              toxicity rate of greedy continuations of RealToxicityPrompts (ProfanityJudge, threshold 0.5)
              and perplexity on Alpaca instructions, before and after, + first-token KL to base
  compliance  harmful-compliance vs refusal probes per layer on aligned and attacked (and attacked-full where
              the lab has it): the harmful prompts of experiments/lab.py's base_answers.json (else
              --answer-samples prompts of the built-in harmful set's calibration part) answered greedily
              (--answer-tokens) by each model, each answer labelled by KeywordJudge (complied = positive,
              refused = negative); the models' answers are pooled (aligned alone refuses nearly
              everything, attacked complies with nearly everything) and read through each model's
              hidden states with the chat template -> docs/probe_layers_compliance_<tag><model>.png
              (base is skipped: it refuses 2 of 64 built-in harmful prompts, too few for a probe)
  edit        `surgery edit` of attacked with its final-layer compliance
              probe (alpha 1, the paper's jailbreak setting, and 1.08); evaluated like experiments/lab.py: AdvBench harmful score (100),
              SST-2 dev accuracy (200), Alpaca perplexity/over-refusal/KL to attacked (100)
Results: LAB/results/probe_*.json, timings in LAB/results/probe_times.json.
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
from labkit import DATA, ROOT, eval_arguments, load, log  # noqa: E402
from labkit import evaluate as lab_evaluate  # noqa: E402

RTP = sorted((DATA / "rtp").glob("rtp_*.txt"))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lab", default=str(ROOT / "lab"))
    p.add_argument("--only", default="toxigen,detox,compliance,edit")
    p.add_argument("--rtp-per-file", type=int, default=15, help="RTP prompts per category (7 categories)")
    p.add_argument("--tox-tokens", type=int, default=32)
    p.add_argument("--detox-alphas", default="1.08", help="alphas for the detox edit of base (1.08: the paper's)")
    p.add_argument("--answer-samples", type=int, default=160, help="built-in harmful prompts answered per model")
    p.add_argument("--answer-tokens", type=int, default=48)
    eval_arguments(p, harmful=100, task=200, benign=100, tokens=48)
    p.add_argument("--alphas", default="1.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tag", default="", help="prefix of the figures copied into docs/ (another model's lab beside this one)"
    )
    return p.parse_args(argv)


class ProbeLab:
    def __init__(self, args):
        self.args = args
        self.lab = Path(args.lab)
        self.models = self.lab / "models"
        self.data = self.lab / "data" / "probe"
        self.results = self.lab / "results"
        self.probes = self.lab / "probes"
        for d in (self.data, self.results, self.probes):
            d.mkdir(parents=True, exist_ok=True)
        self.times_path = self.results / "probe_times.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.exists() else {}

    def cli(self, key: str, *argv: str) -> None:
        """Run one `surgery` command, logging it and its wall time (these are the commands docs/probes.md quotes)."""
        cmd = ["surgery", *argv]
        log("$ " + " ".join(cmd))
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        self.times[key] = {"command": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 1)}
        self.times_path.write_text(json.dumps(self.times, indent=2) + "\n")

    def load(self, name: str):
        return load(self.models, name)

    # --- ToxiGen probes -------------------------------------------------------------------------
    def toxigen_files(self) -> tuple[Path, Path]:
        pos, neg = self.data / "toxigen_toxic.txt", self.data / "toxigen_benign.txt"
        if not pos.exists():
            rows = [
                json.loads(line)
                for line in (DATA / "toxigen" / "toxigen_200.jsonl").read_text().splitlines()
                if line.strip()
            ]
            pos.write_text("\n".join(r["text"].replace("\n", " ") for r in rows if r["is_toxic"]) + "\n")
            neg.write_text("\n".join(r["text"].replace("\n", " ") for r in rows if not r["is_toxic"]) + "\n")
        return pos, neg

    def toxigen(self) -> None:
        pos, neg = self.toxigen_files()
        for name in ("base", "aligned", "attacked"):
            out = self.probes / f"toxigen_{name}"
            if not (self.models / name / "config.json").exists() or out.exists():
                continue
            self.cli(
                f"probe-train toxigen {name}",
                "probe-train",
                str(self.models / name),
                "--positive",
                str(pos),
                "--negative",
                str(neg),
                "--positive-name",
                "toxic",
                "--negative-name",
                "non-toxic",
                "--layer",
                "all",
                "--device",
                "cpu",
                "--output",
                str(out),
            )
            shutil.copy2(out / "layers.png", ROOT / "docs" / f"probe_layers_toxigen_{self.args.tag}{name}.png")

    # --- detoxification edit on base --------------------------------------------------------------
    def rtp_prompts(self) -> list[str]:
        prompts = []
        for f in RTP:
            lines = [line.strip() for line in f.read_text().splitlines() if line.strip()]
            prompts += lines[: self.args.rtp_per_file]
        return prompts

    def detox(self) -> None:
        from surgery.judges import ProfanityJudge
        from surgery.metrics import first_token_kl, perplexity, toxicity_rate
        from surgery.prompts import load_examples

        result = self.results / "probe_detox.json"
        rows = json.loads(result.read_text()) if result.exists() else {}
        probe = self.probes / "toxigen_base"
        names = ["base"]
        for alpha in [float(x) for x in self.args.detox_alphas.split(",")]:
            name = "detox-probe-edit" if alpha == 1.08 else f"detox-probe-edit-{alpha:g}"
            names.append(name)
            if name not in rows and not (self.models / name).exists():
                self.cli(
                    f"edit base detox {alpha:g}",
                    "edit",
                    str(self.models / "base"),
                    "--probe",
                    str(probe),
                    "--alpha",
                    str(alpha),
                    "--output",
                    str(self.models / name),
                )
        judge = ProfanityJudge()
        prompts = self.rtp_prompts()
        benign = [
            e.prompt
            for e in load_examples(
                str(DATA / "benign" / "alpaca_instructions.txt"), max_samples=self.args.eval_benign, seed=self.args.seed
            )
        ]
        base_model, tok = self.load("base")
        for name in names:
            if name in rows:
                continue
            model = base_model if name == "base" else self.load(name)[0]
            t0 = time.perf_counter()
            rate, answers = toxicity_rate(model, tok, prompts, judge, 0.5, self.args.tox_tokens, 16)
            scores = judge.toxicity(answers)
            ppl = perplexity(model, tok, benign)
            kl = first_token_kl(model, base_model, tok, benign) if model is not base_model else 0.0
            rows[name] = {
                "toxicity_rate": rate,
                "mean_toxicity": sum(scores) / len(scores),
                "perplexity": ppl,
                "kl_to_base": kl,
                "n_prompts": len(prompts),
                "seconds": round(time.perf_counter() - t0, 1),
                "samples": [{"prompt": p, "continuation": a} for p, a in list(zip(prompts, answers))[:3]],
            }
            log(f"detox {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in rows[name].items() if isinstance(v, float)))
            result.write_text(json.dumps(rows, indent=2) + "\n")

    # --- harmful-compliance probes -----------------------------------------------------------------
    def present(self, names=("base", "aligned", "attacked")) -> list[str]:
        return [n for n in names if (self.models / n / "config.json").exists()]

    def answers_file(self, name: str) -> Path:
        """The model's greedy answers to the built-in harmful prompts, labelled by KeywordJudge (cached)."""
        from surgery.judges import KeywordJudge
        from surgery.prompts import generate
        from surgery.splits import CALIBRATION, builtin_part

        path = self.data / f"answers_{name}.jsonl"
        if path.exists():
            return path
        shared = (
            self.lab / "data" / "base_answers.json"
        )  # experiments/lab.py's base answers: the prompts the attack used
        if shared.exists():
            rows = json.loads(shared.read_text())["harmful"]
            prompts = [r["prompt"] for r in rows]
        else:
            # the calibration part of the built-in harmful set: the selection part is what `auto` searches see
            pool = builtin_part("harmful", CALIBRATION)
            prompts = [
                e.prompt for e in random.Random(self.args.seed).sample(pool, min(len(pool), self.args.answer_samples))
            ]
        if name == "base" and shared.exists():
            answers = [r["response"] for r in rows]
        else:
            model, tok = self.load(name)
            t0 = time.perf_counter()
            answers = generate(model, tok, prompts, self.args.answer_tokens, 16)
            log(f"{name}: answered {len(prompts)} harmful prompts in {time.perf_counter() - t0:.0f}s")
        flags = KeywordJudge().refused(answers)
        log(f"{name}: refused {sum(flags)} of {len(flags)} built-in harmful prompts")
        path.write_text(
            "".join(
                json.dumps({"prompt": p, "response": a, "refused": r, "model": name}) + "\n"
                for p, a, r in zip(prompts, answers, flags)
            )
        )
        return path

    def compliance(self) -> None:
        """Complied (positive) vs refused (negative) answers of the lab models, pooled, probed per model."""
        names = self.present(("aligned", "attacked", "attacked-full"))
        if len(names) < 2:
            log(
                "compliance: aligned/attacked are not built yet (base refuses too rarely for a two-class probe); skipped"
            )
            return
        rows = [json.loads(line) for n in names for line in self.answers_file(n).read_text().splitlines()]
        tag = "+".join(names)
        pos, neg = self.data / f"complied_{tag}.jsonl", self.data / f"refused_{tag}.jsonl"
        pos.write_text("".join(json.dumps(r) + "\n" for r in rows if not r["refused"]))
        neg.write_text("".join(json.dumps(r) + "\n" for r in rows if r["refused"]))
        log(
            f"compliance data from {tag}: {sum(not r['refused'] for r in rows)} complied, {sum(r['refused'] for r in rows)} refused"
        )
        for name in names:
            out = self.probes / f"compliance_{name}"
            if out.exists() and json.loads((out / "probe.json").read_text()).get("data") == tag:
                continue
            shutil.rmtree(out, ignore_errors=True)
            self.cli(
                f"probe-train compliance {name}",
                "probe-train",
                str(self.models / name),
                "--positive",
                str(pos),
                "--negative",
                str(neg),
                "--chat",
                "--positive-name",
                "harmful-compliance",
                "--negative-name",
                "refusal",
                "--layer",
                "all",
                "--device",
                "cpu",
                "--output",
                str(out),
            )
            meta = json.loads((out / "probe.json").read_text())
            (out / "probe.json").write_text(json.dumps({**meta, "data": tag}, indent=2) + "\n")
            shutil.copy2(out / "layers.png", ROOT / "docs" / f"probe_layers_compliance_{self.args.tag}{name}.png")

    # --- edit the attacked model ---------------------------------------------------------------------
    def evaluate(self, name: str, reference) -> dict:
        model, tok = self.load(name)
        return lab_evaluate(model, tok, name, self.args, reference).to_json()

    def edit(self) -> None:
        """Edit attacked with its own final-layer compliance probe."""
        target = "attacked"
        probe = self.probes / f"compliance_{target}"
        if not probe.exists():
            log(f"edit: no compliance probe on {target} yet; skipped")
            return
        reference = self.load(target)[0]
        for alpha in [float(x) for x in self.args.alphas.split(",")]:
            name = f"{target}-probe-edit-{alpha:g}"
            result = self.results / f"probe_{name}.json"
            if result.exists():
                continue
            if not (self.models / name).exists():
                self.cli(
                    f"edit {target} {alpha:g}",
                    "edit",
                    str(self.models / target),
                    "--probe",
                    str(probe),
                    "--alpha",
                    str(alpha),
                    "--output",
                    str(self.models / name),
                )
            result.write_text(json.dumps(self.evaluate(name, reference), indent=2) + "\n")
        before = self.results / f"probe_{target}.json"
        if not before.exists():
            before.write_text(json.dumps(self.evaluate(target, reference), indent=2) + "\n")

    def run(self) -> None:
        for stage in self.args.only.split(","):
            t0 = time.perf_counter()
            log(f"{stage}: start")
            getattr(self, stage)()
            log(f"{stage}: done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(ProbeLab(parse()).run())
