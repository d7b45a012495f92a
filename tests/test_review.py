"""Deterministic tests for the flaws of reference/design-review.md §8, one per finding.

Each test reproduces the interleaving the review gives for a flaw and shows the fix holds.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import textwrap
import threading
import time

import pytest

from crashkit import readiness_matches, wait_until
from helpers import fork_child, forks_beside_threads, python, reap
from mpeventfd import EventFD, _faults, recv_eventfd
from mpeventfd._probe import PLATFORM
from mpeventfd._state import W_PR, W_PW, W_WR, W_WW


def words(efd: EventFD, *index: int) -> tuple[int, ...]:
    core = efd._core
    assert core is not None
    return tuple(int(core.words[i]) for i in index)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- W: the wake-up channel -----------------------------------------------------------------


def test_w1_exception_after_a_consumed_post_does_not_lose_the_other_wakeup(backend: str) -> None:
    """Two blocked readers; the one that consumes the post raises before accounting.

    Level-triggered posting makes its exception path re-post, so the other reader returns
    at once (a post, not the expiry of a 100-250 ms wait step).
    """
    with EventFD(0) as efd:
        done: list[tuple[str, float]] = []

        def reader() -> None:
            try:
                efd.read(timeout=20)
                done.append(("read", time.monotonic()))
            except KeyboardInterrupt:
                done.append(("interrupted", time.monotonic()))

        _faults.arm("wait.consumed", "raise")  # whichever reader consumes first
        threads = [threading.Thread(target=reader) for _ in range(2)]
        try:
            for t in threads:
                t.start()
            wait_until(lambda: words(efd, W_WR)[0] == 2)
            t0 = time.monotonic()
            efd.write(1)
            for t in threads:
                t.join(20)
        finally:
            _faults.disarm()
        assert sorted(kind for kind, _ in done) == ["interrupted", "read"]
        read_at = next(at for kind, at in done if kind == "read")
        assert read_at - t0 < 0.05


def test_w2_a_stopped_registered_reader_does_not_pile_up_posts(backend: str) -> None:
    with EventFD(0) as efd:
        core = efd._core
        assert core is not None
        pid = fork_child(lambda: 0 if efd.read(timeout=30) else 1)
        wait_until(lambda: words(efd, W_WR)[0] == 1)
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(10_000):
                efd.write(1)
            if PLATFORM.sem_getvalue:
                assert core.sem_r.value <= 1  # one post for one registered reader
            assert words(efd, W_PR)[0] <= 1
        finally:
            os.kill(pid, signal.SIGCONT)
        assert reap(pid) == 0
        # A later blocked read waits without spinning on stray posts.
        waiter = fork_child(lambda: efd.read(timeout=1.5) and 0)
        wait_until(lambda: words(efd, W_WR)[0] == 1)
        time.sleep(1.0)
        assert cpu_seconds(waiter) < 0.2
        efd.write(1)
        assert reap(waiter) == 0


def test_w3_readers_and_writers_never_steal_each_others_posts(backend: str) -> None:
    with EventFD(10) as efd:
        events: dict[str, float] = {}

        def writer() -> None:
            efd.write(2**64 - 11, timeout=20)  # needs counter <= 9
            events["writer"] = time.monotonic()

        def reader() -> None:
            events["reader"] = time.monotonic() if efd.read(timeout=20) else 0.0

        w = threading.Thread(target=writer)
        w.start()
        wait_until(lambda: words(efd, W_WW)[0] == 1)
        assert efd.read() == 10  # the writer becomes eligible
        eligible = time.monotonic()
        r = threading.Thread(target=reader)
        r.start()  # blocks at 0 or reads the writer's value, whichever comes first
        w.join(20)
        r.join(20)
        assert events["writer"] - eligible < 0.05
        assert events["reader"] - events["writer"] < 0.05
        assert efd.peek() in (0, 2**64 - 11)


def _attach_detach_and_maybe_die(efd: EventFD, rounds: int) -> int:
    for _ in range(rounds):
        try:
            efd.read(timeout=0.02)
        except TimeoutError:
            pass
    return 0


def test_w5_registrations_stay_right_while_64_processes_come_and_die(backend: str) -> None:
    with EventFD(0) as efd:
        pids = [fork_child(lambda: _attach_detach_and_maybe_die(efd, 5)) for _ in range(64)]
        for k, pid in enumerate(pids):
            if k % 3 == 0:
                os.kill(pid, signal.SIGKILL)  # some die while registered as waiters
        for pid in pids:
            reap(pid)
        with pytest.raises(TimeoutError):
            efd.read(timeout=0.3)  # an expired step corrects dead registrations
        assert words(efd, W_WR, W_WW) == (0, 0)
        assert words(efd, W_PR)[0] <= 1
        assert words(efd, W_PW)[0] == 0
        reader = fork_child(lambda: 0 if efd.read(timeout=10) == 1 else 1)
        wait_until(lambda: words(efd, W_WR)[0] == 1)
        t0 = time.monotonic()
        efd.write(1)
        assert reap(reader) == 0
        assert time.monotonic() - t0 < 0.09  # the post latency, not a wait step


# -- S: signals, exceptions, re-entrancy ----------------------------------------------------


def test_s1_sys_exit_in_a_sigterm_handler_ends_a_blocked_read(backend: str) -> None:
    with EventFD(0) as efd:
        def child() -> int:
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))
            try:
                efd.read()
            except SystemExit as e:
                return int(e.code or 0)
            return 1
        pid = fork_child(child)
        wait_until(lambda: words(efd, W_WR)[0] == 1)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        assert reap(pid) == 3
        assert time.monotonic() - t0 < 0.5  # within one wait step


def test_s2_keyboardinterrupt_in_a_contended_acquire_never_frees_anothers_lock(
    backend: str,
) -> None:
    """Thread B is inside the critical section; Ctrl-C hits the main thread while it waits
    for B's thread lock.  The mutex must stay held by B: a probe process cannot get it."""
    ready_r, ready_w = os.pipe()  # child -> parent: "B" (inside), "K" (interrupted)
    go_r, go_w = os.pipe()  # parent -> child main thread: contend now
    free_r, free_w = os.pipe()  # parent -> thread B: leave the section
    with EventFD(0) as efd:
        def child() -> int:
            def hold(step: str) -> None:
                os.write(ready_w, b"B")
                os.read(free_r, 1)
            _faults.arm("write.commit", hold)
            b = threading.Thread(target=efd.write, args=(1,))
            b.start()
            try:
                os.read(go_r, 1)
                efd.write(10)  # contends for B's thread lock
            except KeyboardInterrupt:
                os.write(ready_w, b"K")
            b.join(20)
            return 0
        pid = fork_child(child)
        try:
            assert _read_byte(ready_r) == b"B"
            os.write(go_w, b"x")
            _wait_futex(pid)  # the main thread sleeps in the contended thread lock
            os.kill(pid, signal.SIGINT)
            assert _read_byte(ready_r) == b"K"
            with pytest.raises(TimeoutError):
                efd.write(100, timeout=0.3)  # B still holds the mutex
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


