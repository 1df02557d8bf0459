"""What a notebook user meets: parameter typos stop the run, interactive by default only with a widget front-end,
run dirs from the config, notes on untrained models, one visual convention, TensorBoard off by default."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import papermill
import pytest
import torch

from cacnb import notebook as nb
from cacnb import style
from cacnb.checkpoint_io import safe_load
from cacnb.runs import training_progress

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


class FakeShell:
    """What the helpers read from an IPython kernel: its input history and, for a kernel, ``.kernel``."""

    def __init__(self, history, kernel=True, user_ns=None):
        self.history_manager = types.SimpleNamespace(input_hist_raw=["", *history])
        self.user_ns = user_ns or {}
        if kernel:
            self.kernel = object()


PARAMS_CELL = '# Parameters (papermill overrides these)\nconfig = "synthetic"  # preset\nnproc = 1\nmode: str = "semi"\n'


# ---------------------------------------------------------------------------------------------------------------
# item 4: misspelt papermill parameters


def test_assigned_names_reads_top_level_assignments_only():
    src = "a = 1\nb: int = 2\nc, (d, e) = 1, (2, 3)\ndef f():\n    hidden = 1\nx.attr = 3\n"
    assert nb.assigned_names(src) == ["a", "b", "c", "d", "e"]
    assert nb.assigned_names("this is not python (") == []


def test_a_misspelt_injected_name_is_refused_with_the_closest_valid_one():
    shell = FakeShell([PARAMS_CELL, '# Parameters\nnprocs = 2\nconfig = "voc_r50_1323"\n', "nb.check_parameters()"])
    with pytest.raises(nb.ParameterError, match=r"unknown parameter 'nprocs': did you mean 'nproc'\?"):
        nb.check_parameters(shell)
    shell = FakeShell([PARAMS_CELL, "# Parameters\nbanana = 2\n", "nb.check_parameters()"])
    with pytest.raises(nb.ParameterError, match="valid names: config, nproc, mode"):
        nb.check_parameters(shell)


def test_rerunning_an_executed_notebook_out_of_order_is_no_false_alarm():
    injected = '# Parameters\nnproc = 2\n'
    nb.check_parameters(FakeShell([PARAMS_CELL, injected, "import torch", "x = 1", injected, "y = 2"]))
    with pytest.raises(nb.ParameterError, match="'nprocs'"):
        nb.check_parameters(FakeShell([PARAMS_CELL, injected, "x = 1", "# Parameters\nnprocs = 2\n", "y"]))


def test_valid_or_absent_injections_pass():
    nb.check_parameters(FakeShell([PARAMS_CELL, "# Parameters\nnproc = 2\nmode = \"supervised\"\n", "x"]))
    nb.check_parameters(FakeShell([PARAMS_CELL, "nprocs = 2", "x"]))  # JupyterLab: the user's own cells
    nb.check_parameters(FakeShell([]))


def test_outside_a_kernel_check_parameters_is_a_no_op(monkeypatch):
    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    nb.check_parameters()


@pytest.mark.slow
def test_papermill_run_with_a_typo_stops_naming_it(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(NOTEBOOKS / "01_model.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"configg": "synthetic", "flops": False}, kernel_name="python3",
                                   cwd=str(tmp_path), progress_bar=False)
    assert "ParameterError" in str(err.value) and "did you mean 'config'?" in str(err.value)


def test_every_notebook_checks_its_parameters_first():
    import nbformat

    for path in sorted(NOTEBOOKS.glob("0[0-5]_*.ipynb")):
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert code[0].metadata.get("tags") == ["parameters"], path.name
        assert "nb.check_parameters()" in code[1].source, path.name
        assert "runs/demo" not in "".join(c.source for c in code), f"{path.name} hard-codes a run dir"


def test_overrides_are_a_dict_wherever_a_notebook_takes_them():
    for path in sorted(NOTEBOOKS.glob("0[0-5]_*.ipynb")):
        declared = papermill.inspect_notebook(str(path))
        if "overrides" in declared:
            assert declared["overrides"]["default"] == "{}", path.name


# ---------------------------------------------------------------------------------------------------------------
# item 1: interactive = None


def test_widgets_only_with_a_live_widget_frontend():
    lab = {"JPY_SESSION_NAME": "/work/notebooks/05_visualization.ipynb"}
    assert nb.widget_frontend(FakeShell([]), lab) is True
    assert nb.widget_frontend(FakeShell([], user_ns={"__vsc_ipynb_file__": "x.ipynb"}), {}) is True
    assert nb.widget_frontend(FakeShell([]), {}) is False                        # papermill / nbclient kernel
    assert nb.widget_frontend(FakeShell([], kernel=False), lab) is False         # terminal IPython
    assert nb.widget_frontend(FakeShell([PARAMS_CELL, "# Parameters\nnproc = 2\n"]), lab) is False  # papermill -p
    assert nb.widget_frontend(FakeShell([]), {**lab, "CACNB_STATIC_PLOTS": "1"}) is False


def test_resolve_interactive_keeps_an_explicit_choice(monkeypatch):
    monkeypatch.setattr(nb, "widget_frontend", lambda: True)
    assert nb.resolve_interactive(None) is True and nb.resolve_interactive(False) is False
    monkeypatch.setattr(nb, "widget_frontend", lambda: False)
    assert nb.resolve_interactive(None) is False and nb.resolve_interactive(True) is True


def test_notebooks_default_to_interactive_none():
    for name in ("02_loss_walkthrough", "05_visualization"):
        assert papermill.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))["interactive"]["default"] == "None"


# ---------------------------------------------------------------------------------------------------------------
# items 2, 3, 6: run dirs from the config, notes on untrained models


def test_run_dir_follows_the_config(tmp_path):
    assert nb.run_dir("synthetic", "semi", str(tmp_path)) == tmp_path / "synthetic_semi"
    assert nb.run_dir("synthetic", "supervised", str(tmp_path)) == tmp_path / "synthetic_supervised"
    named = nb.run_dir("synthetic", "semi", str(tmp_path), {"train.run_name": "mine"})
    assert named == tmp_path / "mine"


def test_demo_trains_before_the_walkthrough_and_its_notebooks_open_the_sweeps_runs():
    from cacnb import sweep
    from cacnb.demo import DEMO_ORDER, DEMO_PARAMETERS, SWEEP_DIR, notebook_parameters, sweep_argv

    assert DEMO_ORDER.index("03_training") < DEMO_ORDER.index("02_loss_walkthrough")
    plan = sweep.build_plan(sweep.parse_args(sweep_argv("runs/x")))
    trained = {str(plan.out / spec.run) for spec in plan.runs}
    assert {spec.mode for spec in plan.runs} == {"supervised", "semi"}
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    p02 = notebook_parameters(notebooks / "02_loss_walkthrough.ipynb", "runs/x")
    p04 = notebook_parameters(notebooks / "04_evaluation.ipynb", "runs/x")
    p05 = notebook_parameters(notebooks / "05_visualization.ipynb", "runs/x")
    opened = {str(nb.run_dir(p02["config"], "semi", p02["out_dir"], p02["overrides"]).resolve()),
              str(Path(p04["run_dir"]).resolve()), str(Path(p04["baseline_dir"]).resolve()),
              str(Path(p05["run_dir"]).resolve())}
    assert opened == {str(Path(t).resolve()) for t in trained}
    assert p04["split"] == "test"
    assert DEMO_PARAMETERS["06_results"]["sweep_dir"] == SWEEP_DIR
    assert DEMO_PARAMETERS["02_loss_walkthrough"]["interactive"] is False
    assert DEMO_PARAMETERS["05_visualization"]["interactive"] is False


def _checkpoint(path, iteration, epochs=4, ipe=30):
    from cacnb.config import load_config

    cfg = load_config("synthetic", {"train.epochs": epochs, "train.iters_per_epoch": ipe})
    torch.save({"model": {}, "iteration": iteration, "config": cfg.to_dict()}, path)
    return path


def test_model_notes_for_random_and_barely_trained_models(tmp_path):
    assert "untrained" in nb.model_note(None)
    barely = _checkpoint(tmp_path / "a.pt", 11)               # 11 of 120 planned: 9 %
    assert training_progress(safe_load(barely)) == (11, 120)
    assert "barely trained model: 11 of 120 planned iterations (9%)" in nb.model_note(barely, (11, 120))
    assert nb.model_note(barely, (12, 120)) is None          # 10 %: trained enough to be shown as is
    torch.save({"state_dict": {}}, tmp_path / "official.pth")
    assert training_progress(safe_load(tmp_path / "official.pth")) is None


def test_describe_model_stamps_every_following_figure(tmp_path, capsys):
    import matplotlib.pyplot as plt

    try:
        barely = _checkpoint(tmp_path / "b.pt", 3)
        note = nb.describe_model(barely, training_progress(safe_load(barely)))
        assert note.startswith("barely trained") and style.caveat() == f"Note: {note}"
        fig = style.finish(plt.figure())
        assert any("barely trained" in t.get_text() for t in fig.texts)
        trained = _checkpoint(tmp_path / "c.pt", 120)
        assert nb.describe_model(trained, training_progress(safe_load(trained))) is None
        assert style.caveat() is None and not style.finish(plt.figure()).texts
        assert "loaded" in capsys.readouterr().out
    finally:
        style.set_caveat(None)
        plt.close("all")


# ---------------------------------------------------------------------------------------------------------------
# items 9-11: one visual convention


@pytest.fixture(scope="module")
def pair_and_outputs(trained_run, one_thread):
    """A synthetic pair (no photometric noise) and the outputs of the session's trained model (conftest.py)."""
    from cacnb.data import build_pair_dataset
    from cacnb.runs import load_run, pair_outputs

    run = load_run(trained_run, overrides={"data.photometric": False}, device="cpu")
    item = build_pair_dataset(run.config.data)[(0, 0)]
    return item, pair_outputs(run.model, item)


