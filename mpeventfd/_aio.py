"""``aread()``/``awrite()`` on the event loop that runs them: asyncio (and uvloop), trio, and
anyio on either backend, chosen by the running library as sniffio reports it (sniffio comes
with trio and anyio; without it, asyncio).

One wait loop serves every library: wait until ``fileno()`` is readable, then read without
blocking; consuming happens only in that read, never inside an ``await``, so a cancelled
call consumes nothing.  What differs is how to wait for readability:

* asyncio: ``loop.add_reader`` keeps one callback per fd and loop, and a second registration
  replaces the first; so every task waiting on one eventfd in one loop shares a single
  registration, and each waiting task has one plain future of its own.  The registration
  outlives a wake-up (a steady ``while True: await efd.aread()`` costs no
  ``add_reader``/``remove_reader`` per call); it goes when it fires with nobody waiting,
  when its last waiter is cancelled, and before the fd closes (its number would be reused).
* trio: ``wait_readable`` allows one waiting task per fd (a second one gets
  ``BusyResourceError``), so one task waits and the others park in a ``ParkingLot`` until it
  wakes them; a cancelled waiter hands the wait on.  An fd that a trio task waits on must be
  announced with ``notify_closing`` before it closes, or the task sleeps on a dead fd.

A 0 -> n write puts its pipe byte in before its commit, and the wake-up often preempts the
writer right there: a woken call goes straight to the read, which sleeps on the writer's
lock for about 1 ms (``Core.try_read``), and beyond that backs off on the loop instead of
polling a readable pipe (a writer stopped in its section would make it spin).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from ._core import Core

# Back-offs on the loop, in seconds.
READ_RETRY_FIRST = 0.0005  # the lock stayed busy after try_read's wait: retry this soon,
READ_RETRY_MAX = 0.02  # doubling up to this (the holder is stopped, or starved of CPU)
WRITE_RETRY_FIRST = 0.0005  # no room (the counter near MAX_VALUE) or a busy lock: a pipe
WRITE_RETRY_MAX = 0.05  # cannot report room for writing, so there is nothing to wait on
ARM_RETRY = 0.02  # arming found the lock's holder stopped: try again after this


def _library() -> str:
    """"asyncio" or "trio" (anyio runs on one of them and tells sniffio which)."""
    try:
        import sniffio
    except ImportError:
        return "asyncio"
    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return "asyncio"  # (asyncio.get_running_loop() below says it if none runs)


async def aread(live: Callable[[], Core]) -> int:
    """Wait until readable, then read: the body of ``EventFD.aread``."""
    if _library() == "trio":
        import trio

        sleep: Callable[[float], Awaitable[Any]] = trio.sleep
        readable: Callable[[int], tuple[Awaitable[Any], Callable[[], None]]] = _trio_readable
    else:
        sleep, readable = asyncio.sleep, _asyncio_readable
    delay, woken = READ_RETRY_FIRST, False
    while True:
        core = live()
        try:
            core.arm()  # (it waits for readability; one load once armed)
        except BlockingIOError:  # the lock's holder is stopped: do not block the loop
            await sleep(ARM_RETRY)
            continue
        if not woken and not core.peek():
            wait, on_cancel = readable(core.fds[1])
            try:
                await wait
            except BaseException:  # cancelled, or the coroutine closed (GeneratorExit)
                on_cancel()
                raise
            woken = True
            continue
        woken = False
        try:
            got: int = core.try_read()
        except BlockingIOError:  # 0 under the lock: another reader was first
            continue
        if got:
            return got
        await sleep(delay)  # the lock stayed busy: try_read now tries once at a time
        delay = min(delay * 2, READ_RETRY_MAX)


async def awrite(live: Callable[[], Core], value: int) -> None:
    """Write without blocking the loop: the body of ``EventFD.awrite``."""
    if _library() == "trio":
        import trio

        sleep: Callable[[float], Awaitable[Any]] = trio.sleep
    else:
        sleep = asyncio.sleep
    delay = WRITE_RETRY_FIRST
    while True:
        try:
            if live().try_write(value):
                return
        except BlockingIOError:
            pass
        await sleep(delay)
        delay = min(delay * 2, WRITE_RETRY_MAX)


# -- asyncio ------------------------------------------------------------------------------------

_REGISTERED: dict[tuple[int, int], _Readable] = {}
# Re-entrant: a finalizer that the GC runs inside a guarded block of this thread closes a
# handle, which drops its registrations (wake_all) under the same guard.
_guard = threading.RLock()


class _Readable:
    """One ``add_reader`` registration shared by every task waiting on ``fd`` in ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        self.waiters: list[asyncio.Future[None]] = []
        self.idle = 0
        loop.add_reader(fd, self.fire)

    def fire(self) -> None:
        """Readable (or told to re-check): wake every waiter.

        A selector loop polls again before the woken tasks run and read, so one call with
        nobody waiting is expected; a second one in a row means nobody will read: unregister.
        """
        waiters, self.waiters = self.waiters, []
        woke = False
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
                woke = True
        self.idle = 0 if woke else self.idle + 1
        if self.idle >= 2:
            self.drop()

    def drop(self) -> None:
        """Forget the registration; it must never outlive the fd (its number gets reused).

        Only the live registration removes the loop's reader: one dropped already (a close
        woke its waiters) may be dropped again by a waiter's cancellation, after the fd's
        number has gone to a new eventfd whose own registration holds the reader."""
        key = (id(self.loop), self.fd)
        with _guard:
            live = _REGISTERED.get(key) is self
            if live:
                del _REGISTERED[key]
        if live and not self.loop.is_closed():
            self.loop.remove_reader(self.fd)


