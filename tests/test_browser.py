"""Notebooks 05 and 02 in a real JupyterLab, driven through headless Chromium by Playwright, as a user meets them.

JupyterLab starts on a free port with a token; each notebook is a copy whose parameters cell points at a tiny
checkpoint (edited the way a user would edit it, ``interactive`` left at its default None). The test runs all
cells from the Run menu, moves every slider, and asserts that the widget's image changes and that no cell
ends in an error. It needs the system Chromium (``apt-get install -y chromium``; Playwright's own browser
download is never used). Without one it is skipped, except on CI (``CI=true``), where it fails.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import nbformat
import pytest

from conftest import save_model_checkpoint

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
INSTALL_HINT = ("no Chromium found: install the system package (Debian/Ubuntu: `apt-get install -y chromium`, "
                "macOS: `brew install --cask chromium`) or set CACNB_CHROMIUM=/path/to/chrome; "
                "`playwright install` is not needed")
CELL_TIMEOUT_S = 90


def find_chromium() -> "str | None":
    """The Chromium (or Chrome) executable: ``CACNB_CHROMIUM``, else the first system one on PATH."""
    given = os.environ.get("CACNB_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _missing(reason: str):
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"the browser test cannot be skipped on CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        _missing(INSTALL_HINT)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("playwright is not installed: pip install -e '.[dev]'")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _edit_parameters(src: Path, dst: Path, values: dict) -> None:
    """Copy a notebook, setting ``name = value`` lines of its parameters cell (a user's edit)."""
    nb = nbformat.read(src, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    lines = cell.source.splitlines()
    for name, value in values.items():
        index = next(i for i, line in enumerate(lines) if line.split("=")[0].strip() == name)
        lines[index] = f"{name} = {value!r}"
    cell.source = "\n".join(lines)
    nbformat.write(nb, dst)


@pytest.fixture(scope="module")
def lab(chromium, synthetic_data_dir, tmp_path_factory):
    """A JupyterLab server on a folder holding edited copies of notebooks 02 and 05 and a tiny CAC run."""
    import torch

    from cacnb.config import load_config, save_config
    from cacnb.model import build_model

    folder = tmp_path_factory.mktemp("lab")
    cfg = load_config("synthetic", {"data.data_dir": str(synthetic_data_dir), "data.n_labeled": 8,
                                    "data.crop_size": 64, "data.base_size": 80, "model.proj_dim": 16,
                                    "loss.selected_num": 64, "train.out_dir": str(folder / "runs")})
    config = save_config(cfg, folder / "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_model(cfg)
    save_model_checkpoint(model, Path(cfg.run_dir) / "best.pt", cfg)
    common = {"config": str(config), "out_dir": str(folder / "runs")}
    _edit_parameters(NOTEBOOKS / "05_visualization.ipynb", folder / "05.ipynb", {**common, "n_gallery": 1})
    _edit_parameters(NOTEBOOKS / "02_loss_walkthrough.ipynb", folder / "02.ipynb", common)

    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    env.pop("CACNB_STATIC_PLOTS", None)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={folder}", "--allow-root"]
    log = open(folder / "lab.log", "w")
    server = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (folder / "lab.log").read_text()[-3000:])
                time.sleep(0.3)
        yield {"url": url, "token": token, "folder": folder}
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook tab on show
ALL_PROMPTS_DONE = """() => {
    const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
    const prompts = panel ? [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')] : [];
    return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""


def _accept_dialogs(page) -> None:
    """JupyterLab may ask which kernel to use although the notebook names python3: accept its proposal."""
    accept = page.locator(".jp-Dialog .jp-mod-accept")
    if accept.count() and accept.first.is_visible():
        accept.first.click()


def _wait(page, lab, name: str, done, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        _accept_dialogs(page)
        if time.monotonic() > deadline:
            page.screenshot(path=str(lab["folder"] / f"{name}.png"), full_page=True)
            prompts = page.locator(f"{PANEL} .jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
            raise AssertionError(f"{name}: {what} within {timeout_s:.0f} s (prompts {prompts}; screenshot "
                                 f"{lab['folder'] / name}.png); server log:\n"
                                 + (lab["folder"] / "lab.log").read_text()[-2000:])
        time.sleep(0.25)


def _run_all(page, lab, name: str) -> None:
    # a workspace of its own: JupyterLab would otherwise reopen the previous test's notebook beside this one
    page.goto(f"{lab['url']}/lab/workspaces/{Path(name).stem}/tree/{name}?token={lab['token']}")
    page.locator(".jp-Notebook").wait_for(timeout=60_000)
    _wait(page, lab, name, lambda: page.locator(".jp-StatusBar-Widget", has_text="| Idle").count() > 0,
          "the kernel was not idle", 60)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    _wait(page, lab, name, lambda: page.evaluate(ALL_PROMPTS_DONE), "not every cell ran", CELL_TIMEOUT_S)


def _errors_on_page(page) -> list[str]:
    """Error outputs as JupyterLab renders them (tracebacks in stderr-typed outputs)."""
    texts = page.locator(f"{PANEL} .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")\
        .all_inner_texts()
    return [t[:800] for t in texts if "Traceback" in t or "Error" in t]


def _saved_errors(page, path: Path) -> list[str]:
    """Save the notebook (Ctrl+S) and read its cells' outputs back: no ``error`` output may be there."""
    before = path.stat().st_mtime
    page.locator(f"{PANEL} .jp-Notebook").click()
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 20
    while path.stat().st_mtime == before and time.monotonic() < deadline:
        time.sleep(0.2)
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), f"{path.name} was not saved executed"
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in code for o in c.get("outputs", [])
            if o.get("output_type") == "error"]


def _widget_image(page, box) -> str:
    img = box.locator(".widget-output img").first
    img.wait_for(timeout=30_000)
    return img.get_attribute("src")


def _move_slider(page, box, index: int) -> None:
    """Move one ipywidgets slider by a step, with the keyboard on its handle (what a user's arrow key does)."""
    handle = box.locator(".widget-slider .noUi-handle").nth(index)
    handle.focus()
    handle.press("ArrowRight")
    handle.press("ArrowRight")


def _check_sliders(page, expected: int) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator(f"{PANEL} .widget-vbox").filter(has=page.locator(".widget-slider")).first
    try:
        box.wait_for(timeout=30_000)
    except PlaywrightTimeout:
        raise AssertionError("no slider widget appeared: with interactive=None JupyterLab must get the "
                             "interactive explorer") from None
    sliders = box.locator(".widget-slider")
    assert sliders.count() == expected, f"expected {expected} sliders (interactive=None in JupyterLab)"
    for i in range(expected):
        before = _widget_image(page, box)
        _move_slider(page, box, i)
        deadline = time.monotonic() + 30
        while _widget_image(page, box) == before:
            assert time.monotonic() < deadline, f"slider {i} moved but the image did not change"
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("name, sliders", [("05.ipynb", 2), ("02.ipynb", 1)])
def test_notebook_runs_and_its_sliders_redraw_in_jupyterlab(lab, browser, name, sliders):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        _run_all(page, lab, name)
        assert not _errors_on_page(page), _errors_on_page(page)
        _check_sliders(page, sliders)
        assert not _errors_on_page(page), _errors_on_page(page)
        assert not _saved_errors(page, lab["folder"] / name)
    finally:
        page.close()
