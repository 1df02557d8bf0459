"""Interactive figures: sliders that redraw a figure in JupyterLab, and the static figure in their place under
papermill or plain Python (:func:`cacnb.notebook.resolve_interactive` decides)."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import matplotlib.pyplot as plt

from cacnb.notebook import resolve_interactive, widget_frontend
from cacnb.viz.features import default_queries, plot_similarity, similarity_grid


def widgets_available() -> bool:
    """Kept for older notebooks: :func:`cacnb.notebook.widget_frontend`."""
    return widget_frontend()


def slider_explorer(draw, sliders: Mapping[str, tuple], interactive: Optional[bool] = None, static=None):
    """A figure redrawn whenever one of its sliders moves (JupyterLab), or a static figure (papermill).

    ``draw(**values)`` returns a Figure; ``sliders`` maps each keyword of ``draw`` to ``(value, min, max)``
    (ints give an IntSlider, floats a FloatSlider with ``max - min`` / 100 steps) or ``(value, min, max, step)``.
    ``interactive`` None: widgets when a widget front-end is attached (:func:`cacnb.notebook.resolve_interactive`).
    Without widgets ``static()`` (default: ``draw`` at the initial values) gives the figure. Returns the widget
    box or the Figure."""
    if not resolve_interactive(interactive):
        return static() if static is not None else draw(**{k: v[0] for k, v in sliders.items()})
    import ipywidgets as widgets  # lazy: optional (cacnb[notebooks]); resolve_interactive checked it is there
    from IPython.display import display  # lazy: as ipywidgets, only a live kernel has it
    controls = {}
    for name, spec in sliders.items():
        value, lo, hi, *step = spec
        if all(isinstance(v, int) for v in (value, lo, hi)):
            controls[name] = widgets.IntSlider(value=value, min=lo, max=hi, step=step[0] if step else 1,
                                               description=name, continuous_update=False)
        else:
            controls[name] = widgets.FloatSlider(value=value, min=lo, max=hi, step=step[0] if step else (hi - lo) / 100,
                                                 description=name, continuous_update=False)
    out = widgets.Output()

    def redraw(_change=None) -> None:
        with out:
            out.clear_output(wait=True)
            fig = draw(**{k: c.value for k, c in controls.items()})
            plt.show()
            plt.close(fig)

    for control in controls.values():
        control.observe(redraw, names="value")
    box = widgets.VBox([widgets.HBox(list(controls.values())), out])
    redraw()
    display(box)
    return box


def similarity_explorer(item: Mapping, outputs: Sequence[Mapping], interactive: Optional[bool] = None,
                        num_classes: Optional[int] = None):
    """Pick a cell of view 1 with two sliders and see its cosine similarity over view 2 (JupyterLab).

    Static (:func:`similarity_grid`, a few queries in the overlap) when ``interactive`` is False, or None without
    a widget front-end (papermill). With ``num_classes`` the queries start on the overlap's objects. Returns the
    widget box or the static Figure.
    """
    h8, w8 = outputs[0]["proj"].shape[-2:]
    y0, x0 = default_queries(item, (h8, w8), 1, num_classes)[0]
    return slider_explorer(lambda y, x: plot_similarity(item, outputs, y, x),
                           {"y": (int(y0), 0, int(h8) - 1), "x": (int(x0), 0, int(w8) - 1)},
                           interactive, static=lambda: similarity_grid(item, outputs, num_classes=num_classes))
