"""Replacing a self-pipe: a ``selectors`` event loop woken by mpeventfd instead of ``os.pipe``.

An event loop that sleeps in ``select()`` needs a way for other threads (or signal handlers,
or other processes) to wake it: the classic answer is the self-pipe, one byte written per
wake-up.  ``PipeLoop`` is that loop; ``EventFDLoop`` is the same loop, line for line, with
the pipe swapped for an EventFD.  Only the three marked lines differ.

What changes: a pipe holds one byte per wake-up, so a burst of wake-ups fills it (64 KiB on
Linux) and the next non-blocking write raises ``BlockingIOError`` (a blocking one would hang
the writer), and draining takes a read per 4 KiB.  An eventfd adds wake-ups to a counter: a
burst of 100,000 coalesces into a single select wake-up and a single ``read()``, and the
writer never blocks.  And since ``fileno()`` is readable exactly while the counter is above
zero, a drained loop is never woken again for nothing.

Run it with ``python examples/selectors_self_pipe.py``; it runs both loops on the same burst,
prints what each did, and exits 0.
"""

from __future__ import annotations

import os
import selectors
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from mpeventfd import EFD_NONBLOCK, EventFD

Callback = Callable[[], None]
BURST = 100_000


class Turn(NamedTuple):
    """What one ``run_once`` did."""

    events: int  # select wake-ups
    reads: int  # calls it took to drain the wake-up channel
    wakeups: int  # wake-ups drained (bytes for the pipe, the counter for the eventfd)
    callbacks: int  # callbacks run


class PipeLoop:
    """Before: a ``selectors`` loop woken through an ``os.pipe`` self-pipe."""

    def __init__(self) -> None:
        self._ready: deque[Callback] = deque()
        self._selector = selectors.DefaultSelector()
        self._r, self._w = os.pipe()  # <- the wake-up channel
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._selector.register(self._r, selectors.EVENT_READ)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Queue ``callback`` and wake the loop (from any thread)."""
        self._ready.append(callback)
        os.write(self._w, b"\0")  # <- wake: one byte per wake-up; BlockingIOError when full

    def run_once(self, timeout: float) -> Turn:
        """Wait for a wake-up (at most ``timeout`` s), drain it, run the queued callbacks."""
        events = self._selector.select(timeout)
        reads = wakeups = 0
        for _ in events:
            while True:  # <- drain: read until the pipe is empty, 4 KiB at a time
                try:
                    wakeups += len(os.read(self._r, 4096))
                except BlockingIOError:
                    break
                reads += 1
        return Turn(len(events), reads, wakeups, self._run_callbacks())

    def _run_callbacks(self) -> int:
        ran = 0
        while self._ready:
            self._ready.popleft()()
            ran += 1
        return ran

    def close(self) -> None:
        self._selector.close()
        os.close(self._r)
        os.close(self._w)


class EventFDLoop:
    """After: the same loop woken through an mpeventfd counter."""

    def __init__(self) -> None:
        self._ready: deque[Callback] = deque()
        self._selector = selectors.DefaultSelector()
        self._efd = EventFD(0, EFD_NONBLOCK)  # <- the wake-up channel
        self._selector.register(self._efd, selectors.EVENT_READ)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Queue ``callback`` and wake the loop (from any thread)."""
        self._ready.append(callback)
        self._efd.write(1)  # <- wake: adds 1 to a counter, never fills, never blocks

    def run_once(self, timeout: float) -> Turn:
        """Wait for a wake-up (at most ``timeout`` s), drain it, run the queued callbacks."""
        events = self._selector.select(timeout)
        reads = wakeups = 0
        for _ in events:
            try:  # <- drain: one read takes every wake-up since the last one
                wakeups += self._efd.read()
            except BlockingIOError:
                pass
            reads += 1
        return Turn(len(events), reads, wakeups, self._run_callbacks())

    def _run_callbacks(self) -> int:
        ran = 0
        while self._ready:
            self._ready.popleft()()
            ran += 1
        return ran

    def close(self) -> None:
        self._selector.close()
        self._efd.close()


def burst(loop: PipeLoop | EventFDLoop, n: int) -> int:
    """Wake ``loop`` ``n`` times before it gets to run; return how many wake-ups got through."""
    for i in range(n):
        try:
            loop.call_soon_threadsafe(lambda: None)
        except BlockingIOError:
            return i
    return n


def main() -> int:
    ok = True
    for name, loop in (("os.pipe", PipeLoop()), ("mpeventfd", EventFDLoop())):
        try:
            sent = burst(loop, BURST)
            turn = loop.run_once(timeout=1)
            idle = loop.run_once(timeout=0)  # drained: nothing may wake it now
        finally:
            loop.close()
        if sent == BURST:
            accepted = f"all {BURST:,} wake-ups accepted"
        else:
            accepted = (f"the pipe was full after {sent:,} wake-ups, and wake-up "
                        f"{sent + 1:,} raised BlockingIOError (its callback was queued anyway)")
        print(f"{name}: {accepted}; then {turn.events} select wake-up, {turn.reads} read(s) "
              f"to drain {turn.wakeups:,} wake-ups, and {turn.callbacks:,} callbacks ran")
        ok = ok and turn.events == 1 and idle.events == 0
        if isinstance(loop, EventFDLoop):
            ok = ok and sent == BURST and turn.reads == 1 and turn.wakeups == BURST
        else:
            ok = ok and sent < BURST and turn.wakeups == sent
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
