"""Run one `surgery` command in a child process and report its wall time and peak resident memory."""

from __future__ import annotations

import subprocess
import sys
import time

# VmHWM (peak RSS of this process image) and not ru_maxrss: Linux carries ru_maxrss across exec, so a
# child started by a parent that holds a big checkpoint in memory would report the parent's size.
_CODE = (
    "import sys; from cli.main import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
    "print('PEAK_KIB', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
)


def run_cli(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, stdout) of `surgery ARGS`; exits with the tool's stderr on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CODE, *map(str, args)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or "PEAK_KIB" not in proc.stdout:
        sys.exit(f"surgery {' '.join(map(str, args[:2]))} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    stdout, peak = proc.stdout.rsplit("PEAK_KIB", 1)
    return wall, int(peak.split()[0]) * 1024, stdout
