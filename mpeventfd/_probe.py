"""Capability probes: the one place where mpeventfd makes platform decisions.

Every other module asks :data:`PLATFORM` what the host can do instead of testing
``sys.platform``.  Setting ``MPEVENTFD_PORTABLE=1`` in the environment before import makes
Linux take the code paths that macOS and the BSDs take (classic ``fcntl`` locks on a lock
file, ``trywait`` plus back-off instead of ``sem_timedwait``, no ``pipe2``, no
``RWF_NOWAIT``, no ``MSG_CMSG_CLOEXEC``, no ``O_TMPFILE``), so CI on Linux exercises them
(SPEC §8).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import socket
import stat
import struct
import sys
import tempfile

import posix_ipc

# The longest POSIX semaphore name macOS accepts (PSEMNAMLEN), leading slash included.
SEM_NAME_MAX = 31


@dataclasses.dataclass(frozen=True)
class Platform:
    """What the host can do, decided once at import.

    Attributes:
        portable: True when the macOS/BSD code paths are in force (natively or forced).
        ofd_locks: open-file-description locks exist; the mutex and the slot liveness
            bytes then live on a private description of the notifier pipe (Linux, with
            ``proc_fd``).  Without them a lock file carries classic per-process ``fcntl``
            byte locks.
        setlk, setlkw, getlk: the ``fcntl`` commands for that kind of lock.
        flock_fmt: ``struct`` format of ``struct flock`` on this OS.
        sem_timedwait: ``posix_ipc`` can wait with a timeout (macOS cannot).
        sem_getvalue: ``Semaphore.value`` works (macOS has no ``sem_getvalue``).
        rwf_nowait: ``preadv(..., RWF_NOWAIT)`` refuses to block even on a blocking pipe.
        pipe2: ``os.pipe2`` exists (flags set atomically at creation).
        cmsg_cloexec: ``MSG_CMSG_CLOEXEC`` for ``recvmsg`` (0 where missing).
        o_tmpfile: an unnamed file can be built and then linked into place.
        proc_fd: ``/proc/self/fd/N`` reopens the file behind fd N.
        fallocate: ``os.posix_fallocate`` reserves tmpfs pages up front.
        state_dir: where state files (and lock files) live.
        sem_dir: where the kernel shows named semaphores as files (``""`` if nowhere).
        cpus: CPUs this process may run on (spinning is pointless on one).
    """

    portable: bool
    ofd_locks: bool
    setlk: int
    setlkw: int
    getlk: int
    flock_fmt: str
    sem_timedwait: bool
    sem_getvalue: bool
    rwf_nowait: bool
    pipe2: bool
    cmsg_cloexec: int
    o_tmpfile: bool
    proc_fd: bool
    fallocate: bool
    state_dir: str
    sem_dir: str
    cpus: int


def _flock_fmt() -> str:
    # struct flock: Linux puts l_type/l_whence first; the BSDs and macOS put them last.
    system: str = sys.platform  # a plain str: every branch stays type-checked on any host
    if system.startswith("linux"):
        return "hhqqi4x"
    return "qqihh"


def _probe_rwf_nowait() -> bool:
    # RWF_NOWAIT on a pipe read returns EAGAIN even when the pipe itself is blocking
    # (design-review E11, Linux >= 5.x).  That is what lets a drain never block (M3).
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or not hasattr(os, "preadv"):
        return False
    r, w = os.pipe()
    try:
        os.preadv(r, [bytearray(1)], -1, flag)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(r)
        os.close(w)
    return False


def _private_dir() -> str:
    """Return a per-user runtime directory (mode 0700, owned by us) for non-Linux hosts."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(base, f"mpefd-{os.geteuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    # Refuse a directory someone else planted (or a symlink): our names would be theirs.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} is not a private directory owned by this user")
    return path


def _state_dir() -> str:
    if os.path.isdir("/dev/shm"):
        return "/dev/shm"
    return _private_dir()


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _probe(force_portable: bool) -> Platform:
    has_ofd = hasattr(fcntl, "F_OFD_SETLK") and not force_portable
    portable = force_portable or not has_ofd
    linux_sems = os.path.isdir("/dev/shm") and sys.platform.startswith("linux")
    return Platform(
        portable=portable,
        ofd_locks=has_ofd,
        setlk=fcntl.F_OFD_SETLK if has_ofd else fcntl.F_SETLK,
        setlkw=fcntl.F_OFD_SETLKW if has_ofd else fcntl.F_SETLKW,
        getlk=fcntl.F_OFD_GETLK if has_ofd else fcntl.F_GETLK,
        flock_fmt=_flock_fmt(),
        sem_timedwait=posix_ipc.SEMAPHORE_TIMEOUT_SUPPORTED and not portable,
        sem_getvalue=posix_ipc.SEMAPHORE_VALUE_SUPPORTED and not portable,
        rwf_nowait=not portable and _probe_rwf_nowait(),
        pipe2=hasattr(os, "pipe2") and not portable,
        cmsg_cloexec=0 if portable else getattr(socket, "MSG_CMSG_CLOEXEC", 0),
        o_tmpfile=hasattr(os, "O_TMPFILE") and not portable,
        proc_fd=os.path.isdir("/proc/self/fd") and not portable,
        fallocate=hasattr(os, "posix_fallocate") and not portable,
        state_dir=_state_dir(),
        sem_dir="/dev/shm" if linux_sems else "",
        cpus=_cpus(),
    )


PLATFORM = _probe(os.environ.get("MPEVENTFD_PORTABLE", "") not in ("", "0"))

# Signals that a thread may block around a semaphore wait step (SPEC §5.7).  Blocking the
# synchronous ones (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS) turns a fault into a
# silent kill, and SIGKILL/SIGSTOP cannot be blocked anyway.
_SYNC = {"SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGSYS"}
ASYNC_SIGNALS = frozenset(
    int(s) for s in signal.valid_signals() if getattr(s, "name", "") not in _SYNC
)

FLOCK = struct.Struct(PLATFORM.flock_fmt)


def flock_struct(kind: int, start: int) -> bytes:
    """Pack a one-byte ``struct flock`` of ``kind`` (F_WRLCK/F_UNLCK) at offset ``start``."""
    if PLATFORM.flock_fmt.startswith("h"):
        return FLOCK.pack(kind, os.SEEK_SET, start, 1, 0)
    return FLOCK.pack(start, 1, 0, kind, os.SEEK_SET)


def flock_type(packed: bytes) -> int:
    """Return ``l_type`` of a ``struct flock`` returned by ``F_GETLK``."""
    fields = FLOCK.unpack(packed[: FLOCK.size])
    return int(fields[0] if PLATFORM.flock_fmt.startswith("h") else fields[3])
