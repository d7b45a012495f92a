"""Sharing (docs/design.md §10): every start method, every multiprocessing transport, SCM_RIGHTS
between unrelated processes, and exec with and without close-on-exec."""

from __future__ import annotations

import array
import multiprocessing
import os
import socket
import struct
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import finish, open_fds, python, reaped
from mpeventfd import (
    EFD_SEMAPHORE,
    EventFD,
    StateError,
    from_handle,
    recv_eventfd,
    send_eventfd,
)

METHODS = ["fork", "spawn", "forkserver"]


def _write(efd: EventFD, n: int) -> None:
    efd.write(n)


def _write_from_queue(q: multiprocessing.Queue[EventFD], n: int) -> None:
    efd = q.get(timeout=20)
    efd.write(n)
    efd.close()


def _write_from_pipe(conn: multiprocessing.connection.Connection, n: int) -> None:
    efd = conn.recv()
    efd.write(n)
    efd.close()
    conn.send("done")


def _pool_task(efd: EventFD, n: int) -> int:
    efd.write(n)
    return os.getpid()


def _nested(efd: EventFD, depth: int) -> None:
    if depth == 0:
        efd.write(1)
        return
    p = multiprocessing.get_context("spawn").Process(target=_nested, args=(efd, depth - 1))
    p.start()
    p.join(60)
    assert p.exitcode == 0


def _inheritable_flags(efd: EventFD, q: multiprocessing.Queue[list[bool]]) -> None:
    q.put([os.get_inheritable(fd) for fd in efd.fds])


@pytest.mark.parametrize("method", METHODS)
def test_process_argument(method: str) -> None:
    ctx: Any = multiprocessing.get_context(method)
    with EventFD(0, EFD_SEMAPHORE) as efd:
        p = ctx.Process(target=_write, args=(efd, 7))
        p.start()
        with reaped(p):
            assert finish(p, 60) == 0
        assert efd.semaphore
        assert [efd.read(timeout=5) for _ in range(7)] == [1] * 7


@pytest.mark.parametrize("method", METHODS)
def test_queue_to_a_live_process(method: str) -> None:
    ctx: Any = multiprocessing.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_write_from_queue, args=(q, 11))
    p.start()
    with reaped(p), EventFD() as efd:
        q.put(efd)
        assert efd.read(timeout=60) == 11
        assert finish(p, 60) == 0
    q.close()
    q.join_thread()


@pytest.mark.parametrize("method", METHODS)
def test_pipe_to_a_live_process(method: str) -> None:
    ctx: Any = multiprocessing.get_context(method)
    here, there = ctx.Pipe()
    p = ctx.Process(target=_write_from_pipe, args=(there, 5))
    p.start()
    with reaped(p), EventFD() as efd:
        here.send(efd)
        assert here.poll(60)
        assert here.recv() == "done"
        assert efd.read(timeout=5) == 5
        assert finish(p, 60) == 0
    here.close()
    there.close()


@pytest.mark.parametrize("method", METHODS)
def test_pool(method: str) -> None:
    ctx: Any = multiprocessing.get_context(method)
    with EventFD() as efd, ctx.Pool(2) as pool:
        pids = pool.starmap(_pool_task, [(efd, 1)] * 6)
        assert efd.read(timeout=5) == 6
        assert all(pid != os.getpid() for pid in pids)
        pool.close()
        pool.join()


def test_unpickled_handle_pickles_again_three_levels_deep() -> None:
    with EventFD() as efd:
        p = multiprocessing.get_context("spawn").Process(target=_nested, args=(efd, 2))
        p.start()
        with reaped(p):
            assert finish(p, 120) == 0
        assert efd.read(timeout=5) == 1


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawned_fds_follow_cloexec(method: str) -> None:
    ctx: Any = multiprocessing.get_context(method)
    q = ctx.Queue()
    with EventFD() as efd:
        p = ctx.Process(target=_inheritable_flags, args=(efd, q))
        p.start()
        with reaped(p):
            assert q.get(timeout=60) == [False, False, False]
            assert finish(p, 60) == 0
    q.close()
    q.join_thread()


