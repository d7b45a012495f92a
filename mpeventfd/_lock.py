"""The cross-process mutex and the per-process liveness bytes: kernel byte-range locks.

Facts this module relies on (SPEC §5.1, reliability.md §1.6, design-review §7):

* The kernel releases a byte-range lock when its holder dies, also before a zombie is
  reaped, so a dead holder never blocks anyone and needs no pid logic.
* On Linux the locks are OFD locks (``F_OFD_SETLK``, fcntl(2)) on a *private* open file
  description of the notifier pipe, one per (process, eventfd), opened through
  ``/proc/self/fd`` from the pipe's read end, so every process locks the same inode
  (design-review L5).  A pipe takes byte-range locks like a file (the ranges are only
  names), and a FIFO may be opened read-write on Linux (fifo(7)); ``F_WRLCK`` needs a
  description open for writing.  The same description, non-blocking and never shown to
  users, drains the pipe with a plain ``read(2)`` that cannot block whatever users do to
  the shared read end (design-review M3), so the one private fd SPEC §7 P8 allows serves
  both.  (Layout version 2: version 1 locked a description of the state file.)
* Elsewhere classic ``fcntl`` locks on a lock file.  They belong to the process, so the
  process must keep exactly one descriptor of that file and never close another one
  (lock-protocol S4); the per-process registry guarantees that.
* Every unlock covers exactly one byte: a whole-file unlock would also drop the liveness
  byte (design-review M4).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import time

from ._errors import timeout_error
from ._probe import PLATFORM, flock_struct, flock_type
from ._state import ELECTION_BYTE, LIVENESS_BASE, MUTEX_BYTE

SETLK = PLATFORM.setlk
SETLKW = PLATFORM.setlkw
LOCK = flock_struct(fcntl.F_WRLCK, MUTEX_BYTE)
UNLOCK = flock_struct(fcntl.F_UNLCK, MUTEX_BYTE)
# EAGAIN on Linux, EACCES on some BSDs (fcntl(2): "EACCES or EAGAIN").
_BUSY = frozenset({errno.EAGAIN, errno.EACCES})


class Busy(Exception):
    """The mutex could not be taken before the caller's deadline (internal)."""


class MutexBusy(BlockingIOError):
    """A non-blocking call found the mutex held; asyncio callers retry later."""


PIPE_PRIVATE = PLATFORM.ofd_locks and PLATFORM.proc_fd  # the private fd is the pipe's


def open_private(rfd: int, lock_path: str, lock_ident: tuple[int, int],
                 pipe_ident: tuple[int, int]) -> int:
    """Open this process's private descriptor for the mutex and liveness bytes.

    With ``PIPE_PRIVATE`` it is a non-blocking description of the notifier pipe whose read
    end is ``rfd`` (see the module docstring), checked against ``pipe_ident``: ``rfd`` is
    also ``fileno()``, and a user who closed it (or put another file there) must not make
    this process lock some other inode.  Otherwise the lock file, checked against
    ``lock_ident``.
    """
    if PIPE_PRIVATE:
        fd = os.open(f"/proc/self/fd/{rfd}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if (st.st_dev, st.st_ino) != pipe_ident:
            os.close(fd)
            raise OSError(errno.EBADF, "the eventfd's fileno() was closed or replaced")
        return fd
    fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != lock_ident:
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "the lock file was replaced", lock_path)
    return fd


def try_lock(fd: int, request: bytes = LOCK) -> bool:
    """Take a byte lock (the mutex by default) if it is free; never wait."""
    try:
        fcntl.fcntl(fd, SETLK, request)
    except OSError as e:
        if e.errno in _BUSY:
            return False
        raise
    return True


def lock_until(fd: int, deadline: float, request: bytes = LOCK) -> None:
    """Take a byte lock, polling until ``deadline`` (monotonic); raise :class:`Busy` after.

    ``F_OFD_SETLKW`` has no timeout, and a holder that is stopped (SIGSTOP, a debugger)
    would hold every timed call hostage (design-review M1).  Live holders keep the lock for
    microseconds, so the back-off starts tiny.
    """
    delay = 20e-6
    while not try_lock(fd, request):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Busy
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 2e-3)


def unlocker(fd: int) -> functools.partial[object]:
    """A C-level callable that unlocks the mutex byte of ``fd``.

    Called from ``finally`` blocks: a Python function could be interrupted by a signal
    handler at its first line, before it unlocks (design-review S6); a ``partial`` of
    ``fcntl.fcntl`` runs no Python code.
    """
    return functools.partial(fcntl.fcntl, fd, SETLK, UNLOCK)


def lock_byte(fd: int, byte: int, deadline: float | None) -> None:
    """Take a byte lock, waiting until ``deadline`` (``None``: for ever); :class:`Busy` after."""
    request = flock_struct(fcntl.F_WRLCK, byte)
    if deadline is None:
        fcntl.fcntl(fd, SETLKW, request)
    else:
        lock_until(fd, deadline, request)


def unlock_byte(fd: int, byte: int) -> None:
    fcntl.fcntl(fd, SETLK, flock_struct(fcntl.F_UNLCK, byte))


def try_election(fd: int) -> bool:
    """Take the election byte of the fast mutex's recovery, never waiting."""
    try:
        fcntl.fcntl(fd, SETLK, flock_struct(fcntl.F_WRLCK, ELECTION_BYTE))
    except OSError as e:
        if e.errno in _BUSY:
            return False
        raise
    return True


def end_election(fd: int) -> None:
    fcntl.fcntl(fd, SETLK, flock_struct(fcntl.F_UNLCK, ELECTION_BYTE))


def claim_liveness(fd: int, slot: int) -> bool:
    """Lock the liveness byte of ``slot``; False if someone (alive) holds it."""
    try:
        fcntl.fcntl(fd, SETLK, flock_struct(fcntl.F_WRLCK, LIVENESS_BASE + slot))
    except OSError as e:
        if e.errno in _BUSY:
            return False
        raise
    return True


def release_liveness(fd: int, slot: int) -> None:
    """Unlock the liveness byte of ``slot`` (closing ``fd`` would do the same)."""
    fcntl.fcntl(fd, SETLK, flock_struct(fcntl.F_UNLCK, LIVENESS_BASE + slot))


def slot_alive(fd: int, slot: int) -> bool:
    """True while the process owning ``slot`` lives (its liveness byte is locked).

    Our own locks are invisible to the query (own description for OFD locks, own process
    for classic ones), so the caller never asks about its own slot.
    """
    query = flock_struct(fcntl.F_WRLCK, LIVENESS_BASE + slot)
    return flock_type(fcntl.fcntl(fd, PLATFORM.getlk, query)) != fcntl.F_UNLCK


def busy_error(nonblocking: bool) -> OSError:
    """Map a :class:`Busy` mutex to what the caller's timeout promises."""
    if nonblocking:
        return MutexBusy(
            errno.EAGAIN, "the eventfd's lock stayed held by another thread or process (a "
            "stopped holder?) for longer than a non-blocking call waits for it")
    return timeout_error()
