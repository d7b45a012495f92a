"""Creation, attach, detach and removal of the named objects of an eventfd (SPEC §4).

The kernel counts the references, exactly as it does for a real eventfd:

* **Presence.**  The creator opens the state file once and takes ``flock(LOCK_SH)`` on that
  open file description.  The fd travels everywhere the eventfd goes (fork, ``DupFd``,
  ``SCM_RIGHTS``, ``pass_fds``); every copy shares the description, so the lock lives
  exactly as long as some fd of the eventfd exists anywhere, messages in flight included,
  and the kernel drops it at the last close, also after ``SIGKILL``.  It is never unlocked.
* **Liveness test.**  Open the state file afresh and try ``flock(LOCK_EX | LOCK_NB)``.
  Success means no fd of the eventfd exists anywhere, and none can appear (fds are only ever
  copied from existing ones): unlink every name while holding it, the state file last.
* **Publish atomically.**  The state file is built unnamed (``O_TMPFILE``) or under a
  temporary name with its presence lock taken at once, linked into place, and only then are
  the semaphores (and the lock file) created.  Teardown goes in reverse.  So a semaphore
  without a state file is always debris, and a state file is judged only by the liveness
  test, never by age (design-review L2).
* **Attach** opens names without ``O_CREAT``: a missing name means something outside
  removed it (systemd ``RemoveIPC``), and re-creating it would split the eventfd in two.
* **Last holders that run no finalizer** (a multiprocessing fork child leaves through
  ``os._exit``; a concurrent ``fork`` + ``exec`` holds a copy for an instant): a
  multiprocessing after-fork finalizer, a liveness test at interpreter exit, a janitor
  thread that retests names it could not remove, and a sweep at creation (design-review L1).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Iterator

import posix_ipc

from . import _aio, _lock, _names, _notifier, _reentry
from . import _faults as F
from ._core import Core
from ._errors import StateError, oserror
from ._probe import PLATFORM
from ._state import (
    BACKEND_FAST,
    BACKEND_KERNEL,
    HEADER_WORDS,
    ID_BYTES,
    SIZE,
    W_BACKEND,
    W_LOCK_DEV,
    W_LOCK_INO,
    W_PIPE_DEV,
    W_PIPE_INO,
    W_SEM_M_INO,
    W_SEM_R_INO,
    W_SEM_W_INO,
    Mapping,
    initialise,
    validate,
)

_registry: dict[bytes, Core] = {}
_by_fileno: dict[int, Core] = {}
_reg_lock = threading.Lock()
_janitor_lock = threading.Lock()
_pending: set[str] = set()  # names whose liveness test failed at our last detach
_janitor: threading.Thread | None = None
_last_sweep = 0.0
SWEEP_INTERVAL = 1.0
# A creator takes the presence lock right after creating its temporary file (where there is
# no O_TMPFILE); a free temporary file younger than this may be a creator paused in between.
TEMP_GRACE = 10.0
# The mutex of new eventfds: "fast" (SPEC §5.8, the default) or "kernel" (SPEC §5.1).
# Attachers follow whatever the creator chose, as recorded in the header.
BACKENDS = {"fast": BACKEND_FAST, "kernel": BACKEND_KERNEL}
default_backend = BACKENDS.get(os.environ.get("MPEVENTFD_MUTEX", "fast"), BACKEND_FAST)
_SEM_WORDS = {"r": W_SEM_R_INO, "w": W_SEM_W_INO, "m": W_SEM_M_INO}


# -- creation -------------------------------------------------------------------------------


def create(initval: int, semaphore: bool, nonblocking: bool) -> Core:
    """Build and publish a new eventfd; on any failure leave no fd, mapping or name behind."""
    _sweep_now_and_then()
    backend = default_backend
    kinds = "rwm" if backend == BACKEND_FAST else "rw"
    ident = _names.new_id()
    name = _names.encode(ident)
    path = _names.state_path(name)
    fd = r = w = pd = -1
    mapping: Mapping | None = None
    sems: list[posix_ipc.Semaphore] = []
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
        mapping = Mapping(fd)
        if F.ARMED:
            F.hit("create.mmap")
        r, w = _notifier.create()
        if F.ARMED:
            F.hit("create.pipe")
        pipe = os.fstat(r)
        mapping.words[W_PIPE_DEV], mapping.words[W_PIPE_INO] = pipe.st_dev, pipe.st_ino
        if initval:
            _notifier.signal_ready(w)
        initialise(mapping, ident, semaphore, nonblocking, initval, backend)
        _publish(fd, temp, path)
        made.append(path)
        if temp:
            made.remove(temp)
        if F.ARMED:
            F.hit("create.published")
        for kind in kinds:
            sems.append(_sem_open(_names.sem_name(name, kind), create=True))
            made.append(_names.sem_name(name, kind))
            mapping.words[_SEM_WORDS[kind]] = _sem_ino(name, kind)
            if F.ARMED:
                F.hit("create.sem_" + kind)
        if backend == BACKEND_FAST:
            sems[2].release()  # the mutex token
        lock_ident = (0, 0)
        if not PLATFORM.ofd_locks:
            made.append(_names.lock_path(name))
            lock_ident = _create_lock_file(name)
            if F.ARMED:
                F.hit("create.lockfile")
            mapping.words[W_LOCK_DEV], mapping.words[W_LOCK_INO] = lock_ident
        # The private descriptor opens now, while every name exists: a handle keeps working
        # if something outside removes the names later (only a fork child reopens it).
        pd = _lock.open_private(r, _names.lock_path(name), lock_ident,
                                (pipe.st_dev, pipe.st_ino))
        core = Core(name, (fd, r, w), mapping, _three(sems), _names.lock_path(name), lock_ident)
        core.adopt_private(pd)
    except BaseException:
        for sem in sems:
            sem.close()
        if mapping is not None:
            mapping.close()
        for x in (fd, r, w, pd):
            if x >= 0:
                os.close(x)
        for made_name in reversed(made):
            _unlink(made_name)
        raise
    _register(core)
    return core


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
        os.posix_fallocate(fd, 0, SIZE)
        return
    # No posix_fallocate (macOS): write the zeros ourselves, which also reserves the pages.
    if os.pwrite(fd, bytes(SIZE), 0) != SIZE:
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


def _sem_open(name: str, create: bool) -> posix_ipc.Semaphore:
    """Open (or create) a semaphore, translating posix_ipc's errors into errno ones."""
    try:
        if create:
            return posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, 0)
        return posix_ipc.Semaphore(name)
    except posix_ipc.ExistentialError:
        if create:
            raise FileExistsError(errno.EEXIST, "semaphore exists", name) from None
        raise FileNotFoundError(
            errno.ENOENT,
            "semaphore is missing: something outside mpeventfd removed it (e.g. systemd "
            "RemoveIPC); refusing to re-create it, which would split the eventfd in two",
            name,
        ) from None
    except posix_ipc.PermissionsError as e:
        raise PermissionError(errno.EACCES, str(e), name) from None
    except OSError as e:
        if e.errno is None:
            # posix_ipc raises some system errors without an errno (reliability §1.7).
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


