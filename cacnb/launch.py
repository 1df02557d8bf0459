"""Start training from a notebook without putting the kernel at risk.

:func:`launch` writes the config beside the run dir's files (the worker writes ``config.json`` itself once its
checks pass) and runs ``python -m torch.distributed.run --standalone --nproc_per_node=K -m cacnb.train`` (a plain
``python -m cacnb.train`` when K = 1) as a subprocess of the kernel's own Python. Its output streams into the cell.
A failed or hung worker raises :class:`LaunchError` that leads with the first failing rank's own error and exit
code, then the tail of the log; it never takes the kernel down with it.

Interrupting the cell (or SIGTERM to the kernel) forwards SIGTERM to the workers: they finish their step, save
``last.pt`` and exit, so the next launch resumes. Interrupting again while they save kills them at once.
"""
from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional

from .config import Config, load_config, save_config


class LaunchError(RuntimeError):
    """The training subprocess failed or timed out; the message holds the tail of its log."""


STOP_TIMEOUT_S = float(os.environ.get("CACNB_STOP_TIMEOUT", 300))  # how long a stopping run may take to save


def torchrun_command(config_path: Path, nproc: int, *, python: str = sys.executable,
                     nnodes: int = 1, rdzv_endpoint: Optional[str] = None,
                     train_args: Iterable[str] = ()) -> list[str]:
    """The command line for ``nproc`` local workers (and optionally several nodes); ``train_args`` are extra
    ``cacnb.train`` flags (``--force``, ``--make-synthetic``)."""
    train_args = list(train_args)
    if nproc <= 1 and nnodes <= 1:
        return [python, "-m", "cacnb.train", *train_args, "--config", str(config_path)]
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("a multi-node launch needs rdzv_endpoint='host:port' of the first node")
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "cacnb.train", *train_args, "--config", str(config_path)]


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


def launch(config: "Config | str", *, nproc: int = 1,
           overrides: "Mapping[str, object] | Iterable[str] | None" = None, nnodes: int = 1,
           rdzv_endpoint: Optional[str] = None, timeout: Optional[float] = None,
           env: Optional[Mapping[str, str]] = None, quiet: bool = False, force: bool = False,
           make_synthetic: bool = False) -> Path:
    """Train ``config`` with ``nproc`` local processes and return the run dir.

    >>> run_dir = launch("synthetic", nproc=2, overrides={"train.epochs": 1})   # doctest: +SKIP

    ``timeout`` (seconds) bounds the whole run; process-group setup is bounded separately by the
    ``CACNB_DIST_TIMEOUT`` environment variable (default 600 s). ``force`` and ``make_synthetic`` are
    ``cacnb.train``'s ``--force`` (resume despite changed data/split settings) and ``--make-synthetic``.
    """
    # load here, where the kernel's cwd applies (load_config resolves the paths): the worker runs from the root
    cfg = load_config(config, overrides)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # not config.json: a start the worker refuses (run dir in use, changed settings) must leave the run's intact
    fd, name = tempfile.mkstemp(dir=run_dir, prefix=".launch.", suffix=".json")
    os.close(fd)
    config_path = save_config(cfg, name)
    flags = (["--force"] if force else []) + (["--make-synthetic"] if make_synthetic else [])
    cmd = torchrun_command(config_path, nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, train_args=flags)
    if not quiet:
        print("$ " + " ".join(cmd), flush=True)
    try:
        code, out = _run_streaming(cmd, worker_env(nproc, env), timeout=timeout, quiet=quiet,
                                   cwd=str(Path(__file__).resolve().parent.parent))
    finally:
        config_path.unlink(missing_ok=True)
    if code != 0:
        raise LaunchError(failure_message(code, out, run_dir))
    return run_dir


@dataclass
class Output:
    """What the launcher kept of the workers' output: the tail, and every tagged error line per rank."""

    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=60))
    errors: dict = field(default_factory=dict)       # rank -> its "cacnb.train[rank r]: ..." lines, in order
    exit_codes: dict = field(default_factory=dict)   # rank -> exit code, from torchrun's failure summary
    root_cause: Optional[int] = None                 # torchrun's "first observed failure"
    _rank: Optional[int] = None
    _in_root: bool = False

    ERROR_LINE = re.compile(r"^cacnb\.train(?:\[rank (\d+)\])?: ")
    RANK_LINE = re.compile(r"^\s*rank\s*:\s*(\d+)")
    EXIT_LINE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")

    def add(self, line: str) -> None:
        self.tail.append(line)
        tagged = self.ERROR_LINE.match(line)
        if tagged:
            rank = int(tagged.group(1) or 0)
            lines = self.errors.setdefault(rank, [])
            if len(lines) < 200:
                lines.append(line)
            return
        if "Root Cause" in line:
            self._in_root = True
        ranked, exited = self.RANK_LINE.match(line), self.EXIT_LINE.match(line)
        if ranked:
            self._rank = int(ranked.group(1))
        elif exited and self._rank is not None:
            self.exit_codes[self._rank] = int(exited.group(1))
            if self._in_root and self.root_cause is None:
                self.root_cause = self._rank

    @property
    def lines(self) -> list[str]:
        return list(self.tail)


