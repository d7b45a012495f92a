"""Names this process could not remove at its detach, tested again until they go.

A detach's liveness test fails while some fd of the eventfd exists elsewhere.  Each such
*pending* name ends with something that will certainly test it again:

* while this process lives, a janitor thread retests it on a schedule of its own, 5 ms at
  first and doubling up to 1 s (a fork + exec in another thread holds copies of our fds for
  an instant; a peer that died is gone from the kernel's lock tables a few milliseconds
  after its death woke us);
* at exit, :meth:`Janitor.stop` first ends the thread's work, so that nothing of it is cut
  off half-done (daemon threads are frozen, not finished, when the interpreter exits: one
  stopped between unlinking a name's semaphores and its state file left the rest behind);
  then :meth:`Janitor.finish` retests once more and, for a name whose liveness a death
  may still be holding (this process's core repaired after a peer died inside the lock, or
  no other process was attached), waits out the dying peer for up to ``EXIT_PATIENCE``
  without the GIL (``time.sleep``) or any lock of ours; what is left then goes to a reaper
  process (:func:`_liveness.spawn_reaper`), which outlives us;
* a name other attached processes still hold is theirs to test at their own detach.

The janitor also applies releases that a finalizer could not make itself (it never blocks
on the registry's lock: see ``_registry``).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import _liveness

FIRST_RETEST = 0.005
LAST_RETEST = 1.0
EXIT_PATIENCE = 1.0
STOP_PATIENCE = 5.0  # for the thread's step in progress: a retest, or a release under the lock


@dataclass
class Pending:
    """A name whose liveness test failed, and when to test it next."""

    due: float
    interval: float
    alone: bool  # no other attached process was left at our detach
    saw_death: bool  # our core repaired after a peer died: that peer may still be exiting


class Janitor:
    """The pending names of one process, and the thread that retests them."""

    def __init__(self, apply_release: Callable[[object], None]) -> None:
        # Re-entrant: a finalizer may run inside this very thread's locked block.
        self.cond = threading.Condition(threading.RLock())
        self.pending: dict[str, Pending] = {}
        self.deferred: collections.deque[object] = collections.deque()
        self.thread: threading.Thread | None = None
        self.stopped = False  # the exit took over: no thread any more
        self.finished = False  # the exit's own pass is over: a name added later is alone
        self.apply_release = apply_release

    def add(self, name: str, alone: bool, saw_death: bool) -> None:
        """``name`` stays: retest it from soon on, on its own schedule."""
        with self.cond:
            self.pending[name] = Pending(time.monotonic() + FIRST_RETEST, FIRST_RETEST,
                                         alone, saw_death)
            self._wake()
            late = self.finished
        if late:  # a handle closed after the exit's own pass: see it through now
            self.finish()

    def defer(self, core: object) -> None:
        """A release that a finalizer could not make: the janitor makes it."""
        self.deferred.append(core)  # (thread-safe; the lock below may be ours already)
        with self.cond:
            self._wake()

    def _wake(self) -> None:
        """Wake the thread, or start one (the lock is held: a thread that is ending has
        already let go of ``self.thread``, under this same lock, so none is ever missed)."""
        self.cond.notify()
        if self.thread is not None or self.stopped:
            return
        thread = threading.Thread(target=self._run, name="mpeventfd-janitor", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutdown (3.12+): finish() does it instead
            return
        self.thread = thread

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.deferred or self.stopped:
                    if not self.pending or self.stopped:
                        self.thread = None  # (decided under the lock: see _wake, stop)
                        self.cond.notify_all()
                        return
                    wait = min(p.due for p in self.pending.values()) - time.monotonic()
                    if wait <= 0:
                        break
                    self.cond.wait(wait)
                now = time.monotonic()
                due = [name for name, p in self.pending.items() if p.due <= now]
            self.apply_deferred()
            for name in due:
                if self._stopping():
                    break
                gone = _liveness.retest(name)
                with self.cond:
                    p = self.pending.get(name)
                    if p is None:
                        continue
                    if gone:
                        del self.pending[name]
                    else:
                        p.interval = min(p.interval * 2, LAST_RETEST)
                        p.due = time.monotonic() + p.interval

    def _stopping(self) -> bool:
        return self.stopped  # (set by stop() in another thread at any moment)

    def apply_deferred(self) -> None:
        while True:
            try:
                core = self.deferred.popleft()
            except IndexError:
                return
            self.apply_release(core)

    def stop(self) -> None:
        """At exit, before :meth:`finish`: let the thread end the step it is in (a release
        or a removal cut off half-done leaves names behind), and start no other."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
            deadline = time.monotonic() + STOP_PATIENCE
            while self.thread is not None and self.thread is not threading.current_thread():
                left = deadline - time.monotonic()
                if left <= 0:
                    break  # (stuck on the registry's lock: finish() goes on regardless)
                self.cond.wait(left)

    def finish(self) -> None:
        """At exit: retest every pending name; wait out dying peers; a reaper for the rest.

        The exit's pass gathers all its names first and calls this once, so that its names
        share one wait of at most ``EXIT_PATIENCE`` and one reaper.  Each call takes the
        names it sees out of ``pending``, so that a later call (a handle closed after the
        pass) handles only its own."""
        self.apply_deferred()
        with self.cond:
            self.finished = True
            names, self.pending = self.pending, {}
        names = {n: p for n, p in names.items() if not _liveness.retest(n)}
        reap = [n for n, p in names.items() if p.alone and not p.saw_death]
        waiting = [n for n, p in names.items() if p.saw_death]
        deadline = time.monotonic() + EXIT_PATIENCE
        delay = 0.001
        while waiting and time.monotonic() < deadline:
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.05)
            waiting = [n for n in waiting if not _liveness.retest(n)]
        _liveness.spawn_reaper(reap + waiting)
