"""Crash safety: a process killed, stopped or interrupted at every named step.

For every step of every C section and wait: another process's next operation completes
within 1 s, the killed call was applied wholly or not at all, readiness equals
``counter > 0``, and nothing named leaks (the autouse leak guard).  Every test runs with
both lock kinds (docs/design.md, "Crash safety").
"""

from __future__ import annotations

import errno
import os
import select
import signal
import threading
import time

import pytest

from crashkit import (
    SCENARIOS,
    Scenario,
    check_usable,
    killed,
    next_operation_within,
    read,
    readiness_matches,
    victim,
    wake_when_blocked,
    write3,
)
from figures import record, record_kill
from helpers import (
    LineReader,
    blocked_in_poll,
    fork_child,
    forks_beside_threads,
    python,
    reap,
    sleeping,
    stats,
    wait_until,
)
from mpeventfd import EventFD, _core, _faults, _liveness, _registry
from mpeventfd._probe import PLATFORM

IDS = [s.id for s in SCENARIOS]


@pytest.fixture(params=["armed", "unarmed"])
def readiness(request: pytest.FixtureRequest) -> str:
    """Whether the eventfd's pipe mirrors the counter (someone asked for a pollable fd)."""
    mode: str = request.param
    return mode


@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_sigkill_at_step(backend: str, readiness: str, scenario: Scenario) -> None:
    with EventFD(scenario.initval, scenario.flags) as efd:
        if readiness == "armed":
            efd.fileno()
        pid = victim(efd, scenario.step, "kill", scenario.op)
        if scenario.wake:
            wake_when_blocked(efd, scenario.wake)
        assert killed(reap(pid)), "the victim never reached the step"
        record("recovery seconds after a SIGKILL", next_operation_within(efd))
        record("kill points", 1)
        assert efd.peek() in scenario.outcomes
        assert readiness_matches(efd)
        check_usable(efd)


# It forks right after joining its waker thread, whose OS thread may still be exiting: on
# 3.12+ os.fork() then warns (seen once in CI beside a busy CPU).
@forks_beside_threads
@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_sigint_at_step(backend: str, readiness: str, scenario: Scenario) -> None:
    """SIGINT at any step: the KeyboardInterrupt comes from the call itself, on every
    CPython version, and costs nothing.

    Inside a section no Python code runs: the call finishes its section, then runs the
    handler before it returns.  A read gives its value back first (nothing consumed); a
    write that committed stays committed; a signal in a wait step ends the wait with
    nothing consumed.  (On 3.14 the interrupt once came only after the call had returned,
    a few instructions later than on 3.13: a read's value was lost with it.)
    """
    with EventFD(scenario.initval, scenario.flags) as efd:
        if readiness == "armed":
            efd.fileno()
        waker = None
        if scenario.wake:
            waker = threading.Thread(target=wake_when_blocked, args=(efd, scenario.wake))
            waker.start()
        _faults.arm(scenario.step, f"signal:{int(signal.SIGINT)}")
        returned: list[object] = []
        try:
            with pytest.raises(KeyboardInterrupt):
                returned.append(scenario.op(efd))
        finally:
            _faults.disarm()
            if waker is not None:
                waker.join(20)
        assert not returned  # raised by the call, not after it
        # Nothing locked: another process gets the lock at once.
        assert reap(fork_child(lambda: efd.write(0, timeout=1))) == 0
        added = 3 if scenario.op is write3 else 0  # a write's section always commits
        assert efd.peek() == scenario.initval + scenario.wake + added
        assert readiness_matches(efd)
        assert stats(efd)["waiting_r"] == 0  # no registration left behind
        check_usable(efd)


REPAIR_STEPS = ["repair.start", "repair.slots", "repair.pipe", "repair.posted", "repair.done"]


@pytest.mark.parametrize("step", REPAIR_STEPS)
def test_double_fault_kill_the_repairer(backend: str, readiness: str, step: str) -> None:
    with EventFD(0) as efd:
        if readiness == "armed":
            efd.fileno()
        first = victim(efd, "write.pipe", "kill", lambda e: e.write(3))  # leaves dirty
        assert killed(reap(first))
        second = victim(efd, step, "kill", lambda e: e.write(1))
        assert killed(reap(second))
        record("recovery seconds after a SIGKILL", next_operation_within(efd))
        record("kill points", 1)
        assert efd.peek() == 0  # neither write committed
        assert readiness_matches(efd)
        assert stats(efd)["repairs"] >= 1
        check_usable(efd)


