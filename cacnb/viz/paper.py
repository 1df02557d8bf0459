"""The paper's reported numbers (CAC, PASCAL VOC 2012) and the comparison table notebook 04 shows beside ours."""
from __future__ import annotations

import math
from typing import Mapping, Optional


PAPER_SOURCE = ("CAC paper: Lai et al., 'Semi-supervised Semantic Segmentation with Directional Context-aware "
                "Consistency', CVPR 2021 (arXiv:2106.14133), PASCAL VOC 2012 comparison table: val mIoU (%), "
                "DeepLabv3+, labeled subsets of the 10,582-image SegmentationClassAug training set; values "
                "transcribed by hand, check them against the paper's PDF before citing")
PAPER_SHORT = "CAC paper (Lai et al., CVPR 2021), VOC table [1]"

# (backbone, labeled fraction, labeled images) -> reported mIoU (%)
PAPER_VOC = {
    ("ResNet-50", "1/16", 662): 70.1,
    ("ResNet-50", "1/8", 1323): 72.4,
    ("ResNet-50", "1/4", 2645): 74.0,
    ("ResNet-101", "1/16", 662): 72.4,
    ("ResNet-101", "1/8", 1323): 74.6,
    ("ResNet-101", "1/4", 2645): 76.3,
}


def paper_table(ours: Optional[Mapping[str, "float | Mapping"]] = None) -> list[dict]:
    """Rows ``{"method", "backbone", "labeled", "miou", "source"}``: the paper's reported VOC numbers, then ours.

    ``ours`` maps a row label to an mIoU (a fraction in [0, 1] or a percentage) or to a dict with ``miou`` and
    optionally ``backbone``, ``labeled``, ``source``. Our rows say where they came from (default: "this run,
    cacnb"); a synthetic-data number is not comparable with the paper's and is labelled so by its caller.
    """
    rows = [{"method": "CAC (paper)", "backbone": bb, "labeled": f"{frac} ({n})", "miou": v,
             "source": PAPER_SOURCE} for (bb, frac, n), v in PAPER_VOC.items()]
    for label, value in (ours or {}).items():
        info = dict(value) if isinstance(value, Mapping) else {"miou": value}
        miou = info.get("miou")
        if miou is not None and not (isinstance(miou, float) and math.isnan(miou)) and miou <= 1.0:
            miou = 100.0 * miou
        rows.append({"method": label, "backbone": info.get("backbone", "?"), "labeled": info.get("labeled", "?"),
                     "miou": None if miou is None else round(float(miou), 2),
                     "source": info.get("source", "this run, cacnb")})
    return rows


def paper_table_markdown(ours: Optional[Mapping[str, "float | Mapping"]] = None) -> str:
    """:func:`paper_table` as a Markdown table (display it with ``IPython.display.Markdown``)."""
    rows = paper_table(ours)
    lines = ["| method | backbone | labeled | mIoU (%) | source |", "|---|---|---|---|---|"]
    for r in rows:
        miou = "n/a" if r["miou"] is None or (isinstance(r["miou"], float) and math.isnan(r["miou"])) \
            else f"{r['miou']:.1f}"
        source = PAPER_SHORT if r["source"] == PAPER_SOURCE else r["source"]
        lines.append(f"| {r['method']} | {r['backbone']} | {r['labeled']} | {miou} | {source} |")
    lines += ["", f"[1] {PAPER_SOURCE}. Other rows: measured by cacnb as stated in their source column."]
    return "\n".join(lines)