def _all_text(fig) -> str:
    texts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        texts.append(ax.get_title())
        legend = ax.get_legend()
        if legend is not None:
            texts += [t.get_text() for t in legend.get_texts()]
    for legend in fig.legends:
        texts += [t.get_text() for t in legend.get_texts()]
    return "\n".join(texts)


def test_similarity_map_has_a_fixed_cosine_range_and_a_colour_bar(pair_and_outputs):
    import matplotlib.pyplot as plt

    from cacnb.viz import plot_similarity

    item, outputs = pair_and_outputs
    limits = []
    for y, x in ((1, 1), (5, 6)):
        fig = plot_similarity(item, outputs, y, x)
        sim_image = fig.axes[1].get_images()[-1]
        limits.append(sim_image.get_clim())
        assert len(fig.axes) == 3                            # two panels + the colour bar
        assert fig.get_size_inches()[0] >= 12
        text = _all_text(fig)
        assert "view 1" in text and "view 2" in text and "crop" not in text and "overlap" in text
        plt.close(fig)
    assert limits == [style.COSINE_RANGE, style.COSINE_RANGE]


def test_every_pair_figure_names_views_and_uses_one_overlap_colour(pair_and_outputs):
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from cacnb import viz

    item, outputs = pair_and_outputs
    for fig in (viz.show_pair(item, dataset="synthetic"), viz.plot_pca(item, outputs),
                viz.plot_confidence(item, outputs, 0.5)):
        boxes = [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle)]
        colours = {tuple(b.get_edgecolor()) for b in boxes}
        assert len(boxes) >= 2 and colours == {matplotlib.colors.to_rgba(style.OVERLAP)}
        text = _all_text(fig)
        assert "view 1" in text and "view 2" in text and "crop " not in text
        assert fig.legends or any(ax.get_legend() for ax in fig.axes)
        plt.close(fig)


