"""The public :class:`EventFD` handle."""

from __future__ import annotations

import asyncio
import errno
import math
import operator
import os
from types import TracebackType
from typing import NoReturn

from . import _aio, _lifecycle, _lock, _reentry
from ._core import DEFERRED_GRACE, READ, Core
from ._errors import closed_error, oserror
from ._state import MAX_VALUE, W_NONBLOCK

EFD_SEMAPHORE: int = getattr(os, "EFD_SEMAPHORE", 1)
EFD_CLOEXEC: int = getattr(os, "EFD_CLOEXEC", os.O_CLOEXEC)
EFD_NONBLOCK: int = getattr(os, "EFD_NONBLOCK", os.O_NONBLOCK)
_KNOWN_FLAGS = EFD_SEMAPHORE | EFD_CLOEXEC | EFD_NONBLOCK
assert EFD_SEMAPHORE & (EFD_CLOEXEC | EFD_NONBLOCK) == 0
assert EFD_CLOEXEC != EFD_NONBLOCK
_INITVAL_MAX = 2**32 - 1
_WRITE_LIMIT = 2**64  # values >= this overflow a u64
_held = _reentry.held
_inside = _reentry.inside


class EventFD:
    """A Linux eventfd that works across processes on any POSIX system.

    The object holds a 64-bit counter shared with every process the eventfd reaches (fork,
    multiprocessing, ``send_eventfd``, ``from_handle``).  ``write(v)`` adds ``v``;
    ``read()`` returns the counter and resets it to zero, or, in semaphore mode
    (``EFD_SEMAPHORE``), returns 1 and decrements it.  ``fileno()`` is readable exactly while
    the counter is above zero, for ``select``, ``poll``, ``epoll``, ``selectors`` and asyncio.

    Args:
        initval: initial counter, ``0 <= initval <= 2**32 - 1`` as for ``os.eventfd``.
        flags: ``EFD_CLOEXEC`` (default: no fd of it survives ``exec``), ``EFD_NONBLOCK``
            (``read``/``write`` raise ``BlockingIOError`` instead of waiting, for every
            handle in every process), ``EFD_SEMAPHORE``.

    Raises:
        TypeError: ``initval`` or ``flags`` is not an int.
        ValueError: ``initval`` is negative.
        OverflowError: ``initval`` is above ``2**32 - 1``.
        OSError: ``EINVAL`` for unknown flag bits; ``EMFILE``, ``ENFILE``, ``ENOSPC``
            when the system runs out, with nothing left behind.
    """

    __slots__ = ("__weakref__", "_core", "_owner")

    def __init__(self, initval: int = 0, flags: int = EFD_CLOEXEC) -> None:
        self._core: Core | None = None
        self._owner = True
        if not isinstance(initval, int):
            raise TypeError(f"initval must be an int, not {type(initval).__name__}")
        if not isinstance(flags, int):
            raise TypeError(f"flags must be an int, not {type(flags).__name__}")
        if initval < 0:
            raise ValueError("initval must be >= 0")
        if initval > _INITVAL_MAX:
            raise OverflowError("initval must be <= 2**32 - 1")
        if flags & ~_KNOWN_FLAGS:
            raise oserror(errno.EINVAL, f"unknown eventfd flags {flags:#x}")
        core = _lifecycle.create(
            int(initval), bool(flags & EFD_SEMAPHORE), bool(flags & EFD_NONBLOCK)
        )
        _lifecycle.retain(core)
        self._core = core
        if not flags & EFD_CLOEXEC:
            self.set_inheritable(True)

    @classmethod
    def _from_core(cls, core: Core, owner: bool = True) -> EventFD:
        """A new handle on an attached core (``owner=False``: borrowed, never releases)."""
        self = cls.__new__(cls)
        self._core = None
        self._owner = owner
        if owner:
            _lifecycle.retain(core)
        self._core = core
        return self

    # -- counter operations -----------------------------------------------------------------

    def read(self, timeout: float | None = None) -> int:
        """Read the counter: all of it (resetting it to 0), or 1 in semaphore mode.

        Args:
            timeout: ``None`` follows the blocking mode; ``0`` never waits; ``> 0`` waits at
                most that many seconds (monotonic), for the counter and for the mutex.

        Returns:
            The value read, ``1 <= value <= MAX_VALUE``.

        Raises:
            BlockingIOError: the counter is 0 and the call may not wait.
            TimeoutError: the timeout expired; nothing was consumed.
            OSError: ``EBADF`` if the handle is closed.
            RuntimeError: called from a signal handler or finalizer while the same thread is
                inside an eventfd operation (it could never return).
        """
        core = self._core
        if core is None:
            raise closed_error()
        if timeout is not None:
            _check_timeout(timeout)
        if _held[0] and _inside():
            _reentrant_read()
        try:
            if timeout is None:
                until = -1.0 if core.words[W_NONBLOCK] else None
            else:
                until = core.until(timeout)
        except ValueError:  # the mapping was released: another thread closed it just now
            raise closed_error() from None
        return core.op(READ, until)

    def write(self, value: int = 1, timeout: float | None = None) -> None:
        """Add ``value`` to the counter.

        A write that would take the counter past ``MAX_VALUE`` waits for room (or raises in
        non-blocking mode); there is never a partial add.  ``write(0)`` always succeeds.
        Called from a signal handler or finalizer while the same thread is inside an
        operation, the write is deferred and applied as that operation releases its lock.

        Args:
            value: ``0 <= value <= MAX_VALUE``; ``bool`` is accepted, as by
                ``os.eventfd_write``.
            timeout: as for :meth:`read`.

        Raises:
            TypeError: ``value`` is not an int.
            ValueError: ``value`` is negative.
            OverflowError: ``value >= 2**64``.
            OSError: ``EINVAL`` for ``value == 2**64 - 1`` (checked before room, as on
                Linux); ``EBADF`` if closed.
            BlockingIOError: no room and the call may not wait.
            TimeoutError: no room before the timeout; nothing was added.
        """
        core = self._core
        if core is None:
            raise closed_error()
        if type(value) is not int:  # (bool and int subclasses: _as_value)
            value = _as_value(value)
        if not 0 <= value <= MAX_VALUE:
            _bad_value(value)
        if timeout is not None:
            _check_timeout(timeout)
        if _held[0] and _inside():
            _reentry.defer(self._apply_deferred, value)
            return
        try:
            if timeout is None:
                until = -1.0 if core.words[W_NONBLOCK] else None
            else:
                until = core.until(timeout)
        except ValueError:  # the mapping was released: another thread closed it just now
            raise closed_error() from None
        core.op(value, until)

    def _apply_deferred(self, value: int) -> None:
        # A deferred write has no caller left to wait for room, so it does not wait for it;
        # but it waits for a mutex another process holds, like any write, or it would be
        # lost whenever the handler happened to fire under contention.
        core = self._core
        if core is None:
            raise closed_error()
        core.op(value, -1.0, DEFERRED_GRACE)

    async def aread(self) -> int:
        """``read()`` for asyncio: wait until readable without blocking the event loop.

        Consumes per the mode, like :meth:`read`; never blocks, whatever the blocking mode.
        Several tasks (and several processes, each with its own loop) may wait on one
        eventfd.  A cancelled call consumes nothing; closing the handle wakes its waiters
        with ``OSError(EBADF)``.

        Raises:
            OSError: ``EBADF`` if the handle is (or gets) closed.
        """
        delay = 0.0005
        while True:
            core = self._live()
            if not core.peek():
                # Nothing to read: wait first.  (A lock-free look: a write that lands just
                # after it has written the pipe byte already, so the wait returns at once.)
                await _aio.wait_readable(core.rfd)
                core = self._live()
            try:
                return core.op(READ, -1.0, grace=0.0)
            except _lock.MutexBusy:
                # Another process holds the mutex (live holders keep it for microseconds):
                # retry without blocking the loop (design-review M1).
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
                continue
            except BlockingIOError:
                pass
            await _aio.wait_readable(core.rfd)

    async def awrite(self, value: int = 1) -> None:
        """``write()`` for asyncio: never blocks the event loop.

        A write that fits completes at once.  One that does not (the counter near
        ``MAX_VALUE``) retries with a back-off of up to 50 ms: a pipe read end cannot
        report room for writing (no POLLOUT), so there is nothing to wait on.

        Raises:
            as :meth:`write`.
        """
        if type(value) is not int:  # (bool and int subclasses: _as_value)
            value = _as_value(value)
        if not 0 <= value <= MAX_VALUE:
            _bad_value(value)
        delay = 0.0005
        while True:
            try:
                self._live().op(value, -1.0, grace=0.0)
                return
            except BlockingIOError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)

    def peek(self) -> int:
        """Return the counter without consuming anything (like fdinfo's ``eventfd-count``)."""
        return self._live().peek()

    def fileno(self) -> int:
        """The notifier pipe's read end: readable exactly while the counter is > 0.

        It is a pipe, not an eventfd: it never reports ``POLLOUT``, and reading it directly
        bypasses the counter.  Use :meth:`read` to consume.
        """
        return self._live().rfd

    # -- modes ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._core is None

    @property
    def semaphore(self) -> bool:
        """True for an ``EFD_SEMAPHORE`` eventfd (fixed at creation)."""
        return self._live().semaphore

    @property
    def flags(self) -> int:
        """The ``EFD_*`` bits now in force for this handle."""
        core = self._live()
        flags = EFD_SEMAPHORE if core.semaphore else 0
        if core.get_nonblocking():
            flags |= EFD_NONBLOCK
        if not os.get_inheritable(core.rfd):
            flags |= EFD_CLOEXEC
        return flags

    def get_blocking(self) -> bool:
        """The blocking mode, shared by every handle in every process (``O_NONBLOCK``)."""
        return not self._live().get_nonblocking()

    def set_blocking(self, blocking: bool) -> None:
        """Set the blocking mode for every handle in every process, as ``F_SETFL`` does.

        A call already waiting keeps waiting: the mode is read when a call starts.
        """
        _check_flag("blocking", blocking)
        self._live().set_nonblocking(not blocking)

    def get_inheritable(self) -> bool:
        """True if this process's fds of the eventfd survive ``exec``."""
        return os.get_inheritable(self._live().rfd)

    def set_inheritable(self, inheritable: bool) -> None:
        """Set close-on-exec on every fd of the eventfd in this process (all or none)."""
        _check_flag("inheritable", inheritable)
        for fd in self.fds:
            os.set_inheritable(fd, inheritable)

    @property
    def fds(self) -> tuple[int, ...]:
        """The fds a child needs to re-attach: give them to ``Popen(pass_fds=...)``."""
        core = self._live()
        return (core.state_fd, core.rfd, core.wfd)

    @property
    def handle(self) -> str:
        """A token that names :attr:`fds`; an exec'd child passes it to ``from_handle``."""
        core = self._live()
        return f"mpefd1:{core.name}:{core.state_fd}:{core.rfd}:{core.wfd}"

    # -- life cycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Let go of the eventfd; idempotent.

        When the last fd of the eventfd anywhere is gone, its names are removed.  A thread
        of this process blocked in :meth:`read` or :meth:`write` keeps waiting until a write
        (or read) lets it proceed or its timeout expires, as on Linux.
        """
        core = self._core
        if core is None:
            return
        self._core = None
        if not self._owner:
            return
        _aio.wake_all(core.rfd)  # asyncio waiters re-check and see the handle closed
        if _inside():
            # Inside a critical section of this thread (a handler or finalizer): release
            # when the section ends, never under it (design-review S3f).
            _reentry.defer(lambda _: _lifecycle.release(core), 0)
            return
        _lifecycle.release(core)

    def __del__(self) -> None:
        core = self._core
        if core is not None and self._owner:
            self._core = None
            _lifecycle.release_from_finalizer(core)

    def __enter__(self) -> EventFD:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        core = self._core
        if core is None:
            return "<mpeventfd.EventFD closed>"
        try:
            counter: object = core.peek()
        except (OSError, ValueError):
            counter = "?"
        names = [n for n, bit in _FLAG_NAMES if self.flags & bit]
        return (
            f"<mpeventfd.EventFD id={core.name} counter={counter} "
            f"flags={'|'.join(names) or '0'} fileno={core.rfd}>"
        )

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "an EventFD cannot be pickled with plain pickle: hand it to multiprocessing "
            "(Process arguments, Queue, Pipe, Pool), send it over a Unix socket with "
            "mpeventfd.send_eventfd(), or give an exec'd child efd.handle with "
            "pass_fds=efd.fds"
        )

    def _live(self) -> Core:
        core = self._core
        if core is None:
            raise closed_error()
        return core


_FLAG_NAMES = (
    ("EFD_SEMAPHORE", EFD_SEMAPHORE),
    ("EFD_NONBLOCK", EFD_NONBLOCK),
    ("EFD_CLOEXEC", EFD_CLOEXEC),
)


def _as_value(value: object) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"value must be an int, not {type(value).__name__}") from None


def _bad_value(value: int) -> NoReturn:
    if value < 0:
        raise ValueError("value must be >= 0")
    if value >= _WRITE_LIMIT:
        raise OverflowError("value must be < 2**64")
    # 2**64 - 1 is the kernel's overflow marker; write(2) refuses it before the room check.
    raise oserror(errno.EINVAL, "2**64 - 1 cannot be written")


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")


def _check_timeout(timeout: object) -> None:
    if not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError("timeout must be a non-negative number or None")


def _reentrant_read() -> NoReturn:
    raise RuntimeError(
        "read() from a signal handler or finalizer while this thread is inside an eventfd "
        "operation would deadlock; use write(), which is deferred, instead"
    )
