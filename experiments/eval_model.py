"""One checkpoint on the lab's held-out sets, as experiments/demo_pair.py measures its rows (`DemoPair.evaluate`: 64
AdvBench prompts, 100 SST-2 dev items, 48 Alpaca instructions and a second, unseen Alpaca sample; KL to the attacked
model), for an output made outside a lab folder (the README's main job):

    python experiments/eval_model.py models/demo/repaired [--pair models/demo] [--lab lab/eval] [--name NAME]

The pair's folders (attacked, aligned, base) and the model are linked into LAB/models; the figures go to
LAB/results/NAME.json and one line on stdout. Reads ../shared/data (the evaluation sets).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_pair import DemoPair, parse  # noqa: E402


def link(path: Path, target: Path) -> None:
    if path.is_symlink() and path.resolve() != target.resolve():
        path.unlink()
    if not path.exists():
        path.symlink_to(target.resolve())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--pair", type=Path, default=Path("models/demo"), help="folder of attacked, aligned, base")
    ap.add_argument("--lab", default="lab/eval")
    ap.add_argument("--name", default=None, help="row name (default: the model folder's name)")
    args = ap.parse_args()
    name = args.name or args.model.name
    models = Path(args.lab) / "models"
    models.mkdir(parents=True, exist_ok=True)
    for role in ("attacked", "aligned", "base"):
        link(models / role, args.pair / role)
    link(models / name, args.model)
    pair = DemoPair(parse(["--lab", args.lab]))
    out = pair.results / f"{name}.json"
    t0 = time.perf_counter()
    pair.evaluate(name, out)
    figures = json.loads(out.read_text())["figures"]
    print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()) + f" ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