def _wait_futex(pid: int) -> None:
    """Wait until the main thread of ``pid`` sleeps on a futex (a contended acquire)."""
    deadline = time.monotonic() + 10
    while True:
        with open(f"/proc/{pid}/task/{pid}/wchan") as f:
            if f.read().startswith("futex"):
                return
        assert time.monotonic() < deadline
        time.sleep(0.002)


def _read_byte(fd: int) -> bytes:
    assert select.select([fd], [], [], 20)[0], "the child did not answer in time"
    return os.read(fd, 1)


def test_s3a_a_handlers_write_wakes_the_same_threads_blocked_read(backend: str) -> None:
    with EventFD(0) as efd:
        old = signal.signal(signal.SIGALRM, lambda *a: efd.write(1))
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            t0 = time.monotonic()
            assert efd.read(timeout=10) == 1
            assert time.monotonic() - t0 < 1.0
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


@forks_beside_threads
def test_s3b_gc_of_a_second_handle_inside_the_critical_section(backend: str) -> None:
    a, b = socket.socketpair()
    with EventFD(0) as efd:
        from mpeventfd import send_eventfd

        send_eventfd(a, efd)
        # A second handle of the same core, reachable only through a reference cycle, so
        # only the cyclic GC frees it: closing it must not unlock our section.
        cycle: list[object] = [recv_eventfd(b)]
        cycle.append(cycle)
        del cycle

        def collect(step: str) -> None:
            gc.collect()  # finalizers run inside our critical section
        _faults.arm("write.commit", collect)
        try:
            efd.write(1)
        finally:
            _faults.disarm()
        core = efd._core
        assert core is not None
        assert core.refs == 1  # the finalizer's release ran once we left the section
        assert efd.read(timeout=1) == 1
        assert reap(fork_child(lambda: efd.write(0, timeout=1))) == 0
    a.close()
    b.close()


def test_s3d_fork_with_a_queued_deferred_write_counts_it_once(backend: str) -> None:
    with EventFD(0) as efd:
        pids: list[int] = []

        def handler_like(step: str) -> None:
            efd.write(5)  # deferred: this thread is inside the section
            pid = os.fork()
            if pid == 0:
                os._exit(0)  # the child must not apply the parent's queue
            pids.append(pid)
        _faults.arm("write.commit", handler_like)
        try:
            efd.write(1)
        finally:
            _faults.disarm()
        assert reap(pids[0]) == 0
        assert efd.read(timeout=1) == 6


