"""benchmarks/gpu_check.py: parts bounded in time and isolated from each other; the CPU mode CI runs."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _alive(pid: int) -> bool:
    """Running (a zombie left for a PID 1 that does not reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state


def test_a_hanging_part_is_stopped_with_its_children_and_the_next_part_runs(tmp_path):
    gc = load_gpu_check()
    env = gc.child_env(tmp_path)
    pid_file = tmp_path / "child.pid"
    hang = gc.Part("hang", "sleeps", [sys.executable, "-c",
                                      "import subprocess, sys, time\n"
                                      f"p = subprocess.Popen(['sleep', '120'])\n"
                                      f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
                                      "time.sleep(120)"], 120)
    fail = gc.Part("fail", "exits 3", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], 60)
    good = gc.Part("good", "writes a result", [sys.executable, "-c",
                                               f"open({str(tmp_path / 'r.json')!r}, 'w').write('[1, 2]')"], 60,
                   result=gc._json_file("r.json"))
    tic = time.monotonic()
    hung = gc.run_part(hang, tmp_path, env, timeout_s=3)
    assert hung["status"] == "timeout" and hung["rc"] is None and time.monotonic() - tic < 30
    deadline = time.monotonic() + 10
    while _alive(int(pid_file.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(int(pid_file.read_text())), "the part's child outlived the timeout"
    failed = gc.run_part(fail, tmp_path, env, timeout_s=60)
    assert failed["status"] == "failed" and failed["rc"] == 3 and "boom" in failed["tail"]
    ok = gc.run_part(good, tmp_path, env, timeout_s=60)
    assert ok["status"] == "ok" and ok["result"] == [1, 2]
    assert (tmp_path / "hang.log").exists() and (tmp_path / "fail.log").read_text().startswith("$ ")


def test_parts_keep_their_caches_and_temporary_files_inside_the_out_folder(tmp_path):
    env = load_gpu_check().child_env(tmp_path)
    for key in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH", "MPLCONFIGDIR",
                "XDG_CACHE_HOME", "TORCH_HOME"):
        assert Path(env[key]).is_relative_to(tmp_path) and Path(env[key]).is_dir(), key
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


@pytest.mark.slow
def test_cpu_mode_runs_the_cpu_parts_and_writes_the_summaries(tmp_path):
    """What CI sees: no CUDA, so the CPU parts run (small sizes), every CUDA part is skipped with its reason, the
    summaries say so, and the exit code is 0."""
    out = tmp_path / "check"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CPU mode even on a GPU machine
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--budget", "300"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CUDA not available" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    status = {r["name"]: r for r in summary["parts"]}
    assert summary["cuda"] is False and summary["env"]["torch"]
    for name in ("env", "cuda-tests", "bench-loss-cpu", "bench-step-cpu"):
        assert status[name]["status"] == "ok", status[name]
    tests = status["cuda-tests"]["result"]
    assert tests["passed"] == tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 10
    assert any("no CUDA device" in reason for reason in tests["skip_reasons"])
    assert status["bench-loss-cpu"]["result"][0]["fast"]["ms"] > 0
    assert status["bench-step-cpu"]["result"][0]["images_per_s"] > 0
    for name in ("bench-step-fp32", "bench-step-bf16", "bench-step-channels-last", "bench-loss", "nccl-2gpu",
                 "bench-step-compile"):
        assert status[name]["status"] == "skipped" and "CUDA not available" in status[name]["reason"], name
    md = (out / "summary.md").read_text()
    assert "**CUDA: not available**" in md and "| bench-step-cpu | ok |" in md and "| bench-loss | skipped |" in md
    assert (out / "cache" / "mpl").is_dir() and (out / "tmp").is_dir() and (out / "bench-step-cpu.log").exists()
