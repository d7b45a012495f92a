"""Untrusted input: handles and socket messages from elsewhere (docs/design.md §10, I13), fuzzed."""

from __future__ import annotations

import array
import contextlib
import errno
import os
import resource
import select
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import open_fds
from mpeventfd import EventFD, _names, _transfer, from_handle, recv_eventfd
from mpeventfd._transfer import REST_TIMEOUT

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


class Pool:
    """A zoo of open fds: two eventfds, a pipe, a regular file, a socket, std streams."""

    def __init__(self) -> None:
        self.a = EventFD(1)
        self.b = EventFD(2)
        self.r, self.w = os.pipe()
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the pool)
        self.sa, self.sb = socket.socketpair()
        self.closed = os.dup(0)
        os.close(self.closed)
        self.fds = [0, 1, 2, *self.a.fds, *self.b.fds, self.r, self.w, self.file.fileno(),
                    self.sa.fileno(), self.closed, 99999, 2**31 - 1]
        self.names = [self.a.handle.split(":")[1], "A" * 22, "_" * 22]

    def close(self) -> None:
        self.a.close()
        self.b.close()
        os.close(self.r)
        os.close(self.w)
        self.file.close()
        self.sa.close()
        self.sb.close()


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    p = Pool()
    yield p
    p.close()


@FUZZ
@given(text=st.text(max_size=80))
def test_from_handle_random_text(text: str) -> None:
    before = open_fds()
    try:
        efd = from_handle(text)
    except ValueError:
        pass
    else:  # pragma: no cover - a random string is never a live handle
        efd.close()
    assert open_fds() == before


@FUZZ
@given(data=st.data())
def test_from_handle_forged_fds(pool: Pool, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(pool.names))
    fds = data.draw(st.lists(st.sampled_from(pool.fds), min_size=3, max_size=3))
    handle = f"mpefd1:{name}:{fds[0]}:{fds[1]}:{fds[2]}"
    before = open_fds()
    genuine = pool.a.handle
    try:
        efd = from_handle(handle)
    except (ValueError, OSError):
        assert handle != genuine
    else:
        assert handle == genuine  # only the real handle attaches
        efd.close()
    assert open_fds() == before
    assert pool.a.peek() == 1  # and nothing touched the eventfds
    assert pool.b.peek() == 2


@pytest.mark.parametrize(
    "handle",
    ["", "mpefd1:", "mpefd1:short:1:2:3", "mpefd2:" + "A" * 22 + ":3:4:5",
     "mpefd1:" + "A" * 22 + ":-3:4:5", "mpefd1:" + "A" * 22 + ":3:4:5:6",
     "mpefd1:" + "A" * 22 + ":3:3:3", "mpefd1:" + "A" * 22 + ":99999999999:4:5",
     "mpefd1:" + "!" * 22 + ":3:4:5", " mpefd1:" + "A" * 22 + ":3:4:5"],
)
def test_from_handle_malformed_table(handle: str) -> None:
    with pytest.raises(ValueError):
        from_handle(handle)


@pytest.mark.parametrize("bad", [None, 3, b"mpefd1:", ["mpefd1"]])
def test_from_handle_wrong_types(bad: object) -> None:
    with pytest.raises(TypeError):
        from_handle(bad)  # type: ignore[arg-type]


@FUZZ
@given(data=st.data())
def test_recv_eventfd_fuzzed_messages(pool: Pool, data: st.DataObject) -> None:
    header = struct.pack("!8sHH16s", data.draw(st.sampled_from([b"MPEFDMSG", b"XXXXXXXX"])),
                         data.draw(st.sampled_from([1, 0, 2, 65535])),
                         data.draw(st.integers(0, 6)),
                         data.draw(st.sampled_from([bytes(16), _genuine_header(pool.a)[12:]])))
    payload = data.draw(st.sampled_from([header, header[:5], header + b"!", b"x" * 64]) |
                        st.binary(min_size=1, max_size=40))
    chosen = data.draw(st.lists(st.sampled_from(pool.fds[:-3]), max_size=6))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        before = open_fds()
        dups = [os.dup(fd) for fd in chosen]
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", dups).tobytes())]
        a.sendmsg([payload], rights if dups else [])
        for fd in dups:
            os.close(fd)
        try:
            efd = recv_eventfd(b)
        except (ValueError, OSError):
            pass
        else:
            efd.close()  # a well-formed message carrying the genuine fds
        assert open_fds() == before
        assert pool.a.peek() == 1
    finally:
        a.close()
        b.close()


# -- short, split and hostile socket messages (each answered in bounded time) ---------------


