"""Graceful stop on SIGTERM / SIGINT: the trainer finishes its step, saves ``last.pt`` and exits.

SLURM preemption (``#SBATCH --signal=B:TERM@120``), ``scancel``, a notebook interrupt (forwarded by
:func:`cacnb.launch.launch`) and Ctrl-C all arrive as one of these signals. The handler only sets a flag; the
training loop all-reduces it once per step (in the same reduction as the NaN check, so it costs no extra host
sync) and every rank stops after the same step.

A second Ctrl-C exits at once, without saving (the last complete checkpoint stays; atomic writes never leave a
torn one). Repeats that arrive within :data:`REPEAT_GRACE_S` of the first do not count: a terminal's Ctrl-C
reaches torchrun and its workers together, and torchrun forwards it to the workers once more. Repeated SIGTERMs
never force an exit, since torchrun and SLURM both re-send them.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

from .data.sampling import mark_stopping

REPEAT_GRACE_S = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Training stopped on a signal after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


class GracefulStop:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        mark_stopping(False)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            mark_stopping()
            name = signal.Signals(signum).name
            print(f"\n[cacnb] {name} received: finishing this step, then saving last.pt and stopping "
                  f"(press Ctrl-C again to quit at once without saving)", file=sys.stderr, flush=True)
            return
        if signum == signal.SIGINT and now - self._first_at > REPEAT_GRACE_S:
            print("\n[cacnb] second Ctrl-C: exiting now without saving; the last complete checkpoint is kept",
                  file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGINT)