def test_a_killed_holder_is_repaired_by_the_next_one(backend: str) -> None:
    """The robust mutex reports EOWNERDEAD; the byte lock leaves ``dirty``: both repair."""
    with EventFD(0) as efd:
        pid = victim(efd, "write.commit", "kill", lambda e: e.write(3))
        assert killed(reap(pid))
        before = stats(efd)["repairs"]
        next_operation_within(efd)
        assert stats(efd)["repairs"] == before + 1
        assert efd.peek() == 3
        assert readiness_matches(efd)


def test_zombie_holder_never_blocks(backend: str) -> None:
    """Killed while holding the mutex and not reaped: the kernel has released its locks."""
    with EventFD(0) as efd:
        pid = victim(efd, "write.commit", "kill", lambda e: e.write(1))
        wait_until(lambda: _state_of(pid) == "Z")
        record("recovery seconds after a SIGKILL", next_operation_within(efd))
        assert efd.peek() == 1
        assert killed(reap(pid))


def _state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _stopped_holder(efd: EventFD) -> int:
    """A child stopped inside its critical section (a 0 -> 3 write, before its commit)."""
    holder = victim(efd, "write.pipe", "stop", lambda e: e.write(3))
    os.waitpid(holder, os.WUNTRACED)  # it stopped itself with the lock held
    return holder


def test_stopped_holder_is_waited_for_never_robbed(backend: str) -> None:
    with EventFD(1) as efd:
        efd.read()
        holder = _stopped_holder(efd)
        try:
            waiter = fork_child(lambda: efd.write(1, timeout=20))
            time.sleep(2)  # the holder stays stopped for 2 s: nobody may take its lock
            assert os.waitpid(waiter, os.WNOHANG) == (0, 0)  # still waiting
        finally:
            os.kill(holder, signal.SIGCONT)
            assert reap(holder) == 3  # finished its write (the step was reached)
        assert reap(waiter) == 0
        assert efd.read(timeout=1) == 3 + 1


def test_a_stopped_holder_takes_no_deadline_hostage(backend: str) -> None:
    """A timed call raises at its deadline, a non-blocking one after the documented
    patience (1 s, which a live holder never comes near), Ctrl-C reaches a blocked main
    thread within 100 ms, and close() returns at once under a thread waiting for the lock.
    (A timed read once returned only when the stopped peer was resumed, 5.4 s later.)"""
    efd = EventFD(0)
    holder = _stopped_holder(efd)
    got: list[int] = []
    blocked = threading.Thread(target=lambda: got.append(efd.read(timeout=20)))
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            efd.read(timeout=2)
        assert 1.95 <= time.monotonic() - t0 < 2.3
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            efd.write(1, timeout=0.2)
        assert 0.19 <= time.monotonic() - t0 < 0.5
        t0 = time.monotonic()
        with pytest.raises(BlockingIOError):
            efd.read(timeout=0)
        assert 0.95 <= time.monotonic() - t0 < 1.4
        signal_at = [0.0]

        def interrupt() -> None:
            signal_at[0] = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)

        timer = threading.Timer(0.3, interrupt)
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            efd.read()  # waits for the lock for ever, but for Ctrl-C
        assert time.monotonic() - signal_at[0] < 0.1
        timer.join()
        blocked.start()
        wait_until(lambda: blocked.native_id is not None and _sleeps(blocked.native_id))
        t0 = time.monotonic()
        efd.close()  # the last handle, while a thread of ours waits for the lock
        assert time.monotonic() - t0 < 0.05
    finally:
        os.kill(holder, signal.SIGCONT)
        assert reap(holder) == 3
    blocked.join(20)
    assert got == [3]  # the waiting read went on after close(), as on Linux


