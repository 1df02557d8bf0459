"""Sweep statistics: the t quantile and intervals against hand-computed numbers, tables, README paste."""
from __future__ import annotations

import json
import math

import pytest

from cacnb.readme_block import README_BEGIN, README_END, paste_into_readme, readme_markers
from cacnb.results import (ablation_differences_markdown, comparisons, main, per_class_iou, plot_seeds,
                           read_results, results_markdown, row_summary, write_results_csv)
from cacnb.stats import mean_interval, paired_difference, second_opinion, t_quantile


def test_t_quantile_closed_forms_and_table():
    # df 1 (Cauchy): t = tan(pi (p - 1/2)); df 2: t = (2p - 1) sqrt(2 / (1 - (2p - 1)^2))
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (1 - (2 * p - 1) ** 2)), rel=1e-9)
    # printed tables of t_{0.975, df}
    for df, t in ((3, 3.182446), (4, 2.776445), (5, 2.570582), (10, 2.228139), (30, 2.042272)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=2e-6)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)      # the normal limit
    assert t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=2e-6)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_mean_interval_by_hand():
    # mean 3, s = sqrt(10 / 4), half width = 2.776445 * s / sqrt(5) = 1.963243
    iv = mean_interval([1, 2, 3, 4, 5])
    assert (iv.n, iv.mean, iv.std) == (5, 3.0, pytest.approx(math.sqrt(2.5)))
    assert (iv.low, iv.high) == (pytest.approx(1.036757, abs=1e-6), pytest.approx(4.963243, abs=1e-6))
    one = mean_interval([7.0])
    assert one.mean == 7.0 and math.isnan(one.low) and not one.excludes_zero()
    with pytest.raises(ValueError):
        mean_interval([1.0, float("nan")])


def test_paired_difference_by_hand():
    # the numbers: semi - supervised on seeds 0/1/2 = +0.14, -2.25, -0.92; mean -1.01,
    # s = 1.197539, half width = 4.302653 * 1.197539 / sqrt(3) = 2.974852
    semi = {0: 50.33, 1: 57.18, 2: 56.57}
    sup = {0: 50.19, 1: 59.43, 2: 57.49, 3: 60.0}                           # seed 3 has no partner
    iv, diffs = paired_difference(semi, sup)
    assert list(diffs) == [0, 1, 2] and diffs[1] == pytest.approx(-2.25)
    assert iv.mean == pytest.approx(-1.01) and iv.std == pytest.approx(1.197539, abs=1e-6)
    assert (iv.low, iv.high) == (pytest.approx(-3.984852, abs=1e-6), pytest.approx(1.964852, abs=1e-6))
    assert not iv.excludes_zero()


def test_second_opinions_by_hand():
    # 5 positive differences: the exact two-sided Wilcoxon p is 2 / 2^5 = 0.0625, its floor at 5 pairs
    second = second_opinion([1, 2, 3, 4, 5])
    assert second.wilcoxon_p == pytest.approx(0.0625)
    assert 1 <= second.boot_low < 3 < second.boot_high <= 5        # BCa around the mean, inside the data's range
    assert second_opinion([1, 2, 3, 4, 5]) == second                  # a fixed resampling seed
    assert math.isnan(second_opinion([1.0, 1.0, 1.0]).boot_low)       # no spread, no bootstrap
    assert math.isnan(second_opinion([]).wilcoxon_p)


def _rows():
    rows = []
    for mode, over, base in (("supervised", "", 50.0), ("semi", "", 52.0), ("full", "", 60.0),
                             ("semi", "loss.directional=false", 51.0)):
        for seed, noise in enumerate((0.0, 1.0, -0.5)):
            rows.append({"run": f"{mode}{over}_s{seed}", "mode": mode, "seed": seed, "overrides": over,
                         "val_miou": base + noise + 1, "test_miou": base + noise + 0.1 * seed,
                         "test_miou_final": base + noise - 1, "best_iter": 10, "final_iter": 10 if seed == 0 else 20,
                         "test_agreement": base + 30 + noise, "test_overlap_miou": base - 5,
                         "test_pos_sim": 0.5 + base / 1000, "test_other_sim": 0.2, "test_margin": 0.3 + base / 1000,
                         "train_seconds": 5.0, "status": "ok", "log": f"/x/{seed}.log"})
    rows.append({"run": "semi_s3", "mode": "semi", "seed": 3, "overrides": "", "status": "failed",
                 "log": "/x/3.log"})
    return rows