def _sem_ino(name: str, kind: str) -> int:
    path = _names.sem_file(name, kind)
    return os.stat(path).st_ino if path else 0


# -- attach ---------------------------------------------------------------------------------


def attach(state_fd: int, rfd: int, wfd: int, *, expect: bytes | None = None,
           own: bool = True) -> Core:
    """Attach to the eventfd behind three fds, validating everything before trusting it.

    On success the fds belong to the returned core, or are closed when this process already
    had the eventfd under other fd numbers.  On failure they are closed if ``own`` (fds just
    received) and left alone otherwise (fds named by an untrusted handle).  ``expect`` is
    the id the sender claimed.  Raises :class:`StateError` (a ``ValueError``) for anything
    foreign, forged or corrupt, ``FileNotFoundError`` if a name was removed from outside.
    """
    try:
        core = _attach(state_fd, rfd, wfd, expect)
    except BaseException:
        if own:
            for fd in (state_fd, rfd, wfd):
                try:
                    os.close(fd)
                except OSError:
                    pass
        raise
    return core


def _attach(state_fd: int, rfd: int, wfd: int, expect: bytes | None) -> Core:
    if len({state_fd, rfd, wfd}) != 3:
        raise StateError("the three fds of an eventfd must be distinct")
    st = _check_state_fd(state_fd)
    header = os.pread(state_fd, HEADER_WORDS * 8, 0)
    ident = header[ID_BYTES]
    if expect is not None and ident != expect:
        raise StateError("the fds belong to another eventfd than the one named")
    with _reg_lock:  # one core per (process, eventfd), even when threads attach at once
        return _attach_locked(state_fd, rfd, wfd, ident, st)