def _genuine_header(efd: EventFD) -> bytes:
    ident = _names.decode(efd.handle.split(":")[1])
    return struct.pack("!8sHH16s", b"MPEFDMSG", 1, 3, ident)


def _send(sock: socket.socket, payload: bytes, fds: list[int] | tuple[int, ...]) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sock.sendmsg([payload], rights if fds else [])


@contextlib.contextmanager
def _waits() -> Iterator[list[tuple[float, bool]]]:
    """Every wait recv_eventfd makes, as (time it was allowed, whether something arrived).

    ``_transfer._readable`` is the one place it waits: for the rest of a header a stream
    socket split.  What a wait was allowed is a fact of the code, where the time it took
    is the machine's (wall-clock upper bounds here failed on a loaded machine).
    """
    real = _transfer._readable
    seen: list[tuple[float, bool]] = []

    def watched(fd: int, seconds: float) -> bool:
        ready = real(fd, seconds)
        seen.append((seconds, ready))
        return ready

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_transfer, "_readable", watched)
        yield seen


def _refused_at_once(sock: socket.socket) -> None:
    """recv_eventfd must refuse (ValueError) without waiting for anything.

    Its wait is replaced by a check that fails if what it would wait for is not there
    already, and the time a wait for the rest may take is made an hour: a wait of any other
    kind could not end within the test either (pytest-timeout is the hang guard).  So a
    refusal proves that nothing was awaited, with no clock read.
    """

    def must_not_wait(fd: int, seconds: float) -> bool:
        assert select.select([fd], [], [], 0)[0], "recv_eventfd waited for what was not there"
        return True

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_transfer, "_readable", must_not_wait)
        mp.setattr(_transfer, "REST_TIMEOUT", 3600.0)
        with pytest.raises(ValueError):
            recv_eventfd(sock)


@pytest.mark.parametrize("nbytes", [0, 1, 5, 9])
@pytest.mark.parametrize("with_fds", [True, False], ids=["fds", "no-fds"])
def test_a_stream_message_too_short_to_be_ours_is_refused_at_once(
    nbytes: int, with_fds: bool
) -> None:
    """A peer that sends a few bytes and keeps the connection open once hung the receiver."""
    a, b = socket.socketpair()
    with EventFD(1) as efd:
        before = open_fds()
        # (A stream socket carries fds only with at least one byte.)
        payload = _genuine_header(efd)[:max(nbytes, 1)]
        _send(a, payload, efd.fds if with_fds else ())
        _refused_at_once(b)
        assert open_fds() == before  # every fd it brought is closed
        assert efd.peek() == 1
    a.close()
    b.close()


@pytest.mark.parametrize("timeout", [None, 0.2, 0.0], ids=["blocking", "timeout", "non-blocking"])
def test_the_rest_of_a_split_header_is_awaited_only_as_long_as_the_socket_allows(
    timeout: float | None,
) -> None:
    """The rest of a split header is awaited once, for at most the socket's timeout
    (REST_TIMEOUT on a blocking socket without one) and then refused, or not at all on a
    non-blocking socket.  What the wait was allowed is recorded (``_waits``); that it was
    waited out is a lower bound on the clock."""
    a, b = socket.socketpair()
    b.settimeout(timeout)
    with EventFD(1) as efd:
        before = open_fds()
        _send(a, _genuine_header(efd)[:12], efd.fds)  # magic, version, and no more
        with _waits() as waits:
            t0 = time.monotonic()
            with pytest.raises(ValueError):
                recv_eventfd(b)
            elapsed = time.monotonic() - t0
        if timeout == 0.0:
            assert waits == []  # a non-blocking socket is never waited on
        else:
            limit = REST_TIMEOUT if timeout is None else timeout
            assert len(waits) == 1
            allowed, arrived = waits[0]
            assert allowed <= limit  # no longer than the socket allows
            assert not arrived  # ... and it ran out
            assert elapsed >= limit * 0.9
        assert open_fds() == before
    a.close()
    b.close()


def test_a_peer_that_closes_inside_the_header_is_refused_at_once() -> None:
    a, b = socket.socketpair()
    with EventFD(1) as efd:
        before = open_fds()
        _send(a, _genuine_header(efd)[:12], efd.fds)
        closed = a.fileno()
        a.close()
        _refused_at_once(b)
        assert open_fds() == before - {closed}
    b.close()