def failure_message(code: Optional[int], out: "Output | list[str]", run_dir: Path) -> str:
    """The first failing rank's own error and exit code, then the other ranks' codes, then the log tail."""
    if not isinstance(out, Output):  # a plain list of lines
        lines, out = out, Output()
        for line in lines:
            out.add(line)
    reason = "timed out" if code is None else f"exited with code {code}"
    parts = [f"training {reason}; run dir {run_dir}."]
    first = next(iter(out.errors), out.root_cause)
    if first is not None:
        rank_code = out.exit_codes.get(first, code if len(out.exit_codes) <= 1 else None)
        shown = f" (exit code {rank_code})" if rank_code is not None else ""
        parts.append(f"rank {first} failed first{shown}:")
        parts.append("".join(out.errors.get(first, ["  (it printed no cacnb error; see the output below)\n"])))
        others = {r: c for r, c in out.exit_codes.items() if r != first}
        if others:
            parts.append("other ranks: " + ", ".join(f"rank {r} exit code {c}" for r, c in sorted(others.items())))
    parts.append("Last lines of its output:\n" + "".join(out.tail))
    return "\n".join(p.rstrip("\n") for p in parts) + "\n"


def _run_streaming(cmd: list[str], env: dict, *, timeout: Optional[float], quiet: bool, cwd: str):
    """Run ``cmd`` in its own session, copy its output to our stdout as it comes, keep the tail and the errors.

    A KeyboardInterrupt (the cell's stop button) or SIGTERM to this process asks the workers to save and stop;
    the KeyboardInterrupt is re-raised once they have."""
    out = Output()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True, bufsize=0)
    reader = threading.Thread(target=_pump, args=(proc.stdout, out, quiet), daemon=True)
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    previous = _forward_sigterm(proc)
    try:
        while proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                _stop(proc)
                reader.join(5)
                return None, out
            time.sleep(0.2)
    except KeyboardInterrupt:  # the user interrupted the cell: let the workers save, keep the kernel
        print("\n[cacnb] interrupt: asking the workers to save last.pt and stop (interrupt again to kill them)",
              flush=True)
        _stop(proc)
        reader.join(5)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    reader.join(10)
    return proc.returncode, out


def _forward_sigterm(proc: subprocess.Popen):
    """While the run lasts, a SIGTERM to this process (a job scheduler, papermill's timeout) reaches the workers
    as their own SIGTERM. Returns the previous handler (None off the main thread, where none can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def forward(signum, frame):
        _signal_workers(proc, signal.SIGTERM)

    return signal.signal(signal.SIGTERM, forward)


def _pump(stream, out: Output, quiet: bool) -> None:
    """Forward bytes as they arrive (tqdm redraws with '\\r'); remember complete lines for the error report."""
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
        for line in lines:
            if line.strip():
                out.add(line.decode("utf-8", "replace") + "\n")
    if pending.strip():
        out.add(pending.decode("utf-8", "replace") + "\n")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first), from /proc. torchrun starts each rank in a session of
    its own, so neither a process group nor a session reaches them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "(comm)": state ppid ...
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo += children.get(child, [])
    return found


def _signal_workers(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the training processes: the ranks (torchrun's children) under torchrun, which would answer a
    signal of its own by killing them after 30 s; the whole process group of a single ``cacnb.train``."""
    try:
        if proc.args[1:3] == ["-m", "torch.distributed.run"]:
            for pid in _children(proc.pid):
                _kill(pid, sig)
        else:
            os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _children(pid: int) -> list[int]:
    return [p for p in descendants(pid) if _parent(p) == pid]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the workers, then wait for them to save (up to CACNB_STOP_TIMEOUT s, or until interrupted
    again), then SIGKILL whatever is left."""
    _signal_workers(proc, signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        print("[cacnb] killing the workers", flush=True)
    for pid in [proc.pid, *descendants(proc.pid)]:  # the ranks live in sessions of their own
        _kill(pid, signal.SIGKILL)
    proc.wait()
