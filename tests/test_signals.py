"""Signals: handlers that write, read, interrupt, or return normally.

Handlers run between bytecodes, never inside a C call, so a handler's ``write()`` or
``read()`` is an ordinary call, and a handler's exception propagates with nothing consumed
or added (docs/design.md, "Signals").
"""

from __future__ import annotations

import os
import random
import select
import signal
import sys
import threading
import time
from types import FrameType

import pytest

from crashkit import readiness_matches
from helpers import LineReader, fork_child, reap, sleeping, stats, wait_until
from mpeventfd import EFD_SEMAPHORE, MAX_VALUE, EventFD, _faults

W_WR, W_WW = "waiting_r", "waiting_w"


def waiters(efd: EventFD, word: str) -> int:
    return stats(efd)[word]


def test_handler_writes_while_main_thread_is_inside_write(backend: str) -> None:
    """An interval timer at 0.5 ms for 3 s (and until over 100 handler writes landed,
    however little CPU a loaded machine gives): every handler write lands exactly once."""
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
            while time.monotonic() < end or by_handler[0] <= 100:
                efd.write(1)
                by_main += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert by_handler[0] > 100
        assert efd.read(timeout=1) == by_main + by_handler[0]


def _busy_with_own(own: EventFD, other: EventFD, out: int, seconds: float) -> int:
    """Operate on ``own`` for ``seconds`` (and until over 50 handler writes, however little
    CPU a loaded machine gives); a timer's handler writes to ``other`` meanwhile."""
    counts = {"own": 0, "handler": 0, "read": 0}

    def handler(signum: int, frame: FrameType | None) -> None:
        other.write(1)
        counts["handler"] += 1

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0007, 0.0007)
    end = time.monotonic() + seconds
    while time.monotonic() < end or counts["handler"] <= 50:
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
    """Ctrl-C from another process while the main thread sleeps in a blocking call.

    The interrupter is a child process, not a thread: the fork at the end would otherwise
    happen beside a thread that ``join`` has seen finish but the OS may still be running
    (3.12 warns of a fork in a multi-threaded process; 3.13 joins the OS thread)."""
    with EventFD(0) as efd:
        if blocked == "write":
            efd.write(MAX_VALUE)
        before = efd.peek()
        word = W_WR if blocked == "read" else W_WW
        parent = os.getpid()

        def interrupt() -> None:
            wait_until(lambda: waiters(efd, word) == 1)
            os.kill(parent, signal.SIGINT)

        pid = fork_child(interrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                efd.read() if blocked == "read" else efd.write(1)
        finally:
            assert reap(pid) == 0
        assert efd.peek() == before  # nothing consumed or added
        assert waiters(efd, word) == 0
        assert reap(fork_child(lambda: efd.write(0, timeout=1))) == 0  # lock released


def test_handler_that_returns_continues_with_the_remaining_timeout(backend: str) -> None:
    """PEP 475: after a handler returns, the call goes on, and its deadline does not move.

    A fault raises the signal at the call's first wait step, so its handler runs inside the
    call (between two steps) however late the thread gets a CPU; no timer, no clock race.

    1. The handler returns at once: the call still waits out its whole timeout and raises
       TimeoutError (``elapsed >= timeout``, a lower bound: ending at the handler fails it).
    2. The handler itself runs until past the call's deadline: the call then raises
       TimeoutError without another wait step (``looks`` as the handler left it).  A call
       that restarted its timeout, or moved its deadline by the handler's time, would sleep
       again and look.  (A wall-clock upper bound here failed on a loaded machine.)
    """
    with EventFD(0) as efd:
        calls = [0]
        seen: dict[str, int] = {}

        def returns(signum: int, frame: FrameType | None) -> None:
            calls[0] += 1

        def outlasts_the_deadline(signum: int, frame: FrameType | None) -> None:
            calls[0] += 1
            seen["waiting"] = waiters(efd, W_WR)  # 1: it runs inside the read
            # The read took its deadline before this handler began, so the deadline is no
            # later than `end`.  Waiting for a moment on the call's own clock, not ordering.
            end = time.monotonic() + 0.5
            while (left := end - time.monotonic()) > 0:
                time.sleep(left)
            seen["looks"] = stats(efd)["looks"]

        old = signal.signal(signal.SIGUSR1, returns)
        try:
            _faults.arm("wait.step", f"signal:{int(signal.SIGUSR1)}")
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                efd.read(timeout=1.0)
            elapsed = time.monotonic() - t0
            assert calls[0] == 1
            assert elapsed >= 0.95  # it went on after the handler, to its own deadline

            calls[0] = 0
            signal.signal(signal.SIGUSR1, outlasts_the_deadline)
            _faults.arm("wait.step", f"signal:{int(signal.SIGUSR1)}")
            with pytest.raises(TimeoutError):
                efd.read(timeout=0.5)
            assert calls[0] == 1
            assert seen["waiting"] == 1
            assert stats(efd)["looks"] == seen["looks"]  # no wait step after the handler
        finally:
            _faults.disarm()
            signal.signal(signal.SIGUSR1, old)
        assert waiters(efd, W_WR) == 0


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
    """posix_ipc would turn a handler's exception into SignalError; ours propagates.

    A fault raises the signal at the read's first wait step, so the handler runs inside
    the read whatever the load (a timer's signal could come after the read's timeout)."""

    class Stop(Exception):
        pass

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stop

    with EventFD(0) as efd:
        old = signal.signal(signal.SIGUSR1, handler)
        try:
            _faults.arm("wait.step", f"signal:{int(signal.SIGUSR1)}")
            with pytest.raises(Stop):
                efd.read(timeout=5)
        finally:
            _faults.disarm()
            signal.signal(signal.SIGUSR1, old)
        assert waiters(efd, W_WR) == 0


def test_a_handlers_write_wakes_the_read_it_interrupted(backend: str) -> None:
    """The main thread blocks in read(); a signal's handler writes: that read returns it.
    (It once had to be deferred, and needed the wait step to end first.)

    The signal is sent once the read is registered and lands in its sleep (EINTR).  After
    the handler the read makes at most one look, the one that finds the handler's value:
    a deferred write would leave that look empty and cost at least one more wait step, a
    write applied only after the call would leave the read to time out.  Counted, not
    timed (a wall-clock bound failed on a loaded machine)."""
    with EventFD(0) as efd:
        seen: dict[str, int] = {}

        def handler(signum: int, frame: FrameType | None) -> None:
            efd.write(7)
            seen["looks"] = stats(efd)["looks"]

        def interrupt() -> None:
            wait_until(lambda: waiters(efd, W_WR) == 1)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGALRM)

        old = signal.signal(signal.SIGALRM, handler)
        t = threading.Thread(target=interrupt)
        t.start()
        try:
            assert efd.read(timeout=10) == 7
        finally:
            t.join(10)
            signal.signal(signal.SIGALRM, old)
        assert stats(efd)["looks"] - seen["looks"] <= 1  # no wait step after the handler
        assert waiters(efd, W_WR) == 0
        assert efd.peek() == 0