def test_a_header_split_after_its_start_is_received() -> None:
    a, b = socket.socketpair()
    with EventFD(1) as efd:
        header = _genuine_header(efd)
        _send(a, header[:12], efd.fds)
        a.sendall(header[12:])
        with recv_eventfd(b) as got:
            assert got.peek() == 1
            got.write(1)
        assert efd.peek() == 2
    a.close()
    b.close()


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_SEQPACKET],
                         ids=["dgram", "seqpacket"])
@pytest.mark.parametrize("cut", [5, 12, 27])
def test_a_short_datagram_or_record_is_refused_at_once(kind: int, cut: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    with EventFD(1) as efd:
        before = open_fds()
        _send(a, _genuine_header(efd)[:cut], efd.fds)
        _refused_at_once(b)
        assert open_fds() == before
    a.close()
    b.close()


def test_out_of_fds_the_receiver_gets_emfile_not_a_blame_on_the_peer() -> None:
    a, b = socket.socketpair()
    with EventFD(1) as efd:
        _send(a, _genuine_header(efd), efd.fds)
        before = open_fds()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # The lowest limit that leaves exactly one free fd number: the kernel can install
        # one of the message's three fds, drops two, and reports MSG_CTRUNC.
        used = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        limit = next(n for n in range(1, soft + 1) if n - sum(fd < n for fd in used) == 1)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            with pytest.raises(OSError) as info:
                recv_eventfd(b)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert info.value.errno == errno.EMFILE
        assert not isinstance(info.value, ValueError)
        assert open_fds() == before
        assert efd.peek() == 1
    a.close()
    b.close()


# -- forged handles never close what the live eventfd uses ----------------------------------


def test_a_handle_mixing_live_fds_with_a_dup_closes_nothing() -> None:
    with EventFD(1) as efd:
        state_fd, rfd, wfd = efd.fds
        dup = os.dup(wfd)
        name = efd.handle.split(":")[1]
        before = open_fds()
        for forged in ((state_fd, rfd, dup), (os.dup(state_fd), rfd, wfd)):
            with pytest.raises(ValueError):
                from_handle(f"mpefd1:{name}:{forged[0]}:{forged[1]}:{forged[2]}")
            for fd in forged:
                os.fstat(fd)  # all still open: a handle's fds are named, never taken
            if forged[0] != state_fd:
                os.close(forged[0])
        assert open_fds() == before
        assert select.select([efd.fileno()], [], [], 0)[0]  # the live handle still works
        efd.write(1)
        assert efd.read() == 2
        os.close(dup)


@pytest.mark.parametrize("mode", [os.O_WRONLY, os.O_RDONLY], ids=["write-only", "read-only"])
def test_a_handle_naming_a_regular_file_of_the_wrong_access_mode_is_valueerror(
    mode: int, tmp_path: Any
) -> None:
    with EventFD(1) as efd:
        path = tmp_path / "state"
        path.write_bytes(os.pread(efd.fds[0], os.fstat(efd.fds[0]).st_size, 0))
        path.chmod(0o600)
        fd = os.open(path, mode)
        name = efd.handle.split(":")[1]
        _, rfd, wfd = efd.fds
        before = open_fds()
        with pytest.raises(ValueError):
            from_handle(f"mpefd1:{name}:{fd}:{rfd}:{wfd}")
        assert open_fds() == before
        os.close(fd)


# -- fuzzing stream sockets: short and split messages, with and without fds -----------------


@FUZZ
@given(data=st.data())
def test_recv_eventfd_fuzzed_split_stream_messages(pool: Pool, data: st.DataObject) -> None:
    header = _genuine_header(pool.a)
    payload = data.draw(st.sampled_from([header, header[:5], header[:12], header + b"!"]) |
                        st.binary(min_size=1, max_size=40))
    cut = data.draw(st.integers(1, len(payload)))
    with_fds = data.draw(st.booleans())
    close_after = data.draw(st.booleans())
    a, b = socket.socketpair()
    b.settimeout(0.05)
    try:
        before = open_fds()
        dups = [os.dup(fd) for fd in pool.a.fds] if with_fds else []
        _send(a, payload[:cut], dups)
        if cut < len(payload) and data.draw(st.booleans()):
            a.sendall(payload[cut:])
        if close_after:
            a.shutdown(socket.SHUT_WR)
        for fd in dups:
            os.close(fd)
        with _waits() as waits:
            try:
                efd = recv_eventfd(b)
            except (ValueError, OSError, EOFError):
                pass
            else:
                efd.close()
        # Bounded by the socket's timeout: every wait ends by one deadline 0.05 s away.
        assert all(allowed <= 0.05 for allowed, _ in waits), waits
        assert open_fds() == before
        assert pool.a.peek() == 1
    finally:
        a.close()
        b.close()