def test_multi_line_plots_have_legends(pair_and_outputs, trained_run):
    import matplotlib.pyplot as plt

    from cacnb.viz import loss_viz
    from cacnb.runs import load_run

    run = load_run(trained_run, overrides={"loss.selected_num": 32}, device="cpu")
    cfg, model = run.config, run.model
    item, outputs = pair_and_outputs
    terms = loss_viz.pair_terms(model, item, cfg.loss, pos_thresh=0.3, seed=0)
    for fig in (loss_viz.plot_direction_rule(terms), loss_viz.plot_direction_rule(terms, 0.9)):
        ax = fig.axes[0]
        assert len(ax.lines) >= 3 and ax.get_legend() is not None
        assert len(ax.get_legend().get_texts()) >= len(ax.lines)
        assert "view 1 pulled towards view 2" in _all_text(fig)
        plt.close(fig)
    assert "0.90" in loss_viz.plot_direction_rule(terms, 0.9).axes[0].get_title()
    summary = loss_viz.format_summary(loss_viz.term_summary(terms))
    assert "view 1 pulled towards view 2" in summary and "crop" not in summary
    plt.close("all")


def test_training_curves_use_whole_iterations_and_legends(tmp_path):
    import matplotlib.pyplot as plt

    from cacnb.runlog import plot_curves

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"kind": "train", "iter": i, "epoch": 0, "lr": 0.01 / i, "loss_sup": 1.0 / i, "loss_unsup": 0.5 / i,
             "frac_pos_a": 0.1, "frac_pos_b": 0.2, "pl_acc_overlap": 0.6, "pl_acc_selected": 0.7} for i in (1, 2, 3)]
    rows.append({"kind": "val", "iter": 3, "epoch": 0, "miou": 0.4})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot_curves({"CAC": run})
    fig.canvas.draw()
    assert fig.axes[4].get_title() == "pseudo-label accuracy (%)" and len(fig.axes[4].lines) == 2
    for ax in fig.axes:
        assert ax.get_xlabel() == "iteration" and ax.get_legend() is not None
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    plt.close(fig)