def test_a_handler_reads_while_the_thread_it_interrupted_is_blocked_in_read(
    backend: str,
) -> None:
    """Semaphore mode: the handler takes one token, the interrupted read the other.

    (read() from a handler once raised RuntimeError.)"""
    with EventFD(0, EFD_SEMAPHORE) as efd:
        got: list[int] = []

        def handler(signum: int, frame: FrameType | None) -> None:
            efd.write(2)
            got.append(efd.read(timeout=5))

        old = signal.signal(signal.SIGALRM, handler)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            got.append(efd.read(timeout=10))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert got == [1, 1]
        assert efd.peek() == 0


def _interrupted_loop(efd: EventFD, stop: int, out: int) -> int:
    """write(1) and read() as fast as possible; count what completed and what was hit.

    The handler raises KeyboardInterrupt only while a call is under way (just before or
    just after it), where a user's Ctrl-C would land; elsewhere, in this loop's own
    bookkeeping, it only counts, so that the loop itself cannot be broken.
    """
    done = {"w": 0, "r": 0, "hit": 0}
    inside = [False]

    def handler(signum: int, frame: FrameType | None) -> None:
        if inside[0]:
            # Disarmed at once: a second SIGINT can land before the except clause below has
            # run its first statement, and must not break the loop from there (it once did,
            # in CI beside a busy CPU).
            inside[0] = False
            done["hit"] += 1
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    os.write(out, b"ready\n")
    while not select.select([stop], [], [], 0)[0]:
        try:
            inside[0] = True
            efd.write(1)
            inside[0] = False
            done["w"] += 1
            inside[0] = True
            efd.read(timeout=0)
            inside[0] = False
            done["r"] += 1
        except (KeyboardInterrupt, BlockingIOError):
            inside[0] = False
    os.write(out, f"{done['w']} {done['r']} {done['hit']}\n".encode())
    return 0


