"""Signals (SPEC §2, §5.6, §5.7): handlers that write, interrupt, or return normally."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

import pytest

from crashkit import wait_until
from helpers import fork_child, reap
from mpeventfd import MAX_VALUE, EventFD
from mpeventfd._state import W_WR, W_WW


def waiters(efd: EventFD, word: int) -> int:
    core = efd._core
    assert core is not None
    return int(core.words[word])


def test_handler_writes_while_main_thread_is_inside_write(backend: str) -> None:
    """An interval timer at 0.5 ms for 3 s: every handler write lands exactly once."""
    with EventFD(0) as efd:
        by_handler = [0]

        def handler(signum: int, frame: FrameType | None) -> None:
            efd.write(1)
            by_handler[0] += 1

        old = signal.signal(signal.SIGALRM, handler)
        by_main = 0
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
            end = time.monotonic() + 3
            while time.monotonic() < end:
                efd.write(1)
                by_main += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert by_handler[0] > 100
        assert efd.read(timeout=1) == by_main + by_handler[0]


def _busy_with_own(own: EventFD, other: EventFD, out: int, seconds: float) -> int:
    """Operate on ``own``; a timer's handler writes to ``other`` meanwhile."""
    counts = {"own": 0, "handler": 0, "read": 0}

    def handler(signum: int, frame: FrameType | None) -> None:
        other.write(1)
        counts["handler"] += 1

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0007, 0.0007)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        own.write(1)
        counts["own"] += 1
        try:
            counts["read"] += own.read(timeout=0)
        except BlockingIOError:
            pass
    signal.setitimer(signal.ITIMER_REAL, 0)
    os.write(out, f"{counts['own']} {counts['handler']} {counts['read']}\n".encode())
    return 0


def test_handlers_in_two_processes_write_to_each_others_eventfd(backend: str) -> None:
    """Each handler targets the eventfd the *other* process is operating on: no deadlock."""
    r, w = os.pipe()
    try:
        with EventFD(0) as a, EventFD(0) as b:
            pids = [fork_child(lambda: _busy_with_own(a, b, w, 2.0)),
                    fork_child(lambda: _busy_with_own(b, a, w, 2.0))]
            for pid in pids:
                assert reap(pid, 30) == 0
            data = b""
            while data.count(b"\n") < 2:
                data += os.read(r, 4096)
            rows = [tuple(map(int, line.split())) for line in data.decode().splitlines()]
            written = sum(own + handler for own, handler, _ in rows)
            read = sum(got for _, _, got in rows)
            assert read + a.peek() + b.peek() == written, rows
            assert all(handler > 50 for _, handler, _ in rows)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("blocked", ["read", "write"])
def test_keyboardinterrupt_during_a_blocking_call(backend: str, blocked: str) -> None:
    with EventFD(0) as efd:
        if blocked == "write":
            efd.write(MAX_VALUE)
        before = efd.peek()
        word = W_WR if blocked == "read" else W_WW

        def interrupt() -> None:
            wait_until(lambda: waiters(efd, word) == 1)
            os.kill(os.getpid(), signal.SIGINT)

        t = threading.Thread(target=interrupt)
        t.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                efd.read() if blocked == "read" else efd.write(1)
        finally:
            t.join(10)
        assert efd.peek() == before  # nothing consumed or added
        assert waiters(efd, word) == 0
        assert reap(fork_child(lambda: efd.write(0, timeout=1))) == 0  # lock released


def test_handler_that_returns_continues_with_the_remaining_timeout(backend: str) -> None:
    """PEP 475: the call goes on after the handler, and its deadline does not move."""
    with EventFD(0) as efd:
        calls = [0]

        def handler(signum: int, frame: FrameType | None) -> None:
            calls[0] += 1

        old = signal.signal(signal.SIGUSR1, handler)
        try:
            timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
            timer.start()
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                efd.read(timeout=1.0)
            elapsed = time.monotonic() - t0
            timer.join()
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert calls[0] == 1
        assert 0.95 <= elapsed < 1.3


def test_signalerror_never_reaches_the_user(backend: str) -> None:
    """Signals land in a thread blocked in read(): posix_ipc's SignalError is absorbed."""
    import posix_ipc

    with EventFD(0) as efd:
        results: list[object] = []

        def reader() -> None:
            try:
                results.append(efd.read(timeout=10))
            except posix_ipc.SignalError as e:  # pragma: no cover - the failure we test for
                results.append(e)

        old = signal.signal(signal.SIGUSR2, lambda *a: None)
        t = threading.Thread(target=reader)
        t.start()
        try:
            wait_until(lambda: waiters(efd, W_WR) == 1)
            for _ in range(200):
                signal.pthread_kill(t.ident or 0, signal.SIGUSR2)
                time.sleep(0.001)
            efd.write(9)
            t.join(10)
        finally:
            signal.signal(signal.SIGUSR2, old)
        assert results == [9]


def test_main_thread_handler_exception_is_not_swallowed(backend: str) -> None:
    """posix_ipc would turn a handler's exception into SignalError; ours propagates."""

    class Stop(Exception):
        pass

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stop

    with EventFD(0) as efd:
        old = signal.signal(signal.SIGUSR1, handler)
        try:
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            with pytest.raises(Stop):
                efd.read(timeout=5)
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert waiters(efd, W_WR) == 0