def test_static_explorer_draws_the_initial_values():
    import matplotlib.pyplot as plt

    from cacnb.viz import slider_explorer

    seen = []

    def draw(gamma):
        seen.append(gamma)
        return plt.figure()

    fig = slider_explorer(draw, {"gamma": (0.75, 0.0, 1.0, 0.05)}, interactive=False)
    assert seen == [0.75] and hasattr(fig, "savefig")
    plt.close("all")


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard extra


def test_tensorboard_is_off_by_default_and_mirrors_metrics(tmp_path, monkeypatch):
    from cacnb.config import ConfigError, load_config
    from cacnb.runlog import ScalarWriter

    assert load_config("synthetic").train.tensorboard is False
    off = ScalarWriter(tmp_path, enabled=False)
    off.write({"kind": "train", "iter": 1, "loss": 1.0})
    assert not (tmp_path / "tb").exists()

    calls = []

    class FakeWriter:
        def __init__(self, logdir, purge_step=None):
            calls.append(("init", logdir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    writer = ScalarWriter(tmp_path, enabled=True, start=40)
    writer.write({"kind": "train", "iter": 45, "epoch": 1, "loss": 0.5, "lr": 0.01, "note": "x", "flag": True})
    writer.write({"kind": "val", "iter": 60, "miou": 0.3})
    writer.close()
    assert calls == [("init", str(tmp_path / "tb"), 41), ("train/loss", 0.5, 45), ("train/lr", 0.01, 45),
                     ("val/miou", 0.3, 60), ("close",)]

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the extra is not installed
    with pytest.raises(ConfigError, match=r"pip install 'cacnb\[tensorboard\]'"):
        ScalarWriter(tmp_path, enabled=True)


# ---------------------------------------------------------------------------------------------------------------
# item 8: a failing worker's own error reaches notebook 03


@pytest.mark.slow
def test_notebook_03_shows_the_workers_error(tmp_path):
    params = {"config": "voc_r50_1323", "data_dir": str(tmp_path / "missing_voc"), "out_dir": str(tmp_path),
              "overrides": {"model.pretrained": None}, "timeout": 120}
    with pytest.raises(papermill.PapermillExecutionError) as err:
        nb.execute(NOTEBOOKS / "03_training.ipynb", tmp_path / "out.ipynb", params, cwd=tmp_path)
    assert err.value.ename == "LaunchError" and "exited with code 2" in err.value.evalue
    assert "missing_voc" in err.value.evalue                 # the worker's own message, not just "it failed"
    cells = json.loads((tmp_path / "out.ipynb").read_text())["cells"]
    shown = "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))
    assert "cacnb.train: error:" in shown                    # streamed into the cell as it happened
