"""Table tests of the counter semantics, rule numbers from docs/linux-eventfd.md in names."""

from __future__ import annotations

import errno
import os
import pickle
import select
import threading
import time
from collections.abc import Callable

import pytest

import mpeventfd
from helpers import stats
from mpeventfd import (
    EFD_CLOEXEC,
    EFD_NONBLOCK,
    EFD_SEMAPHORE,
    MAX_VALUE,
    EventFD,
    eventfd,
    eventfd_read,
    eventfd_write,
)

NB = EFD_NONBLOCK


def readable(efd: EventFD) -> bool:
    return bool(select.select([efd.fileno()], [], [], 0)[0])


def test_constants_match_os() -> None:
    assert MAX_VALUE == 2**64 - 2
    for name in ("EFD_CLOEXEC", "EFD_NONBLOCK", "EFD_SEMAPHORE"):
        if hasattr(os, name):
            assert getattr(mpeventfd, name) == getattr(os, name)


@pytest.mark.parametrize(
    ("initval", "error"),
    [
        (-1, ValueError),
        (2**32, OverflowError),
        (2**64, OverflowError),
        (1.0, TypeError),
        ("1", TypeError),
        (None, TypeError),
    ],
)
def test_r4_initval_out_of_range_or_type(initval: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        EventFD(initval)  # type: ignore[arg-type]


@pytest.mark.parametrize("initval", [0, 1, 2**32 - 1, True])
def test_r4_initval_accepted(initval: int) -> None:
    with EventFD(initval, NB) as efd:
        assert efd.peek() == int(initval)
        assert readable(efd) == bool(initval)


@pytest.mark.parametrize("flags", [2, 4, -1, EFD_SEMAPHORE | EFD_CLOEXEC | NB | 42, 1 << 40])
def test_r5_unknown_flags_einval(flags: int) -> None:
    with pytest.raises(OSError) as info:
        EventFD(0, flags)
    assert info.value.errno == errno.EINVAL


def test_r5_flags_type() -> None:
    with pytest.raises(TypeError):
        EventFD(0, "0")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "error", "code"),
    [
        (-1, ValueError, None),
        (2**64, OverflowError, None),
        (2**65, OverflowError, None),
        (2**64 - 1, OSError, errno.EINVAL),
        (1.0, TypeError, None),
        ("1", TypeError, None),
        (None, TypeError, None),
    ],
)
def test_r17_r47_write_value_errors(value: object, error: type[Exception], code: int) -> None:
    with EventFD(0, NB) as efd:
        with pytest.raises(error) as info:
            efd.write(value)  # type: ignore[arg-type]
        if code is not None:
            assert info.value.errno == code  # type: ignore[attr-defined]
        assert efd.peek() == 0


def test_r17_value_checked_before_room() -> None:
    # write(2**64-1) on a full counter is EINVAL, not EAGAIN (LTP eventfd02).
    with EventFD(0, NB) as efd:
        efd.write(MAX_VALUE)
        with pytest.raises(OSError) as info:
            efd.write(2**64 - 1)
        assert info.value.errno == errno.EINVAL
        assert not isinstance(info.value, BlockingIOError)


def test_r18_room_boundary() -> None:
    with EventFD(10, NB) as efd:
        with pytest.raises(BlockingIOError):
            efd.write(2**64 - 11)
        assert efd.peek() == 10
        efd.write(2**64 - 12)
        assert efd.peek() == MAX_VALUE
        with pytest.raises(BlockingIOError):
            efd.write(1)
        efd.write(0)  # R19: a write of 0 fits even at MAX_VALUE
        assert efd.peek() == MAX_VALUE


def test_r19_write_zero_changes_nothing() -> None:
    with EventFD(0, NB) as efd:
        efd.write(0)
        assert efd.peek() == 0
        assert not readable(efd)
        efd.write(5)
        efd.write(0)
        assert efd.peek() == 5


def test_bool_is_a_value_as_in_os() -> None:
    with EventFD(0, NB) as efd:
        efd.write(True)
        assert efd.read() == 1


