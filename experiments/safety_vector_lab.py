"""The safety-vector repairs on the lab's models (issue 15, item 4): resta, revert, safelora, beside prune --reference.

    OMP_NUM_THREADS=1 nice -n 5 python experiments/safety_vector_lab.py [--lab lab/long] [--only sv-resta-auto,...]

Needs the lab's base (unaligned), aligned and attacked models (experiments/lab.py) and the LoRA attack
(experiments/lora_lab.py: lora-attacked, lora-attacked-merged). Every job runs the real command line (a subprocess,
timed, exit code kept), then its output is evaluated with the lab's held-out evaluation (labkit.evaluate, sizes as
experiments/auto_strength.py): AdvBench (harmful score), SST-2 dev (accuracy), Alpaca (perplexity, over-refusal,
first-token KL to the attacked model the job repairs). A job whose output folder and evaluation json exist is
skipped, so a killed run resumes. An adapter output (safelora) is evaluated as aligned + adapter merged in memory.

Which prompts are which (never mixed): calibration = the built-in harmful set's calibration part (surgery/splits.py;
revert's Wanda norms); selection (what `auto` looks at) = the built-in sets' selection part and
LAB/data/sst2_select.tsv (64 SST-2 train rows the attack never saw); evaluation = AdvBench, SST-2 dev, Alpaca.
Writes LAB/models/sv-*, LAB/results/sv-*.json (.log, .time.json), docs/results_safety_vectors.md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_lab import LoraLab  # noqa: E402

from auto_strength import parse as auto_parse  # noqa: E402
from auto_strength import selection_task  # noqa: E402
from labkit import ROOT, load, log  # noqa: E402
from labkit import evaluate as lab_evaluate  # noqa: E402

FAMILIES = {
    "resta": "RESTA (`surgery resta`)",
    "revert": "IRR identify+remove (`surgery revert`)",
    "safelora": "SafeLoRA (`surgery safelora`)",
    "prune": "Antidote prune --reference (restore)",
    "reference": "reference models",
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lab", default=str(ROOT / "lab" / "long"))
    p.add_argument("--only", default=None, help="comma-separated job names (default: all, in order)")
    p.add_argument("--doc-only", action="store_true", help="only rewrite the doc and plot from what exists")
    return p.parse_args(argv)


def short(path) -> str:
    return str(path).replace(str(ROOT) + "/", "")


def jobs(lab: Path) -> dict[str, dict]:
    """name -> family, argv (without -o/--device), knob, the model it repairs (KL reference)."""
    m = lab / "models"
    task = ["--task", f"sst2:{selection_task(lab, auto_parse([]))}"]
    pair = ["--aligned", m / "aligned", "--unaligned", m / "base"]
    resta = ["resta", m / "attacked", *pair]
    revert = ["revert", m / "attacked", *pair]
    safelora = ["safelora", m / "aligned", "--adapter", m / "lora-attacked", *pair]
    calib = ["--max-samples", "32", "--max-new-tokens", "32"]
    full, lora = "attacked", "lora-attacked-merged"
    return {
        "sv-resta-auto": dict(family="resta", argv=[*resta, "--beta", "auto", *task], knob="beta", repairs=full),
        "sv-revert-auto": dict(
            family="revert", argv=[*revert, "--fraction", "auto", *task, *calib], knob="fraction", repairs=full
        ),
        "sv-safelora-auto": dict(
            family="safelora", argv=[*safelora, "--layers", "auto", *task], knob="layers", repairs=lora
        ),
        "sv-resta-1": dict(family="resta", argv=[*resta, "--beta", "1"], knob="beta", repairs=full),
        "sv-resta-0.25": dict(family="resta", argv=[*resta, "--beta", "0.25"], knob="beta", repairs=full),
        "sv-revert-1": dict(family="revert", argv=[*revert, "--fraction", "1"], knob="fraction", repairs=full),
        "sv-safelora-10": dict(family="safelora", argv=[*safelora, "--layers", "10"], knob="layers", repairs=lora),
        "sv-safelora-50": dict(family="safelora", argv=[*safelora, "--layers", "50"], knob="layers", repairs=lora),
    }


# the existing prune --reference row: its folder is evaluated again (the command is not rerun)
RESTORE = dict(
    family="prune",
    folder="auto-restore",
    knob="ratio",
    repairs="attacked",
    argv=[
        "prune",
        "lab/long/models/attacked",
        "--reference",
        "lab/long/models/aligned",
        "--ratio",
        "auto",
        "--task",
        "sst2:lab/long/data/sst2_select.tsv",
        "--max-samples",
        "32",
        "--max-new-tokens",
        "32",
    ],
)


def run_job(lab: Path, name: str, job: dict) -> None:
    results, out = lab / "results", lab / "models" / name
    surgery = str(Path(sys.executable).parent / "surgery")
    cmd = [surgery, *map(str, job["argv"]), "-o", str(out), "--device", "cpu"]
    log(f"{name}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "160"})
    took = {
        "seconds": round(time.perf_counter() - t0, 1),
        "exit": proc.returncode,
        "command": "surgery " + " ".join(short(a) for a in job["argv"]) + f" -o {short(out)} --device cpu",
    }
    (results / f"{name}.log").write_text(proc.stdout + proc.stderr)
    (results / f"{name}.time.json").write_text(json.dumps(took, indent=2))
    log(f"{name}: exit {proc.returncode} in {took['seconds']:.0f}s")
    if proc.returncode not in (0, 1) or "Traceback" in proc.stderr:
        log(f"{name}: FAILED, output tail:\n{(proc.stdout + proc.stderr)[-3000:]}")


def evaluate(lab: Path, name: str, folder: Path, repairs: str, report: Path) -> None:
    from surgery.evaluate import write_report

    models = lab / "models"
    if (folder / "adapter_config.json").exists():  # aligned + adapter, merged in memory (lora_lab's way)
        model = LoraLab.merged_model(SimpleNamespace(models=models), folder)
        tok = load(models, "aligned")[1]
    else:
        model, tok = load(models, str(folder))
    t0 = time.perf_counter()
    write_report(lab_evaluate(model, tok, name, auto_parse([]), load(models, repairs)[0]), report)
    log(f"{name}: evaluated in {time.perf_counter() - t0:.0f}s")


def main() -> None:
    args = parse()
    lab = Path(args.lab)
    results, models = lab / "results", lab / "models"
    only = args.only.split(",") if args.only else None
    if not args.doc_only:
        todo = [("sv-auto-restore", None)] + list(jobs(lab).items())
        for name, job in todo:
            if only and name not in only:
                continue
            report = results / f"{name}.json"
            if name == "sv-auto-restore":
                if not report.exists():
                    evaluate(lab, name, models / RESTORE["folder"], RESTORE["repairs"], report)
                write_doc(lab)
                continue
            out = models / name
            if out.exists() and report.exists():
                log(f"{name}: done, skipped")
                continue
            if not out.exists():
                run_job(lab, name, job)
            if out.exists() and not report.exists():
                evaluate(lab, name, out, job["repairs"], report)
            write_doc(lab)
    write_doc(lab)


# --- the doc ------------------------------------------------------------------------------------


def figures(path: Path):
    return json.loads(path.read_text())["figures"] if path.exists() else None


def chosen(folder: Path, knob: str, argv) -> str:
    manifest = folder / "surgery.json"
    value = str(argv[argv.index(f"--{knob}") + 1])
    if value != "auto":
        return f"{knob} {value}"
    if not manifest.exists():
        return f"{knob} auto"
    s = json.loads(manifest.read_text())["report"].get("search") or {}
    return f"{knob} {s['chosen']:g}" if s.get("chosen") is not None else f"{knob} auto (none: {s.get('failed')})"


def check_note(folder: Path) -> str:
    """The after-write check's perplexity ratio and, for a search, what stopped it one step stronger."""
    manifest = folder / "surgery.json"
    if not manifest.exists():
        return ""
    data = json.loads(manifest.read_text())
    c, notes = data.get("check") or {}, []
    if c.get("perplexity_ratio") is not None:
        notes.append(
            f"after-write check: perplexity x{c['perplexity_ratio']:.2f} ({'passed' if c.get('passed') else 'failed'})"
        )
    s = (data.get("report") or {}).get("search") or {}
    if s.get("chosen") is not None:
        above = sorted(
            (c for c in s.get("candidates", []) if c["strength"] > s["chosen"] and not c["within_budget"]),
            key=lambda c: c["strength"],
        )
        if above:
            notes.append(
                f"search stopped by {s['knob']} {above[0]['strength']:g}: {'; '.join(map(str, above[0]['broken']))}"
            )
        else:
            notes.append("search: the strongest candidate was inside the budget")
    return ", ".join(notes)