def test_300_sigints_in_tight_loops_leave_nothing_locked_or_half_applied(backend: str) -> None:
    """Two processes write and read in tight loops while 300 SIGINTs hit them.

    A KeyboardInterrupt can only arrive before a call starts or after it returned, so the
    only uncertainty is a count the loop did not record (one per interrupt); the state
    itself is never half applied: no lock left held, no registration, readiness exact.
    """
    rng = random.Random(20261201)
    stop_r, stop_w = os.pipe()
    lines = LineReader()
    with EventFD(0, EFD_SEMAPHORE) as efd:
        pids = [fork_child(lambda: _interrupted_loop(efd, stop_r, lines.w)) for _ in range(2)]
        assert [lines.line() for _ in pids] == ["ready", "ready"]
        try:
            for i in range(300):
                time.sleep(rng.uniform(0.0002, 0.002))  # a random moment, not an ordering
                os.kill(pids[i % 2], signal.SIGINT)
        finally:
            os.write(stop_w, b"x")
        for pid in pids:
            assert reap(pid, 30) == 0
        rows = [tuple(map(int, lines.line().split())) for _ in pids]
        assert reap(fork_child(lambda: efd.write(0, timeout=1))) == 0  # nothing locked
        written = sum(r[0] for r in rows)
        read = sum(r[1] for r in rows)
        hits = sum(r[2] for r in rows)
        assert hits > 0
        assert abs(efd.peek() - (written - read)) <= hits
        assert readiness_matches(efd)
        assert stats(efd)["dirty"] == 0
        assert stats(efd)["waiting_r"] == stats(efd)["waiting_w"] == 0
    os.close(stop_r)
    os.close(stop_w)
    lines.close()


def test_sys_exit_in_a_sigterm_handler_ends_a_blocked_read(backend: str) -> None:
    """A handler's SystemExit propagates out of a blocked read, at once.

    The child's handler records the read still registered and the wait steps made so far;
    the SystemExit must end the read with no further wait step (``looks`` unchanged) and
    reach the child's ``except``.  A read that swallowed it would block for ever (its
    ``read()`` has no timeout): ``reap``'s 20 s is only that hang guard.  Counted, not timed
    (a 0.5 s wall-clock bound failed on a loaded machine)."""
    with EventFD(0) as efd:
        def child() -> int:
            seen: dict[str, int] = {}

            def handler(signum: int, frame: FrameType | None) -> None:
                s = stats(efd)
                seen.update(waiting=s[W_WR], looks=s["looks"])
                sys.exit(3)

            signal.signal(signal.SIGTERM, handler)
            try:
                efd.read()
            except SystemExit as e:
                if seen.get("waiting") != 1:
                    return 4  # the handler did not run inside the read
                if stats(efd)["looks"] != seen["looks"]:
                    return 5  # the read waited on after the handler raised
                return int(e.code or 0)
            return 1
        pid = fork_child(child)
        wait_until(lambda: waiters(efd, W_WR) == 1)
        os.kill(pid, signal.SIGTERM)
        assert reap(pid) == 3
        assert waiters(efd, W_WR) == 0


def test_keyboardinterrupt_while_waiting_for_the_lock_never_frees_anothers(
    backend: str,
) -> None:
    """Thread B holds the lock (held inside its write); Ctrl-C hits the main thread while
    it waits for it.  The lock stays B's: a probe process cannot get it meanwhile."""
    ready_r, ready_w = os.pipe()  # child -> parent: "B" (inside), "K" (interrupted)
    go_r, go_w = os.pipe()  # parent -> child main thread: contend now
    free_r, free_w = os.pipe()  # parent -> thread B: leave the section
    with EventFD(0) as efd:
        def child() -> int:
            _faults.arm("write.dirty", f"block:{free_r}")
            b = threading.Thread(target=efd.write, args=(1,))
            b.start()
            wait_until(lambda: stats(efd)["dirty"] == 1)
            os.write(ready_w, b"B")
            try:
                os.read(go_r, 1)
                efd.write(10)  # waits for B's lock
            except KeyboardInterrupt:
                os.write(ready_w, b"K")
            b.join(20)
            return 0
        pid = fork_child(child)
        try:
            assert _read_byte(ready_r) == b"B"
            os.write(go_w, b"x")
            wait_until(lambda: sleeping(pid))  # the main thread waits for the lock
            os.kill(pid, signal.SIGINT)
            assert _read_byte(ready_r) == b"K"
            with pytest.raises(TimeoutError):
                efd.write(100, timeout=0.3)  # B still holds the lock
            os.write(free_w, b"x")
            assert reap(pid) == 0
        finally:
            os.write(free_w, b"x")
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        assert efd.read(timeout=1) == 1
    for fd in (ready_r, ready_w, go_r, go_w, free_r, free_w):
        os.close(fd)


def _read_byte(fd: int) -> bytes:
    assert select.select([fd], [], [], 20)[0], "the child did not answer in time"
    return os.read(fd, 1)