@pytest.fixture
def sweep_dir(tmp_path):
    write_results_csv(tmp_path / "results.csv", _rows())
    for row in _rows()[:6]:
        (tmp_path / row["run"]).mkdir()
        iou = [0.9, 0.2 + row["seed"] * 0.1, None] if row["mode"] == "supervised" else [0.95, 0.5, 0.3]
        payload = {"best": {"iou": iou, "class_names": ["bg", "a", "b"]}, "final": None}
        (tmp_path / row["run"] / "test.json").write_text(json.dumps(payload))
    (tmp_path / "sweep.json").write_text(json.dumps({"command": "python -m cacnb.sweep --config x", "config": "x",
                                                      "wall_seconds": 120.0, "finished": "2026-01-01 00:00 UTC",
                                                      "machine": {"platform": "p", "cpu_count": 2,
                                                                  "torch": "2.x", "device": "cpu"}}))
    return tmp_path


def test_csv_round_trip_and_row_summary(sweep_dir):
    rows = read_results(sweep_dir)
    assert rows[0]["seed"] == 0 and rows[0]["test_miou"] == 50.0 and rows[-1]["status"] == "failed"
    assert math.isnan(rows[-1]["test_miou"]) and rows[-1]["best_iter"] is None
    summary = row_summary(rows)
    assert list(summary) == ["supervised", "semi", "full", "semi [loss.directional=false]"]
    assert summary["semi"]["test"].n == 3                                  # the failed seed is left out
    assert summary["semi"]["test"].mean == pytest.approx(52.0 + 0.5 / 3 + 0.1)


def test_comparisons_are_paired_on_seed(sweep_dir):
    found = {name: (iv, diffs) for name, iv, diffs in comparisons(read_results(sweep_dir))}
    assert list(found) == ["semi − supervised", "full − semi", "full − supervised",
                           "semi [loss.directional=false] − semi"]
    iv, diffs = found["semi − supervised"]
    assert diffs == {0: pytest.approx(2.0), 1: pytest.approx(2.0), 2: pytest.approx(2.0)}
    assert iv.std == pytest.approx(0.0, abs=1e-12) and iv.excludes_zero()
    assert found["semi [loss.directional=false] − semi"][0].mean == pytest.approx(-1.0)


def test_every_metric_of_each_ablation_is_paired_with_semi(sweep_dir):
    rows = read_results(sweep_dir)
    for row in rows:                     # the ablation's margin falls by 0.01, 0.02, 0.03 below semi's on seeds 0-2
        if row["label"] == "semi [loss.directional=false]":
            row["test_margin"] = 0.352 + 0.1 * row["seed"] - 0.01 * (row["seed"] + 1)
        elif row["label"] == "semi" and row["status"] == "ok":
            row["test_margin"] = 0.352 + 0.1 * row["seed"]
    table = ablation_differences_markdown(rows)
    # mean -0.02, s = 0.01, half width 4.302653 * 0.01 / sqrt(3) = 0.0248; test mIoU: -1 on every seed
    line = next(l for l in table.splitlines() if l.startswith("| semi [loss.directional=false] − semi |"))
    assert line.startswith("| semi [loss.directional=false] − semi | 3 | -1.00 [-1.00, -1.00] |")
    assert line.endswith("| -0.020 [-0.045, +0.005] |")
    assert len(table.splitlines()) == 3                                    # heading, rule, the one ablation
    assert "## Every metric, each ablation − semi" in results_markdown(sweep_dir)
    unfinished = [dict(r, status="pending") if r["label"] == "semi [loss.directional=false]" else r for r in rows]
    assert "− semi | 0 | n/a | n/a |" in ablation_differences_markdown(unfinished)
    without = [r for r in rows if r["label"] != "semi [loss.directional=false]"]
    assert ablation_differences_markdown(without) == ""


