"""Helpers for crash tests: kill (or interrupt) a process at a named step, then check.

A scenario is one step of one operation.  The victim runs the operation with the fault
hook armed at that step; afterwards another process must complete its next operation within
its deadline of 1 s, the victim's call must be applied wholly or not at all, and readiness
must equal ``counter > 0`` (docs/design.md, "Crash safety").
"""

from __future__ import annotations

import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from figures import record_kill
from helpers import fork_child, reap, stats, wait_until
from mpeventfd import EFD_SEMAPHORE, EventFD, _faults

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
    tags: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return self.step + ("-sem" if self.flags & EFD_SEMAPHORE else "") + (
            f"-from{self.initval}" if self.step.startswith("lock.") else "")


def write3(efd: EventFD) -> object:
    efd.write(3)
    return None


def read(efd: EventFD) -> object:
    return efd.read(timeout=20)


SEM = EFD_SEMAPHORE
SCENARIOS = [
    # A 0 -> 3 write takes the lock: the byte goes in, then the counter.
    *(Scenario(s, 0, write3, frozenset({0, 3})) for s in (
        "write.locked", "write.dirty", "write.pipe", "write.commit", "write.posted",
        "lock.unlocked")),
    # 5 -> 8 is lock-free: one CAS, nothing to repair.
    Scenario("write.lockfree", 5, write3, frozenset({8})),
    # 5 -> 0 takes the lock; the drain comes after the commit.
    *(Scenario(s, 5, read, frozenset({5, 0})) for s in (
        "read.locked", "read.dirty", "read.commit", "read.drained", "read.posted",
        "lock.taken", "lock.unlocked")),
    Scenario("read.lockfree", 5, read, frozenset({4}), flags=SEM),
    *(Scenario(s, 1, read, frozenset({1, 0}), flags=SEM) for s in (
        "read.locked", "read.dirty", "read.commit", "read.drained")),
    # A blocked read: registered, in its wait step, woken, accounted.
    *(Scenario(s, 0, read, frozenset({0})) for s in ("wait.registered", "wait.step")),
    *(Scenario(s, 0, read, frozenset({4, 0}), wake=4) for s in (
        "wait.woken", "wait.accounted")),
    *(Scenario(s, 0, read, frozenset({4, 3}), wake=4, flags=SEM) for s in (
        "wait.woken", "wait.accounted")),
    Scenario("slot.claimed", 0, read, frozenset({0})),
]


def readiness_matches(efd: EventFD) -> bool:
    return bool(select.select([efd.fileno()], [], [], 0)[0]) == (efd.peek() > 0)


def victim(efd: EventFD, step: str, action: str, op: Op) -> int:
    """Fork a child that runs ``op`` with the hook armed at ``step``; return its pid."""
    def body() -> int:
        _faults.arm(step, action)
        op(efd)
        return 3  # the step was never reached: the scenario is wrong
    if action == "kill":
        record_kill(step)
    return fork_child(body)


def wake_when_blocked(efd: EventFD, value: int) -> None:
    wait_until(lambda: stats(efd)["waiting_r"] >= 1)
    efd.write(value)


def next_operation_within(efd: EventFD, seconds: float = 1.0) -> float:
    """Another process's next operation: it must take the lock (and repair) within its
    own deadline of ``seconds``.  Returns how long it took, for the figures only.

    The deadline is the check, not a clock read afterwards (a loaded machine can keep this
    process off the CPU for longer than a second): the dead holder's lock is free once the
    kernel has released it, so a working core takes it at its first try, whatever the
    load, and a lock left held makes the write raise TimeoutError here."""
    t0 = time.monotonic()
    try:
        efd.write(0, timeout=seconds)
    except TimeoutError:
        raise AssertionError(f"the next operation got no lock within {seconds} s") from None
    elapsed = time.monotonic() - t0
    assert stats(efd)["dirty"] == 0  # whatever the dead holder left is repaired
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
