"""Path resolution that behaves the same from the repo root, from ``notebooks/`` (JupyterLab's kernel cwd) and
under papermill: relative paths such as ``data/synthetic`` or ``runs/demo`` mean the project root's."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Optional

TMP_SUFFIX = ".tmp"


class StorageError(OSError):
    """A file could not be written (disk full, read-only or missing folder); the message names path and cause."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class RunDirLocked(RuntimeError):
    """Another live process holds the run dir's lock."""


def project_root(start: Optional[Path] = None) -> Optional[Path]:
    """The nearest folder at or above ``start`` (default: cwd) holding cacnb's pyproject.toml, else None."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and (folder / "cacnb").is_dir():
            return folder
    return None


def resolve(path: "str | os.PathLike", must_exist: bool = False) -> Path:
    """Absolute paths stay; a relative path is taken from cwd if it exists there, else from the project root."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute():
        return p
    if p.exists():
        return p.resolve()
    root = project_root()
    candidate = (root / p) if root is not None else p.resolve()
    if must_exist and not candidate.exists():
        raise FileNotFoundError(f"{path}: not found relative to {Path.cwd()} nor to the project root {root}")
    return candidate


def atomic_write(path: "str | os.PathLike", write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it into place, fsync the folder.

    A crash or an exception never leaves a torn file under ``path``: the previous version stays until the new
    one is complete (and on disk, so a power loss cannot leave an empty file after the rename), and the
    temporary file is removed. A failed write (disk full, read-only folder) raises :class:`StorageError`
    naming ``path`` and the cause.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        translated = storage_error(path, e)
        if translated is e:
            raise
        raise translated from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: "str | os.PathLike", text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


def _fsync_file(name: str) -> None:
    with open(name, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: "str | os.PathLike") -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. some network FS)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def storage_error(path: "str | os.PathLike", e: BaseException) -> "StorageError | BaseException":
    """A one-line :class:`StorageError` for a failed write of ``path``; other errors are returned unchanged."""
    if isinstance(e, StorageError):
        return e
    code = getattr(e, "errno", None)
    folder = Path(path).parent
    if code == errno.ENOSPC or (isinstance(e, RuntimeError) and _free_bytes(folder) < 64 << 20):
        cause = f"no space left on the device ({_free_bytes(folder) >> 20} MiB free in {folder})"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        cause = f"{folder} is read-only or not writable ({os.strerror(code)})"
    elif code in (errno.ENOENT, errno.ENOTDIR):
        cause = f"the folder {folder} cannot be created ({os.strerror(code)})"
    elif isinstance(e, OSError):
        cause = e.strerror or str(e)
    elif isinstance(e, RuntimeError) and ("write" in str(e) or "basic_ios" in str(e)):
        cause = f"the write failed ({str(e).strip().splitlines()[0][:200]})"
    else:
        return e
    return StorageError(code or errno.EIO, f"cannot write {path}: {cause}. Free space or choose a writable "
                                           f"train.out_dir; the previous version of the file is untouched")


def _free_bytes(folder: Path) -> int:
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return -1


def remove_stale_temporaries(folder: "str | os.PathLike") -> list[Path]:
    """Delete the ``.<name>.<random>.tmp`` files :func:`atomic_write` leaves behind when a process is killed
    mid-write. Call it only while holding the folder's :class:`RunDirLock` (no live writer then)."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


class RunDirLock:
    """An exclusive ``fcntl.flock`` on ``<run dir>/.lock``, held for the life of the process.

    The kernel drops the lock when the holder dies, however it dies (``kill -9`` included), so a crashed run never
    leaves a stale lock. The file records the holder's pid and host for the refusal message. (flock is advisory
    and works on local file systems and most cluster ones: NFSv4, Lustre and GPFS with locking enabled.)
    """

    NAME = ".lock"

    def __init__(self, run_dir: "str | os.PathLike"):
        self.path = Path(run_dir) / self.NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(e.errno, f"cannot create the run dir lock {self.path}: "
                                        f"{e.strerror or e}. Choose a writable train.out_dir") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirLocked(f"run dir {self.path.parent} is in use by another run ({holder}). Wait for it to "
                               f"finish or stop it, or choose another train.run_name / train.out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
