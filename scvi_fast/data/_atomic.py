"""Writing a folder beside its destination, renaming it into place, and nothing lost.

A writer (a store conversion) works in hidden entries beside its destination ``NAME``, all
named ``.NAME.<pid>-<12 hex>.<kind><n>``, and holds the lock file ``.NAME.<pid>-<hex>.lock``
(``flock``) for as long as it runs; the kernel releases that lock when the process ends, however
it ends. The next writer to the same destination removes the entries of every writer whose lock
it can take (that writer is gone), never those of a writer still running, so two conversions
racing to one path never delete each other's work, and a killed one leaves nothing behind for
long. Entries named as writers did before these locks existed (``.NAME.tmp-<12 hex>``) are
removed once a day old.

Replacing a destination that exists is allowed only when the caller recognises it (a store by
its manifest); the swap (old renamed aside, new renamed in, old removed) holds a lock on the
parent folder, so two writers finishing at once take turns.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks, leftovers are removed by age only
    fcntl = None

#: entries named as before per-writer locks existed are removed once older than this
LEGACY_AGE_S = 24 * 3600
#: entries of a writer with no lock file (only while its lock is being created) are removed
#: once older than this
UNLOCKED_AGE_S = 600


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def _take_lock_of_gone_writer(lock: Path) -> int | None:
    """An fd holding ``lock`` when its writer is gone, else None (running, or just finished)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def clean_stale(dest) -> list[Path]:
    """Remove the temporary entries beside ``dest`` left by writers that are gone.

    Returns
    -------
    list of Path
        The entries removed.
    """
    dest = Path(dest)
    parent, name = dest.parent, dest.name
    prefix = f".{name}."
    token_re = re.compile(re.escape(prefix) + r"(\d+-[0-9a-f]{12})\.(.+)$")
    legacy_re = re.compile(r"\.?" + re.escape(prefix)
                           + r"(tmp|old|stage)-[0-9a-f]{12}(\.tmp-[0-9a-f]{12})?$")
    try:
        names = [n for n in os.listdir(parent) if n.startswith((prefix, "." + prefix))]
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    jobs: dict[str, list[str]] = {}
    for n in names:
        m = token_re.match(n)
        if m:
            jobs.setdefault(m.group(1), []).append(n)
            continue
        m = legacy_re.match(n)
        # an old-style ".old" entry is the only copy of a store if its swap was cut short
        if (m and _age(parent / n) > LEGACY_AGE_S
                and (m.group(1) != "old" or dest.exists())):
            _remove(parent / n)
            removed.append(parent / n)
    for token, entries in jobs.items():
        lock = f"{prefix}{token}.lock"
        if fcntl is not None and lock in entries:
            fd = _take_lock_of_gone_writer(parent / lock)
            if fd is None:
                continue
            try:
                for n in entries:
                    if n != lock:
                        _remove(parent / n)
                        removed.append(parent / n)
                _remove(parent / lock)
                removed.append(parent / lock)
            finally:
                os.close(fd)
        else:
            age = UNLOCKED_AGE_S if fcntl is not None else LEGACY_AGE_S
            for n in entries:
                if _age(parent / n) > age:
                    _remove(parent / n)
                    removed.append(parent / n)
    return removed


class WriteJob:
    """The temporary entries of one writer to ``dest``, under a lock that says it still runs.

    Creating one first removes what writers that are gone left beside ``dest``
    (:func:`clean_stale`). Use as a context manager (or call :meth:`close`): its remaining
    entries are removed at the end.
    """

    def __init__(self, dest):
        self.dest = Path(dest)
        self.parent = self.dest.parent
        self.parent.mkdir(parents=True, exist_ok=True)
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._n = 0
        self._entries: list[Path] = []
        self._fd = None
        clean_stale(self.dest)
        if fcntl is not None:
            # locked before it is visible under its name: a cleaner never sees it free
            tmp = self.parent / self._name("lock-new")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.replace(tmp, self.parent / self._name("lock"))
            self._fd = fd

    def _name(self, kind: str) -> str:
        return f".{self.dest.name}.{self.token}.{kind}"

    def entry(self, kind: str = "tmp") -> Path:
        """A new path for a temporary entry of this job (not created)."""
        self._n += 1
        path = self.parent / self._name(f"{kind}{self._n}")
        self._entries.append(path)
        return path

    def close(self) -> None:
        """Remove this job's remaining entries and its lock."""
        for path in self._entries:
            _remove(path)
        self._entries = []
        if self._fd is not None:
            _remove(self.parent / self._name("lock"))
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False


@contextmanager
def _parent_locked(parent: Path):
    if fcntl is None:
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_destination(dest, overwrite: bool, recognise: Callable[[Path], bool], what: str,
                      flag: str = "overwrite=True") -> None:
    """Refuse a destination that exists unless ``overwrite`` and it is a ``what``.

    Raises
    ------
    FileExistsError
        ``dest`` exists and ``overwrite`` is off, or it is not something ``recognise`` accepts
        (nothing is deleted).
    """
    dest = Path(dest)
    if not (dest.exists() or dest.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{dest} exists; pass {flag} to replace it")
    if not recognise(dest):
        raise FileExistsError(
            f"{dest} exists and is not a {what}: {flag} replaces only a {what} that scvi_fast "
            "wrote, never another file or folder. Nothing was deleted; remove it yourself or "
            "choose another path."
        )


def replace_into(new: Path, dest, job: WriteJob, overwrite: bool,
                 recognise: Callable[[Path], bool], what: str) -> None:
    """Rename the finished folder ``new`` to ``dest``; an existing ``dest`` (checked again
    here, since it may have appeared meanwhile) is renamed aside first and removed after."""
    dest = Path(dest)
    with _parent_locked(dest.parent):
        if dest.exists() or dest.is_symlink():
            if not overwrite:
                raise FileExistsError(
                    f"{dest} appeared while this {what} was written; pass overwrite=True to "
                    "replace it")
            check_destination(dest, overwrite, recognise, what)
            trash = job.entry("old")
            os.replace(dest, trash)
            os.replace(new, dest)
            _remove(trash)
        else:
            os.replace(new, dest)