def _asyncio_readable(fd: int) -> tuple[Awaitable[Any], Callable[[], None]]:
    """A future of the running loop that resolves when ``fd`` is readable (or a close asks
    every waiter to re-check), and what to do if its await ends otherwise.  (A future, not
    a coroutine: a coroutine frame per wait is measurable on the wake-up path.)"""
    loop = asyncio.get_running_loop()
    key = (id(loop), fd)
    with _guard:
        reg = _REGISTERED.get(key)
        if reg is None or reg.loop is not loop:  # (an id a closed loop had, reused)
            reg = _REGISTERED[key] = _Readable(loop, fd)
        fut: asyncio.Future[None] = loop.create_future()
        reg.waiters.append(fut)

    def cancelled() -> None:  # no registration stays without a waiter
        with _guard:
            if fut in reg.waiters:
                reg.waiters.remove(fut)
            idle = not reg.waiters
        if idle:
            reg.drop()

    return fut, cancelled


def _fire_and_drop(reg: _Readable) -> None:
    reg.fire()
    reg.drop()


# -- trio ---------------------------------------------------------------------------------------

_WATCHES: dict[tuple[int, int], _TrioWatch] = {}


class _TrioWatch:
    """The one ``wait_readable`` of a trio run on ``fd``, and the tasks parked behind it."""

    def __init__(self, fd: int) -> None:
        import trio

        self.fd = fd
        self.token = trio.lowlevel.current_trio_token()
        self.thread = threading.get_ident()
        self.lot = trio.lowlevel.ParkingLot()
        self.leading = False
        self.closed = False

    async def wait(self) -> None:
        import trio

        if self.closed:
            return  # (the caller finds the handle closed)
        if self.leading:
            await self.lot.park()
            return
        self.leading = True
        try:
            await trio.lowlevel.wait_readable(self.fd)
        except trio.ClosedResourceError:
            pass  # notify_closing: the handle is closing (the caller finds EBADF)
        finally:
            self.leading = False
            self.lot.unpark_all()  # (a cancelled waiter hands the wait on)
            with _guard:
                if not self.lot and _WATCHES.get(self._key()) is self:
                    del _WATCHES[self._key()]

    def _key(self) -> tuple[int, int]:
        return (id(self.token), self.fd)

    def close(self) -> None:
        """The fd is about to close: wake every task, in the run's own thread."""
        import trio

        self.closed = True
        trio.lowlevel.notify_closing(self.fd)
        self.lot.unpark_all()


def _trio_readable(fd: int) -> tuple[Awaitable[Any], Callable[[], None]]:
    import trio

    key = (id(trio.lowlevel.current_trio_token()), fd)
    with _guard:
        watch = _WATCHES.get(key)
        if watch is None or watch.closed:
            watch = _WATCHES[key] = _TrioWatch(fd)
    return watch.wait(), _nothing


def _nothing() -> None:
    """(A trio wait tidies up after itself, cancelled or not.)"""


# -- a handle closes, a process forks -----------------------------------------------------------


def wake_all(fd: int) -> None:
    """A handle is closing, or ``fd`` is about to close: every waiter on it wakes and
    re-checks its handle, and no registration survives the fd.

    In the loop's (or trio run's) own thread the registration goes at once, before the fd
    can close and its number be reused; another thread's loop is asked to drop it at its
    next iteration; a closed loop's registration is simply forgotten.
    """
    with _guard:
        regs = [r for (_, f), r in _REGISTERED.items() if f == fd]
        watches = [w for (_, f), w in _WATCHES.items() if f == fd]
        for w in watches:
            del _WATCHES[w._key()]
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for reg in regs:
        if reg.loop.is_closed():
            reg.drop()
        elif running is reg.loop:
            _fire_and_drop(reg)
        else:
            reg.loop.call_soon_threadsafe(_fire_and_drop, reg)
    for w in watches:
        if w.thread == threading.get_ident():
            w.close()
        else:
            try:
                w.token.run_sync_soon(w.close)
            except RuntimeError:  # (that run has ended)
                pass


def reset_after_fork() -> None:
    """Fork child: event loops do not survive a fork, nor may a lock held by a parent thread
    (without the GIL, nor the dict's own: fresh ones, rather than clearing the old)."""
    global _guard, _REGISTERED, _WATCHES
    _guard = threading.RLock()
    _REGISTERED = {}
    _WATCHES = {}


os.register_at_fork(after_in_child=reset_after_fork)
