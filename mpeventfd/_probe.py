"""Capability probes: the one place where mpeventfd makes platform decisions at run time.

Every other Python module asks :data:`PLATFORM` what the host can do instead of testing
``sys.platform``; what the C compiler found at build time (``setup.py``'s probes) arrives
here through the ``HAVE_*`` constants of ``_core``.  Setting ``MPEVENTFD_PORTABLE=1`` in the
environment before import makes Linux take the code paths that macOS takes (a kernel byte
lock instead of the robust mutex, classic ``fcntl`` locks on a lock file, trywait plus a
back-off instead of timed semaphore waits, no ``pipe2``, no ``MSG_CMSG_CLOEXEC``, no
``O_TMPFILE``), so CI on Linux exercises them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import sys
import tempfile

import posix_ipc

from . import _core

# The longest POSIX semaphore name macOS accepts (PSEMNAMLEN), leading slash included.
SEM_NAME_MAX = 31


@dataclasses.dataclass(frozen=True)
class Platform:
    """What the host can do, decided once at import.

    Attributes:
        portable: True when the macOS/BSD code paths are in force (natively or forced).
        robust_mutex: robust process-shared pthread mutexes work here.
        mutex_kind: the lock new eventfds get (``_core.MUTEX_ROBUST`` or ``MUTEX_BYTE``).
        carrier: where the kernel byte locks live (``_core.CARRIER_PIPE``: OFD locks on a
            private read-write description of the notifier pipe, opened through
            ``/proc/self/fd``; ``CARRIER_FILE``: classic ``fcntl`` locks on a lock file).
        poll_waits: no timed semaphore wait (macOS): trywait with a back-off.
        pipe2: ``os.pipe2`` exists (flags set atomically at creation).
        cmsg_cloexec: ``MSG_CMSG_CLOEXEC`` for ``recvmsg`` (0 where missing).
        o_tmpfile: an unnamed file can be built and then linked into place.
        fallocate: ``os.posix_fallocate`` reserves tmpfs pages up front.
        state_dir: where state files (and lock files) live.
        sem_dir: where the kernel shows named semaphores as files (``""`` if nowhere).
        cpus: CPUs this process may run on (spinning is pointless on one).
    """

    portable: bool
    robust_mutex: bool
    mutex_kind: int
    carrier: int
    poll_waits: bool
    pipe2: bool
    cmsg_cloexec: int
    o_tmpfile: bool
    fallocate: bool
    state_dir: str
    sem_dir: str
    cpus: int


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


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _probe(force_portable: bool) -> Platform:
    # A FIFO opens read-write through /proc on Linux (fifo(7)), and takes OFD locks there.
    pipe_carrier = (bool(_core.HAVE_OFD_LOCKS) and os.path.isdir("/proc/self/fd")
                    and not force_portable)
    robust = bool(_core.HAVE_ROBUST_MUTEX) and not force_portable
    linux_sems = os.path.isdir("/dev/shm") and sys.platform.startswith("linux")
    return Platform(
        portable=force_portable or not pipe_carrier,
        robust_mutex=robust,
        mutex_kind=_core.MUTEX_ROBUST if robust else _core.MUTEX_BYTE,
        carrier=_core.CARRIER_PIPE if pipe_carrier else _core.CARRIER_FILE,
        poll_waits=(force_portable or not _core.HAVE_TIMED_SEM_WAIT
                    or not posix_ipc.SEMAPHORE_TIMEOUT_SUPPORTED),
        pipe2=hasattr(os, "pipe2") and not force_portable,
        cmsg_cloexec=0 if force_portable else getattr(socket, "MSG_CMSG_CLOEXEC", 0),
        o_tmpfile=hasattr(os, "O_TMPFILE") and not force_portable,
        fallocate=hasattr(os, "posix_fallocate") and not force_portable,
        state_dir="/dev/shm" if os.path.isdir("/dev/shm") else _private_dir(),
        sem_dir="/dev/shm" if linux_sems else "",
        cpus=_cpus(),
    )


PLATFORM = _probe(os.environ.get("MPEVENTFD_PORTABLE", "") not in ("", "0"))