def rows(lab: Path) -> list[dict]:
    results, models = lab / "results", lab / "models"
    out = []
    for name, path, note in (
        ("attacked", "attacked", "the full fine-tune attack (repaired by resta, revert, prune)"),
        ("aligned", "aligned", "before the attack"),
        ("base (unaligned)", "base", "SmolLM2-135M-Instruct as imported"),
        ("lora-attacked", "lora-attacked-merged", "the LoRA attack (repaired by safelora)"),
        ("aligned, KL to lora-attacked", "lora-aligned", "aligned.json, KL re-measured"),
    ):
        f = figures(results / f"{path}.json")
        if f:
            out.append(
                dict(
                    name=name,
                    family="reference",
                    figures=f,
                    command="",
                    exit="",
                    chosen="",
                    wall="",
                    note=note,
                    repairs="lora-attacked" if path.startswith("lora") else "attacked",
                )
            )
    rt = results / "auto-restore.time.json"
    t = json.loads(rt.read_text()) if rt.exists() else {}
    out.append(
        dict(
            name="restore-auto",
            family="prune",
            figures=figures(results / "sv-auto-restore.json"),
            command="surgery " + " ".join(RESTORE["argv"]) + " -o lab/long/models/auto-restore --device cpu",
            exit=t.get("exit", ""),
            chosen=chosen(models / "auto-restore", "ratio", RESTORE["argv"]),
            wall=t.get("seconds"),
            note="run earlier by experiments/auto_strength.py, evaluated again here; "
            + check_note(models / "auto-restore"),
            repairs="attacked",
            short="prune --reference aligned --ratio auto",
        )
    )
    for name, job in jobs(lab).items():
        tp = results / f"{name}.time.json"
        t = json.loads(tp.read_text()) if tp.exists() else None
        command = (
            t["command"]
            if t
            else ("surgery " + " ".join(short(a) for a in job["argv"]) + f" -o lab/long/models/{name} --device cpu")
        )
        out.append(
            dict(
                name=name,
                family=job["family"],
                figures=figures(results / f"{name}.json"),
                command=command,
                exit=t["exit"] if t else None,
                chosen=chosen(models / name, job["knob"], job["argv"]),
                wall=t["seconds"] if t else None,
                note=check_note(models / name) if t else "not run yet",
                repairs="lora-attacked" if job["repairs"].startswith("lora") else "attacked",
                short=f"{job['argv'][0]} --{job['knob']} {job['argv'][job['argv'].index('--' + job['knob']) + 1]}",
            )
        )
    return out


