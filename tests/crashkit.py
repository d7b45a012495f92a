"""Helpers for crash tests: kill (or interrupt) a process at a named step, then check.

A scenario is one step of one operation.  The victim runs the operation with the fault
hook armed at that step; afterwards another process must complete its next operation within
1 s, the victim's call must be applied wholly or not at all, and readiness must equal
``counter > 0`` (SPEC §5).
"""

from __future__ import annotations

import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from helpers import fork_child, reap
from mpeventfd import EFD_SEMAPHORE, EventFD, _faults
from mpeventfd._state import W_WR

Op = Callable[[EventFD], object]


@dataclass(frozen=True)
class Scenario:
    """``op`` on an eventfd that starts at ``initval``; the counter ends in ``outcomes``."""

    step: str
    initval: int
    op: Op
    outcomes: frozenset[int]
    flags: int = 0
    wake: int = 0  # write this once the victim is blocked (steps inside a blocked read)
    fast_only: bool = False
    tags: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return self.step + ("-sem" if self.flags & EFD_SEMAPHORE else "")


def write3(efd: EventFD) -> object:
    efd.write(3)
    return None


def read(efd: EventFD) -> object:
    return efd.read(timeout=20)


SCENARIOS = [
    *(Scenario(s, 5, write3, frozenset({5, 8})) for s in (
        "write.locked", "write.commit", "write.posted", "write.before_unlock",
        "write.unlocked")),
    *(Scenario(s, 0, write3, frozenset({0, 3})) for s in ("write.dirty", "write.pipe")),
    *(Scenario(s, 5, read, frozenset({5, 0})) for s in (
        "read.locked", "read.dirty", "read.commit", "read.drained", "read.posted",
        "read.before_unlock", "read.unlocked")),
    Scenario("read.commit", 5, read, frozenset({5, 4}), flags=EFD_SEMAPHORE),
    *(Scenario(s, 0, read, frozenset({0})) for s in ("wait.registered", "wait.step")),
    # A lone normal-mode reader waits on the pipe; semaphore-mode readers on the semaphore.
    *(Scenario(s, 0, read, frozenset({4, 0}), wake=4) for s in (
        "wait.polled", "wait.accounted")),
    *(Scenario(s, 0, read, frozenset({4, 3}), wake=4, flags=EFD_SEMAPHORE) for s in (
        "wait.consumed", "wait.accounted")),
    *(Scenario(s, 5, write3, frozenset({5, 8}), fast_only=True) for s in (
        "mutex.entering", "mutex.taken", "mutex.posted")),
]


def readiness_matches(efd: EventFD) -> bool:
    return bool(select.select([efd.fileno()], [], [], 0)[0]) == (efd.peek() > 0)


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def victim(efd: EventFD, step: str, action: str, op: Op) -> int:
    """Fork a child that runs ``op`` with the hook armed at ``step``; return its pid."""
    def body() -> int:
        _faults.arm(step, action)
        op(efd)
        return 3  # the step was never reached: the scenario is wrong
    return fork_child(body)


def wake_when_blocked(efd: EventFD, value: int) -> None:
    core = efd._core
    assert core is not None
    wait_until(lambda: core.words[W_WR] >= 1)
    efd.write(value)


def next_operation_within(efd: EventFD, seconds: float = 1.0) -> float:
    """Another process's next operation: it must take the mutex (and repair) in time."""
    t0 = time.monotonic()
    efd.write(0, timeout=seconds)
    elapsed = time.monotonic() - t0
    assert elapsed < seconds, f"next operation took {elapsed:.2f} s"
    return elapsed


def killed(status: int) -> bool:
    return status == -signal.SIGKILL


def check_usable(efd: EventFD) -> None:
    """After the fault, a full cycle still works from this process and from a new child."""
    assert readiness_matches(efd)
    before = efd.peek()
    efd.write(1, timeout=1)
    pid = fork_child(lambda: efd.write(1, timeout=5))
    assert reap(pid) == 0
    expected = before + 2
    if efd.semaphore:
        assert [efd.read(timeout=1) for _ in range(expected)] == [1] * expected
    else:
        assert efd.read(timeout=1) == expected
    assert readiness_matches(efd)
    assert efd.peek() == 0
