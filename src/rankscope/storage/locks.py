"""One writer at a time: an advisory lock on a small file, released by the kernel when its holder dies.

``rankscope run`` holds one per run folder while it trains that run, ``rankscope data prepare`` one
per output folder. The lock is ``flock`` on the lock file, not the file's existence, so no crash,
SIGKILL or out-of-memory kill can leave a folder locked: the kernel drops the lock with the
process's last descriptor. The file only carries the holder's pid, host and start time, so that a
refused process can say in one line who holds it; a killed holder leaves the file behind, unlocked
and harmless, and the next holder overwrites it.

On NFS, ``flock`` is carried out with byte-range locks through the server, so it holds between
machines; the server drops the locks of a client that crashed when its lease runs out (a minute
or two). A file system without locks (Lustre mounted without ``flock``, NFS without a lock
daemon) makes the lock unguarded: the caller is told why and goes on as before there were locks.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from ..errors import RankscopeError

# errno values that mean "someone holds it", as opposed to "this file system cannot lock".
_HELD = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its holder wrote it down."""

    pid: int | None = None
    host: str = ""
    since: str = ""
    what: str = ""

    def __str__(self) -> str:
        if self.pid is None:  # it has the lock but has not written its name yet, or cannot
            return "another process"
        text = f"pid {self.pid} on {self.host or 'an unknown host'}"
        if self.since:
            text += f" since {self.since}"
        return f"{text} ({self.what})" if self.what else text


class LockHeld(RankscopeError):
    """The lock is held by another process (or another descriptor of this one)."""

    def __init__(self, path: Path, holder: Holder):
        super().__init__(f"{path} is held by {holder}")
        self.path = path
        self.holder = holder


def _read_holder(fd: int) -> Holder:
    # The holder writes its name right after taking the lock; a refusal can land in between, so
    # look a few times before settling for "another process". Never more than a quarter second.
    for attempt in range(25):
        try:
            raw = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            return Holder(
                int(raw["pid"]), str(raw.get("host", "")), str(raw.get("since", "")), str(raw.get("what", ""))
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            if attempt < 24:
                time.sleep(0.01)
    return Holder()


def live_holder(path: Path) -> Holder | None:
    """Who holds the lock at `path`, judged without touching the lock (a reader must never make a
    writer's non-blocking acquire fail): the holder its file names, when that process is alive on
    this host; a holder on another host is returned as named (it cannot be checked from here).
    None when there is no file, no name in it, or its process is gone."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        holder = Holder(int(raw["pid"]), str(raw.get("host", "")), str(raw.get("since", "")), str(raw.get("what", "")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if holder.host and holder.host != socket.gethostname():
        return holder
    try:
        os.kill(holder.pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None
    except OSError:  # exists, owned by someone else
        pass
    return holder


class FileLock:
    """An exclusive, non-blocking lock on ``path``: ``with FileLock(p, "rankscope run"): ...``.

    ``acquire`` raises :class:`LockHeld` naming the holder instead of waiting: a second writer is a
    mistake to report, not a turn to wait for. ``release`` removes the file while still holding it,
    and ``acquire`` checks that the file it locked is still the one at ``path``, so a process that
    opened the file just before it was removed never believes it holds a lock nobody else can see.
    After a failed lock call other than "held" (a file system without locks) the lock is
    ``unguarded``: ``acquire`` returns, and ``unguarded`` says why.
    """

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.what = what
        self.unguarded: str | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FileLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already held by this lock object")
        try:
            import fcntl
        except ImportError:  # not POSIX
            self.unguarded = f"cannot lock {self.path}: no advisory locks on this platform"
            return self
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in _HELD:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise LockHeld(self.path, holder) from None
                os.close(fd)
                self.unguarded = f"cannot lock {self.path} ({e.strerror or e}; does this file system support locks?)"
                return self
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it on release: lock the file now at path
        self._fd = fd
        self._write_holder()
        return self

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            # another user's lock file in a shared folder: flock works on a read-only descriptor,
            # only the holder's name cannot be written
            try:
                return os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise RankscopeError(f"cannot open the lock file {self.path}: {e.strerror or e}") from None
        except OSError as e:
            raise RankscopeError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None

    def _write_holder(self) -> None:
        assert self._fd is not None
        since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since, "what": self.what})
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (text + "\n").encode("utf-8"), 0)
        except OSError:
            pass  # read-only descriptor or full disk: the lock holds all the same, unnamed

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: see acquire's check
        except OSError:
            pass  # a folder we may no longer write to: the stale file is harmless
        finally:
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