def answer(rs: list[dict]) -> str:
    acc = {r["name"]: r["figures"]["accuracy"] for r in rs if r["family"] == "reference" and r["figures"]}
    repairs = [r for r in rs if r["family"] != "reference" and r["figures"]]
    if not repairs:
        return "No repair row is evaluated yet."
    for r in repairs:
        r["drop"] = 100 * (acc.get(r["repairs"], acc.get("attacked")) - r["figures"]["accuracy"])
    inside = [r for r in repairs if r["drop"] <= 2 + 1e-9]

    def fig(r):
        f = r["figures"]
        return (
            f"`{r['name']}` ({r['chosen']}): AdvBench harmful {100 * f['harmful_score']:.1f} %, SST-2 "
            f"{100 * f['accuracy']:.0f} % (the {r['repairs']} model: {100 * acc.get(r['repairs'], 0):.0f} %), "
            f"perplexity {f['perplexity']:.1f}"
        )

    if inside:
        best = min(inside, key=lambda r: (r["figures"]["harmful_score"], -r["figures"]["accuracy"]))
        text = f"Within 2 points of the attacked model's SST-2 accuracy, the best harmful score is {fig(best)}."
        lower = min(repairs, key=lambda r: r["figures"]["harmful_score"])
        if lower is not best and lower["figures"]["harmful_score"] < best["figures"]["harmful_score"]:
            text += (
                f" Lower harmful scores cost more than 2 SST-2 points: {fig(lower)} ({lower['drop']:.0f} points below)."
            )
        return text
    close = min(repairs, key=lambda r: (r["drop"], r["figures"]["harmful_score"]))
    return f"No repair stays within 2 points of the attacked model's SST-2 accuracy; the closest is {fig(close)}."


