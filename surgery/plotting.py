"""How every plot of the toolkit and its lab is drawn and saved: matplotlib's file-only Agg backend (no display),
the figure laid out, written, and closed."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend. Raises ImportError without matplotlib (the `eval` extra): a caller whose
    plot is optional catches it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay `fig` out, write it to `path`, close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
