"""Building and publishing a new eventfd (docs/design.md §9, "Publish").

The state file is built unnamed (``O_TMPFILE``) or under a temporary name with its presence
lock taken at once, sized with ``posix_fallocate`` before anything maps it, its header
written, then linked into place; only then are the semaphores (and the lock file) created
and their identities recorded.  Teardown goes in reverse.  So a sweep never catches a
half-built eventfd: a semaphore without a state file is always debris, and a state file is
judged only by the liveness test.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

import posix_ipc

from . import _core, _liveness, _names, _registry
from . import _faults as F
from ._core import Core
from ._errors import oserror
from ._probe import PLATFORM

# The lock kinds a new eventfd can have; attachers follow the one recorded in the header.
LOCK_KINDS = {"robust": _core.MUTEX_ROBUST, "byte": _core.MUTEX_BYTE}
SWEEP_INTERVAL = 1.0
_last_sweep = 0.0


def create(initval: int, semaphore: bool, nonblocking: bool, mutex_kind: int) -> Core:
    """Build and publish a new eventfd whose lock is of ``mutex_kind`` (``LOCK_KINDS``);
    on any failure leave no fd, mapping or name behind."""
    _sweep_now_and_then()
    ident = _names.new_id()
    name = _names.encode(ident)
    path = _names.state_path(name)
    carrier = PLATFORM.carrier
    fd = r = w = -1
    made: list[str] = []  # names created so far, for the teardown
    try:
        fd, temp = _open_unnamed(name)
        if temp:
            made.append(temp)
        fcntl.flock(fd, fcntl.LOCK_SH)  # presence, at once: a sweep now sees "in use"
        if F.ARMED:
            F.hit("create.file")
        _allocate(fd)
        if F.ARMED:
            F.hit("create.fallocate")
        r, w = _pipe()
        if F.ARMED:
            F.hit("create.pipe")
        pipe = os.fstat(r)
        _core.init_page(fd, ident, semaphore, nonblocking, initval, mutex_kind, carrier,
                        pipe.st_dev, pipe.st_ino)
        if F.ARMED:
            F.hit("create.mmap")
        _publish(fd, temp, path)
        made.append(path)
        if temp:
            made.remove(temp)
        if F.ARMED:
            F.hit("create.published")
        inos = []
        for kind in "rw":
            _sem_create(_names.sem_name(name, kind))
            made.append(_names.sem_name(name, kind))
            inos.append(sem_ino(name, kind))
            if F.ARMED:
                F.hit("create.sem_" + kind)
        lock_ident = (0, 0)
        if carrier == _core.CARRIER_FILE:
            made.append(_names.lock_path(name))
            lock_ident = _create_lock_file(name)
            if F.ARMED:
                F.hit("create.lockfile")
        _core.set_identity(fd, inos[0], inos[1], *lock_ident)
        # The private description opens now, while every name exists: a handle keeps working
        # if something outside removes the names later (only a fork child reopens it).
        core = new_core(name, fd, r, w, carrier)
    except BaseException:
        for x in (fd, r, w):
            if x >= 0:
                os.close(x)
        for made_name in reversed(made):
            _liveness.unlink(made_name)
        raise
    registry = _registry.current()
    with registry.lock:
        registry.add_locked(core)
    return core


def new_core(name: str, fd: int, r: int, w: int, carrier: int) -> Core:
    lock = _names.lock_path(name) if carrier == _core.CARRIER_FILE else None
    return Core(fd, r, w, _names.sem_name(name, "r"), _names.sem_name(name, "w"), lock,
                PLATFORM.poll_waits)


def _pipe() -> tuple[int, int]:
    """A non-blocking, close-on-exec pipe: ``(read end, write end)``."""
    if PLATFORM.pipe2:
        return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    r, w = os.pipe()  # (no pipe2, as on macOS: os.pipe() is close-on-exec already, PEP 446)
    try:
        os.set_blocking(r, False)
        os.set_blocking(w, False)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return r, w


def _open_unnamed(name: str) -> tuple[int, str]:
    """Open the state file to be; return ``(fd, temporary name or "")``."""
    if PLATFORM.o_tmpfile:
        # O_TMPFILE: no name exists until linkat(2), so no sweep can ever see it half-built.
        fd = os.open(PLATFORM.state_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        return fd, ""
    temp = _names.temp_path(name)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(temp, flags, 0o600), temp


def _allocate(fd: int) -> None:
    """Reserve every page now: a full tmpfs then fails here with ENOSPC, not later by SIGBUS."""
    os.fchmod(fd, 0o600)  # exactly owner-only, whatever the umask
    if PLATFORM.fallocate:
        os.posix_fallocate(fd, 0, _core.SIZE)
        return
    # No posix_fallocate (macOS): write the zeros ourselves, which also reserves the pages.
    if os.pwrite(fd, bytes(_core.SIZE), 0) != _core.SIZE:
        raise oserror(errno.ENOSPC, "short write while sizing the state file")


def _publish(fd: int, temp: str, path: str) -> None:
    if temp:
        os.link(temp, path)  # link, not rename: never replaces an existing name
        os.unlink(temp)
        return
    # linkat(2) with AT_SYMLINK_FOLLOW on /proc/self/fd/N names an O_TMPFILE file (open(2)).
    # os.link uses plain link(2), which would hard-link the proc symlink itself (EXDEV),
    # unless a dir fd is given.
    dirfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", os.path.basename(path), dst_dir_fd=dirfd,
                follow_symlinks=True)
    finally:
        os.close(dirfd)


def _create_lock_file(name: str) -> tuple[int, int]:
    path = _names.lock_path(name)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino


def _sem_create(name: str) -> None:
    """Create a semaphore (``O_EXCL``, 0600) with posix_ipc; the C core opens it by name."""
    try:
        posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, 0).close()
    except posix_ipc.ExistentialError:
        raise FileExistsError(errno.EEXIST, "semaphore exists", name) from None
    except posix_ipc.PermissionsError as e:
        raise PermissionError(errno.EACCES, str(e), name) from None
    except OSError as e:
        if e.errno is None:
            # posix_ipc raises some system errors without an errno (EMFILE, ENOSPC, ...).
            raise oserror(_errno_of(str(e)), f"{name}: {e}") from None
        raise
    except ValueError as e:  # posix_ipc's EINVAL and ENAMETOOLONG
        raise oserror(errno.EINVAL, f"{name}: {e}") from None


def _errno_of(message: str) -> int:
    text = message.lower()
    if "maximum number of files" in text:
        return errno.EMFILE
    if "total number of open files" in text or "system limit" in text:
        return errno.ENFILE
    if "space" in text:
        return errno.ENOSPC
    if "memory" in text:
        return errno.ENOMEM
    return errno.EIO


def sem_ino(name: str, kind: str) -> int:
    path = _names.sem_file(name, kind)
    return os.stat(path).st_ino if path else 0


def _sweep_now_and_then() -> None:
    """Every creation, at most once a second, removes what dead holders left behind."""
    global _last_sweep
    now = time.monotonic()
    if now - _last_sweep >= SWEEP_INTERVAL:
        _last_sweep = now
        try:
            _registry.sweep()
        except OSError:
            pass  # opportunistic: a failing sweep must not fail a creation
