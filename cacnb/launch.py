"""Start training from a notebook without putting the kernel at risk.

:func:`launch` writes the config into the run dir and runs ``python -m torch.distributed.run --standalone
--nproc_per_node=K -m cacnb.train`` (a plain ``python -m cacnb.train`` when K = 1) as a subprocess of the
kernel's own Python. Its output streams into the cell. A failed or hung worker raises :class:`LaunchError` with
the tail of the log; it never takes the kernel down with it.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional

from .config import Config, absolute_paths, load_config, save_config


class LaunchError(RuntimeError):
    """The training subprocess failed or timed out; the message holds the tail of its log."""


def torchrun_command(config_path: Path, nproc: int, *, python: str = sys.executable,
                     nnodes: int = 1, rdzv_endpoint: Optional[str] = None) -> list[str]:
    """The command line for ``nproc`` local workers (and optionally several nodes)."""
    if nproc <= 1 and nnodes <= 1:
        return [python, "-m", "cacnb.train", "--config", str(config_path)]
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("a multi-node launch needs rdzv_endpoint='host:port' of the first node")
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "cacnb.train", "--config", str(config_path)]


def worker_env(nproc: int, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Environment for the workers: unbuffered output and the CPU cores split between local workers."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    env.setdefault("CACNB_TQDM_INTERVAL", "5")
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def launch(config: "Config | str" = "synthetic", *, nproc: int = 1,
           overrides: "Mapping[str, object] | Iterable[str] | None" = None, nnodes: int = 1,
           rdzv_endpoint: Optional[str] = None, timeout: Optional[float] = None,
           env: Optional[Mapping[str, str]] = None, quiet: bool = False) -> Path:
    """Train ``config`` with ``nproc`` local processes and return the run dir.

    >>> run_dir = launch("synthetic", nproc=2, overrides={"train.epochs": 1})   # doctest: +SKIP

    ``timeout`` (seconds) bounds the whole run; process-group setup is bounded separately by the
    ``CACNB_DIST_TIMEOUT`` environment variable (default 600 s).
    """
    # resolve here, where the kernel's cwd applies: the worker runs from the project root
    cfg = absolute_paths(load_config(config, overrides))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = save_config(cfg, run_dir / "config.json")
    cmd = torchrun_command(config_path, nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint)
    if not quiet:
        print("$ " + " ".join(cmd), flush=True)
    code, tail = _run_streaming(cmd, worker_env(nproc, env), timeout=timeout, quiet=quiet,
                                cwd=str(Path(__file__).resolve().parent.parent))
    if code != 0:
        reason = "timed out" if code is None else f"exited with code {code}"
        raise LaunchError(f"training {reason}; run dir {run_dir}. Last lines of its output:\n" + "".join(tail))
    return run_dir


def _run_streaming(cmd: list[str], env: dict, *, timeout: Optional[float], quiet: bool, cwd: str,
                   tail_lines: int = 60):
    """Run ``cmd`` in its own session, copy its output to our stdout as it comes, keep the tail."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True, bufsize=0)
    reader = threading.Thread(target=_pump, args=(proc.stdout, tail, quiet), daemon=True)
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                _terminate(proc)
                reader.join(5)
                return None, list(tail)
            time.sleep(0.2)
    except KeyboardInterrupt:  # the user interrupted the cell: stop the workers, keep the kernel
        _terminate(proc)
        raise
    reader.join(10)
    return proc.returncode, list(tail)


def _pump(stream, tail, quiet: bool) -> None:
    """Forward bytes as they arrive (tqdm redraws with '\\r'); remember complete lines for the error tail."""
    pending = b""
    while True:
        chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
        if not chunk:
            break
        if not quiet:
            sys.stdout.write(chunk.decode("utf-8", "replace"))
            sys.stdout.flush()
        pending += chunk
        *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
        tail.extend(l.decode("utf-8", "replace") + "\n" for l in lines if l.strip())
    if pending.strip():
        tail.append(pending.decode("utf-8", "replace") + "\n")


def _terminate(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def overrides_from_parameters(config: "Config | str", *, mode: Optional[str] = None,
                              data_dir: Optional[str] = None, epochs: Optional[int] = None,
                              iters_per_epoch: Optional[int] = None, out_dir: Optional[str] = None,
                              run_name: Optional[str] = None, resume: Optional[str] = None,
                              amp: Optional[bool] = None, extra: Optional[Mapping[str, object]] = None) -> dict:
    """Turn notebook 03's papermill parameters into typed config overrides; ``None`` keeps the config's value.

    The run dir is ``<out_dir>/<config name>_<mode>`` unless ``run_name`` is given, so a supervised baseline and a
    CAC run of the same config sit side by side.
    """
    over: dict = {}
    for key, value in (("train.mode", mode), ("train.run_name", run_name), ("data.data_dir", data_dir), ("train.epochs", epochs),
                       ("train.iters_per_epoch", iters_per_epoch), ("train.out_dir", out_dir),
                       ("train.resume", resume), ("train.amp", amp)):
        if value is not None:
            over[key] = value
    over.update(extra or {})
    return over
