"""The fast mutex: a POSIX semaphore as the lock, made safe by lock-protocol.md §4 ("§5'").

An uncontended ``sem_trywait``/``sem_post`` pair is two atomic instructions in user space,
where the kernel byte lock costs two system calls (SPEC §5.8, §7).  A semaphore has no
owner, though, and is never released by the death of its holder; §5' makes it recoverable:

* every process that touches the semaphore owns a slot whose word is ``seq << 8 | phase``,
  phase IDLE, ENTERING or ASIDE, and every store bumps ``seq``; a kernel-held liveness byte
  per slot proves death (the kernel releases it, also for a zombie);
* ENTERING is written before every semaphore operation and kept while holding; the holder
  posts and then writes IDLE;
* a waiter stuck for longer than ``RECOVERY_AFTER`` while some dead slot is ENTERING may be
  elected (a non-blocking kernel lock), raises a request generation, lets the others stand
  ASIDE (a promise: no semaphore operation until ENTERING again), and proves: collect every
  other slot (C1), a trywait fails, collect again (C2), ``C1 == C2`` with no live slot
  ENTERING.  Then the token belongs to no live process: it belongs to a dead one, and the
  prover takes it over (no post) and marks the state dirty so the critical section repairs;
* a stopped or slow holder is ENTERING, so it is never robbed, however long it holds.

The model checker ``shared/tools/lock_model.py fixed`` explores this protocol; the proof
sketch in lock-protocol §4 does not depend on its bounds.  x86-64 needs no fences (TSO and
locked instructions); other CPUs get them through the capability probe (none needed on the
tested platforms, see README).
"""

from __future__ import annotations

import errno
import os
import threading
import time

import posix_ipc

from . import _faults as F
from . import _lock, _wake
from ._errors import closed_error, oserror
from ._probe import PLATFORM
from ._state import (
    ASIDE,
    ENTERING,
    NSLOTS,
    S_LOCK,
    S_PID,
    S_WR,
    W_DIRTY,
    W_EPOCH,
    W_HWM,
    W_REQ,
    W_RESOLVED,
    W_WR,
    slot_word,
)
from ._waiters import Waiters

RECOVERY_AFTER = 0.05  # waited this long, with a dead ENTERING slot: try to recover
ASIDE_PERIOD = 0.1  # how long a waiter stands aside for one request generation
MUTEX_STEP = 0.02  # one bounded wait on the mutex semaphore
CLAIM_BYTE = 2  # kernel byte lock that serialises slot claims (and the high-water mark)
SPIN_SECONDS = 200e-6  # how long a contended acquire retries (yielding) before it sleeps
_GETVALUE = PLATFORM.sem_getvalue
_MASK = 0xFF


def forked_error() -> RuntimeError:
    return RuntimeError(
        "an eventfd operation interrupted by os.fork() cannot finish in the child; "
        "the parent finishes it"
    )


