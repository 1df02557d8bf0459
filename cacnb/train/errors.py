"""The errors training stops with, and which of them are the user's to fix (exit code 2 in :mod:`.cli`)."""
from __future__ import annotations

from ..checkpoint_io import CheckpointError
from ..config import ConfigError
from ..data.errors import DatasetError
from ..paths import RunDirLocked, StorageError


class TrainingDiverged(FloatingPointError):
    """A loss term became NaN or Inf; the last good checkpoint is kept."""


class PeerFailed(RuntimeError):
    """Rank 0 refused to start (its own error says why); the other ranks stop quietly with the same exit code."""


# bad input: a config, the data, a checkpoint, a run dir in use, the storage
USER_ERRORS = (ConfigError, FileNotFoundError, DatasetError, CheckpointError, RunDirLocked, StorageError)
