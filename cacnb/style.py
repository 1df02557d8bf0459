"""The one visual convention of every cacnb figure (notebooks 02-05).

- The two crops of an unlabeled pair are **view 1** and **view 2** everywhere (the loss code's ``_a`` / ``_b``
  suffixes are view 1 / view 2; ``loss_a`` is :math:`\\mathcal{L}^{1\\leftarrow 2}`, view 1 pulled towards view 2).
- The overlap box has one colour, :data:`OVERLAP`, on images, labels and feature maps alike.
- View 1 is drawn in :data:`VIEW_COLOURS` [0], view 2 in [1] wherever a plot tells them apart.
- Every plot with more than one line or marker kind gets a legend (:func:`legend`).
- Cosine similarities are drawn on the fixed range [-1, 1] (:data:`COSINE_RANGE`) with a colour bar, so two
  queries (or two models) can be compared by colour.
- When the model behind a figure is untrained or barely trained, :func:`set_caveat` makes :func:`finish` stamp
  that on every figure, so a figure copied out of the notebook still says so.
"""
from __future__ import annotations

from typing import Optional

VIEWS = ("view 1", "view 2")
VIEW_COLOURS = ("tab:blue", "tab:orange")
OVERLAP = "yellow"           # the overlap box, on every panel
QUERY = "red"                # the query cell of the similarity explorer
MATCH = "cyan"               # its counterpart in view 2
CONTOUR = "white"            # the confidence threshold contour
COSINE_RANGE = (-1.0, 1.0)
COSINE_CMAP = "RdBu_r"
NO_PULL = "lightgrey"

_caveat: Optional[str] = None


def view(k: int) -> str:
    """``"view 1"`` for ``k = 0``, ``"view 2"`` for ``k = 1``."""
    return VIEWS[k]


def pull(k: int) -> str:
    """The direction of the loss term that moves view ``k + 1``: ``"view 1 pulled towards view 2"`` for 0."""
    return f"{VIEWS[k]} pulled towards {VIEWS[1 - k]}"


def line_handle(colour: str, label: str, **kwargs):
    """A legend entry for an artist that has none of its own (a box patch, a contour)."""
    from matplotlib.lines import Line2D  # lazy, as everywhere in cacnb: importing cacnb must not load matplotlib

    kwargs.setdefault("linewidth", 2)
    return Line2D([], [], color=colour, label=label, **kwargs)


def overlap_handle(label: str = "overlap (same image region)"):
    """A legend entry for the overlap box (the box itself is a Rectangle patch without a label)."""
    return line_handle(OVERLAP, label)


def legend(ax, handles=None, **kwargs) -> None:
    """A legend with the axes' labelled artists plus ``handles``; nothing when there is nothing to name."""
    own, _ = ax.get_legend_handles_labels()
    items = own + list(handles or [])
    if items:
        kwargs.setdefault("fontsize", 8)
        ax.legend(handles=items, **kwargs)


def set_caveat(text: Optional[str]) -> None:
    """Stamp ``text`` on every figure :func:`finish` sees from now on (None: stop)."""
    global _caveat
    _caveat = text


def caveat() -> Optional[str]:
    return _caveat


def finish(fig):
    """The last step of every figure function: stamp the caveat (if any) in red at the top left."""
    if _caveat:
        fig.text(0.005, 0.995, _caveat, color="red", fontsize=9, fontweight="bold", ha="left", va="top")
    return fig