class FastMutex(Waiters):
    """Base of :class:`~mpeventfd._core.Core`: the slow path of the fast mutex."""

    __slots__ = (
        "first_fail", "fix_slot", "last_aside", "lockword", "released", "sem_m", "seq8",
        "taken", "tlock",
    )
    first_fail: float
    fix_slot: bool
    last_aside: int
    lockword: int
    released: bool
    sem_m: posix_ipc.Semaphore
    # The seq of this process's last store to its slot word, shifted into place (``seq << 8``,
    # the low byte is the phase): the hot path computes its words with one addition.
    seq8: int
    taken: bool
    tlock: threading.RLock

    def _open_private(self) -> int:
        raise NotImplementedError  # Core opens the process's private descriptor

    # -- claiming a slot --------------------------------------------------------------------

    def _claim_fast(self, until: float | None, grace: float) -> int:
        """Own a slot before the first semaphore operation (invariant I5); return its word.

        Lock the liveness byte first, then re-read the word under it (lock-protocol L5): a
        dead slot left ENTERING is a dead holder's evidence and stays for the recoverer.
        Claims are serialised by a kernel byte lock, waited for like the mutex itself (a
        stopped claimer gives a timed call ``TimeoutError``, not a hang).
        """
        if self.released:
            raise closed_error()
        pd = self.private if self.private >= 0 else self._open_private()
        w = self.words
        limit = None if until is None else (time.monotonic() + grace if until < 0 else until)
        try:
            # Inside the try: an exception right after the lock call still unlocks, which
            # is harmless when it was not taken (a private description; one claimer).
            try:
                _lock.lock_byte(pd, CLAIM_BYTE, limit)
            except _lock.Busy:
                raise _lock.busy_error(until is not None and until < 0) from None
            for i in range(NSLOTS):
                if not _lock.claim_liveness(pd, i):
                    continue
                lw = slot_word(i, S_LOCK)
                word = w[lw]
                if word & _MASK == ENTERING:
                    _lock.release_liveness(pd, i)
                    continue
                seq = (word >> 8) + 1
                w[lw] = seq << 8  # IDLE
                w[slot_word(i, S_PID)] = os.getpid()
                if i >= w[W_HWM]:
                    w[W_HWM] = i + 1
                self.slot, self.lockword, self.seq8 = i, lw, seq << 8
                # Under the mutex, at the first section: drop what a dead previous owner
                # left registered, and write our pid again in case a holder that judged
                # the slot dead zeroed it just after our claim.
                self.fix_slot = True
                if F.ARMED:
                    F.hit("attach.slot")
                return lw
        finally:
            _lock.unlock_byte(pd, CLAIM_BYTE)
        raise oserror(errno.EUSERS, f"more than {NSLOTS} processes use this eventfd")

    def _settle_claim(self, w: memoryview) -> None:
        """Under the mutex, once after a claim (see ``_claim_fast``)."""
        pid = os.getpid()
        base = slot_word(self.slot, S_PID)
        dirty = w[W_DIRTY]  # keep a repair that is due: this runs before the section's check
        w[W_DIRTY] = 1
        w[base] = pid
        for cls in (0, 1):
            n = w[base + S_WR + cls]
            count = W_WR + 2 * cls
            w[count] -= min(w[count], n)
            w[count + 1] -= min(w[count + 1], n)
            w[base + S_WR + cls] = 0
        w[W_DIRTY] = dirty
        self.fix_slot = False

    # -- the slow path ----------------------------------------------------------------------

    def _acquire_slow(self, w: memoryview, lw: int, seq: int, until: float | None,
                      grace: float, tl: object) -> int:
        """Our word is ENTERING(seq) and the token was busy: wait for it, or recover it.

        Returns the seq of our ENTERING word, holding the token; or raises, with the word
        IDLE and no token.  ``tl`` is the caller's thread lock: a frame that a fork copied
        into a child (where the lock was replaced) must not touch the semaphore (S4).
        """
        now = time.monotonic()
        limit = None if until is None else (now + grace if until < 0 else until)
        if not self.first_fail:
            self.first_fail = now  # persists across calls: short timeouts still recover (L1)
        self.taken = False
        try:
            if self._spin(tl):
                self.first_fail = 0.0
                return seq
            while True:
                req = w[W_REQ]
                if req > w[W_RESOLVED] and req != self.last_aside:
                    seq = self._stand_aside(w, lw, seq, req, limit)
                elif (time.monotonic() - self.first_fail > RECOVERY_AFTER
                      and self._dead_entering(w) and self._recover(w, limit, tl)):
                    break
                step = MUTEX_STEP
                if limit is not None:
                    step = min(step, limit - time.monotonic())
                    if step <= 0:
                        raise _lock.busy_error(until is not None and until < 0)
                if self.tlock is not tl:
                    raise forked_error()
                if _wake.take_step(self.sem_m, step):
                    break
        except _wake.HeldAfter as held:
            self.sem_m.release()  # we hold a token we will not use: give it back
            w[lw] = self.seq8 = (seq + 1) << 8  # IDLE, after the post (invariant I2)
            raise held.original from None
        except BaseException:
            if self.taken:  # a proof took the token, then something raised
                self.taken = False
                self.sem_m.release()
            w[lw] = self.seq8 = (seq + 1) << 8
            raise
        self.taken = False
        self.first_fail = 0.0
        return seq

    def _spin(self, tl: object) -> bool:
        """Retry briefly before sleeping: a live holder keeps the token for microseconds.

        A reader that a pipe byte woke usually finds its writer still inside the section
        (the byte goes in before the commit); a futex sleep and wake-up would cost far more
        than the few microseconds the writer needs.  Yielding the CPU on each try lets a
        holder that shares our CPU finish.
        """
        sem = self.sem_m
        deadline = time.perf_counter() + SPIN_SECONDS
        while time.perf_counter() < deadline:
            os.sched_yield()
            if self.tlock is not tl:
                raise forked_error()
            if (not _GETVALUE or sem.value) and _wake.try_take_mutex(sem):
                return True
        return False

    def _stand_aside(self, w: memoryview, lw: int, seq: int, req: int,
                     limit: float | None) -> int:
        """Promise a prover that we make no semaphore operation until its request resolves."""
        seq += 1
        w[lw] = (seq << 8) | ASIDE
        self.seq8 = seq << 8
        self.last_aside = req
        end = time.monotonic() + ASIDE_PERIOD
        if limit is not None:
            end = min(end, limit)
        delay = 0.0005
        try:
            while w[W_RESOLVED] < req and time.monotonic() < end:
                time.sleep(delay)
                delay = min(delay * 2, 0.005)
        finally:
            seq += 1
            w[lw] = (seq << 8) | ENTERING
            self.seq8 = seq << 8
        return seq

    # -- recovery ---------------------------------------------------------------------------

    def _dead_entering(self, w: memoryview) -> bool:
        pd = self.private
        for j in range(min(w[W_HWM], NSLOTS)):
            entering = w[slot_word(j, S_LOCK)] & _MASK == ENTERING
            if j != self.slot and entering and not _lock.slot_alive(pd, j):
                return True
        return False

    def _recover(self, w: memoryview, limit: float | None, tl: object) -> bool:
        """Elected prover: ask the others to stand aside, then prove; True if holding.

        Sets ``self.taken`` the moment the token is ours, so an exception after that (even
        from ending the election) gives it back instead of losing it.
        """
        pd = self.private
        if not _lock.try_election(pd):
            return False
        try:
            req = w[W_REQ] + 1
            w[W_REQ] = req  # a new generation after every failed proof (L7)
            end = time.monotonic() + 2 * ASIDE_PERIOD
            if limit is not None:
                end = min(end, limit)
            while self._collect(w) is None and time.monotonic() < end:
                time.sleep(0.001)
            if self.tlock is not tl:
                raise forked_error()
            return self._prove(w, req)
        finally:
            _lock.end_election(pd)

    def _collect(self, w: memoryview) -> tuple[int, ...] | None:
        """Every other slot's word and liveness, or None if a live one is ENTERING."""
        pd = self.private
        hwm = min(w[W_HWM], NSLOTS)
        out = [hwm]
        for j in range(hwm):
            if j == self.slot:
                continue
            word = w[slot_word(j, S_LOCK)]
            alive = _lock.slot_alive(pd, j)
            if alive and word & _MASK == ENTERING:
                return None
            out += (word, alive)
        return tuple(out)

    def _prove(self, w: memoryview, req: int) -> bool:
        if F.ARMED:
            F.hit("recover.elected")
        c1 = self._collect(w)
        if c1 is None:
            return False
        if _wake.take_step(self.sem_m, 0):
            self.taken = True
            # The token was free after all (its holder posted): an ordinary acquisition.
            self._clear_dead_entering(w)
            w[W_RESOLVED] = max(w[W_RESOLVED], req)
            return True
        if self._collect(w) != c1:
            return False
        # Between C1 and C2 no live process was ENTERING and nothing changed, and the
        # semaphore was 0 in between: the token belongs to a dead process.  Take it over.
        self.taken = True
        self._clear_dead_entering(w)
        w[W_EPOCH] += 1
        w[W_DIRTY] = 1  # the dead holder may have been mid-update: the section repairs
        w[W_RESOLVED] = req
        if F.ARMED:
            F.hit("recover.takeover")
        return True

    def _clear_dead_entering(self, w: memoryview) -> None:
        pd = self.private
        for j in range(min(w[W_HWM], NSLOTS)):
            lw = slot_word(j, S_LOCK)
            if j != self.slot and w[lw] & _MASK == ENTERING and not _lock.slot_alive(pd, j):
                w[lw] = ((w[lw] >> 8) + 1) << 8  # IDLE