def test_index_objects_are_values() -> None:
    class Seven:
        def __index__(self) -> int:
            return 7

    with EventFD(0, NB) as efd:
        efd.write(Seven())  # type: ignore[arg-type]
        assert efd.read() == 7


def test_r10_normal_read_takes_everything() -> None:
    with EventFD(0, NB) as efd:
        efd.write(3)
        efd.write(4)
        assert efd.read() == 7
        assert efd.peek() == 0
        assert not readable(efd)


def test_r10_semaphore_read_decrements() -> None:
    with EventFD(3, EFD_SEMAPHORE | NB) as efd:
        assert efd.semaphore
        assert [efd.read(), efd.read()] == [1, 1]
        assert readable(efd)
        assert efd.read() == 1
        assert not readable(efd)
        with pytest.raises(BlockingIOError):
            efd.read()


def test_r10_semaphore_read_at_max() -> None:
    with EventFD(0, EFD_SEMAPHORE | NB) as efd:
        efd.write(MAX_VALUE)
        assert efd.read() == 1
        assert efd.peek() == 0xFFFFFFFFFFFFFFFD


def test_r11_nonblocking_read_at_zero() -> None:
    with EventFD(0, NB) as efd:
        with pytest.raises(BlockingIOError) as info:
            efd.read()
        assert info.value.errno == errno.EAGAIN


@pytest.mark.parametrize("flags", [0, EFD_SEMAPHORE])
def test_timeout_zero_never_waits(flags: int) -> None:
    """``timeout=0`` is non-blocking: BlockingIOError without ever registering as a waiter.

    A process claims its waiter slot in the eventfd's page at its first wait and keeps it,
    and nothing waits unregistered: a slot still -1 after both calls proves that neither
    waited, without a clock (a wall-clock bound failed on a loaded machine)."""
    with EventFD(0, flags) as efd:
        with pytest.raises(BlockingIOError):
            efd.read(timeout=0)
        efd.write(MAX_VALUE)
        with pytest.raises(BlockingIOError):
            efd.write(1, timeout=0)
        assert efd.peek() == MAX_VALUE
        assert stats(efd)["slot"] == -1  # never registered to wait


def _most_looks(timeout: float) -> int:
    """The most wait steps a main-thread call of ``timeout`` can end with a look.

    A main-thread step sleeps to an absolute time at least 90 ms away (100 ms, ending on a
    10 ms grid: docs/design.md §7) and only a post or a signal ends it sooner; a step that
    ends at the deadline does not look.  Load only makes steps longer, so fewer.
    """
    return int(timeout / 0.09)


def test_timeout_positive_raises_timeouterror_nothing_consumed() -> None:
    """A blocked call ends by its own deadline with TimeoutError, having consumed nothing.

    Not before the deadline (``elapsed``, a lower bound), and by it: the call made no more
    wait steps than fit before it (``looks``), where a call that waited on past its deadline
    would look again at every further step.  Counted, not timed (a wall-clock upper bound
    failed on a loaded machine)."""
    with EventFD(0) as efd:
        before = stats(efd)
        looks = before["looks"]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            efd.read(timeout=0.2)
        elapsed = time.monotonic() - t0
        assert elapsed >= 0.19
        assert stats(efd)["looks"] - looks <= _most_looks(0.2)
        efd.write(MAX_VALUE - 1)
        looks = stats(efd)["looks"]
        with pytest.raises(TimeoutError):
            efd.write(2, timeout=0.1)
        assert stats(efd)["looks"] - looks <= _most_looks(0.1)
        assert efd.peek() == MAX_VALUE - 1
        assert efd.read() == MAX_VALUE - 1
        assert stats(efd)["woken"] == before["woken"]  # no post came, none was consumed


@pytest.mark.parametrize("timeout", [-1, -0.5, float("nan")])
def test_bad_timeout_value(timeout: float) -> None:
    with EventFD() as efd:
        with pytest.raises(ValueError):
            efd.read(timeout=timeout)
        with pytest.raises(ValueError):
            efd.write(1, timeout=timeout)


def test_bad_timeout_type() -> None:
    with EventFD() as efd, pytest.raises(TypeError):
        efd.read(timeout="1")  # type: ignore[arg-type]


