"""Differential test: the kernel's ``os.eventfd`` is the oracle.

Random sequences of writes (values around every boundary, plus wrong types), reads and
zero-timeout ``select`` calls run against both a kernel eventfd and an mpeventfd; after every
step the results, the exception type and errno, and readiness must be identical.  A second
machine leaves readiness unarmed (no ``fileno()``) until a random step, then checks it
after every step from there on.
"""

from __future__ import annotations

import os
import select
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mpeventfd import EFD_NONBLOCK, EFD_SEMAPHORE, MAX_VALUE, EventFD

pytestmark = pytest.mark.skipif(not hasattr(os, "eventfd"), reason="needs os.eventfd (Linux)")

BOUNDARIES = [
    0, 1, 2, 3, 2**32 - 1, 2**32, 2**32 + 1, 2**63, 2**64 - 4, 2**64 - 3, 2**64 - 2,
    2**64 - 1, 2**64, 2**64 + 1, -1, -(2**64), True, False,
]
WRONG_TYPES = [1.0, "1", None, b"\x01", 2.5]


def outcome(call: Any, *args: Any) -> tuple[str, Any]:
    """A comparable description of what a call did: its result or its error."""
    try:
        return ("ok", call(*args))
    except OSError as e:
        return (type(e).__name__, e.errno)
    except (TypeError, ValueError, OverflowError) as e:
        # Messages differ; the class is the contract (docs/linux-eventfd.md R47).
        return (type(e).__name__, None)


def ready(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


class EventfdOracle(RuleBasedStateMachine):
    kernel: int
    mine: EventFD

    @initialize(
        initval=st.sampled_from([0, 1, 7, 2**32 - 1]),
        semaphore=st.booleans(),
    )
    def create(self, initval: int, semaphore: bool) -> None:
        flags = EFD_NONBLOCK | (EFD_SEMAPHORE if semaphore else 0)
        self.kernel = os.eventfd(initval, flags)
        self.mine = EventFD(initval, flags)

    def teardown(self) -> None:
        if hasattr(self, "mine"):
            os.close(self.kernel)
            self.mine.close()

    def both(self, kernel_call: Any, mine_call: Any, *args: Any) -> None:
        expected = outcome(kernel_call, self.kernel, *args)
        got = outcome(mine_call, *args)
        assert got == expected, f"args={args!r}: kernel {expected}, mpeventfd {got}"

    @rule(value=st.sampled_from(BOUNDARIES + WRONG_TYPES) | st.integers(0, 2**64 + 5))
    def write(self, value: Any) -> None:
        self.both(os.eventfd_write, self.mine.write, value)

    @rule(delta=st.integers(-3, 3))
    def write_near_room(self, delta: int) -> None:
        # Values right at the edge of the room left: MAX_VALUE - counter + delta.
        value = MAX_VALUE - self.mine.peek() + delta
        self.both(os.eventfd_write, self.mine.write, value)

    @rule()
    def read(self) -> None:
        self.both(os.eventfd_read, self.mine.read)

    @rule()
    def read_timeout_zero(self) -> None:
        expected = outcome(os.eventfd_read, self.kernel)
        assert outcome(self.mine.read, 0) == expected

    @invariant()
    def same_readiness(self) -> None:
        if hasattr(self, "mine"):
            assert ready(self.mine.fileno()) == ready(self.kernel)


EventfdOracle.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestEventfdOracle = EventfdOracle.TestCase


class UnarmedEventfdOracle(EventfdOracle):
    """The same, with the pipe left alone until someone first asks for fileno()."""

    polled = False

    @rule()
    def start_polling(self) -> None:
        self.polled = True

    @invariant()
    def same_readiness(self) -> None:
        if hasattr(self, "mine") and self.polled:
            assert ready(self.mine.fileno()) == ready(self.kernel)


UnarmedEventfdOracle.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestUnarmedEventfdOracle = UnarmedEventfdOracle.TestCase