def _attach_locked(state_fd: int, rfd: int, wfd: int, ident: bytes,
                   st: os.stat_result) -> Core:
    name = _names.encode(ident)
    existing = _registry.get(ident) or _revive(ident)
    if existing is not None and not existing.released:
        _check_same(existing, st, rfd, wfd)
        given, mine = (state_fd, rfd, wfd), (existing.state_fd, existing.rfd, existing.wfd)
        if given != mine:
            if set(given) & {*mine, existing.private}:
                # Copies of this eventfd's fds, but mixed with the fds the live handles
                # use: closing "the duplicates" would close those (a forged handle).
                raise StateError("the fds mix this eventfd's own fds with other copies")
            for fd in given:
                os.close(fd)
        return existing
    mapping = Mapping(state_fd)
    sems: list[posix_ipc.Semaphore] = []
    pd = -1
    try:
        validate(mapping, st.st_size)
        if F.ARMED:
            F.hit("attach.validated")
        words = mapping.words
        _check_pipe(rfd, wfd, (words[W_PIPE_DEV], words[W_PIPE_INO]))
        _check_named(name, st)
        kinds = "rwm" if words[W_BACKEND] == BACKEND_FAST else "rw"
        for kind in kinds:
            sems.append(_sem_open(_names.sem_name(name, kind), create=False))
            ino = words[_SEM_WORDS[kind]]
            if ino and _sem_ino(name, kind) != ino:
                raise StateError(f"semaphore {_names.sem_name(name, kind)} is not the original")
        if F.ARMED:
            F.hit("attach.sems")
        lock_ident = (int(words[W_LOCK_DEV]), int(words[W_LOCK_INO]))
        if not PLATFORM.ofd_locks and lock_ident == (0, 0):
            raise StateError("this eventfd was created without a lock file; mixed backends")
        pd = _lock.open_private(rfd, _names.lock_path(name), lock_ident,
                                (words[W_PIPE_DEV], words[W_PIPE_INO]))
        core = Core(name, (state_fd, rfd, wfd), mapping, _three(sems),
                    _names.lock_path(name), lock_ident)
        core.adopt_private(pd)
    except BaseException:
        for sem in sems:
            sem.close()
        mapping.close()
        if pd >= 0:
            os.close(pd)
        raise
    _register_locked(core)
    return core


def _three(
    sems: list[posix_ipc.Semaphore],
) -> tuple[posix_ipc.Semaphore, posix_ipc.Semaphore, posix_ipc.Semaphore | None]:
    return sems[0], sems[1], sems[2] if len(sems) > 2 else None


def _revive(ident: bytes) -> Core | None:
    """A core whose last handle closed while a thread still waits in it: use it again.

    A second core would open a second private descriptor, and classic ``fcntl`` locks
    belong to the process: closing either would drop the other's locks (lock-protocol S4).
    Called with ``_reg_lock`` held.
    """
    for core in list(_reentry.cores.values()):
        if isinstance(core, Core) and core.ident == ident:
            with core.tlock:
                if core.released:
                    return None
                core.closing = False
            _register_locked(core)
            return core
    return None