def test_closed_handle_ebadf_everywhere() -> None:
    efd = EventFD(1)
    efd.close()
    efd.close()  # idempotent
    assert efd.closed
    calls: list[Callable[[], object]] = [
        efd.read, lambda: efd.write(1), efd.peek, efd.fileno, efd.get_blocking,
        lambda: efd.set_blocking(False), efd.get_inheritable,
        lambda: efd.set_inheritable(True), lambda: efd.fds, lambda: efd.handle,
        lambda: efd.flags, lambda: efd.semaphore,
    ]
    for call in calls:
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF
    assert "closed" in repr(efd)


def test_blocking_mode_is_shared_by_handles() -> None:
    # C6: O_NONBLOCK lives on the one description, so set_blocking acts on every handle.
    with EventFD(0) as efd:
        assert efd.get_blocking()
        efd.set_blocking(False)
        assert not efd.get_blocking()
        assert efd.flags & EFD_NONBLOCK
        with pytest.raises(BlockingIOError):
            efd.read()
        efd.set_blocking(True)
        assert not efd.flags & EFD_NONBLOCK


def test_cloexec_default_and_inheritable() -> None:
    with EventFD() as efd:
        assert efd.flags & EFD_CLOEXEC
        assert not any(os.get_inheritable(fd) for fd in efd.fds)
        efd.set_inheritable(True)
        assert all(os.get_inheritable(fd) for fd in efd.fds)
        assert not efd.flags & EFD_CLOEXEC
    with EventFD(0, 0) as efd:
        assert efd.get_inheritable()
        assert all(os.get_inheritable(fd) for fd in efd.fds)


def test_fds_and_fileno() -> None:
    with EventFD() as efd:
        assert len(efd.fds) == 3
        assert efd.fileno() in efd.fds
        assert efd.handle.startswith("mpefd1:")


def test_repr_shows_id_counter_flags() -> None:
    with EventFD(5, EFD_SEMAPHORE) as efd:
        text = repr(efd)
        assert "counter=5" in text
        assert "EFD_SEMAPHORE" in text
        assert "id=" in text


def test_plain_pickle_refused_with_advice() -> None:
    with EventFD() as efd, pytest.raises(TypeError, match="multiprocessing"):
        pickle.dumps(efd)


def test_os_compatible_functions() -> None:
    with eventfd(0, NB) as efd:
        eventfd_write(efd, 5)
        eventfd_write(efd.fileno(), 2)
        assert eventfd_read(efd.fileno()) == 7
        with pytest.raises(BlockingIOError):
            eventfd_read(efd)
        fd = efd.fileno()
    with pytest.raises(OSError) as info:
        eventfd_read(fd)
    assert info.value.errno == errno.EBADF
    with pytest.raises(ValueError):
        eventfd_read(-1)
    with pytest.raises(TypeError):
        eventfd_read("3")  # type: ignore[arg-type]
    with pytest.raises(OSError) as info:
        eventfd_write(12345, 1)
    assert info.value.errno == errno.EBADF


def test_readiness_follows_counter() -> None:
    with EventFD(0, NB) as efd:
        assert not readable(efd)
        efd.write(1)
        assert readable(efd)
        efd.write(1)
        assert readable(efd)
        efd.read()
        assert not readable(efd)
        # The read end never reports writability (docs/linux-eventfd.md C3).
        assert select.select([], [efd.fileno()], [], 0)[1] == []


def test_a_borrowed_handle_racing_close_gets_ebadf() -> None:
    """eventfd_read(fileno) borrows the handle; once the owner closes, calls give EBADF."""
    efd = EventFD(1)
    core = efd._core
    assert core is not None
    borrowed = EventFD._from_core(core, owner=False)
    efd.close()
    for call in (borrowed.read, lambda: borrowed.write(1), borrowed.peek, borrowed.fileno):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF


def test_an_infinite_timeout_waits_for_ever() -> None:
    with EventFD(0) as efd:
        efd.write(2)
        assert efd.read(timeout=float("inf")) == 2
        threading.Timer(0.1, efd.write, (1,)).start()
        assert efd.read(timeout=1e300) == 1
