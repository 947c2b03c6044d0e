"""Triton kernels for the memory-bound steps (optional: `pip install 'model-surgery[kernels]'`).

Nothing here imports Triton until a kernel is asked for: `surgery.select` decides whether to use
them, and its plain-torch functions give the identical answers everywhere else. With
TRITON_INTERPRET=1 set before Triton is first imported, the kernels run on CPU tensors (slowly): that
is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import functools
import os


def interpreter_mode() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_problem() -> str | None:
    """Why the kernels cannot be used here, or None when they can."""
    try:
        import inspect

        import triton
        import triton.language as tl
    except ImportError as err:
        return f"Triton is not installed (pip install 'model-surgery[kernels]'): {err}"
    # The radix passes histogram only the keys that share the current prefix: masked tl.histogram (3.4+).
    if "mask" not in inspect.signature(tl.histogram).parameters:
        return f"Triton {triton.__version__} is too old: the kernels need tl.histogram(mask=...), Triton 3.4 or newer"
    return None


def triton_available() -> bool:
    return triton_problem() is None
