"""Bad input and security (docs/design.md, I13, I14): every public entry point refuses what
it cannot use, and a corrupted or foreign shared header gives a clear error, never a crash."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import textwrap
from collections.abc import Callable, Iterator

import pytest

from figures import record
from helpers import mpefd_entries, open_fds, python, shared_word
from mpeventfd import (
    MAX_VALUE,
    EventFD,
    StateError,
    eventfd,
    eventfd_read,
    eventfd_write,
    from_handle,
    recv_eventfd,
    send_eventfd,
)
from mpeventfd._core import NSLOTS, SIZE


@pytest.fixture
def efd() -> Iterator[EventFD]:
    with EventFD(1) as handle:
        yield handle


def _bad_calls(efd: EventFD, a: socket.socket,
               inet: socket.socket) -> list[tuple[str, Callable[[], object], type[BaseException]]]:
    calls: list[tuple[str, Callable[[], object], type[BaseException]]] = [
        ("EventFD(initval=-1)", lambda: EventFD(-1), ValueError),
        ("EventFD(initval=2**32)", lambda: EventFD(2**32), OverflowError),
        ("EventFD(initval=1.5)", lambda: EventFD(1.5), TypeError),  # type: ignore[arg-type]
        ("EventFD(initval=None)", lambda: EventFD(None), TypeError),  # type: ignore[arg-type]
        ("EventFD(flags='x')", lambda: EventFD(0, "x"), TypeError),  # type: ignore[arg-type]
        ("EventFD(flags=2)", lambda: EventFD(0, 2), OSError),
        ("eventfd(-5)", lambda: eventfd(-5), ValueError),
        ("eventfd(flags=-1)", lambda: eventfd(0, -1), OSError),
        ("read(timeout=-1)", lambda: efd.read(timeout=-1), ValueError),
        ("read(timeout=nan)", lambda: efd.read(timeout=float("nan")), ValueError),
        ("read(timeout='1')", lambda: efd.read(timeout="1"), TypeError),  # type: ignore[arg-type]
        ("write(-1)", lambda: efd.write(-1), ValueError),
        ("write(2**64)", lambda: efd.write(2**64), OverflowError),
        ("write(2**64-1)", lambda: efd.write(2**64 - 1), OSError),
        ("write(1.0)", lambda: efd.write(1.0), TypeError),  # type: ignore[arg-type]
        ("write('1')", lambda: efd.write("1"), TypeError),  # type: ignore[arg-type]
        ("write(None)", lambda: efd.write(None), TypeError),  # type: ignore[arg-type]
        ("write(1, timeout=-2)", lambda: efd.write(1, timeout=-2), ValueError),
        ("set_blocking('yes')", lambda: efd.set_blocking("yes"), TypeError),  # type: ignore[arg-type]
        ("set_inheritable(None)", lambda: efd.set_inheritable(None), TypeError),  # type: ignore[arg-type]
        ("eventfd_read(-1)", lambda: eventfd_read(-1), ValueError),
        ("eventfd_read('3')", lambda: eventfd_read("3"), TypeError),  # type: ignore[arg-type]
        ("eventfd_read(99999)", lambda: eventfd_read(99999), OSError),
        ("eventfd_write(efd, -1)", lambda: eventfd_write(efd, -1), ValueError),
        ("eventfd_write(efd, 'x')", lambda: eventfd_write(efd, "x"), TypeError),  # type: ignore[arg-type]
        ("eventfd_write(None, 1)", lambda: eventfd_write(None, 1), TypeError),  # type: ignore[arg-type]
        ("send_eventfd(None, efd)", lambda: send_eventfd(None, efd), TypeError),  # type: ignore[arg-type]
        ("send_eventfd(inet, efd)", lambda: send_eventfd(inet, efd), ValueError),
        ("send_eventfd(sock, 3)", lambda: send_eventfd(a, 3), TypeError),  # type: ignore[arg-type]
        ("recv_eventfd('sock')", lambda: recv_eventfd("sock"), TypeError),  # type: ignore[arg-type]
        ("recv_eventfd(inet)", lambda: recv_eventfd(inet), ValueError),
        ("from_handle(None)", lambda: from_handle(None), TypeError),  # type: ignore[arg-type]
        ("from_handle('')", lambda: from_handle(""), ValueError),
        ("from_handle(forged)", lambda: from_handle("mpefd1:" + "A" * 22 + ":0:1:2"), ValueError),
        ("awrite(-1)", lambda: asyncio.run(efd.awrite(-1)), ValueError),
        ("awrite('x')", lambda: asyncio.run(efd.awrite("x")), TypeError),  # type: ignore[arg-type]
    ]
    return calls


def test_every_public_entry_point_refuses_bad_arguments(efd: EventFD) -> None:
    names = mpefd_entries()
    a, b = socket.socketpair()
    inet = socket.socket(socket.AF_INET)
    fds = open_fds()
    try:
        for label, call, error in _bad_calls(efd, a, inet):
            with pytest.raises(error):
                call()
            record("bad inputs refused", 1)
            assert efd.peek() == 1, label  # nothing consumed or added
        assert open_fds() == fds
    finally:
        for sock in (a, b, inet):
            sock.close()
    assert mpefd_entries() == names


@pytest.mark.parametrize(
    ("field", "value"),
    [("magic", 0xDEADBEEF), ("version", 99), ("nslots", 5), ("semaphore", 7),
     ("nonblock", 5), ("dirty", 9), ("armed", 2), ("counter", 2**64 - 1),
     ("hwm", NSLOTS + 1), ("mutex_kind", 9), ("carrier", 0)],
)
def test_a_corrupted_header_is_refused_on_attach(field: str, value: int) -> None:
    with EventFD(0) as efd:
        original = shared_word(efd, field, value)
        try:
            efd.set_inheritable(True)
            out = python(textwrap.dedent(
                """
                import sys
                from mpeventfd import StateError, from_handle
                try:
                    from_handle(sys.argv[1])
                except StateError as e:
                    print("refused:", e)
                """), efd.handle, pass_fds=efd.fds)
        finally:
            shared_word(efd, field, original)
        assert out.returncode == 0, out.stderr
        assert "refused:" in out.stdout
        record("bad inputs refused", 1)


def test_a_state_file_of_the_wrong_size_is_refused() -> None:
    with EventFD(0) as efd:
        os.ftruncate(efd.fds[0], SIZE + 4096)
        try:
            efd.set_inheritable(True)
            out = python("import sys\nfrom mpeventfd import from_handle\n"
                         "try:\n    from_handle(sys.argv[1])\n"
                         "except ValueError as e:\n    print('refused:', e)\n",
                         efd.handle, pass_fds=efd.fds)
        finally:
            os.ftruncate(efd.fds[0], SIZE)
        assert "refused:" in out.stdout, out.stderr


def test_a_counter_corrupted_at_run_time_gives_stateerror() -> None:
    with EventFD(0, 0) as efd:
        shared_word(efd, "counter", 2**64 - 1)  # only a foreign writer could put this here
        try:
            for call in (efd.read, efd.peek, lambda: efd.write(1, timeout=0.1)):
                with pytest.raises(StateError):
                    call()
                record("bad inputs refused", 1)
        finally:
            shared_word(efd, "counter", 0)
        efd.write(1)
        assert efd.read() == 1


def test_max_value_boundaries_never_wrap() -> None:
    with EventFD(0) as efd:
        efd.write(MAX_VALUE)
        with pytest.raises(BlockingIOError):
            efd.write(1, timeout=0)
        assert efd.read() == MAX_VALUE
        assert errno.EAGAIN


class _ClosingIndex:
    """An int-like whose conversion closes the handle it is passed to."""

    def __init__(self, efd: EventFD) -> None:
        self.efd = efd

    def __index__(self) -> int:
        self.efd.close()
        return 1


class _ClosingFloat(int):
    efd: EventFD

    def __float__(self) -> float:
        self.efd.close()
        return 1.0


def test_an_argument_whose_conversion_closes_the_handle_gets_ebadf() -> None:
    """Conversions run Python code; a handle they close must not be used after that.
    (The interpreter once crashed reading a freed mapping.)"""
    calls: list[Callable[[EventFD], object]] = [
        lambda e: e.write(_ClosingIndex(e)),  # type: ignore[arg-type]
        lambda e: e.write(1, _closing_float(e)),
        lambda e: e.read(timeout=_closing_float(e)),
        lambda e: asyncio.run(e.awrite(_ClosingIndex(e))),  # type: ignore[arg-type]
    ]
    for call in calls:
        efd = EventFD(1)
        with pytest.raises(OSError) as info:
            call(efd)
        assert info.value.errno == errno.EBADF
        assert efd.closed


def _closing_float(efd: EventFD) -> _ClosingFloat:
    t = _ClosingFloat(1)
    t.efd = efd
    return t
