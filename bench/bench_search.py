"""What an automatic strength search costs: one fixed-strength run of a method against its `auto` search (target: at
most 3x), and `surgery repair`'s wall time. Prints a Markdown table. Not a test: timings depend on the machine.

    python bench/bench_search.py                                   # the tiny in-process model (seconds; checks it runs)
    python bench/bench_search.py --model lab/models/attacked --reference lab/models/aligned --task sst2:SELECT.tsv
    python bench/bench_search.py --model M --reference R --method revert --fixed 1 --extra "--unaligned B"

Each command runs in this process through the CLI (`cli.main.main`), one after the other; exit 1 (a search that finds
no repair inside the budget, as on the random tiny model) is a result, not a failure. The search's own figures
(candidates, confirmed points, forward passes, binding line) are read from the output's surgery.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def surgery(args: list[str]) -> tuple[float, int]:
    """(wall seconds, exit code) of `surgery ARGS` in this process; exit 2 (bad input) stops the benchmark."""
    from cli.main import main

    t0 = time.perf_counter()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    wall = time.perf_counter() - t0
    if code not in (0, 1):
        sys.exit(f"surgery {' '.join(map(str, args[:2]))} exited {code}")
    return wall, code


def searched(out: Path) -> dict:
    """Candidates, confirmed points, forward passes and binding line of the search(es) recorded in OUT/surgery.json."""
    report = json.loads((out / "surgery.json").read_text()).get("report", {})
    searches = [report["search"]] if "search" in report else []
    points = report.get("repair", {}).get("points")
    if points is not None:
        return {
            "points": len(points),
            "confirmed": sum(p["confirmed"] for p in points),
            "passes": sum(c.get("forward_passes") or 0 for c in report["repair"]["candidates"]),
            "bound": ", ".join(
                f"{c['candidate']}: {(c.get('bound') or '-').split(':')[0]}" for c in report["repair"]["candidates"]
            ),
        }
    if not searches:
        return {}
    s = searches[0]
    return {
        "points": len(s["candidates"]),
        "confirmed": sum(c["confirmed"] for c in s["candidates"]),
        "passes": s.get("forward_passes"),
        "bound": (s.get("bound") or "-").split(":")[0],
    }


def tiny_pair(folder: Path) -> tuple[Path, Path]:
    from surgery.testing.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(folder / "model", seed=0), save_tiny_checkpoint(folder / "reference", seed=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="the fine-tuned checkpoint (default: the tiny in-process model)")
    ap.add_argument(
        "--reference",
        type=Path,
        help="the checkpoint before the fine-tune (default with the tiny model: another tiny model)",
    )
    ap.add_argument("--task", help="NAME:FILE for the task budget line (e.g. sst2:select.tsv)")
    ap.add_argument("--method", default="prune", help="the method timed fixed against auto (a registered command)")
    ap.add_argument("--fixed", default="0.05", help="the fixed strength of the fixed-strength run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--extra", default="", help="more arguments for every command, quoted (e.g. '--unaligned BASE')")
    ap.add_argument("--no-repair", action="store_true", help="skip the `surgery repair` run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        if args.model is None:
            model, reference = tiny_pair(work)
            where, device = "tiny (in-process, 2 layers)", "cpu"
        else:
            model, reference, where, device = args.model, args.reference, str(args.model), args.device
        common = ["--device", device, *(["--task", args.task] if args.task else []), *shlex.split(args.extra)]
        from surgery.methods import get_method

        method = get_method(args.method)
        knob = method.strength.field.replace("_", "-")
        role = next((r for r in ("reference", "aligned", "direction_from") if r in method.references), None)
        with_reference = [f"--{role.replace('_', '-')}", reference] if reference and role else []
        rows = []
        for label, strength in (("fixed", args.fixed), ("auto", "auto")):
            out = work / f"{args.method}-{label}"
            wall, code = surgery([args.method, model, "-o", out, *with_reference, f"--{knob}", strength, *common])
            rows.append((f"`{args.method} --{knob} {strength}`", wall, code, searched(out) if label == "auto" else {}))
            shutil.rmtree(out, ignore_errors=True)
        if not args.no_repair:
            out = work / "repair"
            wall, code = surgery(
                ["repair", model, "-o", out, *(["--reference", reference] if reference else []), *common]
            )
            rows.append(("`surgery repair`" + (" --reference" if reference else ""), wall, code, searched(out)))
        fixed = rows[0][1]
        print(f"\nmodel: {where}\n")
        print(
            "| run | wall time | x fixed | exit | points measured | confirmed (generated) | forward passes | bound by |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for label, wall, code, found in rows:
            print(
                f"| {label} | {wall:.1f} s | {wall / fixed:.2f} | {code} | {found.get('points', '-')} | "
                f"{found.get('confirmed', '-')} | {found.get('passes', '-')} | {found.get('bound', '-')} |"
            )
        ratio = rows[1][1] / fixed
        print(f"\nauto / fixed = {ratio:.2f} (target at most 3): {'met' if ratio <= 3 else 'NOT met'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
