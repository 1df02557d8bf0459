"""Figures for notebooks 02, 04, 05 and 06, one module per job:

- :mod:`cacnb.viz.figures`: images and labels, a crop pair, predictions, per-class IoU and confusion;
- :mod:`cacnb.viz.features`: what the CAC features look like on a pair (similarity, PCA, confidence and the
  direction of the loss);
- :mod:`cacnb.viz.widgets`: slider explorers in JupyterLab, static figures under papermill;
- :mod:`cacnb.viz.loss_viz`: the CAC loss on one pair, term by term (notebook 02);
- :mod:`cacnb.viz.paper`: the paper's reported VOC numbers beside ours.

The geometry they draw comes from :mod:`cacnb.data.pairs`, the model outputs from :mod:`cacnb.runs`. The names
notebooks use are re-exported here, so ``from cacnb import viz; viz.show_pair(...)`` works.
"""
from __future__ import annotations

from cacnb.viz import loss_viz
from cacnb.viz.features import (default_queries, pca_rgb, plot_agreement, plot_confidence, plot_pca,
                                plot_similarity, pull_directions, similarity_grid, similarity_map)
from cacnb.viz.figures import (colorize, image_to_rgb, overlay, plot_compare, plot_confusion, plot_iou_bars,
                               prediction_gallery, show_pair)
from cacnb.viz.paper import paper_table, paper_table_markdown
from cacnb.viz.widgets import similarity_explorer, slider_explorer, widgets_available

__all__ = ["loss_viz", "default_queries", "pca_rgb", "plot_agreement", "plot_confidence", "plot_pca", "plot_similarity",
           "pull_directions", "similarity_grid", "similarity_map", "colorize", "image_to_rgb", "overlay",
           "plot_compare", "plot_confusion", "plot_iou_bars", "prediction_gallery", "show_pair", "paper_table",
           "paper_table_markdown", "similarity_explorer", "slider_explorer", "widgets_available"]
