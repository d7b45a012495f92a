"""One eventfd as attached in one process: the critical sections of ``read``/``write``.

There is exactly one :class:`Core` per (process, eventfd); every handle of that eventfd in
the process shares it (lock-protocol S4).  It owns the travelling fds (the state fd, whose
open file description carries the presence ``flock``, and the notifier pipe's two ends), the
shared mapping, the private descriptor that carries this process's kernel byte locks, a
``threading.RLock`` in front of the mutex, and the semaphores.

The mutex is one of two backends, chosen by the creator and recorded in the header:

* **kernel** (SPEC §5.1): an OFD byte lock on the private descriptor (a classic ``fcntl``
  lock on a lock file where OFD locks do not exist); the kernel releases it when its holder
  dies.  Two system calls per critical section.
* **fast** (SPEC §5.8, the default): a third semaphore under the recoverable protocol of
  ``_fastmutex``.  No system call when uncontended.

Either way (SPEC §5):

* Lock nesting: the thread lock is taken first and released last; only its owner ever
  releases the mutex, in ``finally`` blocks that call C functions directly (design-review
  S2, S6).  A fork from a handler inside the section gives the child a new thread lock, so
  the interrupted frames in the child see that they are stale and release nothing (S4).
* Readiness ordering: the pipe byte is written *before* committing 0 → n and drained
  *after* committing n → 0, under a ``dirty`` mark; the next holder that finds ``dirty``
  repairs (``_waiters``).  A write to a counter already > 0 is one aligned store and needs
  no pipe operation.
* No wait while holding the mutex: waits happen on a semaphore, outside, in bounded steps.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable

import posix_ipc

from . import _faults as F
from . import _lock, _notifier, _reentry, _wake
from ._errors import StateError, closed_error, timeout_error, would_block
from ._fastmutex import FastMutex, forked_error
from ._probe import PLATFORM
from ._state import (
    BACKEND_FAST,
    MAX_VALUE,
    W_BACKEND,
    W_COUNTER,
    W_DIRTY,
    W_FLAGS,
    W_NONBLOCK,
    W_PIPE_DEV,
    W_PIPE_INO,
    W_SCRATCH,
    W_WR,
    W_WW,
    Mapping,
)
from ._waiters import CONSUMED, EXPIRED, FAILED, POLLED, READER, WRITER

# Bounded wait steps (SPEC §5.4: at most 250 ms on every platform).  The main thread blocks
# signals during a step, so its step also bounds the latency of Ctrl-C.  Writers wait in
# shorter steps: with writers of different sizes no exact wake rule exists (design-review W4).
STEP = 0.25
STEP_MAIN = 0.1
STEP_WRITER = 0.05
# How long a non-blocking call (timeout=0, or EFD_NONBLOCK) waits for the lock while another
# thread or process holds it.  Linux never fails a non-blocking call that could proceed, and
# a live holder keeps the lock for microseconds, but on a loaded machine a descheduled one
# (a preempted thread, a process waiting for its GIL) can keep it for tens of milliseconds.
# Only a stopped holder (SIGSTOP, a debugger) keeps it for a second; then the call raises
# BlockingIOError rather than hang.
MUTEX_GRACE = 1.0
DEFERRED_GRACE = 1.0  # the same, for a write deferred from a handler (it has no caller)
# How long a blocking normal-mode read watches the counter before it sleeps; never on a
# single CPU, where watching would only keep the writer from running.
SPIN_READ = 50e-6 if PLATFORM.cpus > 1 else 0.0

_TIMEOUT_MAX = threading.TIMEOUT_MAX
_fcntl = fcntl.fcntl
_monotonic = time.monotonic
_yield = os.sched_yield
_SETLK = _lock.SETLK
_SETLKW = _lock.SETLKW
_LOCK = _lock.LOCK
_UNLOCK = _lock.UNLOCK
_BusyError = posix_ipc.BusyError
_signal_ready = _notifier.signal_ready
_drain = _notifier.drain
_drain_own = _notifier.drain_own
_PIPE_PRIVATE = _lock.PIPE_PRIVATE
_os_read = os.read
_READ_SIZE = 64  # the pipe holds one byte; a full read means more (then drain them all)
_os_write = os.write
_BYTE = b"\x01"
_held = _reentry.held
_deferred = _reentry.deferred
_inside = _reentry.inside
_drain_deferred = _reentry.drain


READ = -1  # the ``value`` that asks Core.op for a read


def _nothing() -> None:
    return None


class Core(FastMutex):
    """The per-process attachment of one eventfd.  Built by ``_lifecycle`` only."""

    __slots__ = (
        "closing", "fast", "ident", "lock_ident", "lock_path", "map", "name", "on_idle",
        "refs", "spin", "state_fd", "trywait", "unlock",
    )

    def __init__(
        self,
        name: str,
        fds: tuple[int, int, int],
        mapping: Mapping,
        sems: tuple[posix_ipc.Semaphore, posix_ipc.Semaphore, posix_ipc.Semaphore | None],
        lock_path: str,
        lock_ident: tuple[int, int],
    ) -> None:
        self.name = name
        self.ident = mapping.ident()
        self.state_fd, self.rfd, self.wfd = fds
        self.map = mapping
        self.words = mapping.words
        self.sem_r, self.sem_w = sems[0], sems[1]
        self.lock_path, self.lock_ident = lock_path, lock_ident
        self.semaphore = bool(mapping.words[W_FLAGS] & 1)
        self.spin = bool(SPIN_READ) and not self.semaphore  # see _spin_for_counter
        self.private = -1
        self.tlock = threading.RLock()
        self.slot = -1
        self.refs = self.waiters = 0
        self.closing = self.released = self.fix_slot = self.taken = False
        self.abandoned: list[int] = []
        self.on_idle: Callable[[Core], None] | None = None
        self.seq8 = self.last_aside = 0
        self.first_fail = 0.0
        self.fast = mapping.words[W_BACKEND] == BACKEND_FAST and sems[2] is not None
        if self.fast:
            assert sems[2] is not None
            self.sem_m = sems[2]
            self.trywait = self.sem_m.acquire
            self.unlock: Callable[[], object] = self.sem_m.release
            self.lockword = -1  # claimed before the first semaphore operation
        else:
            self.unlock = _nothing  # replaced when the private descriptor opens
            self.lockword = W_SCRATCH

    # -- entering a critical section --------------------------------------------------------

    def until(self, timeout: float | None) -> float | None:
        """Encode a public ``timeout`` as a deadline.

        ``None`` waits for ever; ``-1.0`` never waits for the counter (non-blocking, either
        ``timeout=0`` or the shared blocking mode); otherwise a monotonic deadline.  The
        blocking mode is read once, at entry, as the kernel checks ``O_NONBLOCK`` on entry.
        """
        if timeout is None:
            return -1.0 if self.words[W_NONBLOCK] else None
        if timeout <= 0:
            return -1.0
        if timeout >= _TIMEOUT_MAX:
            return None  # an infinite timeout waits for ever, whatever the blocking mode
        return _monotonic() + timeout

    def _take_thread_lock(self, until: float | None, grace: float) -> threading.RLock:
        tl = self.tlock
        if until is None:
            tl.acquire()
        else:
            limit = _monotonic() + grace if until < 0 else until
            if not tl.acquire(True, max(0.0, limit - _monotonic())):
                raise _lock.busy_error(until < 0)
        return tl

    def _enter_kernel(self, until: float | None, grace: float) -> threading.RLock:
        """Thread lock, then the kernel byte lock; returns holding both or raises holding none.

        The caller releases exactly the thread lock returned (after a fork from inside the
        section, ``self.tlock`` is the child's new lock: design-review S4).
        """
        tl = self.tlock
        try:
            tl = self._take_thread_lock(until, grace)
            if self.released:
                raise closed_error()
            pd = self.private
            if pd < 0:
                pd = self._open_private()
            if until is None:
                _fcntl(pd, _SETLKW, _LOCK)
            else:
                try:
                    _lock.lock_until(pd, _monotonic() + grace if until < 0 else until)
                except _lock.Busy:
                    raise _lock.busy_error(until < 0) from None
            return tl
        except BaseException:
            # Only the owner of the thread lock can hold this process's byte lock, so
            # unlocking here is harmless even if the lock call itself was interrupted.
            if tl._is_owned():  # type: ignore[attr-defined]
                try:
                    if self.private >= 0:
                        _fcntl(self.private, _SETLK, _UNLOCK)
                finally:
                    tl.release()
            raise

    def _open_private(self) -> int:
        return self.adopt_private(
            _lock.open_private(self.rfd, self.lock_path, self.lock_ident,
                               (self.words[W_PIPE_DEV], self.words[W_PIPE_INO]))
        )

    def adopt_private(self, pd: int) -> int:
        """Use ``pd`` as this process's private descriptor (kernel byte locks live on it)."""
        self.private = pd
        if not self.fast:
            self.unlock = _lock.unlocker(pd)
        return pd

    # -- the operations ---------------------------------------------------------------------

    def op(self, value: int, until: float | None, grace: float = MUTEX_GRACE,
           body: Callable[[memoryview], None] | None = None) -> int:
        """Write ``value`` (already validated, ``>= 0``) or read (``value == READ``).

        Returns what a read consumed (0 for a write).  A call that cannot proceed registers
        as a waiter, leaves the section, waits one bounded step (``until`` allows it), and
        enters again.  With ``body``, the section only repairs and runs ``body`` (the slow
        paths' bookkeeping, see :meth:`_locked`).

        One function for both operations keeps a single copy of the section's entry and
        exit.  It is written for the uncontended call, whose cost is mostly the interpreter
        (SPEC §7 P1, P2): the mutex entry is inlined, and everything only a waiting call
        needs is computed when it waits.
        """
        held = _held
        armed = F.ARMED  # tests arm the hook before the call: one global lookup, not ten
        waited = 0  # registered as a waiter: how its last wait step ended (FAILED: unknown)
        change = 0  # what this call committed, taken back if it raises
        if value < 0 and self.spin and (until is None or until > 0):
            try:
                if not self.words[W_COUNTER]:
                    self._spin_for_counter(until)
            except ValueError:
                if not self.released:
                    raise  # a handler's, not a mapping released under us
                # closed under us by another thread: the section says EBADF
        try:
            while True:
                held[0] += 1
                try:
                    tl = self.tlock
                    if self.fast:
                        # The thread lock, then the mutex semaphore (lock-protocol §4); holding
                        # both, or raising holding neither.  The caller releases exactly the
                        # thread lock taken: after a fork from inside the section, self.tlock
                        # is the child's new lock (design-review S4).
                        try:
                            if until is None:
                                tl.acquire()
                            else:
                                tl = self._take_thread_lock(until, grace)
                            lw = self.lockword
                            if lw < 0:
                                lw = self._claim_fast(until, grace)  # EBADF once released
                            # Only now: a fork from a handler above gave the child a new
                            # view (the old one raises) and a new thread lock (checked below).
                            w = self.words
                            # ENTERING at the next seq, before any semaphore operation (I1);
                            # ``entering + 255`` is IDLE at the seq after it.
                            entering = self.seq8 + 257
                            w[lw] = entering
                            try:
                                if armed:
                                    F.hit("mutex.entering")
                                if tl is not self.tlock:
                                    raise forked_error()  # a frame a fork copied (S4)
                            except BaseException:
                                w[lw] = self.seq8 = entering + 255  # IDLE
                                raise
                            trywait = self.trywait  # (calling a local is cheaper than
                            try:                    # calling a slot's method)
                                # Nothing here but the trywait can raise, so an exception
                                # that is not posix_ipc's came after a successful take
                                # (_wake.taken_then_raised).
                                trywait(0)
                            except _BusyError:
                                try:
                                    seq = self._acquire_slow(w, lw, entering >> 8, until,
                                                             grace, tl)
                                except BaseException:
                                    # Interrupted before _acquire_slow could clean up (a
                                    # handler at its first line): still ENTERING without
                                    # the token.  Inline stores only.
                                    word = w[lw]
                                    if word & 0xFF == 1:
                                        w[lw] = self.seq8 = ((word >> 8) + 1) << 8
                                    raise
                                entering = (seq << 8) | 1
                            except BaseException as e:
                                if _wake.taken_then_raised(e):
                                    self.sem_m.release()
                                w[lw] = self.seq8 = entering + 255  # IDLE
                                raise
                        except BaseException:
                            if tl._is_owned():  # type: ignore[attr-defined]
                                tl.release()
                            raise
                        # No call from the trywait to the next ``try``: nothing can raise
                        # in between (handlers run only at calls and backward jumps).
                        self.seq8 = idle = entering + 255  # stored after the release post
                    else:
                        tl = self._enter_kernel(until, grace)
                        w = self.words
                        lw, idle = self.lockword, 0
                    try:
                        if self.fix_slot:
                            self._settle_claim(w)
                        if armed:
                            F.hit("mutex.taken")
                        if w[W_DIRTY]:
                            self._repair(w)
                        if body is not None:
                            body(w)
                            return 0
                        if armed:
                            F.hit("read.locked" if value < 0 else "write.locked")
                        if waited:
                            cls = READER if value < 0 else WRITER
                            self._unregister(w, cls, waited)
                            kind, waited = waited, 0  # unregistered: stores only, no call
                            self._after_wait(w, cls, kind)
                            if armed:
                                F.hit("wait.accounted")
                        c = w[W_COUNTER]
                        if value >= 0:
                            if value <= MAX_VALUE - c:
                                if c or not value:
                                    w[W_COUNTER] = c + value
                                    change = value
                                    if armed:
                                        F.hit("write.commit")
                                    if w[W_WR]:
                                        self._restore(w)
                                else:
                                    # 0 -> n: the pipe byte goes in before the commit (§5.3).
                                    w[W_DIRTY] = 1
                                    if armed:
                                        F.hit("write.dirty")
                                    try:  # the pipe byte (a full pipe is already readable)
                                        _os_write(self.wfd, _BYTE)
                                    except BlockingIOError:
                                        pass
                                    if armed:
                                        F.hit("write.pipe")
                                    w[W_COUNTER] = value
                                    change = value
                                    if armed:
                                        F.hit("write.commit")
                                    if w[W_WR]:
                                        self._restore(w)
                                    w[W_DIRTY] = 0
                                if armed:
                                    F.hit("write.posted")
                                    F.hit("write.before_unlock")
                                return 0
                            if c > MAX_VALUE:
                                raise StateError(f"counter {c} exceeds MAX_VALUE")
                        elif c:
                            if c > MAX_VALUE:
                                raise StateError(f"counter {c} exceeds MAX_VALUE")
                            if self.semaphore and c > 1:
                                w[W_COUNTER] = c - 1
                                change = -1
                                if armed:
                                    F.hit("read.commit")
                                if w[W_WW]:
                                    self._restore_writers(w)
                                if w[W_WR]:
                                    self._restore(w)
                            else:
                                # n -> 0: drain only after the commit (SPEC §5.3).
                                w[W_DIRTY] = 1
                                if armed:
                                    F.hit("read.dirty")
                                w[W_COUNTER] = 0
                                change = -1 if self.semaphore else -c
                                if armed:
                                    F.hit("read.commit")
                                if _PIPE_PRIVATE:
                                    # The private descriptor is our own non-blocking
                                    # description of the pipe (_lock): a plain read empties
                                    # the usual single byte and can never block.
                                    try:
                                        if len(_os_read(self.private, _READ_SIZE)) == _READ_SIZE:
                                            _drain_own(self.private)  # more: all
                                    except BlockingIOError:
                                        pass
                                else:
                                    _drain(self.rfd)
                                if armed:
                                    F.hit("read.drained")
                                if w[W_WW]:
                                    self._restore_writers(w)
                                w[W_DIRTY] = 0
                            if armed:
                                F.hit("read.posted")
                                F.hit("read.before_unlock")
                            return -change
                        if until is not None and (until < 0 or _monotonic() >= until):
                            raise would_block() if until < 0 else timeout_error()
                        cls = READER if value < 0 else WRITER
                        self._register(w, cls)
                        waited = FAILED
                        # The only waiting reader of a normal-mode eventfd waits on the pipe
                        # itself: one poll, no signal masking, no post to consume.  Several
                        # waiters (and every semaphore-mode one) use the semaphore, which
                        # wakes only those that can proceed (SPEC §5.4, §7 P4).
                        lone = cls == READER and not self.semaphore and w[W_WR] == 1
                        if armed:
                            F.hit("wait.registered")
                    except BaseException:
                        # An exception inside the section (a handler's, at any bytecode)
                        # leaves it whole: repair what it left dirty before unlocking.
                        if w[W_DIRTY]:
                            self._repair(w)
                        raise
                    finally:
                        try:
                            # Not in a child that a fork copied this frame into (S4): the
                            # mutex and the slot word are the parent's.
                            if tl is self.tlock:
                                try:
                                    unlock = self.unlock
                                    unlock()
                                finally:
                                    try:
                                        if armed:
                                            F.hit("mutex.posted")
                                    finally:
                                        w[lw] = idle
                        finally:
                            tl.release()
                finally:
                    held[0] -= 1
                    if _deferred and not _inside():
                        _drain_deferred()
                waited = self._wait(cls, until, lone)
        except BaseException:
            if waited:
                self._abandon(READER if value < 0 else WRITER)
            if change and tl is self.tlock:  # (not in a child a fork copied us into)
                self._undo(-change)  # the call raises: it must not have changed anything
            raise
        finally:
            if self.closing and body is None:
                self._idle()
            if armed and body is None:
                F.hit("read.unlocked" if value < 0 else "write.unlocked")

    def peek(self) -> int:
        """The committed counter: one aligned 8-byte load, no lock needed."""
        try:
            c = self.words[W_COUNTER]
        except ValueError:  # the view was released: closed under us
            raise closed_error() from None
        if c > MAX_VALUE:
            raise StateError(f"counter {c} exceeds MAX_VALUE")
        return int(c)

    def get_nonblocking(self) -> bool:
        return bool(self.words[W_NONBLOCK])

    def set_nonblocking(self, nonblocking: bool) -> None:
        # One aligned store, visible to every handle in every process (SPEC §2).
        self.words[W_NONBLOCK] = int(nonblocking)

    # -- waiting ----------------------------------------------------------------------------

    def _spin_for_counter(self, until: float | None) -> None:
        """Before a blocking read registers and sleeps, watch the counter for a moment.

        An answer often arrives within microseconds (a ping-pong partner, a producer in a
        burst); seeing it with a lock-free load avoids the registration, the sleep and the
        wake-up.  Semaphore-mode readers do not spin: they sleep at once so that only the
        readers that can proceed ever run (SPEC §7 P4).
        """
        words = self.words
        if words[W_COUNTER]:
            return
        end = _monotonic() + SPIN_READ
        if until is not None and until < end:
            end = until
        while not words[W_COUNTER] and _monotonic() < end:
            _yield()  # let a writer that shares our CPU run

    def _wait(self, cls: int, until: float | None, lone: bool) -> int:
        """One bounded wait step outside the lock; CONSUMED, POLLED or EXPIRED."""
        if cls == WRITER:
            sem, step = self.sem_w, STEP_WRITER
        else:
            sem = self.sem_r
            step = STEP_MAIN if threading.current_thread() is threading.main_thread() else STEP
        if until is not None:
            step = min(step, max(0.0, until - _monotonic()))
        if F.ARMED:
            F.hit("wait.step")
        if lone:
            if not _notifier.wait_readable(self.rfd, step):
                return EXPIRED
            if F.ARMED:
                F.hit("wait.polled")
            return POLLED
        if _wake.wait_step(sem, step):
            if F.ARMED:
                F.hit("wait.consumed")
            return CONSUMED
        return EXPIRED

    def _abandon(self, cls: int) -> None:
        """Account a registration whose wait ended by an exception (its outcome unknown)."""
        self.abandoned.append(cls)
        self._locked(self._settle_abandoned)

    def _undo(self, delta: int) -> None:
        """Take back a committed operation whose call raised (a handler's exception came
        after the commit): ``-value`` for a write, ``+value`` for a read.

        SPEC §2: a call that raises has consumed or added nothing.  Done under the mutex as
        an ordinary update, so it is exact unless other processes acted in between and
        left no room for it (a read of the written value, or a counter near MAX_VALUE);
        then the operation stays applied.
        """
        def undo(w: memoryview) -> None:
            c = w[W_COUNTER]
            new = c + delta
            if new < 0 or new > MAX_VALUE:
                return
            w[W_DIRTY] = 1
            if not c:
                _signal_ready(self.wfd)  # 0 -> n: the byte first
            w[W_COUNTER] = new
            if not new:
                self._drain_pipe()  # n -> 0: the byte after
            self._restore(w)
            if delta < 0:
                self._restore_writers(w)
            w[W_DIRTY] = 0

        self._locked(undo)

    def _locked(self, body: Callable[[memoryview], None]) -> None:
        """Run ``body`` in a critical section, waiting for the mutex (the slow paths)."""
        self.op(0, None, MUTEX_GRACE, body)

    # -- life cycle hooks -------------------------------------------------------------------

    def _idle(self) -> None:
        """Called after an operation on a closing core; the last waiter out releases it."""
        callback = self.on_idle
        if callback is not None:
            callback(self)

    def after_fork_child(self) -> None:
        """Fork child: drop everything per-process; re-attach lazily on first use (M2, S4).

        The new thread lock is also the generation mark: frames of an operation the fork
        interrupted hold the old one, see it differ, and release nothing.
        """
        if self.private >= 0:
            try:
                # Closing a copy never releases the parent's locks (its copy stays open).
                os.close(self.private)
            except OSError:
                pass
            self.private = -1
        self.tlock = threading.RLock()
        if not self.released:
            self.map.renew()
            self.words = self.map.words
        self.slot = -1
        self.waiters = 0
        self.abandoned = []
        self.first_fail = 0.0
        self.fix_slot = False
        if self.fast:
            self.lockword = -1
        else:
            self.unlock = _nothing


__all__ = ["DEFERRED_GRACE", "MUTEX_GRACE", "READ", "Core"]
