"""Attaching to an eventfd from its three fds, trusting nothing it has not checked.

Whoever holds the fds (a ``multiprocessing`` child, a receiver of ``SCM_RIGHTS``, an exec'd
child with a handle) validates them first, in this order: the state fd (a regular file, open
read-write, owner-only, of the right size), every header field (``_core.read_header``), the
pipe's two ends (kinds, access modes, and the identity the header records), the state file's
name, the lock kind this process can take, and the semaphores (opened without ``O_CREAT``: a
missing one was removed from outside, e.g. by systemd ``RemoveIPC``, and re-creating it would
split the eventfd in two) (docs/design.md §9 and I13, I14).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from . import _core, _names, _registry
from . import _faults as F
from ._core import Core
from ._create import new_core, sem_ino
from ._errors import StateError
from ._probe import PLATFORM


def attach(state_fd: int, rfd: int, wfd: int, *, expect: bytes | None = None,
           own: bool = True) -> Core:
    """Attach to the eventfd behind three fds, validating everything before trusting it.

    On success the fds belong to the returned core, or are closed when this process already
    had the eventfd under other fd numbers.  On failure they are closed if ``own`` (fds just
    received) and left alone otherwise (fds named by an untrusted handle).  ``expect`` is
    the id the sender claimed.  Raises :class:`StateError` (a ``ValueError``) for anything
    foreign, forged or corrupt, ``FileNotFoundError`` if a name was removed from outside.
    """
    taken = [False]  # set once a core owns the fds: from then on only it closes them
    try:
        core = _attach(state_fd, rfd, wfd, expect, taken)
    except BaseException:
        if own and not taken[0]:
            for fd in (state_fd, rfd, wfd):
                try:
                    os.close(fd)
                except OSError:
                    pass
        raise
    return core


def _attach(state_fd: int, rfd: int, wfd: int, expect: bytes | None,
            taken: list[bool]) -> Core:
    if len({state_fd, rfd, wfd}) != 3:
        raise StateError("the three fds of an eventfd must be distinct")
    st = _check_state_fd(state_fd)
    header = _core.read_header(state_fd)
    ident = header["id"]
    if expect is not None and ident != expect:
        raise StateError("the fds belong to another eventfd than the one named")
    _check_pipe(rfd, wfd, (header["pipe_dev"], header["pipe_ino"]))
    registry = _registry.current()
    with registry.lock:  # one core per (process, eventfd), even when threads attach at once
        existing = registry.find_locked(ident)
        if existing is not None:
            return _same_again(existing, st, (state_fd, rfd, wfd))
        name = _names.encode(ident)
        _check_named(name, st)
        _check_kind(header)
        if F.ARMED:
            F.hit("attach.validated")
        for kind in "rw":
            ino = header[f"sem_{kind}_ino"]
            if ino and _sem_ino_or_missing(name, kind) != ino:
                raise StateError(f"semaphore {_names.sem_name(name, kind)} is not the original")
        if F.ARMED:
            F.hit("attach.sems")
        core = new_core(name, state_fd, rfd, wfd, header["carrier"])
        taken[0] = True
        try:
            registry.add_locked(core)
        except BaseException:
            core.close()  # (it closes the fds it owns)
            raise
        return core


def _sem_ino_or_missing(name: str, kind: str) -> int:
    try:
        return sem_ino(name, kind)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, "semaphore is missing: something outside mpeventfd removed it (e.g. "
            "systemd RemoveIPC); refusing to re-create it, which would split the eventfd in two",
            _names.sem_name(name, kind)) from None


def _check_kind(header: dict[str, object]) -> None:
    """Refuse an eventfd whose lock this process cannot take the same way as its creator.

    Locks of different kinds (a robust mutex, OFD locks on the pipe, classic locks on a lock
    file) do not exclude each other: two processes using different ones would both enter.
    """
    mutex, carrier = header["mutex_kind"], header["carrier"]
    if mutex == _core.MUTEX_ROBUST and not PLATFORM.robust_mutex:
        raise StateError("this eventfd's lock is a robust mutex, which this process cannot use "
                         "(MPEVENTFD_PORTABLE, or a build without robust mutexes)")
    if carrier == _core.CARRIER_PIPE and PLATFORM.carrier != _core.CARRIER_PIPE:
        raise StateError("this eventfd keeps its locks on the notifier pipe (OFD locks), which "
                         "this process cannot use (MPEVENTFD_PORTABLE, or not Linux)")
    if carrier == _core.CARRIER_FILE and PLATFORM.carrier != _core.CARRIER_FILE:
        raise StateError("this eventfd keeps its locks on a lock file (it was created with "
                         "MPEVENTFD_PORTABLE or on another OS); this process would lock the pipe")


def _same_again(core: Core, st: os.stat_result, given: tuple[int, int, int]) -> Core:
    """The eventfd is attached here already: return that core, after checking the fds."""
    mine = core.fds
    shown = os.fstat(mine[0])
    if (shown.st_dev, shown.st_ino) != (st.st_dev, st.st_ino):
        raise StateError("the fds claim an id that belongs to another state file")
    if given != mine:
        if set(given) & set(mine):
            # Copies of this eventfd's fds, but mixed with the fds the live handles use:
            # closing "the duplicates" would close those (a forged handle).
            raise StateError("the fds mix this eventfd's own fds with other copies")
        for fd in given:
            os.close(fd)
    return core


def _check_state_fd(fd: int) -> os.stat_result:
    try:
        st = os.fstat(fd)
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as e:
        raise StateError(f"fd {fd} is not open: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StateError(f"fd {fd} is not an mpeventfd state file")
    if mode != os.O_RDWR:
        raise StateError(f"fd {fd} is not open for reading and writing, as a state fd is")
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o600:
        raise StateError(f"fd {fd}: state file is not owner-only (mode 0600, this user)")
    if st.st_size != _core.SIZE:
        raise StateError(f"fd {fd}: state file has {st.st_size} bytes, expected {_core.SIZE}")
    return st


def _check_pipe(rfd: int, wfd: int, ident: tuple[int, int]) -> None:
    for fd, mode in ((rfd, os.O_RDONLY), (wfd, os.O_WRONLY)):
        try:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError as e:
            raise StateError(f"fd {fd} is not open: {e}") from None
        if not stat.S_ISFIFO(st.st_mode) or (st.st_dev, st.st_ino) != ident:
            raise StateError(f"fd {fd} is not this eventfd's notifier pipe")
        if flags & os.O_ACCMODE != mode:
            raise StateError(f"fd {fd} is the wrong end of the notifier pipe")


def _check_named(name: str, st: os.stat_result) -> None:
    try:
        named = os.stat(_names.state_path(name))
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT,
            "state file name is missing: something outside mpeventfd removed it",
            _names.state_path(name),
        ) from None
    if (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
        raise StateError("the state file's name refers to another file")