# -- SCM_RIGHTS between unrelated processes -------------------------------------------------

SENDER = textwrap.dedent(
    """
    import socket, sys
    from mpeventfd import EventFD, send_eventfd
    path, mode = sys.argv[1], sys.argv[2]
    efd = EventFD(0, 0 if mode != "sem" else 1)
    efd.write(40)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    send_eventfd(s, efd)
    efd.close()          # right after send_eventfd returns
    s.close()
    print(efd.closed, flush=True)
    """
)


@pytest.fixture
def socket_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as d:
        yield os.path.join(d, "sock")


def _listen(path: str) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(30)
    return srv


def test_scm_rights_sender_closes_and_exits_before_recv(socket_path: str) -> None:
    """The message in flight keeps the eventfd alive, as the kernel does for an eventfd."""
    srv = _listen(socket_path)
    try:
        done = python(SENDER, socket_path, "normal")  # runs to completion: the sender is gone
        assert done.returncode == 0, done.stderr
        conn, _ = srv.accept()
        with conn:
            efd = recv_eventfd(conn)
        with efd:
            assert not any(os.get_inheritable(fd) for fd in efd.fds)
            assert efd.read(timeout=5) == 40
            efd.write(2)
            assert efd.read() == 2
    finally:
        srv.close()


def test_scm_rights_unrelated_receiver_writes_back(socket_path: str) -> None:
    receiver = textwrap.dedent(
        """
        import socket, sys
        from mpeventfd import recv_eventfd
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sys.argv[1])
        efd = recv_eventfd(s)
        efd.write(41)
        efd.close()
        """
    )
    srv = _listen(socket_path)
    try:
        import subprocess

        child = subprocess.Popen([sys.executable, "-c", receiver, socket_path])
        try:
            conn, _ = srv.accept()
            with conn, EventFD() as efd:
                send_eventfd(conn, efd)
                assert efd.read(timeout=20) == 41
            assert child.wait(20) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    finally:
        srv.close()


def _receive_many(sock: socket.socket, rounds: int) -> int:
    for i in range(rounds):
        with recv_eventfd(sock) as efd:
            efd.write(i + 1)
            if efd.read(timeout=5) != i + 1:
                return 1
    return 0


def test_200_rounds_create_send_close_at_once() -> None:
    a, b = socket.socketpair()
    p = multiprocessing.get_context("spawn").Process(target=_child_receiver, args=(b, 200))
    p.start()
    with reaped(p):
        for _ in range(200):
            efd = EventFD()
            send_eventfd(a, efd)
            efd.close()  # the receiver attaches after this, to an object only in flight
        assert finish(p, 120) == 0
    a.close()
    b.close()


def _child_receiver(sock: socket.socket, rounds: int) -> None:
    sys.exit(_receive_many(sock, rounds))


def _send_raw(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    rights = array.array("i", fds).tobytes()
    sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)] if fds else [])


def _header(magic: bytes = b"MPEFDMSG", version: int = 1, count: int = 3,
            ident: bytes = bytes(16)) -> bytes:
    return struct.pack("!8sHH16s", magic, version, count, ident)