def _sleeps(tid: int) -> bool:
    with open(f"/proc/self/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "S"


def _poll_until_read(efd: EventFD, out: int) -> int:
    """Wait for readiness, then read without waiting; report the first value read.

    Level-triggered readiness lets a poller find nothing: another one took the counter, or a
    repair drained a byte that a writer killed before its commit had put in.  Then it polls
    again, as a user's loop would.
    """
    while select.select([efd.fileno()], [], [], 20)[0]:
        try:
            value = efd.read(timeout=0)
        except BlockingIOError:
            continue
        os.write(out, b"%d\n" % value)
        return 0
    return 2


@pytest.mark.parametrize("step", ["write.pipe", "write.commit", "write.posted"])
def test_blocked_pollers_wake_after_a_writer_dies_between_steps(backend: str,
                                                                 step: str) -> None:
    reports = LineReader()
    with EventFD(0) as efd:
        pollers = [fork_child(lambda: _poll_until_read(efd, reports.w)) for _ in range(2)]
        for pid in pollers:
            wait_until(lambda: blocked_in_poll(pid))  # noqa: B023 (called at once)
        writer = victim(efd, step, "kill", lambda e: e.write(3))
        assert killed(reap(writer))
        values = []
        if step != "write.pipe":
            # The write committed and its byte is in: a blocked poller woke and took it.
            values.append(int(reports.line()))
        # Each poller still polling gets a write of its own.
        while len(values) < len(pollers):
            efd.write(3)
            values.append(int(reports.line()))
        assert values == [3] * len(pollers)
        for pid in pollers:
            assert reap(pid) == 0
        assert efd.peek() == 0
        assert readiness_matches(efd)
    reports.close()


def test_registrations_of_killed_waiters_are_swept_where_they_matter(backend: str) -> None:
    """Dead waiters' registrations are harmless until the rule counts a dead one's consumed
    post as still on its way: a live reader then finds, at its next look, that it could
    proceed without a post, takes the lock, and sweeps them (no idle waiter ever scans)."""
    with EventFD(0) as efd:
        pids = [fork_child(lambda: efd.read(timeout=30)) for _ in range(3)]
        wait_until(lambda: stats(efd)["waiting_r"] == 3)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            assert killed(reap(pid))
        reader = fork_child(lambda: 0 if efd.read(timeout=10) == 1 else 1)
        wait_until(lambda: stats(efd)["waiting_r"] == 4)
        t0 = time.monotonic()
        efd.write(1)  # the dead are registered, yet the live reader gets the post
        assert reap(reader) == 0
        assert time.monotonic() - t0 < 0.09  # woken by a post, not by a step
        # A waiter consumes its post and dies before accounting it: the rule now believes
        # that post is still on its way to a waiter.
        victim_pid = victim(efd, "wait.woken", "kill", read)
        wait_until(lambda: sleeping(victim_pid) and stats(efd)["waiting_r"] == 4)
        efd.write(1)
        assert killed(reap(victim_pid))
        assert stats(efd)["posted_r"] == 1
        assert efd.read(timeout=0) == 1  # (the victim's token: nobody took it)
        reader = fork_child(lambda: 0 if efd.read(timeout=10) == 1 else 1)
        wait_until(lambda: sleeping(reader) and stats(efd)["waiting_r"] == 5)
        t0 = time.monotonic()
        efd.write(1)  # no post: the rule counts the dead one's as pending
        assert reap(reader) == 0
        assert time.monotonic() - t0 < 0.5  # its next look (100 ms steps in a main thread)
        assert (stats(efd)["waiting_r"], stats(efd)["posted_r"]) == (0, 0)  # swept
        reader = fork_child(lambda: 0 if efd.read(timeout=10) == 1 else 1)
        wait_until(lambda: stats(efd)["waiting_r"] == 1)
        t0 = time.monotonic()
        efd.write(1)
        assert reap(reader) == 0
        assert time.monotonic() - t0 < 0.09  # a post again


@pytest.mark.parametrize("step", ["attach.validated", "attach.sems", "slot.claimed"])
def test_kill_during_attach(backend: str, step: str) -> None:
    import socket

    from mpeventfd import recv_eventfd, send_eventfd

    a, b = socket.socketpair()
    record_kill(step)
    with EventFD(2) as efd:
        def body() -> int:
            efd.close()  # the inherited handle: the next one is a real attach
            _faults.arm(step, "kill")
            with recv_eventfd(b) as mine:
                mine.read(timeout=5)
                mine.read(timeout=0.3)  # waits: claims a slot
            return 3
        pid = fork_child(body)
        send_eventfd(a, efd)
        assert killed(reap(pid))
        record("recovery seconds after a SIGKILL", next_operation_within(efd))
        check_usable(efd)
    a.close()
    b.close()


@pytest.mark.parametrize("step", ["detach.closed", "detach.unlinking"])
def test_kill_during_detach_of_the_last_holder(backend: str, step: str) -> None:
    go_r, go_w = os.pipe()
    efd = EventFD()

    def close_when_last(e: EventFD) -> None:
        assert select.select([go_r], [], [], 20)[0]  # the parent has closed its handle
        e.close()

    pid = victim(efd, step, "kill", close_when_last)
    efd.close()
    os.write(go_w, b"x")
    # Whatever the dead detacher left is debris now, and the cleanup removes it.
    assert killed(reap(pid))
    os.close(go_r)
    os.close(go_w)
    _registry.sweep()


@pytest.mark.parametrize(
    "step", [s for s in _faults.PY_STEPS if s.startswith("create.") and s != "create.lockfile"])
def test_kill_during_creation_leaves_only_debris_cleanup_removes(
    backend: str, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without O_TMPFILE a dead creator leaves a temporary file, which the sweep removes once
    # it is free and older than TEMP_GRACE: the creator here is certainly dead.
    monkeypatch.setattr(_liveness, "TEMP_GRACE", 0.0)
    record_kill(step)
    out = python(f"from mpeventfd import _faults, EventFD\n"
                 f"EventFD._mutex_kind = {EventFD._mutex_kind}\n"
                 f"_faults.arm({step!r}, 'kill')\nEventFD()\n")
    assert out.returncode == -signal.SIGKILL
    _registry.sweep()


@pytest.mark.skipif(PLATFORM.carrier != _core.CARRIER_PIPE,
                    reason="the byte locks live on a lock file here")
def test_a_replaced_fileno_never_becomes_a_childs_lock_carrier() -> None:
    """A fork child opens its private description from fileno(): it checks the pipe's
    identity first, so a user's file at that number is refused instead of locked."""
    efd = EventFD(0)
    rfd = efd.fileno()
    os.close(rfd)
    impostor = os.open(os.devnull, os.O_RDONLY)
    assert impostor == rfd  # the lowest free number: the user's file now sits there

    def child() -> int:
        try:
            efd.write(1)
        except OSError as e:
            return 0 if e.errno == errno.EBADF else 2
        return 1

    try:
        assert reap(fork_child(child)) == 0
        efd.write(1)  # the parent's private description is the real pipe: it still works
        assert efd.read(timeout=1) == 1
    finally:
        os.close(impostor)
        os.dup2(efd.fds[2], rfd)  # any fd at the number, for close() to close
        efd.close()


def test_a_post_lost_with_its_poster_is_made_up_by_the_waiters_step(backend: str) -> None:
    """Posts are made after the unlock (a woken reader would find the lock still held):
    a writer killed in between has accounted a post it never made.  The waiter's bounded
    step finds the counter all the same, and the accounting drops the phantom post."""
    with EventFD(0) as efd:
        reader = fork_child(lambda: 0 if efd.read(timeout=10) == 3 else 1)
        wait_until(lambda: stats(efd)["waiting_r"] == 1)
        writer = victim(efd, "lock.unlocked", "kill", lambda e: e.write(3))
        assert killed(reap(writer))
        t0 = time.monotonic()
        assert reap(reader) == 0
        assert time.monotonic() - t0 < 0.6  # one wait step (250 ms) and the read
        next_operation_within(efd)
        words = stats(efd)
        assert (words["waiting_r"], words["posted_r"]) == (0, 0)
        check_usable(efd)


def test_a_waiter_that_times_out_holding_a_consumed_post_gives_it_back(backend: str) -> None:
    """X consumed a post, then could not get the lock (a stopped holder) before its
    deadline.  It gives the post back: another reader is then woken by the next write's
    post, not by the end of its wait step.  (The post was once lost until X's process
    used the eventfd again.)"""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    lines = LineReader()
    with EventFD(0) as efd:
        def x() -> int:
            _faults.arm("wait.woken", f"block:{go_r}")
            try:
                efd.read(timeout=1.0)
                os.write(lines.w, b"read\n")
            except TimeoutError:
                os.write(lines.w, b"timeout\n")
            os.read(done_r, 1)  # alive, and not touching the eventfd, until the end
            return 0

        xpid = fork_child(x)
        wait_until(lambda: stats(efd)["waiting_r"] == 1)
        efd.write(1)  # X consumes the post and holds still at wait.woken
        wait_until(lambda: stats(efd)["sem_r"] == 0 and sleeping(xpid))
        holder = victim(efd, "read.locked", "stop", lambda e: e.read(timeout=5))
        os.waitpid(holder, os.WUNTRACED)  # it holds the lock, stopped before taking the 1
        try:
            os.write(go_w, b"x")
            assert lines.line() == "timeout"
        finally:
            os.kill(holder, signal.SIGCONT)
            assert reap(holder) == 3  # it took the 1
        reader = fork_child(lambda: 0 if efd.read(timeout=5) == 1 else 1)
        wait_until(lambda: sleeping(reader) and stats(efd)["waiting_r"] >= 2)
        t0 = time.monotonic()
        efd.write(1)
        assert reap(reader) == 0
        assert time.monotonic() - t0 < 0.15  # a post, not the end of a 250 ms step
        os.write(done_w, b"x")
        assert reap(xpid) == 0
    for fd in (go_r, go_w, done_r, done_w):
        os.close(fd)
    lines.close()