def test_s4_fork_from_inside_the_critical_section(backend: str) -> None:
    """The child resumes inside the parent's section: it must raise, not store."""
    r, w = os.pipe()
    with EventFD(0) as efd:
        pids: list[int] = []

        def fork_here(step: str) -> None:
            pid = os.fork()
            if pid:
                pids.append(pid)

        _faults.arm("write.commit", fork_here)
        try:
            efd.write(1)
        except BaseException:
            if not pids:  # the child: the interrupted write refused to finish
                os.write(w, b"raised")
                os._exit(0)
            raise
        finally:
            _faults.disarm()
        if not pids:
            os.write(w, b"completed")
            os._exit(0)
        assert reap(pids[0]) == 0
        assert os.read(r, 16) == b"raised"
        assert efd.read(timeout=1) == 1  # exactly one write, by the parent
        efd.write(1)  # and the eventfd still works in both worlds
        assert reap(fork_child(lambda: 0 if efd.read(timeout=5) == 1 else 1)) == 0
    os.close(r)
    os.close(w)


# -- L4, M1, M3 ----------------------------------------------------------------------------


def test_l4_close_from_another_thread_while_one_blocks_in_read(backend: str) -> None:
    efd = EventFD(0)
    got: list[object] = []

    def reader() -> None:
        try:
            got.append(efd.read(timeout=2))
        except BaseException as e:
            got.append(e)

    t = threading.Thread(target=reader)
    t.start()
    wait_until(lambda: words(efd, W_WR)[0] == 1)
    handle = efd.handle
    efd.set_inheritable(True)
    fds = efd.fds
    attach = "import sys\nfrom mpeventfd import from_handle\nfrom_handle(sys.argv[1]).write(7)\n"
    out = python(attach, handle, pass_fds=fds)
    efd.close()  # the reader keeps its resources until it leaves (no crash)
    assert out.returncode == 0, out.stderr
    t.join(10)
    assert got == [7] or isinstance(got[0], TimeoutError)


def test_m1_stopped_holder_gives_timeouterror_in_time(backend: str) -> None:
    with EventFD(1) as efd:
        from crashkit import victim

        holder = victim(efd, "write.commit", "stop", lambda e: e.write(1))
        os.waitpid(holder, os.WUNTRACED)
        for call in (lambda: efd.read(timeout=0.2), lambda: efd.write(1, timeout=0.2)):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                call()
            assert time.monotonic() - t0 < 0.3
        os.kill(holder, signal.SIGCONT)
        assert reap(holder) == 3
        assert efd.read(timeout=1) == 2


def test_m3_a_user_who_makes_the_pipe_blocking_and_reads_it_cannot_hang_us(
    backend: str,
) -> None:
    with EventFD(0) as efd:
        efd.write(3)
        os.set_blocking(efd.fileno(), True)  # shared description: affects the library too
        assert os.read(efd.fileno(), 1)  # a user drains the byte behind our back
        assert efd.read(timeout=1) == 3  # must not block while draining
        efd.write(1)  # 0 -> n writes the byte again: readiness is repaired
        assert readiness_matches(efd)
        assert efd.read(timeout=1) == 1
        assert readiness_matches(efd)


# -- P1/P2: the macOS paths forced on Linux -------------------------------------------------

PORTABLE = textwrap.dedent(
    """
    import os, sys, time
    from mpeventfd import EventFD, MAX_VALUE, _lifecycle, _names
    from mpeventfd._probe import PLATFORM
    assert PLATFORM.portable and not PLATFORM.sem_timedwait
    efd = EventFD(0)
    core = efd._core
    names = [_names.sem_name(core.name, k) for k in "rwm"]
    assert all(len(n.encode()) <= 31 for n in names), names
    efd.write(MAX_VALUE)
    pid = os.fork()
    if pid == 0:
        efd.write(1, timeout=1.5)  # blocked writer: must poll, not spin
        os._exit(0)
    time.sleep(1.0)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    efd.read()
    os.waitpid(pid, 0)
    print("cpu", cpu)
    assert cpu < 0.2, cpu
    efd.close()
    """
)


def test_p1_p2_portable_paths_no_busy_loop_and_short_names() -> None:
    out = python(PORTABLE, env={"MPEVENTFD_PORTABLE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr


def test_p1_portable_recovery_from_a_killed_poster() -> None:
    code = textwrap.dedent(
        """
        import os, signal, time
        from mpeventfd import EventFD, _faults
        efd = EventFD(0)
        pid = os.fork()
        if pid == 0:
            _faults.arm("write.commit", "kill")  # dies after the commit, before posting
            efd.write(1)
            os._exit(3)
        reader = os.fork()
        if reader == 0:
            os._exit(0 if efd.read(timeout=5) == 1 else 1)
        os.waitpid(pid, 0)
        t0 = time.monotonic()
        _, status = os.waitpid(reader, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert time.monotonic() - t0 < 1.0
        efd.close()
        """
    )
    out = python(code, env={"MPEVENTFD_PORTABLE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
