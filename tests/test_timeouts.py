"""Per-test time limits: a hang fails the test that hangs, by name, and slow tests get the larger limit."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SLOW_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_slow_tests_get_the_larger_limit(request):
    assert request.node.get_closest_marker("timeout").args == (SLOW_TIMEOUT_S,)


def test_other_tests_get_the_configured_limit(request):
    assert request.node.get_closest_marker("timeout") is None
    assert float(request.config.getini("timeout")) == 120


def test_a_hanging_test_fails_by_name_and_the_next_one_runs(tmp_path):
    """The project's pytest settings with the limit lowered to 2 s: the hanging test fails naming itself and its
    timeout, the test after it still passes."""
    (tmp_path / "test_hang.py").write_text("import time\n\n"
                                          "def test_hangs():\n    time.sleep(60)\n\n"
                                          "def test_after():\n    assert True\n")
    tic = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                           str(tmp_path), "-p", "no:cacheprovider", "-o", "timeout=2", "-q",
                           str(tmp_path / "test_hang.py")], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - tic < 50
    assert proc.returncode == 1, proc.stdout
    assert "FAILED" in proc.stdout and "test_hang.py::test_hangs" in proc.stdout and "Timeout" in proc.stdout
    assert "1 failed, 1 passed" in proc.stdout