def _check_state_fd(fd: int) -> os.stat_result:
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise StateError(f"fd {fd} is not open: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StateError(f"fd {fd} is not an mpeventfd state file")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise StateError(f"fd {fd} is not open for reading and writing, as a state fd is")
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o600:
        raise StateError(f"fd {fd}: state file is not owner-only (mode 0600, this user)")
    if st.st_size != SIZE:
        raise StateError(f"fd {fd}: state file has {st.st_size} bytes, expected {SIZE}")
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


def _check_same(core: Core, st: os.stat_result, rfd: int, wfd: int) -> None:
    mine = os.fstat(core.state_fd)
    if (mine.st_dev, mine.st_ino) != (st.st_dev, st.st_ino):
        raise StateError("the fds claim an id that belongs to another state file")
    _check_pipe(rfd, wfd, (core.words[W_PIPE_DEV], core.words[W_PIPE_INO]))


# -- the per-process registry ---------------------------------------------------------------


def _register(core: Core) -> None:
    with _reg_lock:
        _register_locked(core)


def _register_locked(core: Core) -> None:
    core.on_idle = _on_idle
    _reentry.cores[id(core)] = core
    _registry[core.ident] = core
    _by_fileno[core.rfd] = core


def retain(core: Core) -> None:
    """A new handle refers to ``core``."""
    with _reg_lock:
        core.refs += 1


def release(core: Core) -> None:
    """A handle let go of ``core`` (explicit close): detach when it was the last one."""
    with _reg_lock:
        core.refs -= 1
        if core.refs > 0:
            return
        _forget(core)
    _finish(core)


def release_from_finalizer(core: Core) -> None:
    """Like :func:`release`, from ``__del__``: never block, never take a busy lock.

    A finalizer can run inside this thread's own critical section (any allocation may start
    the cyclic GC), so the release is queued like a deferred write when it cannot run now
    (design-review S3f).
    """
    if not _reentry.inside() and _reg_lock.acquire(False):
        try:
            core.refs -= 1
            last = core.refs <= 0
            if last:
                _forget(core)
        finally:
            _reg_lock.release()
        if last:
            _finish(core, blocking=False)
        return
    _reentry.defer(lambda _: release(core), 0)
    _start_janitor()


def _forget(core: Core) -> None:
    core.closing = True
    if _registry.get(core.ident) is core:
        del _registry[core.ident]
    if _by_fileno.get(core.rfd) is core:
        del _by_fileno[core.rfd]


def by_fileno(fd: int) -> Core | None:
    """The core whose ``fileno()`` is ``fd`` in this process, if any."""
    return _by_fileno.get(fd)


def _on_idle(core: Core) -> None:
    if core.closing and not core.waiters and not core.released:
        _finish(core)


def _finish(core: Core, blocking: bool = True) -> None:
    """Free the process's resources once no thread waits in ``core``, then liveness-test."""
    tl = core.tlock
    if not tl.acquire(blocking):
        _reentry.defer(lambda _: _finish(core), 0)
        _start_janitor()
        return
    try:
        if core.released or core.waiters or not core.closing:
            return  # the last waiter out calls _on_idle; or an attach revived it
        core.released = True
        if core.fast:
            core.lockword = -1  # the next section entry goes to _claim_fast, which sees released
        _reentry.cores.pop(id(core), None)
        _close_resources(core)
    finally:
        tl.release()
    if F.ARMED:
        F.hit("detach.closed")
    if not liveness_test(core.name):
        _pending.add(core.name)
        _start_janitor()


def _close_resources(core: Core) -> None:
    _aio.wake_all(core.rfd)  # no asyncio registration may outlive the fd
    # Semaphores are closed only here, when no thread of ours waits on them: sem_close under
    # a waiter unmaps its futex and crashes the interpreter (design-review L4).
    core.sem_r.close()
    core.sem_w.close()
    if core.fast:
        core.sem_m.close()
    core.map.close()
    for attr in ("private", "state_fd", "rfd", "wfd"):
        fd = getattr(core, attr)
        setattr(core, attr, -1)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


# -- liveness test, sweep, cleanup ----------------------------------------------------------


def liveness_test(name: str) -> bool:
    """Remove every name of ``name`` if no fd of it exists anywhere; True if gone."""
    path = _names.state_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        _unlink_secondary(name)
        return True
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        # Nobody holds an fd of it, and nobody can get one: remove while holding LOCK_EX.
        if F.ARMED:
            F.hit("detach.unlinking")
        _unlink_secondary(name)
        _unlink(path)
        return True
    finally:
        os.close(fd)


def _unlink_secondary(name: str) -> None:
    for kind in "rwm":
        _unlink(_names.sem_name(name, kind))
    _unlink(_names.lock_path(name))


def _unlink(name: str) -> None:
    try:
        if name.startswith("/" + _names.PREFIX):
            posix_ipc.unlink_semaphore(name)
        else:
            os.unlink(name)
    except (FileNotFoundError, posix_ipc.ExistentialError):
        pass


def entries() -> Iterator[tuple[str, str]]:
    """Yield ``(name, kind)`` for this user's files in the state (and semaphore) directory.

    ``kind`` is ``""`` for a state file, ``".lock"``, ``".tmp"``, ``"-r"`` or ``"-w"``.
    """
    dirs = {PLATFORM.state_dir, PLATFORM.sem_dir} - {""}
    uid = os.geteuid()
    for d in sorted(dirs):
        try:
            listing = list(os.scandir(d))
        except FileNotFoundError:
            continue
        for entry in listing:
            m = _names.FILE_RE.fullmatch(entry.name) if d == PLATFORM.state_dir else None
            s = _names.SEM_FILE_RE.fullmatch(entry.name) if d == PLATFORM.sem_dir else None
            if not (m or s):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
            except FileNotFoundError:
                continue
            if m:
                yield m.group(1), m.group(2)
            elif s:
                yield s.group(1), "-" + s.group(2)


def sweep(skip_attached: bool = True) -> list[str]:
    """Remove every eventfd of this user that no fd refers to any more; return their names.

    Never removes anything in use: state files are judged only by the liveness test, and a
    semaphore or lock file counts as debris only when its state file is gone (it is created
    after the state file is published and removed before it).
    """
    attached = {core.name for core in list(_registry.values())} if skip_attached else set()
    removed = []
    for name, kind in sorted(set(entries())):
        if name in attached:
            continue
        if kind == "":
            if liveness_test(name):
                removed.append(name)
        elif kind == ".tmp":
            if _dead_temp(name):
                removed.append(name)
        elif not os.path.exists(_names.state_path(name)):
            _unlink_secondary(name)
            removed.append(name)
    return sorted(set(removed))


def _dead_temp(name: str) -> bool:
    path = _names.temp_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        if time.time() - os.fstat(fd).st_mtime < TEMP_GRACE:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        _unlink(path)
        return True
    finally:
        os.close(fd)


def _sweep_now_and_then() -> None:
    global _last_sweep
    now = time.monotonic()
    if now - _last_sweep >= SWEEP_INTERVAL:
        _last_sweep = now
        try:
            sweep()
        except OSError:
            pass  # opportunistic: a failing sweep must not fail a creation


# -- the janitor, exit and fork -------------------------------------------------------------


def _start_janitor() -> None:
    """Start the janitor unless it runs; never blocks (finalizers call this)."""
    global _janitor
    if not _janitor_lock.acquire(False):
        return  # being started right now, possibly by this very thread
    try:
        if _janitor is not None and _janitor.is_alive():
            return
        _janitor = threading.Thread(target=_janitor_loop, name="mpeventfd-janitor", daemon=True)
        _janitor.start()
    finally:
        _janitor_lock.release()


def _janitor_loop() -> None:
    """Retest names we could not remove, and apply releases queued by finalizers.

    A ``fork`` + ``exec`` in another thread holds copies of our fds for an instant, so a
    detach can see "in use" and nobody would test again (design-review E5).  The retest backs
    off from 10 ms to 1 s and ends when nothing is pending.
    """
    delay = 0.01
    while _pending or _reentry.deferred:
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
        if not _reentry.inside():
            _reentry.drain()
        _retest_pending()


def _retest_pending() -> None:
    """Run the liveness test again on every name a detach could not remove."""
    for name in list(_pending):
        try:
            if liveness_test(name):
                _pending.discard(name)
        except OSError:
            pass


def shutdown() -> None:
    """Interpreter exit (also a multiprocessing child's exit): detach everything, retest.

    Cores in which a thread still waits are left alone: closing their semaphores under the
    waiter would crash, and the process's exit releases the fds anyway.
    """
    if not _reentry.inside():
        _reentry.drain()
    with _reg_lock:
        cores = list(_registry.values())
        for core in cores:
            _forget(core)
    for core in cores:
        _finish(core, blocking=False)
    _retest_pending()


def _after_fork_child() -> None:
    global _reg_lock, _janitor_lock, _janitor
    _reg_lock = threading.Lock()
    _janitor_lock = threading.Lock()
    _janitor = None
    _pending.clear()  # the parent retests its own names
    _reentry.reset_after_fork()
    _aio.reset_after_fork()
    for core in list(_reentry.cores.values()):
        if not isinstance(core, Core):
            continue
        if core.closing:
            # No handle of it exists, and no thread of the child waits in it: let go of
            # the copies now, or the child would pin the parent's locks (design-review M2).
            core.released = True
            _reentry.cores.pop(id(core), None)
            _close_resources(core)
        else:
            core.after_fork_child()


def _install_mp_finalizer(_: object) -> None:
    # A multiprocessing fork child clears the finalizers it inherited and leaves through
    # os._exit, skipping atexit; re-register so its exit detaches (design-review E4).
    from multiprocessing import util

    util.Finalize(None, shutdown, exitpriority=-100)


class _Anchor:
    """Something weakly referenceable for ``multiprocessing.util.register_after_fork``."""


_ANCHOR = _Anchor()
atexit.register(shutdown)
os.register_at_fork(after_in_child=_after_fork_child)


def _hook_multiprocessing() -> None:
    from multiprocessing import util

    util.register_after_fork(_ANCHOR, _install_mp_finalizer)


_hook_multiprocessing()