def test_per_class_iou_averages_over_seeds(sweep_dir):
    names, means = per_class_iou(sweep_dir, read_results(sweep_dir))
    assert names == ["bg", "a", "b"] and list(means) == ["supervised", "semi"]
    assert means["supervised"][1] == pytest.approx(0.3) and math.isnan(means["supervised"][2])


def test_results_markdown_and_readme_paste(sweep_dir, tmp_path):
    text = results_markdown(sweep_dir)
    for needle in ("python -m cacnb.sweep --config x", "4 seed(s) planned", "| semi | 3 |", "Student-t",
                   "2 CPU cores", "2.0 min", "| semi − supervised | 3 | +2.00 |", "not finished: semi_s3", "| bg |",
                   "the last iteration in 4 of 12 runs", "| semi | 3 | 82.17 ± 0.76 |",
                   "| cross-context agreement (%) | 3 | +2.00 |", "| margin (cos) | 3 | +0.002 |", "Wilcoxon"):
        assert needle in text, needle
    assert main([str(sweep_dir)]) == 0 and (sweep_dir / "results.md").read_text() == text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{README_BEGIN}\nold table\n{README_END}\nafter\n")
    assert main([str(sweep_dir), "--readme", str(readme)]) == 0
    pasted = readme.read_text()
    assert "old table" not in pasted and "| semi − supervised | 3 |" in pasted
    assert pasted.startswith("# x\n\nbefore\n") and pasted.endswith(f"{README_END}\nafter\n")
    assert "\n#### Paired differences" in pasted and "# Sweep results" not in pasted
    paste_into_readme(sweep_dir / "results.md", readme)                      # idempotent
    assert readme.read_text() == pasted
    readme.write_text("no markers\n")
    assert main([str(sweep_dir), "--readme", str(readme)]) == 2
    assert main([str(tmp_path / "missing")]) == 2


def test_the_readme_has_one_results_block():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert text.count(README_BEGIN) == 1 and text.count(README_END) == 1
    assert text.index(README_BEGIN) < text.index(README_END)


def test_plot_seeds_draws_every_seed(sweep_dir):
    import matplotlib

    matplotlib.use("Agg")
    fig = plot_seeds(read_results(sweep_dir))
    ax = fig.axes[0]
    points = sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets"))
    assert points >= 12 and [t.get_text() for t in ax.get_xticklabels()][0] == "supervised"


@pytest.mark.slow
def test_notebook_06_shows_the_tables_and_figures(sweep_dir, tmp_path):
    from pathlib import Path

    import nbformat
    import papermill

    source = Path(__file__).resolve().parent.parent / "notebooks" / "06_results.ipynb"
    assert all(not c.get("outputs") and not c.get("execution_count")
               for c in nbformat.read(source, 4).cells if c.cell_type == "code")   # committed without outputs
    out = tmp_path / "06.ipynb"
    papermill.execute_notebook(str(source), str(out), parameters={"sweep_dir": str(sweep_dir)},
                               kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    text = out.read_text()
    assert "semi − supervised" in text and "interval excludes 0" in text and "image/png" in text
    assert "| bg |" in text
    assert "| pairs | test mIoU (%) | cross-context agreement (%) |" in text     # the ablation − semi table


def test_named_block_is_pasted_and_the_study_block_left_alone(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# Sweep results\n\nnew demo table\n")
    first, last = readme_markers("demo")
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN}\nstudy table\n{README_END}\n{first}\nold\n{last}\n")
    paste_into_readme(results, readme, block="demo")
    text = readme.read_text()
    assert "study table" in text and "new demo table" in text and "old" not in text
    with pytest.raises(ValueError, match="cacnb-results:other:begin"):
        paste_into_readme(results, readme, block="other")

