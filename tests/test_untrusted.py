"""Untrusted input: handles and socket messages from elsewhere (SPEC §3, §6), fuzzed."""

from __future__ import annotations

import array
import os
import socket
import struct
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import open_fds
from mpeventfd import EventFD, from_handle, recv_eventfd

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
        core = self.a._core
        assert core is not None
        self.names = [core.name, "A" * 22, "_" * 22]

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
                         data.draw(st.sampled_from([bytes(16), pool.a._core.ident])))  # type: ignore[union-attr]
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
