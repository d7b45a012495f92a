"""One eventfd as attached in one process: critical sections, wake-ups and repair.

There is exactly one :class:`Core` per (process, eventfd); every handle of that eventfd in
the process shares it (lock-protocol S4).  It owns:

* the travelling fds: the state fd (whose open file description carries the presence
  ``flock``), and the two ends of the notifier pipe;
* the shared mapping of the state file;
* the private descriptor that carries the mutex byte and this process's liveness byte;
* a ``threading.RLock`` in front of the mutex (kernel byte locks do not exclude threads of
  one process), and the two wake-up semaphores.

Critical sections follow SPEC §5:

* Lock nesting: the thread lock is taken first and released last, and the mutex is only ever
  unlocked by the thread that owns the thread lock, with direct C calls in ``finally``
  (design-review S2, S6).
* Readiness ordering: the pipe byte is written *before* committing 0 → n and drained *after*
  committing n → 0, under a ``dirty`` mark; the next holder that finds ``dirty`` repairs.
* The wake rule of design-review §2.7: at the end of every critical section, post until the
  posts not yet accounted (``P_r``) cover the readers that can proceed; after a read that
  made room, post every registered writer.  A waiter accounts after every wait step; on a
  timeout it absorbs a surplus post, on an exception it assumes it consumed one.
* No wait while holding the mutex: waits happen on a semaphore, outside, in bounded steps.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable

import posix_ipc

from . import _faults as F
from . import _lock, _notifier, _reentry, _wake
from ._errors import StateError, closed_error, oserror, timeout_error, would_block
from ._state import (
    MAX_VALUE,
    NSLOTS,
    S_PID,
    S_WR,
    W_COUNTER,
    W_DIRTY,
    W_EPOCH,
    W_FLAGS,
    W_HWM,
    W_NONBLOCK,
    W_PR,
    W_PW,
    W_WR,
    W_WW,
    Mapping,
    slot_word,
)

# Bounded wait steps (SPEC §5.4: at most 250 ms on every platform).  The main thread blocks
# signals during a step, so its step also bounds the latency of Ctrl-C.  Writers wait in
# shorter steps: with writers of different sizes no exact wake rule exists (design-review W4).
STEP = 0.25
STEP_MAIN = 0.1
STEP_WRITER = 0.05
# How long a non-blocking call waits for a mutex that another process holds.  Live holders
# keep it for microseconds; only a stopped or badly descheduled one exceeds this.
MUTEX_GRACE = 1.0

READER, WRITER = 0, 1
CONSUMED, EXPIRED, FAILED = 1, 2, 3

_fcntl = fcntl.fcntl
_monotonic = time.monotonic
_SETLK = _lock.SETLK
_SETLKW = _lock.SETLKW
_LOCK = _lock.LOCK
_UNLOCK = _lock.UNLOCK
_signal_ready = _notifier.signal_ready
_drain = _notifier.drain
_held = _reentry.held
_deferred = _reentry.deferred
_inside = _reentry.inside
_drain_deferred = _reentry.drain


class Core:
    """The per-process attachment of one eventfd.  Built by ``_lifecycle`` only."""

    __slots__ = (
        "abandoned",
        "closing",
        "ident",
        "lock_ident",
        "lock_path",
        "map",
        "name",
        "on_idle",
        "private",
        "refs",
        "released",
        "rfd",
        "sem_r",
        "sem_w",
        "semaphore",
        "slot",
        "state_fd",
        "tlock",
        "waiters",
        "wfd",
        "words",
    )

    def __init__(
        self,
        name: str,
        state_fd: int,
        rfd: int,
        wfd: int,
        mapping: Mapping,
        sem_r: posix_ipc.Semaphore,
        sem_w: posix_ipc.Semaphore,
        lock_path: str,
        lock_ident: tuple[int, int],
    ) -> None:
        self.name = name
        self.ident = mapping.ident()
        self.state_fd, self.rfd, self.wfd = state_fd, rfd, wfd
        self.map = mapping
        self.words = mapping.words
        self.sem_r, self.sem_w = sem_r, sem_w
        self.lock_path, self.lock_ident = lock_path, lock_ident
        self.semaphore = bool(mapping.words[W_FLAGS] & 1)
        self.private = -1
        self.tlock = threading.RLock()
        self.slot = -1
        self.refs = 0
        self.waiters = 0
        self.closing = False
        self.released = False
        self.abandoned: list[int] = []
        self.on_idle: Callable[[Core], None] | None = None

    # -- entering and leaving a critical section -------------------------------------------

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
        return _monotonic() + timeout

    def _enter(self, until: float | None, grace: float) -> threading.RLock:
        """Take the thread lock, then the mutex; return the thread lock, or raise holding none.

        The caller stores the returned lock and releases exactly that one: after a fork from
        inside the section, ``self.tlock`` is the child's new lock (design-review S4).
        """
        tl = self.tlock
        try:
            if until is None:
                tl.acquire()
                if self.released:
                    raise closed_error()
                pd = self.private
                if pd < 0:
                    pd = self._open_private()
                _fcntl(pd, _SETLKW, _LOCK)
                return tl
            limit = _monotonic() + grace if until < 0 else until
            if not tl.acquire(True, max(0.0, limit - _monotonic())):
                raise _lock.busy_error(until < 0)
            if self.released:
                raise closed_error()
            pd = self.private
            if pd < 0:
                pd = self._open_private()
            try:
                _lock.lock_until(pd, limit)
            except _lock.Busy:
                raise _lock.busy_error(until < 0) from None
            return tl
        except BaseException:
            # Only the owner of the thread lock can hold this process's mutex, so unlocking
            # it here is harmless even if the lock call itself was interrupted.
            if tl._is_owned():  # type: ignore[attr-defined]
                try:
                    if self.private >= 0:
                        _fcntl(self.private, _SETLK, _UNLOCK)
                finally:
                    tl.release()
            raise

    def _open_private(self) -> int:
        self.private = _lock.open_private(self.state_fd, self.lock_path, self.lock_ident)
        return self.private

    # -- the operations ---------------------------------------------------------------------

    def write(self, value: int, until: float | None, grace: float = MUTEX_GRACE) -> None:
        """Add ``value`` (already validated), waiting for room as ``until`` allows."""
        held = _held
        registered = False
        kind = 0
        try:
            while True:
                held[0] += 1
                try:
                    tl = self._enter(until, grace)
                    try:
                        w = self.words
                        if w[W_DIRTY]:
                            self._repair(w)
                        if F.ARMED:
                            F.hit("write.locked")
                        if registered:
                            self._account(w, WRITER, kind)
                            registered = False
                        c = w[W_COUNTER]
                        if value <= MAX_VALUE - c:
                            if c or not value:
                                w[W_COUNTER] = c + value
                                if F.ARMED:
                                    F.hit("write.commit")
                                if w[W_WR]:
                                    self._restore(w)
                            else:
                                # 0 -> n: the pipe byte goes in before the commit (SPEC §5.3).
                                w[W_DIRTY] = 1
                                if F.ARMED:
                                    F.hit("write.dirty")
                                _signal_ready(self.wfd)
                                if F.ARMED:
                                    F.hit("write.pipe")
                                w[W_COUNTER] = value
                                if F.ARMED:
                                    F.hit("write.commit")
                                if w[W_WR]:
                                    self._restore(w)
                                w[W_DIRTY] = 0
                            if F.ARMED:
                                F.hit("write.posted")
                                F.hit("write.before_unlock")
                            return
                        if until is not None and (until < 0 or _monotonic() >= until):
                            raise would_block() if until < 0 else timeout_error()
                        self._register(w, WRITER)
                        registered = True
                    finally:
                        try:
                            _fcntl(self.private, _SETLK, _UNLOCK)
                        finally:
                            tl.release()
                finally:
                    held[0] -= 1
                    if _deferred and not _inside():
                        _drain_deferred()
                kind = self._wait(WRITER, until)
        except BaseException:
            if registered:
                self._abandon(WRITER)
            raise
        finally:
            if self.closing:
                self._idle()
            if F.ARMED:
                F.hit("write.unlocked")

    def read(self, until: float | None, grace: float = MUTEX_GRACE) -> int:
        """Consume per the mode, waiting for a counter > 0 as ``until`` allows."""
        held = _held
        registered = False
        kind = 0
        try:
            while True:
                held[0] += 1
                try:
                    tl = self._enter(until, grace)
                    try:
                        w = self.words
                        if w[W_DIRTY]:
                            self._repair(w)
                        if F.ARMED:
                            F.hit("read.locked")
                        if registered:
                            self._account(w, READER, kind)
                            registered = False
                        c = w[W_COUNTER]
                        if c:
                            if c > MAX_VALUE:
                                raise StateError(f"counter {c} exceeds MAX_VALUE")
                            if self.semaphore and c > 1:
                                got = 1
                                w[W_COUNTER] = c - 1
                                if F.ARMED:
                                    F.hit("read.commit")
                                if w[W_WW]:
                                    self._restore_writers(w)
                                if w[W_WR]:
                                    self._restore(w)
                            else:
                                # n -> 0: drain only after the commit (SPEC §5.3).
                                got = 1 if self.semaphore else c
                                w[W_DIRTY] = 1
                                if F.ARMED:
                                    F.hit("read.dirty")
                                w[W_COUNTER] = 0
                                if F.ARMED:
                                    F.hit("read.commit")
                                _drain(self.rfd)
                                if F.ARMED:
                                    F.hit("read.drained")
                                if w[W_WW]:
                                    self._restore_writers(w)
                                w[W_DIRTY] = 0
                            if F.ARMED:
                                F.hit("read.posted")
                                F.hit("read.before_unlock")
                            return got
                        if until is not None and (until < 0 or _monotonic() >= until):
                            raise would_block() if until < 0 else timeout_error()
                        self._register(w, READER)
                        registered = True
                    finally:
                        try:
                            _fcntl(self.private, _SETLK, _UNLOCK)
                        finally:
                            tl.release()
                finally:
                    held[0] -= 1
                    if _deferred and not _inside():
                        _drain_deferred()
                kind = self._wait(READER, until)
        except BaseException:
            if registered:
                self._abandon(READER)
            raise
        finally:
            if self.closing:
                self._idle()
            if F.ARMED:
                F.hit("read.unlocked")

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

    def _wait(self, cls: int, until: float | None) -> int:
        """One bounded wait step outside the lock; returns CONSUMED or EXPIRED."""
        if cls == WRITER:
            sem, step = self.sem_w, STEP_WRITER
        else:
            sem = self.sem_r
            step = STEP_MAIN if threading.current_thread() is threading.main_thread() else STEP
        if until is not None:
            step = min(step, max(0.0, until - _monotonic()))
        if F.ARMED:
            F.hit("wait.step")
        if _wake.wait_step(sem, step):
            if F.ARMED:
                F.hit("wait.consumed")
            return CONSUMED
        return EXPIRED

    def _register(self, w: memoryview, cls: int) -> None:
        """Register the calling thread as a waiter of class ``cls`` (under the mutex)."""
        if self.abandoned:
            self._settle_abandoned(w)
        if self.slot < 0:
            self._claim_slot(w)
        # No call between these stores: a signal handler cannot split them, and a SIGKILL
        # leaves ``dirty`` for the repair, which recounts W from the slots.
        count = W_WR + 2 * cls
        mine = slot_word(self.slot, S_WR + cls)
        w[W_DIRTY] = 1
        w[count] += 1
        w[mine] += 1
        w[W_DIRTY] = 0
        self.waiters += 1
        if F.ARMED:
            F.hit("wait.registered")

    def _account(self, w: memoryview, cls: int, kind: int) -> None:
        """Undo a registration after a wait step (under the mutex)."""
        count = W_WR + 2 * cls
        posts = count + 1
        mine = slot_word(self.slot, S_WR + cls)
        w[W_DIRTY] = 1
        if w[count]:
            w[count] -= 1
        if w[mine]:
            w[mine] -= 1
        if kind == EXPIRED:
            # A post issued for us may have arrived as the step ended: absorb a surplus so
            # strays cannot pile up (design-review W2).
            if w[posts] > w[count] and _wake.try_take(self.sem_w if cls else self.sem_r):
                w[posts] -= 1
        elif w[posts]:
            # Consumed, or unknown (an exception): assume consumed (design-review W1).
            w[posts] -= 1
        if kind == EXPIRED:
            self._correct_dead(w)
        w[W_DIRTY] = 0
        self.waiters -= 1
        if kind != CONSUMED:
            self._restore(w)
            self._restore_writers(w)
        if self.abandoned:
            self._settle_abandoned(w)
        if F.ARMED:
            F.hit("wait.accounted")

    def _abandon(self, cls: int) -> None:
        """Account a registration whose wait ended by an exception (its outcome unknown)."""
        self.abandoned.append(cls)
        _held[0] += 1
        try:
            tl = self._enter(None, MUTEX_GRACE)
            try:
                w = self.words
                if w[W_DIRTY]:
                    self._repair(w)
                self._settle_abandoned(w)
            finally:
                try:
                    _fcntl(self.private, _SETLK, _UNLOCK)
                finally:
                    tl.release()
        finally:
            _held[0] -= 1
            if _deferred and not _inside():
                _drain_deferred()

    def _settle_abandoned(self, w: memoryview) -> None:
        # Entries are appended before the accounting is attempted, so a second exception
        # during it leaves the entry here for the next critical section of this process.
        while self.abandoned:
            cls = self.abandoned.pop()
            self._account(w, cls, FAILED)

    # -- posting ----------------------------------------------------------------------------

    def _restore(self, w: memoryview) -> None:
        """Post until pending posts cover the readers that can proceed (post, then account)."""
        c = w[W_COUNTER]
        if not c:
            return
        waiting = w[W_WR]
        want = (c if c < waiting else waiting) if self.semaphore else (1 if waiting else 0)
        pending = w[W_PR]
        while pending < want:
            if not _wake.post(self.sem_r):
                return
            pending += 1
            w[W_PR] = pending

    def _restore_writers(self, w: memoryview) -> None:
        """Room appeared: wake every registered writer; each re-checks its own size."""
        waiting = w[W_WW]
        pending = w[W_PW]
        while pending < waiting:
            if not _wake.post(self.sem_w):
                return
            pending += 1
            w[W_PW] = pending

    # -- slots, dead waiters and repair -----------------------------------------------------

    def _claim_slot(self, w: memoryview) -> None:
        """Claim a slot: lock its liveness byte first, then correct what a dead owner left."""
        pd = self.private
        hwm = min(w[W_HWM], NSLOTS)
        for i in range(NSLOTS):
            base = slot_word(i, S_PID)
            if i < hwm and w[base] and _lock.slot_alive(pd, i):
                continue
            if not _lock.claim_liveness(pd, i):
                continue
            w[W_DIRTY] = 1
            self._forget_slot(w, i)
            w[base] = os.getpid()
            if i >= hwm:
                w[W_HWM] = i + 1
            w[W_DIRTY] = 0
            self.slot = i
            if F.ARMED:
                F.hit("attach.slot")
            return
        raise oserror(errno.EUSERS, f"more than {NSLOTS} processes wait on this eventfd")

    def _forget_slot(self, w: memoryview, i: int) -> None:
        """Remove a dead slot's registrations, assuming each consumed a post (W5)."""
        base = slot_word(i, S_PID)
        for cls in (READER, WRITER):
            n = w[base + S_WR + cls]
            if n:
                count = W_WR + 2 * cls
                w[count] -= min(w[count], n)
                w[count + 1] -= min(w[count + 1], n)
                w[base + S_WR + cls] = 0
        w[base] = 0

    def _correct_dead(self, w: memoryview) -> None:
        """Drop the registrations of processes whose liveness byte the kernel released.

        The caller has set ``dirty``: a death halfway leaves the recount to the repair.
        """
        pd = self.private
        for i in range(min(w[W_HWM], NSLOTS)):
            if i == self.slot:
                continue
            base = slot_word(i, S_PID)
            if w[base] and (w[base + S_WR] or w[base + S_WR + 1]) and not _lock.slot_alive(pd, i):
                self._forget_slot(w, i)

    def _repair(self, w: memoryview) -> None:
        """A holder died between related updates: re-derive everything from committed values.

        Idempotent (``dirty`` stays set until the end), so a death during the repair only
        makes the next holder repeat it.
        """
        if F.ARMED:
            F.hit("repair.start")
        self._correct_dead(w)
        readers = writers = 0
        for i in range(min(w[W_HWM], NSLOTS)):
            base = slot_word(i, S_PID)
            if w[base]:
                readers += w[base + S_WR]
                writers += w[base + S_WR + 1]
        w[W_WR], w[W_WW] = readers, writers
        w[W_PR] = min(w[W_PR], readers)
        w[W_PW] = min(w[W_PW], writers)
        if F.ARMED:
            F.hit("repair.slots")
        # Re-derive readiness from the committed counter (SPEC §5.2).
        queued = _notifier.pending(self.rfd)
        if w[W_COUNTER] and not queued:
            _signal_ready(self.wfd)
        elif not w[W_COUNTER] and queued:
            _drain(self.rfd)
        if F.ARMED:
            F.hit("repair.pipe")
        self._restore(w)
        self._restore_writers(w)
        if F.ARMED:
            F.hit("repair.posted")
        w[W_EPOCH] += 1
        w[W_DIRTY] = 0
        if F.ARMED:
            F.hit("repair.done")

    # -- life cycle hooks -------------------------------------------------------------------

    def _idle(self) -> None:
        """Called after an operation on a closing core; the last waiter out releases it."""
        callback = self.on_idle
        if callback is not None:
            callback(self)

    def after_fork_child(self) -> None:
        """Fork child: drop everything per-process; re-attach lazily on first use (M2, S4)."""
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
