"""The public :class:`EventFD` handle.

``read``, ``write``, ``peek`` and ``fileno`` are methods of its C base, ``_core.Handle``:
each is one C call, which is what makes them fast and what keeps a signal handler from
ever running inside a critical section.  Everything else is here.
"""

from __future__ import annotations

import errno
import os
from types import TracebackType
from typing import NoReturn

from . import _aio, _core, _create, _registry
from ._core import Core
from ._errors import closed_error, oserror
from ._probe import PLATFORM

EFD_SEMAPHORE: int = getattr(os, "EFD_SEMAPHORE", 1)
EFD_CLOEXEC: int = getattr(os, "EFD_CLOEXEC", os.O_CLOEXEC)
EFD_NONBLOCK: int = getattr(os, "EFD_NONBLOCK", os.O_NONBLOCK)
MAX_VALUE: int = _core.MAX_VALUE
_KNOWN_FLAGS = EFD_SEMAPHORE | EFD_CLOEXEC | EFD_NONBLOCK
assert EFD_SEMAPHORE & (EFD_CLOEXEC | EFD_NONBLOCK) == 0
assert EFD_CLOEXEC != EFD_NONBLOCK
_INITVAL_MAX = 2**32 - 1


class EventFD(_core.Handle):
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

    __slots__ = ("__weakref__", "_owner")
    _core: Core | None  # (a C-level attribute of Handle: the attached core, or None)
    # The lock kind of new eventfds (the platform's; a test may pick the other one).
    _mutex_kind: int = PLATFORM.mutex_kind

    def __init__(self, initval: int = 0, flags: int = EFD_CLOEXEC) -> None:
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
        core = _create.create(int(initval), bool(flags & EFD_SEMAPHORE),
                              bool(flags & EFD_NONBLOCK), self._mutex_kind)
        _registry.current().retain(core)
        self._core = core
        if not flags & EFD_CLOEXEC:
            self.set_inheritable(True)

    @classmethod
    def _from_core(cls, core: Core, owner: bool = True) -> EventFD:
        """A new handle on an attached core (``owner=False``: borrowed, never releases)."""
        self = cls.__new__(cls)
        self._owner = owner
        if owner:
            _registry.current().retain(core)
        self._core = core
        return self

    # -- asyncio ----------------------------------------------------------------------------

    async def aread(self) -> int:
        """``read()`` for an event loop: wait until readable without blocking the loop.

        Works under asyncio (uvloop included), trio, and anyio on either backend: the
        running library is asked (sniffio).  Consumes per the mode, like :meth:`read`;
        never blocks, whatever the blocking mode (once woken it may wait about 1 ms for the
        lock of a writer that is mid-transition, and backs off on the loop beyond that).
        Any number of tasks, in any number of processes, may wait on one eventfd; in
        semaphore mode each token goes to one task.  A cancelled call consumes nothing;
        closing the handle wakes its waiters with ``OSError(EBADF)``.

        Raises:
            OSError: ``EBADF`` if the handle is (or gets) closed.
        """
        return await _aio.aread(self._live)

    async def awrite(self, value: int = 1) -> None:
        """``write()`` for an event loop (asyncio, trio, anyio): never blocks the loop.

        A write that fits completes at once.  One that does not (the counter near
        ``MAX_VALUE``) retries with a back-off of up to 50 ms: a pipe read end cannot
        report room for writing (no POLLOUT), so there is nothing to wait on.  A cancelled
        call adds nothing.

        Raises:
            as :meth:`write`.
        """
        await _aio.awrite(self._live, value)

    # -- modes ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._core is None

    @property
    def semaphore(self) -> bool:
        """True for an ``EFD_SEMAPHORE`` eventfd (fixed at creation)."""
        return bool(self._live().semaphore)

    @property
    def flags(self) -> int:
        """The ``EFD_*`` bits now in force for this handle."""
        core = self._live()
        flags = EFD_SEMAPHORE if core.semaphore else 0
        if core.nonblocking:
            flags |= EFD_NONBLOCK
        if not os.get_inheritable(core.fds[1]):
            flags |= EFD_CLOEXEC
        return flags

    def get_blocking(self) -> bool:
        """The blocking mode, shared by every handle in every process (``O_NONBLOCK``)."""
        return not self._live().nonblocking

    def set_blocking(self, blocking: bool) -> None:
        """Set the blocking mode for every handle in every process, as ``F_SETFL`` does.

        A call already waiting keeps waiting: the mode is read when a call starts.
        """
        _check_flag("blocking", blocking)
        self._live().nonblocking = not blocking

    def get_inheritable(self) -> bool:
        """True if this process's fds of the eventfd survive ``exec``."""
        return os.get_inheritable(self._live().fds[1])

    def set_inheritable(self, inheritable: bool) -> None:
        """Set close-on-exec on every fd of the eventfd in this process (all or none)."""
        _check_flag("inheritable", inheritable)
        for fd in self._live().fds:
            os.set_inheritable(fd, inheritable)

    @property
    def fds(self) -> tuple[int, ...]:
        """The fds a child needs to re-attach: give them to ``Popen(pass_fds=...)``."""
        core = self._live()
        core.arm()  # the read end among them can be polled from now on
        fds: tuple[int, int, int] = core.fds
        return fds

    @property
    def handle(self) -> str:
        """A token that names :attr:`fds`; an exec'd child passes it to ``from_handle``."""
        core = self._live()
        core.arm()
        state_fd, rfd, wfd = core.fds
        return f"mpefd1:{_registry.name_of(core)}:{state_fd}:{rfd}:{wfd}"

    # -- life cycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Let go of the eventfd; idempotent.

        When the last fd of the eventfd anywhere is gone, its names are removed.  A thread
        of this process blocked in :meth:`read` or :meth:`write` keeps waiting until a write
        (or read) lets it proceed or its timeout expires, as on Linux.
        """
        core = self._detach()  # (one caller gets the core, whatever the threads)
        if core is not None and self._owner:
            _registry.current().release(core)

    def __del__(self) -> None:
        core = self._detach()
        if core is not None and getattr(self, "_owner", False):
            _registry.current().release_from_finalizer(core)

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
            names = [n for n, bit in _FLAG_NAMES if self.flags & bit]
            fileno: object = core.fds[1]
        except (OSError, ValueError):
            return "<mpeventfd.EventFD closed>"
        return (
            f"<mpeventfd.EventFD id={_registry.name_of(core)} counter={counter} "
            f"flags={'|'.join(names) or '0'} fileno={fileno}>"
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


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")


# No asyncio registration may outlive the fd it watches: a detach drops them first.
_registry.ON_DETACH.append(_aio.wake_all)
