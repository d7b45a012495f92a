"""Creation, attach, detach and removal of the named objects of an eventfd.

The kernel counts the references, exactly as it does for a real eventfd (docs/design.md,
"Lifecycle"):

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
  test, never by age.
* **Attach** opens names without ``O_CREAT``: a missing name means something outside
  removed it (systemd ``RemoveIPC``), and re-creating it would split the eventfd in two.
* **Last holders that run no finalizer** (a multiprocessing fork child leaves through
  ``os._exit``; a concurrent ``fork`` + ``exec`` holds a copy for an instant): a
  multiprocessing after-fork finalizer, a liveness test at interpreter exit, a janitor
  thread that retests names it could not remove, and a sweep at creation.
"""

from __future__ import annotations

import atexit
import collections
import errno
import fcntl
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import posix_ipc

from . import _aio, _core, _names
from . import _faults as F
from ._core import Core
from ._errors import StateError, oserror
from ._probe import PLATFORM

_registry: dict[bytes, Core] = {}  # ident -> the live core of this process
_by_fileno: dict[int, Core] = {}
_refs: dict[Core, int] = {}  # handles per core; a core leaves when its count drops to 0
_closing: dict[bytes, Core] = {}  # closed, but a call in flight keeps it: revivable
_names_of: dict[Core, str] = {}  # those cores' names (their ident goes with the mapping)
_reg_lock = threading.Lock()
_janitor_lock = threading.Lock()
# Names whose liveness test failed at our detach -> no other process was attached then.
_pending: dict[str, bool] = {}
_deferred: collections.deque[Core] = collections.deque()  # releases a finalizer could not do
_janitor: threading.Thread | None = None
_last_sweep = 0.0
SWEEP_INTERVAL = 1.0
# A creator takes the presence lock right after creating its temporary file (where there is
# no O_TMPFILE); a free temporary file younger than this may be a creator paused in between.
TEMP_GRACE = 10.0
# The lock kind of new eventfds; attachers follow the one recorded in the header.
LOCK_KINDS = {"robust": _core.MUTEX_ROBUST, "byte": _core.MUTEX_BYTE}
default_mutex = PLATFORM.mutex_kind


def name_of(core: Core) -> str:
    """The 22-character name (the encoded id) of an attached core."""
    return _names.encode(core.ident)


# -- creation -------------------------------------------------------------------------------


