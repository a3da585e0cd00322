"""One run per run directory: a live run holds an advisory lock on ``<run_dir>/.run.lock``.

    lock = RunLock(run_dir).acquire()   # RunLockedError at once if another live run holds it
    ...
    lock.release()

The lock is ``flock`` on an open file, so the kernel drops it when the holder's process ends
in any way (exit, exception, SIGKILL, OOM kill): a crashed run never leaves it stuck, and there
is no stale-PID guessing. The file keeps the holder's host, pid, start time and command so that
a refused second run can say who holds the directory. (flock works across hosts on NFSv4 and
Lustre/GPFS with flock enabled; on a run directory that is a URL, there is no lock.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

LOCK_NAME = ".run.lock"
# Locks this process holds, by path: flock conflicts between two open files of one process too, so a
# second train() in a process whose first one failed (its lock not yet collected) takes the held one.
_HELD: dict[str, "RunLock"] = {}


class RunLockedError(RuntimeError):
    """Another live run holds the run directory."""


class RunLock:
    def __init__(self, run_dir: str):
        self.run_dir = os.path.abspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self._fd: int | None = None
        self._pid: int | None = None

    def acquire(self) -> "RunLock":
        held = _HELD.get(self.path)
        if held is not None and held._fd is not None and held._pid == os.getpid():
            self._fd, self._pid = held._fd, held._pid
            _HELD[self.path] = self
            held._fd = None
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunLockedError(f"run directory {self.run_dir} is in use by another run ({describe(holder)}); "
                                 f"stop that run or choose another run_dir / --run-dir") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd, self._pid = fd, os.getpid()
        _HELD[self.path] = self
        return self

    def holder(self) -> dict:
        """Who holds the lock now ({} if nobody has written it)."""
        try:
            with open(self.path, "rb") as f:
                return _parse(f.read())
        except OSError:
            return {}

    def release(self) -> None:
        if self._fd is not None and self._pid == os.getpid():  # a forked child must not drop its parent's lock
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            _HELD.pop(self.path, None)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(run_dir: str) -> None:
    """Raise :class:`RunLockedError` if a live run holds ``run_dir`` (without taking the lock)."""
    path = os.path.join(os.path.abspath(run_dir), LOCK_NAME)
    if not os.path.exists(path):
        return
    RunLock(run_dir).acquire().release()


def describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}: {holder.get('command')}"


def _read(fd: int) -> dict:
    return _parse(os.pread(fd, 4096, 0))


def _parse(raw: bytes) -> dict:
    try:
        return json.loads(raw.decode() or "{}")
    except ValueError:
        return {}