def write_doc(lab: Path) -> None:
    rs = rows(lab)
    lines = [
        "# Safety-vector repairs on the lab's models (SmolLM2-135M-Instruct, CPU; issue 15, item 4)",
        "",
        "Generated by `OMP_NUM_THREADS=1 nice -n 5 python experiments/safety_vector_lab.py` (regenerated after every "
        "job). Methods: docs/safety_vectors.md (`resta`, `revert`) and surgery/methods/safelora.py (`safelora`). Models "
        "(lab/long/models/): `base` = SmolLM2-135M-Instruct as imported, the *unaligned* model of the pair; `aligned` = "
        "base after the lab's safety alignment (V = aligned - base); `attacked` = aligned after a 160-step full "
        "fine-tune on SST-2 + 20 % harmful pairs (docs/results_long_attack.md); `lora-attacked` = a peft LoRA adapter "
        "on aligned (rank 16, all 7 projections, 160 steps, same data; docs/results_lora_attack.md).",
        "",
        "**Prompt sets, never mixed.** Calibration = the built-in harmful set's calibration part (surgery/splits.py; "
        "`revert --score wanda` norms, `prune`'s scores). Selection (what every `auto` looks at) = the built-in "
        "harmful/harmless sets' selection part (48 each) and `lab/long/data/sst2_select.tsv` (64 SST-2 train rows "
        "the attack never saw). Evaluation (the table; never seen by any command) = 64 held-out AdvBench prompts "
        "(harmful score, keyword judge), 100 SST-2 dev items (accuracy), 48 Alpaca instructions (perplexity, "
        "over-refusal, first-token KL to the attacked model the row repairs: `attacked`, or `lora-attacked` for "
        "the SafeLoRA rows), greedy, 32 new tokens (experiments/labkit.py `evaluate`, as experiments/lab.py). "
        "Every row below comes from this one evaluation; the `restore-auto` folder (experiments/auto_strength.py) "
        "was evaluated again here, its command not rerun.",
        "",
        "| row | command (below) | exit | chosen strength | AdvBench harmful | SST-2 acc | perplexity | KL to the "
        "attacked model it repairs | over-refusal | empty answers | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    missing = []
    for _i, r in enumerate(rs):
        f = r["figures"]
        if f:
            figs = (
                f"{100 * f['harmful_score']:.1f} % | {100 * f['accuracy']:.0f} % | {f['perplexity']:.1f} | "
                f"{f.get('kl_to_reference', float('nan')):.3f} | {100 * f['over_refusal']:.1f} % | "
                f"{100 * f.get('empty_answers', 0):.1f} %"
            )
        else:
            figs = "- | - | - | - | - | -"
            missing.append(r["name"])
        ref = r["family"] == "reference"
        name = f"{r['name']} (reference)" if ref else r["name"]
        cmd = "" if ref else f"`{r['short']}`"
        wall = f"{r['wall'] / 60:.1f} min" if isinstance(r["wall"], (int, float)) else ("" if ref else "-")
        ex = "" if ref else ("-" if r["exit"] is None else r["exit"])
        lines.append(f"| {name} | {cmd} | {ex} | {r['chosen']} | {figs} | {wall} |")
    lines += ["", f"**Answer.** {answer(rs)}", ""]
    if missing:
        lines += [f"Missing rows (not run or not evaluated yet when this was written): {', '.join(missing)}.", ""]
    lines += [
        "**Noise.** One prompt of 64 is ~1.6 points of harmful score (one SST-2 item of 100 is 1 point), so "
        "differences below ~3 points are within noise. The AdvBench figure is the optimistic one: a benchmark kept "
        "from us scores the same checkpoints higher. The SafeLoRA rows repair another attack (`lora-attacked`, "
        "93.8 % harmful) than the other rows (`attacked`, 98.4 %): compare them across with care.",
        "",
        "Exit 1 = the command's after-write check (perplexity at most x2 its input's on built-in harmless prompts) "
        "or its auto search failed its budget; the output stays and is evaluated (that is a result). Wall time: the "
        "command's subprocess (its own search and after-write check), not the evaluation; the jobs ran one at a time "
        "beside other work on the shared 2-core CPU (`OMP_NUM_THREADS=1`, load average 4-8), so compare them with "
        "each other, not with an idle machine. Each command's output is in lab/long/results/NAME.log; its search "
        "table (candidates, selection figures, budget) in the output's surgery.json under `report.search`.",
        "",
        "## Commands",
        "",
    ]
    for r in rs:
        if r["family"] != "reference":
            extra = f" ({r['note']})" if r["note"] else ""
            lines.append(f"- {r['name']}: `{r['command']}`{extra}")
    lines += ["", "![harmful score against SST-2 accuracy and perplexity](results_safety_vectors.png)", ""]
    (ROOT / "docs" / "results_safety_vectors.md").write_text("\n".join(lines) + "\n")
    plot(rs, ROOT / "docs" / "results_safety_vectors.png")


def plot(rs: list[dict], path: Path) -> None:
    from surgery.plotting import pyplot, save

    plt = pyplot()
    import matplotlib.ticker

    markers = {"reference": "s", "resta": "o", "revert": "^", "safelora": "D", "prune": "P"}
    colors = {
        "reference": "grey",
        "resta": "tab:blue",
        "revert": "tab:orange",
        "safelora": "tab:green",
        "prune": "tab:red",
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    seen = set()
    for r in rs:
        f = r["figures"]
        if not f or r["name"].startswith("aligned, KL"):
            continue
        fam = r["family"]
        for ax, x in zip(axes, (100 * f["accuracy"], f["perplexity"])):
            ax.plot(
                x,
                100 * f["harmful_score"],
                markers[fam],
                color=colors[fam],
                markersize=7,
                label=FAMILIES[fam].replace("`", "") if fam not in seen else None,
            )
            ax.annotate(
                r["name"].replace(" (unaligned)", ""),
                (x, 100 * f["harmful_score"]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        seen.add(fam)
    axes[0].set_xlabel("SST-2 dev accuracy (%)")
    axes[1].set_xlabel("Alpaca perplexity")
    axes[1].set_xscale("log")
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].set_xticks([30, 40, 60, 100, 200, 300])
    for ax in axes:
        ax.set_ylabel("AdvBench harmful score (%)")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0].set_xlim(-5, 105)
    axes[0].legend(fontsize=7, loc="center left")
    fig.suptitle("Safety-vector repairs of the lab's attacked SmolLM2-135M (held-out evaluation)")
    save(fig, path, dpi=120)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    main()
