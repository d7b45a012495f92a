"""Wake-up accounting, dead waiters and repair: the slow paths of a critical section.

The rule is the one design-review §2.7 model-checked (``tools/wake_model.py``):

* per class (readers ``r``, writers ``w``) the header counts registered waiters ``W`` and
  posts issued but not yet accounted ``P``; each process's slot counts its own waiters;
* at the end of every critical section, post until ``P`` covers the readers that can proceed
  (``min(c, W_r)`` in semaphore mode, ``min(1, W_r)`` otherwise) — post first, then account;
  after a read that made room, post every registered writer (their sizes differ: W4);
* a waiter accounts after each wait step: a consumed post → ``W -= 1, P -= 1``; an expired
  step → ``W -= 1`` and absorb one surplus post if ``P > W``; an exception (outcome unknown)
  → assume consumed, then restore.  Every doubt errs towards a stray post, never a lost
  wake-up;
* a dead process's registrations are dropped, assuming each consumed a post (W5).

Everything here runs under the mutex.  Store sequences contain no calls, so a signal handler
cannot split them; a SIGKILL can, and leaves ``dirty`` for the repair.
"""

from __future__ import annotations

import errno
import os

import posix_ipc

from . import _faults as F
from . import _lock, _notifier, _wake
from ._errors import oserror
from ._state import (
    ENTERING,
    IDLE,
    NSLOTS,
    S_LOCK,
    S_PID,
    S_WR,
    W_COUNTER,
    W_DIRTY,
    W_EPOCH,
    W_HWM,
    W_PR,
    W_WR,
    W_WW,
    slot_word,
)

READER, WRITER = 0, 1
# How a wait step ended: a post consumed; the step expired; an exception (outcome unknown);
# or, for a lone reader waiting on the pipe instead of the semaphore, the pipe became
# readable (no post consumed: any post issued for it is a surplus to absorb).
CONSUMED, EXPIRED, FAILED, POLLED = 1, 2, 3, 4


class Waiters:
    """Base of :class:`~mpeventfd._core.Core`: everything about blocked threads."""

    __slots__ = (
        "abandoned", "private", "rfd", "sem_r", "sem_w", "semaphore", "slot", "waiters",
        "wfd", "words",
    )
    abandoned: list[int]
    private: int
    rfd: int
    sem_r: posix_ipc.Semaphore
    sem_w: posix_ipc.Semaphore
    semaphore: bool
    slot: int
    waiters: int
    wfd: int
    words: memoryview

    def _drain_pipe(self) -> None:
        """Empty the pipe, under the mutex: through the private descriptor where it is our
        own non-blocking description of the pipe (``_lock.PIPE_PRIVATE``), which no user
        can make blocking; else through the shared read end (``_notifier.drain`` never
        blocks on it either)."""
        if _lock.PIPE_PRIVATE:
            _notifier.drain_own(self.private)
        else:
            _notifier.drain(self.rfd)

    def _register(self, w: memoryview, cls: int) -> None:
        """Register the calling thread as a waiter of class ``cls``."""
        if self.abandoned:
            self._settle_abandoned(w)
        if self.slot < 0:
            self._claim_slot(w)
        count = W_WR + 2 * cls
        mine = slot_word(self.slot, S_WR + cls)
        w[W_DIRTY] = 1
        w[count] += 1
        w[mine] += 1
        w[W_DIRTY] = 0
        self.waiters += 1

    def _unregister(self, w: memoryview, cls: int, kind: int) -> None:
        """Undo a registration after a wait step: stores only.

        No call happens between the entry of this method and its return, so a signal
        handler can interrupt it only before the first store; the caller marks itself
        unregistered right after it returns.  ``kind`` is EXPIRED, CONSUMED, or FAILED (an
        exception: outcome unknown, so assume consumed: design-review W1).
        """
        count = W_WR + 2 * cls
        mine = slot_word(self.slot, S_WR + cls)
        w[W_DIRTY] = 1
        if w[count]:
            w[count] -= 1
        if w[mine]:
            w[mine] -= 1
        if kind in (CONSUMED, FAILED) and w[count + 1]:
            w[count + 1] -= 1
        w[W_DIRTY] = 0
        self.waiters -= 1

    def _after_wait(self, w: memoryview, cls: int, kind: int) -> None:
        """What follows an unregistration: absorb a stray, drop dead waiters, restore."""
        if kind in (EXPIRED, POLLED):
            posts = W_WR + 2 * cls + 1
            if w[posts] > w[posts - 1]:
                # A post issued for us may have arrived as the step ended: absorb the surplus
                # so strays cannot pile up (design-review W2).  Account first, then take:
                # an interruption in between leaves a stray post, never a missing one.
                w[posts] -= 1
                if not _wake.try_take(self.sem_w if cls else self.sem_r):
                    w[posts] += 1
        if kind == EXPIRED:
            w[W_DIRTY] = 1
            self._correct_dead(w)
            w[W_DIRTY] = 0
        if kind != CONSUMED:
            self._restore(w)
            self._restore_writers(w)
        if self.abandoned:
            self._settle_abandoned(w)

    def _settle_abandoned(self, w: memoryview) -> None:
        # Entries are appended before the accounting is attempted, so a second exception
        # during it leaves the entry here for the next critical section of this process.
        while self.abandoned:
            cls = self.abandoned.pop()
            self._unregister(w, cls, FAILED)
            self._after_wait(w, cls, FAILED)

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
        pending = w[W_WW + 1]
        while pending < waiting:
            if not _wake.post(self.sem_w):
                return
            pending += 1
            w[W_WW + 1] = pending

    # -- slots and dead processes -----------------------------------------------------------

    def _claim_slot(self, w: memoryview) -> None:
        """Kernel backend: lock a slot's liveness byte first, then correct its old contents."""
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
        raise oserror(errno.EUSERS, f"more than {NSLOTS} processes use this eventfd")

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
        """Drop what processes whose liveness byte the kernel released left behind.

        Their waiter registrations, and a dead fast-mutex slot left ENTERING by a process
        that died waiting (we hold the mutex, so it holds no token: lock-protocol L6).  The
        caller has set ``dirty``: a death halfway leaves the recount to the repair.
        """
        pd = self.private
        for i in range(min(w[W_HWM], NSLOTS)):
            if i == self.slot:
                continue
            base = slot_word(i, S_PID)
            regs = w[base + S_WR] or w[base + S_WR + 1]
            entering = w[base + S_LOCK] & 0xFF == ENTERING
            if (regs or entering) and not _lock.slot_alive(pd, i):
                self._forget_slot(w, i)
                if entering:
                    w[base + S_LOCK] = ((w[base + S_LOCK] >> 8) + 1) << 8 | IDLE

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
        w[W_WW + 1] = min(w[W_WW + 1], writers)
        if F.ARMED:
            F.hit("repair.slots")
        # Re-derive readiness from the committed counter (SPEC §5.2).
        queued = _notifier.pending(self.rfd)
        if w[W_COUNTER] and not queued:
            _notifier.signal_ready(self.wfd)
        elif not w[W_COUNTER] and queued:
            self._drain_pipe()
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
