"""Which thread is inside a critical section, and writes deferred from handlers/finalizers.

Python runs signal handlers, ``__del__`` and ``weakref.finalize`` callbacks in the
interrupted thread, between bytecodes — also inside the library's own critical section.  A
``write()`` from there must neither deadlock nor corrupt a half-done update (SPEC §2, §5.6).
The rule mirrors the kernel's ``current->in_eventfd`` guard (linux-eventfd-semantics R32):

* A thread is *inside* while it owns the thread lock (an ``RLock``) of any eventfd.  Owning
  is the mark: it is set by the acquire itself, so no handler can run between taking the
  lock and raising a separate flag (design-review S3c).  A global counter of sections being
  entered (``held``) keeps the common case — nobody inside — to one load.
* A ``write()`` made while inside is queued and applied when the thread is no longer inside
  (S3b); a ``read()`` raises, since it could wait for ever.
* While a thread only *waits* (blocked in ``read()`` outside the lock) it is not inside, so
  a handler's write runs directly and can wake that very ``read()`` (S3a).
* A fork child starts with an empty queue: the parent applies what it queued (S3d).

``held[0] += 1`` is one load, add and store with no call in between, which the CPython
interpreter does not interrupt to switch threads or run handlers.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Protocol


class _HasLock(Protocol):
    tlock: threading.RLock


held = [0]
# id(core) -> core for every core not yet released; maintained by _lifecycle.
cores: dict[int, _HasLock] = {}
# (apply, value) pairs; deque.append/popleft are atomic and call no Python code.
deferred: collections.deque[tuple[Callable[[int], None], int]] = collections.deque()


def inside() -> bool:
    """True if the calling thread owns the thread lock of some eventfd."""
    if held[0] <= 0:
        return False
    return any(core.tlock._is_owned() for core in list(cores.values()))  # type: ignore[attr-defined]


def defer(apply: Callable[[int], None], value: int) -> None:
    """Queue ``apply(value)`` for the moment no thread is inside."""
    deferred.append((apply, value))


def drain() -> None:
    """Apply queued writes; the caller is not inside.

    A deferred write has lost its caller, so a failure (no room in non-blocking mode, a
    closed handle) is reported through ``sys.unraisablehook`` rather than raised into
    unrelated code.
    """
    while deferred:
        try:
            apply, value = deferred.popleft()
        except IndexError:
            return
        try:
            apply(value)
        except Exception as exc:
            _Report(exc)


class _Report:
    """Hands an exception to ``sys.unraisablehook``: Python's own route is ``__del__``."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def __del__(self) -> None:
        raise self.exc

    def __repr__(self) -> str:
        return "<deferred mpeventfd write>"


def reset_after_fork() -> None:
    """Fork child: forget writes the parent queued (the parent applies them).

    Only the forking thread survives; it is inside exactly the sections whose locks it owns
    (a fork from a handler inside a critical section), and its frames leave them later.
    """
    deferred.clear()
    owned = [core for core in cores.values() if core.tlock._is_owned()]  # type: ignore[attr-defined]
    held[0] = len(owned)