@pytest.mark.parametrize(
    ("payload", "nfds"),
    [
        (_header(magic=b"NOTMPEFD"), 3),
        (_header(version=2), 3),
        (_header(count=2), 2),
        (_header(count=4), 4),
        (_header(), 2),
        (_header(), 4),
        (_header()[:10], 3),
        (_header(), 0),
    ],
    ids=["magic", "version", "two-fds", "four-fds", "count-mismatch-2", "count-mismatch-4",
         "short", "no-fds"],
)
def test_malformed_message_closes_every_fd(payload: bytes, nfds: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with EventFD() as efd:
        fds = [os.dup(fd) for fd in (efd.fds * 2)[:nfds]]
        before = open_fds() - set(fds)
        _send_raw(a, payload, fds)
        for fd in fds:
            os.close(fd)
        with pytest.raises(ValueError):
            recv_eventfd(b)
        assert open_fds() == before
    a.close()
    b.close()


def test_truncated_control_data_closes_every_fd() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    before = open_fds()
    r, w = os.pipe()
    fds = [r] * 40  # more than recv_eventfd makes room for: MSG_CTRUNC
    _send_raw(a, _header(count=40), fds)
    os.close(r)
    os.close(w)
    with pytest.raises(StateError, match="truncated"):
        recv_eventfd(b)
    assert open_fds() == before
    a.close()
    b.close()


def test_foreign_fds_with_a_valid_header_are_refused() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    before = open_fds()
    with tempfile.TemporaryFile() as f:
        r, w = os.pipe()
        _send_raw(a, _header(), [f.fileno(), r, w])
        os.close(r)
        os.close(w)
    with pytest.raises(StateError):
        recv_eventfd(b)
    assert open_fds() == before
    a.close()
    b.close()


def test_eof_before_any_message() -> None:
    a, b = socket.socketpair()
    a.close()
    with pytest.raises(EOFError):
        recv_eventfd(b)
    b.close()


@pytest.mark.parametrize("bad", [None, 3, "sock"])
def test_send_and_recv_reject_non_sockets(bad: object) -> None:
    with EventFD() as efd, pytest.raises(TypeError):
        send_eventfd(bad, efd)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        recv_eventfd(bad)  # type: ignore[arg-type]


def test_send_rejects_inet_sockets_and_non_eventfds() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with EventFD() as efd, pytest.raises(ValueError):
        send_eventfd(s, efd)
    s.close()
    a, b = socket.socketpair()
    with pytest.raises(TypeError):
        send_eventfd(a, 3)  # type: ignore[arg-type]
    a.close()
    b.close()


# -- exec ------------------------------------------------------------------------------------

LIST_FDS = textwrap.dedent(
    """
    import os
    for fd in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        print(f"{st.st_dev}:{st.st_ino}")
    """
)


def _targets(efd: EventFD) -> set[str]:
    # Identify files by inode: a linked O_TMPFILE's fd reads back as "/dev/shm/#N (deleted)".
    return {f"{st.st_dev}:{st.st_ino}" for st in map(os.fstat, efd.fds)}


def test_cloexec_default_no_fd_survives_exec() -> None:
    with EventFD() as efd:
        out = python(LIST_FDS, close_fds=False)
        assert out.returncode == 0
        assert not set(out.stdout.split()) & _targets(efd)


def test_without_cloexec_every_fd_survives_exec() -> None:
    with EventFD(0, 0) as efd:
        out = python(LIST_FDS, close_fds=False)
        assert _targets(efd) <= set(out.stdout.split())


ATTACH = textwrap.dedent(
    """
    import os, sys
    from mpeventfd import from_handle
    efd = from_handle(sys.argv[1] if len(sys.argv) > 1 else os.environ["MPEFD_HANDLE"])
    assert not efd.get_inheritable()
    efd.write(41)
    efd.close()
    """
)


@pytest.mark.parametrize("via", ["argv", "env"])
def test_exec_child_reattaches_with_handle(via: str) -> None:
    with EventFD() as efd:
        efd.set_inheritable(True)
        if via == "argv":
            out = python(ATTACH, efd.handle, pass_fds=efd.fds)
        else:
            out = python(ATTACH, env={"MPEFD_HANDLE": efd.handle}, pass_fds=efd.fds)
        assert out.returncode == 0, out.stderr
        assert efd.read(timeout=5) == 41


def test_exec_child_of_a_non_cloexec_eventfd() -> None:
    with EventFD(0, 0) as efd:
        out = python(ATTACH, efd.handle, pass_fds=efd.fds)
        assert out.returncode == 0, out.stderr
        assert efd.read(timeout=5) == 41


def test_from_handle_in_the_owning_process_gives_a_second_handle() -> None:
    with EventFD() as efd:
        twin = from_handle(efd.handle)
        twin.write(3)
        assert efd.read() == 3
        twin.close()
        efd.write(1)  # closing the second handle left the first one working
        assert efd.read() == 1
