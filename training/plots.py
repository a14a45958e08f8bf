"""Matplotlib for the PNG reports (`training.evaluate`, `training.robustness`, `training.mnist_c`).

Plots are written to files, never shown: the Agg backend works on machines without a display. Matplotlib is
imported on first use, so a module that can plot costs nothing until it does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot():
    """`matplotlib.pyplot` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, out: str | Path, dpi: int = 110) -> Path:
    """Writes the figure as a PNG (creating its directory) and closes it, so a report's figures do not pile up."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out