def create(initval: int, semaphore: bool, nonblocking: bool) -> Core:
    """Build and publish a new eventfd; on any failure leave no fd, mapping or name behind."""
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
        _core.init_page(fd, ident, semaphore, nonblocking, initval, default_mutex, carrier,
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
            inos.append(_sem_ino(name, kind))
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
        core = _new_core(name, fd, r, w, carrier)
    except BaseException:
        for x in (fd, r, w):
            if x >= 0:
                os.close(x)
        for made_name in reversed(made):
            _unlink(made_name)
        raise
    _register(core)
    return core


def _new_core(name: str, fd: int, r: int, w: int, carrier: int) -> Core:
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
    with _reg_lock:  # one core per (process, eventfd), even when threads attach at once
        existing = _registry.get(ident) or _revive(ident)
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
        core = _new_core(name, state_fd, rfd, wfd, header["carrier"])
        taken[0] = True
        try:
            _register_locked(core)
        except BaseException:
            core.close()  # (it closes the fds it owns)
            raise
        return core


def _sem_ino_or_missing(name: str, kind: str) -> int:
    try:
        return _sem_ino(name, kind)
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


def _revive(ident: bytes) -> Core | None:
    """A core whose last handle closed while a thread still waits in it: use it again.

    A second core would open a second private description, and classic ``fcntl`` locks
    belong to the process: closing either would drop the other's locks.  Called with
    ``_reg_lock`` held.
    """
    core = _closing.pop(ident, None)
    if core is None or not core.reopen():
        return None
    _names_of.pop(core, None)
    _register_locked(core)
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


# -- the per-process registry ---------------------------------------------------------------


def _register(core: Core) -> None:
    with _reg_lock:
        _register_locked(core)


def _register_locked(core: Core) -> None:
    core.on_free = _on_free
    _registry[core.ident] = core
    _by_fileno[core.fds[1]] = core
    _refs.setdefault(core, 0)


def retain(core: Core) -> None:
    """A new handle refers to ``core``."""
    with _reg_lock:
        _refs[core] += 1


def release(core: Core) -> None:
    """A handle let go of ``core`` (explicit close): detach when it was the last one."""
    with _reg_lock:
        if core not in _refs:  # detached already (interpreter exit)
            return
        _refs[core] -= 1
        if _refs[core] > 0:
            return
        name = _detach_locked(core)
    if name:
        _after_free(name, core.alone)


def release_from_finalizer(core: Core) -> None:
    """Like :func:`release`, from ``__del__``: never block on a lock this thread may hold.

    A finalizer can run at any bytecode, also while this very thread is inside a
    ``_reg_lock`` block (any allocation may start the cyclic GC); then the janitor does it.
    """
    if not _reg_lock.acquire(False):
        _deferred.append(core)
        _start_janitor()
        return
    try:
        name = None
        if core in _refs:  # (not detached already, at interpreter exit)
            _refs[core] -= 1
            name = _detach_locked(core) if _refs[core] <= 0 else None
    finally:
        _reg_lock.release()
    if name:
        _after_free(name, core.alone)


def _detach_locked(core: Core) -> str | None:
    """Unregister and close a core no handle refers to (``_reg_lock`` held).

    Returns its name if it was freed at once; else a thread of this process still waits in
    it, keeps waiting (as on Linux), and the last call out frees it and calls ``_on_free``.
    """
    ident = core.ident
    name = _names.encode(ident)
    del _refs[core]
    if _registry.get(ident) is core:
        del _registry[ident]
    fileno = core.fds[1]
    if _by_fileno.get(fileno) is core:
        del _by_fileno[fileno]
    _aio.wake_all(fileno)  # no asyncio registration may outlive the fd
    if core.close():
        return name
    _closing[ident] = core
    _names_of[core] = name
    return None


def _on_free(core: Core) -> None:
    """The last call in flight left a closed core and freed it (called by the C core)."""
    with _reg_lock:
        name = _names_of.pop(core, None)
        for ident, closing in list(_closing.items()):
            if closing is core:
                del _closing[ident]
    if name:
        _after_free(name, core.alone)


def _after_free(name: str, alone: bool) -> None:
    """Our fds of ``name`` are closed: remove its names if nobody holds any fd of it.

    If someone still does, the janitor retests while this process lives (a concurrent
    ``fork`` + ``exec`` holds copies for an instant).  If no other process was attached
    either (the holders are exec'd children that never called ``from_handle``, or a
    message nobody will receive), nobody would test after our exit: ``shutdown`` then
    leaves the name to a reaper process.
    """
    if F.ARMED:
        F.hit("detach.closed")
    if liveness_test(name):
        return
    _pending[name] = _pending.get(name, False) or alone
    _start_janitor()


def _spawn_reaper(name: str) -> None:
    """Start ``python -m mpeventfd reap NAME``: it outlives us, holding no fd of the eventfd."""
    try:
        subprocess.Popen(
            [sys.executable, "-m", "mpeventfd", "reap", "--", name], close_fds=True,
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
    except OSError:
        pass  # out of processes or fds: `cleanup`, or a later creation's sweep, removes it


def reap_when_free(name: str) -> bool:
    """Wait until no fd of ``name`` exists anywhere, then remove its names (the reaper).

    ``flock(LOCK_EX)`` on a fresh description returns exactly when the last shared lock,
    that is the last fd of the eventfd anywhere, is gone; none can appear after that.
    """
    path = _names.state_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        _unlink_secondary(name)
        return True
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            return False
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            named = os.stat(path)
        except FileNotFoundError:
            named = None
        if named is not None and (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino):
            _unlink_secondary(name)
            _unlink(path)
        return True
    finally:
        os.close(fd)


def by_fileno(fd: int) -> Core | None:
    """The live core whose ``fileno()`` is ``fd`` in this process, if any."""
    return _by_fileno.get(fd)


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
    for kind in "rw":
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
    with _reg_lock:
        attached = {_names.encode(i) for i in _registry} if skip_attached else set()
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
        try:
            _janitor.start()
        except RuntimeError:  # interpreter shutdown (3.12+): shutdown() retests itself
            _janitor = None
    finally:
        _janitor_lock.release()


def _janitor_loop() -> None:
    """Apply releases finalizers queued, and retest names we could not remove.

    A ``fork`` + ``exec`` in another thread holds copies of our fds for an instant, so a
    detach can see "in use" and nobody would test again.  The retest backs off from 10 ms
    to 1 s and ends when nothing is pending.
    """
    delay = 0.01
    while _pending or _deferred:
        _apply_deferred()
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
        _retest_pending()


def _apply_deferred() -> None:
    while _deferred:
        try:
            core = _deferred.popleft()
        except IndexError:
            return
        release(core)


def _retest_pending() -> None:
    """Run the liveness test again on every name a detach could not remove."""
    for name in list(_pending):
        try:
            if liveness_test(name):
                _pending.pop(name, None)
        except OSError:
            pass


def shutdown() -> None:
    """Interpreter exit (also a multiprocessing child's exit): detach everything, retest.

    Cores in which a thread still waits stay: their last call frees them, or the exit does.
    """
    _apply_deferred()
    with _reg_lock:
        names = [(core, _detach_locked(core)) for core in list(_registry.values())]
    for core, name in names:
        if name:
            _after_free(name, core.alone)
    _retest_pending()
    for name, alone in list(_pending.items()):
        if alone:  # held, and by nobody who will ever test: a reaper waits for them
            _spawn_reaper(name)
            _pending.pop(name, None)


# Fork.  Without the GIL another thread may be inside a container's operation at the fork,
# and the child would find that container's lock held for ever: the forking thread holds
# the registry lock across the fork, so that no registry container is being changed, and the
# child takes fresh containers instead of touching the ones other threads used.
_fork_held = False


def _before_fork() -> None:
    global _fork_held
    # (A timeout, not a wait: this very thread may hold it, in a finalizer's fork.)
    _fork_held = _reg_lock.acquire(timeout=5)
    for core in list(_registry.values()):
        core.prepare_fork()


def _after_fork_parent() -> None:
    global _fork_held
    for core in list(_registry.values()):
        core.after_fork_parent()
    if _fork_held:
        _fork_held = False
        _reg_lock.release()


def _after_fork_child() -> None:
    global _reg_lock, _janitor_lock, _janitor, _pending, _deferred, _closing, _names_of
    global _fork_held
    _reg_lock = threading.Lock()
    _fork_held = False
    _janitor_lock = threading.Lock()
    _janitor = None
    _pending = {}  # the parent retests its own names
    _deferred = collections.deque()
    _aio.reset_after_fork()
    # Closed cores kept only by another thread's call in flight (no such thread here): let
    # go of their copies now, or the child would pin the parent's names.
    closing, _closing, _names_of = _closing, {}, {}
    for core in closing.values():
        core.close()
    for core in list(_registry.values()):
        try:
            core.own()  # attached here too: a parent that detaches first must see us
        except OSError:
            pass  # (fileno() was replaced: the first call says so)


def _install_mp_finalizer(_: object) -> None:
    # A multiprocessing fork child clears the finalizers it inherited and leaves through
    # os._exit, skipping atexit; re-register so its exit detaches.
    from multiprocessing import util

    util.Finalize(None, shutdown, exitpriority=-100)


class _Anchor:
    """Something weakly referenceable for ``multiprocessing.util.register_after_fork``."""


_ANCHOR = _Anchor()
atexit.register(shutdown)
os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent,
                    after_in_child=_after_fork_child)


def _hook_multiprocessing() -> None:
    from multiprocessing import util

    util.register_after_fork(_ANCHOR, _install_mp_finalizer)


_hook_multiprocessing()
