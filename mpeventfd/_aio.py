"""asyncio integration: ``aread``/``awrite`` built on ``loop.add_reader``.

``loop.add_reader`` keeps one callback per fd and loop, and a second registration replaces the
first; so every task waiting on one eventfd in one loop shares a single registration and a
single future (as anyio's ``wait_readable`` does).  Each task awaits it through
``asyncio.shield``: cancelling one task never cancels the others, and the reader is removed
as soon as the fd is readable.  Consuming always happens in a non-blocking ``read()`` after
the wake, never inside an ``await``, so a cancelled call consumes nothing.
"""

from __future__ import annotations

import asyncio
import threading

_REGISTERED: dict[tuple[int, int], _Readable] = {}
# Re-entrant: a finalizer that the GC runs inside a guarded block of this thread closes a
# handle, which drops its registrations (wake_all) under the same guard.
_guard = threading.RLock()


class _Readable:
    """One ``add_reader`` registration shared by every task waiting on ``fd`` in ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        self.waiters = 0
        self.future: asyncio.Future[None] = loop.create_future()
        # Retrieve the outcome even when every waiter was cancelled: no warning then.
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        loop.add_reader(fd, self.fire)

    def fire(self) -> None:
        """Readable (or told to re-check): drop the registration and wake every waiter."""
        self.drop()
        if not self.future.done():
            self.future.set_result(None)

    def drop(self) -> None:
        """Forget the registration; it must never outlive the fd (its number gets reused)."""
        with _guard:
            if _REGISTERED.get((id(self.loop), self.fd)) is self:
                del _REGISTERED[(id(self.loop), self.fd)]
        if not self.loop.is_closed():
            self.loop.remove_reader(self.fd)


async def wait_readable(fd: int) -> None:
    """Wait until ``fd`` is readable (or a close asks every waiter to re-check)."""
    loop = asyncio.get_running_loop()
    key = (id(loop), fd)
    with _guard:
        reg = _REGISTERED.get(key)
        if reg is None:
            reg = _REGISTERED[key] = _Readable(loop, fd)
        reg.waiters += 1
    try:
        await asyncio.shield(reg.future)
    finally:
        reg.waiters -= 1
        if not reg.waiters and not reg.future.done():
            reg.drop()  # the last waiter was cancelled: no registration without a waiter


def reset_after_fork() -> None:
    """Fork child: event loops do not survive a fork, nor may a lock held by a parent thread."""
    global _guard
    _guard = threading.RLock()
    _REGISTERED.clear()


def wake_all(fd: int) -> None:
    """A handle is closing, or ``fd`` is about to close: every waiter on it wakes and
    re-checks its handle, and no registration survives the fd.

    In the loop's own thread the registration goes at once, before the fd can close and its
    number be reused; another thread's loop is asked to drop it at its next iteration; a
    closed loop's registration is simply forgotten.
    """
    with _guard:
        regs = [r for (_, f), r in _REGISTERED.items() if f == fd]
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for reg in regs:
        if reg.loop.is_closed():
            reg.drop()
        elif running is reg.loop:
            reg.fire()
        else:
            reg.loop.call_soon_threadsafe(reg.fire)
