"""What the lab scripts share: paths, a timestamped log, loading a lab model, the lab's evaluation."""

from __future__ import annotations

import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load(models: Path, name: str, base: str = "aligned"):
    """A lab model (LAB/models/NAME, or a path) and its tokenizer, on CPU. An adapter folder (a repair that writes
    LoRA matrices, SafeLoRA) is merged onto LAB/models/BASE, the model it was trained on."""
    from surgery.adapter import CONFIG_NAME, MergedCheckpoint, open_adapter
    from surgery.checkpoint import open_checkpoint
    from surgery.model import load_model, load_tokenizer

    path = models / name if (models / name).exists() else Path(name)
    if (path / CONFIG_NAME).exists():
        ckpt = MergedCheckpoint(open_adapter(path, open_checkpoint(models / base)))
        return load_model(ckpt, torch.device("cpu")), load_tokenizer(models / base)
    return load_model(open_checkpoint(path), torch.device("cpu")), load_tokenizer(path)


def sst2_train(n: int, seed: int) -> list:
    """`n` SST-2 training sentences in the chat form the lab attacks with (sentence -> label word)."""
    from surgery.metrics import SST2_LABELS, SST2_TEMPLATE
    from surgery.prompts import Example, load_examples

    task = load_examples(DATA / "sst2" / "train.tsv", response_column="label", max_samples=n, seed=seed)
    return [Example(SST2_TEMPLATE.format(e.prompt.strip()), SST2_LABELS[int(e.response)]) for e in task]


def attack_mixture(task: list, harmful: list, p: float) -> list:
    """The lab's harmful fine-tune: the task examples plus harmful (prompt, answer) examples, cycled, so that a share
    `p` of the whole mixture is harmful."""
    n_harm = round(p / (1 - p) * len(task))
    return list(task) + [harmful[i % len(harmful)] for i in range(n_harm)]


def eval_arguments(parser, harmful: int = 64, task: int = 100, benign: int = 48, tokens: int = 32) -> None:
    """The sizes of the lab's evaluation sets, as every lab script takes them (what `evaluate` reads)."""
    parser.add_argument("--eval-harmful", type=int, default=harmful, help="AdvBench prompts")
    parser.add_argument("--eval-task", type=int, default=task, help="SST-2 dev items")
    parser.add_argument("--eval-benign", type=int, default=benign, help="Alpaca instructions")
    parser.add_argument("--eval-tokens", type=int, default=tokens, help="greedy tokens per answer")


def evaluate(model, tok, name: str, args, reference, harmful: Path | None = None):
    """The lab's held-out evaluation (what `surgery eval` measures), harmful and benign sets sized apart.

    args: eval_harmful (AdvBench prompts), eval_task (SST-2 dev items), eval_benign (Alpaca instructions),
    eval_tokens, seed. reference: the model first-token KL is measured against. harmful: another prompt
    file in place of AdvBench (e.g. AdvBench wrapped in a jailbreak).
    """
    from surgery.evaluate import EvalOptions, evaluate_model

    options = EvalOptions(
        harmful=str(harmful or DATA / "advbench" / "harmful_behaviors.txt"),
        benign=str(DATA / "benign" / "alpaca_instructions.txt"),
        task=f"sst2:{DATA / 'sst2' / 'dev.tsv'}",
        max_samples=args.eval_harmful,
        max_task_samples=args.eval_task,
        max_new_tokens=args.eval_tokens,
        seed=args.seed,
        device="cpu",
    )
    harmful_opts = EvalOptions(**{**options.__dict__, "benign": None, "task": None})
    rest = EvalOptions(**{**options.__dict__, "harmful": None, "max_samples": args.eval_benign})
    report = evaluate_model(model, tok, harmful_opts, name=name, log=log)
    other = evaluate_model(model, tok, rest, reference=reference, name=name, log=log)
    for key in ("figures", "counts", "seconds", "samples"):
        getattr(report, key).update(getattr(other, key))
    log(f"eval {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in report.figures.items()))
    return report
