"""The one figure style of every mokd plot: two-column paper sizes, fonts, a colour-blind-safe palette.

Every figure is saved twice, as vector PDF (for the paper) and PNG (for README/report), with the same
size and DPI, so a figure's pixel size is known in advance (`pixel_size`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from mokd.core import atomic  # noqa: E402

# Okabe & Ito (2008): distinguishable under the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
CONTROL_COLOUR = "#7f7f7f"  # random-init and other control curves
MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")
# CVPR: a column is 3.25 in wide, the full text width 6.875 in.
COLUMN_WIDTH = 3.25
TEXT_WIDTH = 6.875
DPI = 200
RC = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "axes.linewidth": 0.6, "lines.linewidth": 1.2, "lines.markersize": 3,
    "pdf.fonttype": 42, "ps.fonttype": 42,  # embed TrueType: editable text in the PDF
    "savefig.dpi": DPI, "figure.dpi": DPI,
}


def palette(n: int) -> list[str]:
    """`n` distinct colours: Okabe-Ito up to 8, seaborn's colour-blind palette up to 10, then evenly spaced hues."""
    if n <= len(PALETTE):
        return list(PALETTE[:n])
    if n <= 10:
        return sns.color_palette("colorblind", n).as_hex()
    return sns.color_palette("husl", n).as_hex()


@contextmanager
def paper_style() -> Iterator[None]:
    """Matplotlib settings for one figure, restored afterwards (tests and other plots are unaffected)."""
    with sns.axes_style("ticks"), plt.rc_context(RC):
        yield


def figure(width: float = COLUMN_WIDTH, height: float = 2.3, ncols: int = 1, nrows: int = 1):
    """A figure of exactly width x height inches (pixel size = inches x DPI)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    return fig, axes


def pixel_size(width: float, height: float) -> tuple[int, int]:
    """PNG size in pixels (width, height) of a `figure(width, height)`: matplotlib truncates to whole pixels."""
    return int(width * DPI + 1e-6), int(height * DPI + 1e-6)


def save(fig, stem: str | Path) -> dict[str, str]:
    """Write `<stem>.pdf` and `<stem>.png` atomically (fixed size: no tight bbox), close the figure."""
    stem = Path(stem)
    paths = {}
    try:
        for ext in ("pdf", "png"):
            target = stem.with_name(stem.name + f".{ext}")
            with atomic.atomic_path(target) as tmp:
                fig.savefig(tmp, format=ext, dpi=DPI)
            paths[ext] = str(target)
    finally:
        plt.close(fig)
    return paths
