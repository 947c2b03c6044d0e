"""End-to-end `surgery prune` on a real checkpoint: wall time and peak resident memory.

    python bench/bench_prune.py --model lab/models/base            # SmolLM2-135M-Instruct, default calibration
    python bench/bench_prune.py --model M --extra "--score magnitude"

Runs the CLI in a child process (bench/child.py) so its peak RSS is the tool's alone, and prints one
markdown table row per run to paste into docs/prune.md.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child import run_cli  # noqa: E402


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def run_prune(model: Path, extra: list[str]) -> tuple[float, int, str]:
    out = Path(tempfile.mkdtemp(prefix="bench-prune-")) / "out"
    try:
        return run_cli(["prune", str(model), "-o", str(out), *extra])
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", type=Path, required=True, help="checkpoint folder (e.g. from `surgery import-gguf smollm2`)"
    )
    ap.add_argument("--extra", default="", help="extra `surgery prune` arguments, quoted")
    args = ap.parse_args()
    extra = shlex.split(args.extra)
    size = checkpoint_bytes(args.model)
    # The runtime alone (Python, torch, transformers, the model built on the meta device): a dry run.
    _, floor, _ = run_cli(["prune", str(args.model), "--dry-run", *extra])
    wall, peak, stdout = run_prune(args.model, extra)
    # rich wraps the summary at the terminal width: rejoin it from "pruned" up to "wrote"
    start, end = stdout.find("pruned "), stdout.find("wrote ")
    print(" ".join(stdout[start:end].split()) if 0 <= start < end else stdout[-400:])
    print(
        "| command | checkpoint | wall time | peak RSS | runtime (dry run) | peak - runtime | (peak - runtime) / checkpoint |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| `surgery prune {args.model.name} {' '.join(extra)}` | {size / 2**20:.0f} MiB | {wall:.1f} s "
        f"| {peak / 2**20:.0f} MiB | {floor / 2**20:.0f} MiB | {(peak - floor) / 2**20:.0f} MiB | {(peak - floor) / size:.2f}x |"
    )


if __name__ == "__main__":
    main()
