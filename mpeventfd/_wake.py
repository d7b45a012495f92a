"""One bounded wait step on a wake-up semaphore, and posting.

posix_ipc facts that shape this module (design-review S1, E1, P1; reliability §1.7):

* When a signal handler raises inside ``Semaphore.acquire``, posix_ipc keeps only
  ``KeyboardInterrupt`` and turns every other exception (``SystemExit`` included) into
  ``SignalError``.  So in the main thread, where Python handlers run, the asynchronous
  signals are blocked around each step and the mask is restored with the C-level
  ``_signal.pthread_sigmask`` called directly (a Python wrapper can raise before it restores
  the mask and leave every signal blocked for good: E1e).  Handlers run between steps, and
  their exceptions propagate.
* Without ``sem_timedwait`` (macOS) posix_ipc waits for ever whatever the timeout, so a step
  is ``trywait`` plus a monotonic back-off, as CPython's ``sem_timedwait_save`` does.
* posix_ipc deadlines follow the wall clock; steps are short, so a clock step can stretch one
  step, never a whole timeout (the caller's deadline is monotonic).
"""

from __future__ import annotations

import _signal
import errno
import signal
import threading
import time

import posix_ipc

from ._probe import ASYNC_SIGNALS, PLATFORM

_sigmask = _signal.pthread_sigmask
_BLOCK = signal.SIG_BLOCK
_SETMASK = signal.SIG_SETMASK
_NOTHING: tuple[int, ...] = ()
_main_thread = threading.main_thread
_last_base: list[set[int]] = []  # the main thread's mask before its last wait step


def wait_step(sem: posix_ipc.Semaphore, seconds: float) -> bool:
    """Wait at most ``seconds`` for a post; True if one was consumed."""
    if not PLATFORM.sem_timedwait:
        return _poll_step(sem, seconds)
    if threading.current_thread() is not _main_thread():
        return _step_unmasked(sem, seconds)
    if not _last_base:
        _last_base.append(_sigmask(_BLOCK, _NOTHING))  # learn the mask once, unchanged
    try:
        # One call both blocks and returns the mask to restore.  A handler that tripped
        # before it runs right after it returns, before ``base`` is bound: restore the mask
        # this thread had at its previous step (the usual unmasked one) and let it raise.
        base = _sigmask(_BLOCK, ASYNC_SIGNALS)
    except BaseException:
        _sigmask(_SETMASK, _last_base[0])
        raise
    _last_base[0] = base
    try:
        sem.acquire(seconds)
        return True
    except posix_ipc.BusyError:
        return False
    finally:
        _sigmask(_SETMASK, base)


def _step_unmasked(sem: posix_ipc.Semaphore, seconds: float) -> bool:
    """A wait step outside the main thread.  Python handlers never run there, so a
    ``SignalError`` hides nothing: the step just ended early, and the caller re-checks."""
    try:
        sem.acquire(seconds)
    except (posix_ipc.BusyError, posix_ipc.SignalError):
        return False
    return True


def _poll_step(sem: posix_ipc.Semaphore, seconds: float) -> bool:
    """``trywait`` with a monotonic back-off of 1 ms growing to 20 ms (macOS path)."""
    deadline = time.monotonic() + seconds
    delay = 0.001
    while True:
        if try_take(sem):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)


def try_take(sem: posix_ipc.Semaphore) -> bool:
    """Consume one post if there is one; never wait."""
    try:
        sem.acquire(0)
    except posix_ipc.BusyError:
        return False
    return True


def post(sem: posix_ipc.Semaphore) -> bool:
    """Post once; False if the semaphore is at ``SEM_VALUE_MAX``.

    A post follows a commit, so it must not raise: at the limit there are already more
    posts pending than anyone can use (design-review W2).
    """
    try:
        sem.release()
    except OSError as e:
        if e.errno in (errno.EOVERFLOW, None):
            return False
        raise
    return True


# -- taking the fast mutex's semaphore ------------------------------------------------------
#
# A semaphore used as a mutex has no owner, so "did I get it?" must never be lost.  CPython
# runs signal handlers at the check that follows a C call, so an exception can arrive right
# after a successful sem_wait, before the caller has recorded anything (lock-protocol L3a).
# The exception's origin tells the two cases apart: posix_ipc raises its own errors (and
# OSError) from inside the call, when nothing was taken; any other exception in the main
# thread came from a handler after the call returned, when the token *was* taken.  The
# caller receives that case as HeldAfter and gives the token back before re-raising.

SEM_ERRORS = (posix_ipc.Error, OSError)


class HeldAfter(Exception):
    """The semaphore was taken, then ``original`` arrived before the caller knew."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original = original


def taken_then_raised(exc: BaseException) -> bool:
    """Classify an exception from ``sem.acquire(0)`` (no signal can interrupt a trywait)."""
    return not isinstance(exc, SEM_ERRORS) and threading.current_thread() is _main_thread()


def try_take_mutex(sem: posix_ipc.Semaphore) -> bool:
    """One trywait on the mutex semaphore, with the classification above."""
    try:
        sem.acquire(0)
    except posix_ipc.BusyError:
        return False
    except BaseException as e:
        if taken_then_raised(e):
            raise HeldAfter(e) from e
        raise
    return True


def take_step(sem: posix_ipc.Semaphore, seconds: float) -> bool:
    """Wait at most ``seconds`` to take ``sem``; raise :class:`HeldAfter` as explained above."""
    if not PLATFORM.sem_timedwait:
        return _take_polling(sem, seconds)
    if threading.current_thread() is not _main_thread():
        return _step_unmasked(sem, seconds)
    base = _sigmask(_BLOCK, _NOTHING)
    stage = 0
    try:
        _sigmask(_BLOCK, ASYNC_SIGNALS)
        stage = 1
        sem.acquire(seconds)
        stage = 2
        _sigmask(_SETMASK, base)  # a handler that waited for the mask runs right after this
    except posix_ipc.BusyError:
        _sigmask(_SETMASK, base)
        return False
    except BaseException as e:
        if stage < 2:
            _sigmask(_SETMASK, base)
        # Signals were blocked in this thread, so nothing interrupted the wait itself.
        if stage == 2 or (stage == 1 and not isinstance(e, SEM_ERRORS)):
            raise HeldAfter(e) from e
        raise
    return True


def _take_polling(sem: posix_ipc.Semaphore, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    delay = 0.001
    while True:
        try:
            sem.acquire(0)
        except posix_ipc.BusyError:
            pass
        except BaseException as e:
            if taken_then_raised(e):
                raise HeldAfter(e) from e
            raise
        else:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)
