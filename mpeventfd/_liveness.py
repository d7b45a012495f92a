"""Whether any fd of an eventfd exists anywhere, and the removal of its names once none does.

The kernel counts the references, as it does for a real eventfd (docs/design.md §9).  The
facts this module leans on, all from flock(2):

* A ``flock`` lock belongs to the open file description.  Every copy of an fd (``dup``,
  ``fork``, ``SCM_RIGHTS``, an fd kept across ``exec``) shares the description and so the
  lock, which the kernel drops when the last fd of the description closes, also when its
  process is killed (before it is reaped).
* The creator's description of the state file holds ``LOCK_SH`` for good (presence).  A
  fresh description of the same file gets ``LOCK_EX`` only while no fd of the creator's
  description exists anywhere; the holder's own lock counts too, seen from a fresh
  description in the same process.
* None can appear afterwards: fds of an eventfd are only ever copies of existing ones.

So one step, :func:`try_exclusive`, decides everything here: the liveness test after a
detach, the reaper's wait, the sweep.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator

import posix_ipc

from . import _faults as F
from . import _names
from ._probe import PLATFORM

# A creator takes the presence lock right after creating its temporary file (where there is
# no O_TMPFILE); a free temporary file younger than this may be a creator paused in between.
TEMP_GRACE = 10.0


def try_exclusive(path: str, *, wait: bool = False) -> int | None:
    """An fd of a fresh description of ``path`` holding ``LOCK_EX``, or ``None``.

    ``None``: some fd of the file exists elsewhere (or the file is not this user's).  With
    ``wait`` it blocks until the last such fd is gone.  ``FileNotFoundError`` if there is no
    file.  The caller removes what it must while holding the fd, then closes it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            os.close(fd)
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_if_unused(name: str) -> bool:
    """The liveness test: remove every name of ``name`` if no fd of it exists; True if gone."""
    try:
        fd = try_exclusive(_names.state_path(name))
    except FileNotFoundError:
        remove_secondary(name)
        return True
    if fd is None:
        return False
    try:
        if F.ARMED:
            F.hit("detach.unlinking")
        remove_secondary(name)
        unlink(_names.state_path(name))
        return True
    finally:
        os.close(fd)


def reap_when_free(name: str) -> bool:
    """Wait until no fd of ``name`` exists anywhere, then remove its names (the reaper)."""
    path = _names.state_path(name)
    try:
        st = os.stat(path)
        fd = try_exclusive(path, wait=True)
    except FileNotFoundError:
        remove_secondary(name)
        return True
    if fd is None:
        return False  # not this user's
    try:
        try:
            named = os.stat(path)
        except FileNotFoundError:
            named = None
        # (the name may have been removed, or even reused by a new eventfd, meanwhile)
        if named is not None and (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino):
            remove_secondary(name)
            unlink(path)
        return True
    finally:
        os.close(fd)


def spawn_reaper(names: Iterable[str]) -> None:
    """``python -m mpeventfd reap NAME...``: it outlives us, holding no fd of the eventfds,
    and removes each one's names when its last fd anywhere closes."""
    names = list(names)
    if not names:
        return
    try:
        subprocess.Popen(
            [sys.executable, "-m", "mpeventfd", "reap", "--", *names], close_fds=True,
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
    except OSError:
        pass  # out of processes or fds: `cleanup`, or a later creation's sweep, removes them


def remove_secondary(name: str) -> None:
    """The semaphores and the lock file: made after the state file, removed before it."""
    for kind in "rw":
        unlink(_names.sem_name(name, kind))
    unlink(_names.lock_path(name))


def unlink(name: str) -> None:
    """Remove one name (a path, or a semaphore's ``/mpefd-...`` name) if it is there."""
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


def sweep(skip: frozenset[str] = frozenset()) -> list[str]:
    """Remove every eventfd of this user that no fd refers to any more; return their names.

    Never removes anything in use: state files are judged only by the liveness test, and a
    semaphore or lock file counts as debris only when its state file is gone (it is created
    after the state file is published and removed before it).  ``skip``: names attached in
    this process, which are in use by definition.
    """
    removed = []
    for name, kind in sorted(set(entries())):
        if name in skip:
            continue
        if kind == "":
            if remove_if_unused(name):
                removed.append(name)
        elif kind == ".tmp":
            if _dead_temp(name):
                removed.append(name)
        elif not os.path.exists(_names.state_path(name)):
            remove_secondary(name)
            removed.append(name)
    return sorted(set(removed))


def _dead_temp(name: str) -> bool:
    path = _names.temp_path(name)
    try:
        if time.time() - os.stat(path).st_mtime < TEMP_GRACE:
            return False
        fd = try_exclusive(path)
    except FileNotFoundError:
        return False
    if fd is None:
        return False
    try:
        unlink(path)
        return True
    finally:
        os.close(fd)


def retest(name: str) -> bool:
    """The liveness test in a retest loop: an ``OSError`` (out of fds, say) means "not
    yet", and the loop tries again."""
    try:
        return remove_if_unused(name)
    except OSError:
        return False
