"""Notebooks 04 and 05 under papermill (the session's trained run, 1 val image), plus the viz geometry they rely on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory):
    """A baseline run dir holding only metrics.jsonl (the CAC run is the session's trained run, conftest.py)."""
    root = tmp_path_factory.mktemp("supervised")
    iou = [0.5] + [None] * 20
    (root / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "iter": 1, "loss": 1.0}) + "\n"
        + json.dumps({"kind": "val", "iter": 2, "epoch": 0, "miou": 0.5, "iou": iou, "pixel_acc": 0.9}) + "\n")
    return root


def _execute(name, tmp_path, parameters):
    import papermill

    out = tmp_path / f"out_{name}"
    papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=parameters, kernel_name="python3",
                               cwd=str(tmp_path), progress_bar=False)
    return json.loads(out.read_text())


def _text(nb) -> str:
    chunks = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            chunks.append("".join(o.get("text", "")))
            chunks.append("".join(o.get("data", {}).get("text/markdown", "")))
    return "\n".join(chunks)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


@pytest.mark.slow
def test_notebook_04_executes(trained_run, baseline_dir, tmp_path):
    nb = _execute("04_evaluation.ipynb", tmp_path, {
        "config": str(trained_run / "config.json"), "run_dir": str(trained_run),
        "baseline_dir": str(baseline_dir), "max_images": 1})
    text = _text(nb)
    assert "mIoU" in text and "1 synthetic val images" in text
    assert "best val line" in text                       # baseline read back from metrics.jsonl
    assert "CAC (paper) | ResNet-50 | 1/8 (1323) | 72.4" in text and "arXiv:2106.14133" in text
    assert _images(nb) >= 3                              # IoU bars, confusion, comparison


@pytest.mark.slow
def test_notebook_05_executes(trained_run, tmp_path):
    nb = _execute("05_visualization.ipynb", tmp_path, {
        "config": str(trained_run / "config.json"), "checkpoint": str(trained_run / "best.pt"),
        "n_gallery": 1, "interactive": False})
    text = _text(nb)
    assert "loaded" in text and "random" not in text.lower().split("loaded")[0]
    assert _images(nb) >= 5                              # pair, similarity, PCA, confidence, gallery


def test_missing_checkpoint_falls_back_to_a_random_model(trained_run, tmp_path):
    from cacnb.runs import load_run

    run = load_run(tmp_path / "nope.pt", config=str(trained_run / "config.json"), allow_random=True)
    assert run.checkpoint is None and not run.model.training and run.config.model.proj_dim == 16
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_run(tmp_path / "nope.pt", config=str(trained_run / "config.json"))


@pytest.mark.parametrize("flip", [(False, False), (False, True), (True, False), (True, True)])
def test_viz_overlap_alignment_matches_the_loss(flip):
    from cacnb.data.pairs import overlap_cells
    from cacnb.loss import gather_overlap

    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.rand(1, 3, 6, 7, generator=g), torch.rand(1, 3, 6, 7, generator=g)
    overlap = torch.tensor([[[8, 16, 40, 48], [0, 8, 32, 40]]])   # 4 x 4 cells at stride 8
    flips = torch.tensor([flip])
    ref_a, ref_b = gather_overlap(x_a, x_b, overlap, flips)       # [n, 3]
    for k, (x, ref) in enumerate(((x_a, ref_a), (x_b, ref_b))):
        rows, cols = overlap_cells(overlap[0, k].tolist(), flip[k], 7)
        ours = x[0][:, rows][:, :, cols].reshape(3, -1).T
        torch.testing.assert_close(ours, ref)


def test_counterpart_cell_shows_the_same_pixels(trained_run):
    from cacnb.config import load_config
    from cacnb.data import build_pair_dataset
    from cacnb.data.pairs import counterpart
    from cacnb.viz import default_queries

    cfg = load_config(str(trained_run / "config.json"), {"data.photometric": False})
    pairs = build_pair_dataset(cfg.data)
    for index in range(3):
        item = pairs[(index, 0)]
        grid = item["image"].shape[-1] // 8
        for y, x in default_queries(item, (grid, grid), 3):
            match = counterpart(item, y, x, (grid, grid))
            assert match is not None
            a = item["image"][0][:, 8 * y:8 * y + 8, 8 * x:8 * x + 8]
            b = item["image"][1][:, 8 * match[0]:8 * match[0] + 8, 8 * match[1]:8 * match[1] + 8]
            if bool(item["flip"][0]) != bool(item["flip"][1]):
                b = b.flip(-1)
            torch.testing.assert_close(a, b)


def test_static_fallback_and_figures_without_a_kernel():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cacnb import viz

    assert not viz.widgets_available()   # plain pytest: no IPython kernel
    g = torch.Generator().manual_seed(0)
    item = {"image": torch.randn(2, 3, 32, 32, generator=g), "label": torch.randint(0, 21, (2, 32, 32)),
            "overlap": torch.tensor([[0, 8, 24, 32], [8, 0, 32, 24]]), "flip": torch.tensor([True, False]),
            "id": "toy"}
    outputs = [{"proj": torch.nn.functional.normalize(torch.randn(8, 4, 4, generator=g), dim=0),
                "logits": 5 * torch.randn(21, 4, 4, generator=g)} for _ in range(2)]
    fig = viz.similarity_explorer(item, outputs, interactive=None)
    assert isinstance(fig, plt.Figure)
    info = viz.pull_directions(item, outputs)
    assert info["direction"].shape == (3, 3)
    assert not bool((info["pull_a"] & info["pull_b"]).any())
    assert torch.equal(info["pull_a"], (info["conf_b"] > 0.75) & (info["conf_b"] > info["conf_a"]))
    rgb_a, rgb_b = viz.pca_rgb(outputs[0]["proj"], outputs[1]["proj"])
    assert rgb_a.shape == (4, 4, 3) and 0 <= rgb_a.min() and rgb_b.max() <= 1
    sim = viz.similarity_map(outputs[0]["proj"], outputs[0]["proj"], 1, 2)
    assert sim[1, 2].item() == pytest.approx(1.0) and sim.max().item() <= 1 + 1e-6
    for f in (viz.plot_confidence(item, outputs), viz.plot_pca(item, outputs), viz.show_pair(item)):
        assert isinstance(f, plt.Figure)
    rows = viz.paper_table({"ours": 0.5})
    assert rows[-1]["miou"] == 50.0 and all("arXiv:2106.14133" in r["source"] for r in rows[:-1])
    plt.close("all")
