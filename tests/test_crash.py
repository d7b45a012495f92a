"""Crash safety (SPEC §5): a process killed — or interrupted — at every named step.

For every step: another process's next operation completes within 1 s, the killed call was
applied wholly or not at all, readiness equals ``counter > 0``, and nothing named leaks
(the autouse leak guard).  Every test runs with both mutex backends.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

import pytest

from conftest import record
from crashkit import (
    SCENARIOS,
    Scenario,
    check_usable,
    killed,
    next_operation_within,
    readiness_matches,
    victim,
    wait_until,
    wake_when_blocked,
)
from helpers import LineReader, blocked_in_poll, fork_child, python, reap
from mpeventfd import EventFD, _faults, _lifecycle
from mpeventfd._state import W_WR

IDS = [s.id for s in SCENARIOS]


def _skip_unsupported(backend: str, scenario: Scenario) -> None:
    if scenario.fast_only and backend != "fast":
        pytest.skip("a step of the fast mutex")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_sigkill_at_step(backend: str, scenario: Scenario) -> None:
    _skip_unsupported(backend, scenario)
    with EventFD(scenario.initval, scenario.flags) as efd:
        pid = victim(efd, scenario.step, "kill", scenario.op)
        if scenario.wake:
            wake_when_blocked(efd, scenario.wake)
        assert killed(reap(pid)), "the victim never reached the step"
        record("recovery seconds after a SIGKILL", next_operation_within(efd))
        record("kill points", 1)
        assert efd.peek() in scenario.outcomes
        assert readiness_matches(efd)
        check_usable(efd)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_keyboardinterrupt_at_step(backend: str, scenario: Scenario) -> None:
    """A handler's exception at any step leaves nothing locked and nothing half-applied."""
    _skip_unsupported(backend, scenario)
    with EventFD(scenario.initval, scenario.flags) as efd:
        waker = None
        if scenario.wake:
            waker = threading.Thread(target=wake_when_blocked, args=(efd, scenario.wake))
            waker.start()
        _faults.arm(scenario.step, "raise")
        try:
            with pytest.raises(KeyboardInterrupt):
                scenario.op(efd)
        finally:
            _faults.disarm()
            if waker is not None:
                waker.join(20)
        # Nothing locked: another process gets the mutex at once.
        assert reap(fork_child(lambda: efd.write(0, timeout=1))) == 0
        assert efd.peek() in scenario.outcomes
        assert readiness_matches(efd)
        check_usable(efd)


REPAIR_STEPS = ["repair.start", "repair.slots", "repair.pipe", "repair.posted", "repair.done"]


@pytest.mark.parametrize("step", REPAIR_STEPS)
def test_double_fault_kill_the_repairer(backend: str, step: str) -> None:
    with EventFD(0) as efd:
        first = victim(efd, "write.pipe", "kill", lambda e: e.write(3))  # leaves dirty
        assert killed(reap(first))
        second = victim(efd, step, "kill", lambda e: e.write(1))
        assert killed(reap(second))
        record("recovery seconds after a SIGKILL", next_operation_within(efd))
        assert efd.peek() == 0  # neither write committed
        assert readiness_matches(efd)
        check_usable(efd)


@pytest.mark.parametrize("step", ["recover.elected", "recover.takeover"])
def test_double_fault_kill_the_recoverer(step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast mutex: the holder dies with the token, then the elected prover dies too."""
    monkeypatch.setattr(_lifecycle, "default_backend", _lifecycle.BACKENDS["fast"])
    with EventFD(5) as efd:
        holder = victim(efd, "mutex.taken", "kill", lambda e: e.write(1))
        assert killed(reap(holder))
        prover = victim(efd, step, "kill", lambda e: e.write(1, timeout=5))
        assert killed(reap(prover))
        record("recovery seconds after a SIGKILL", next_operation_within(efd))
        assert efd.peek() == 5
        check_usable(efd)


def test_zombie_holder_never_blocks(backend: str) -> None:
    """Killed while holding the mutex and not reaped: the kernel has released its locks."""
    with EventFD(1) as efd:
        pid = victim(efd, "write.commit", "kill", lambda e: e.write(1))
        deadline = time.monotonic() + 10
        while _state_of(pid) != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.002)
        record("recovery seconds after a SIGKILL", next_operation_within(efd))
        assert efd.peek() == 2
        assert killed(reap(pid))


def _state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_stopped_holder_is_waited_for_never_robbed(backend: str) -> None:
    with EventFD(1) as efd:
        holder = victim(efd, "write.commit", "stop", lambda e: e.write(3))
        os.waitpid(holder, os.WUNTRACED)  # it stopped itself inside the critical section
        # M1: a timed call elsewhere gives up in time instead of hanging on the mutex.
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            efd.read(timeout=0.2)
        assert time.monotonic() - t0 < 0.5
        waiter = fork_child(lambda: efd.write(1, timeout=20))
        time.sleep(2)  # the holder stays stopped for 2 s; nobody may steal its mutex
        assert os.waitpid(waiter, os.WNOHANG) == (0, 0)  # still waiting
        os.kill(holder, signal.SIGCONT)
        assert reap(holder) == 3  # finished its write (the step was reached, no more hooks)
        assert reap(waiter) == 0
        assert efd.read(timeout=1) == 1 + 3 + 1


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


def test_waiter_registrations_of_killed_processes_are_corrected(backend: str) -> None:
    with EventFD(0) as efd:
        core = efd._core
        assert core is not None
        pids = [fork_child(lambda: efd.read(timeout=30)) for _ in range(3)]
        wait_until(lambda: core.words[W_WR] == 3)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            assert killed(reap(pid))
        # A live waiter's expired step drops the dead registrations.
        with pytest.raises(TimeoutError):
            efd.read(timeout=0.3)
        assert core.words[W_WR] == 0
        t0 = time.monotonic()
        reader = fork_child(lambda: 0 if efd.read(timeout=10) == 1 else 1)
        wait_until(lambda: core.words[W_WR] == 1)
        t0 = time.monotonic()
        efd.write(1)
        assert reap(reader) == 0
        assert time.monotonic() - t0 < 0.09  # woken by a post, not by a step


@pytest.mark.parametrize("step", ["attach.validated", "attach.sems", "attach.slot"])
def test_kill_during_attach(backend: str, step: str) -> None:
    import socket

    from mpeventfd import recv_eventfd, send_eventfd

    a, b = socket.socketpair()
    with EventFD(2) as efd:
        def body() -> int:
            efd.close()  # the inherited handle: the next one is a real attach
            _faults.arm(step, "kill")
            with recv_eventfd(b) as mine:
                mine.read(timeout=5)  # claims a slot with either backend
                mine.read(timeout=0.3)
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
    _lifecycle.sweep()


@pytest.mark.parametrize(
    "step", [s for s in _faults.STEPS if s.startswith("create.") and s != "create.lockfile"])
def test_kill_during_creation_leaves_only_debris_cleanup_removes(
    backend: str, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if step == "create.sem_m" and backend != "fast":
        pytest.skip("the fast mutex's semaphore")
    # Without O_TMPFILE a dead creator leaves a temporary file, which the sweep removes once
    # it is free and older than TEMP_GRACE: the creator here is certainly dead.
    monkeypatch.setattr(_lifecycle, "TEMP_GRACE", 0.0)
    out = python(f"from mpeventfd import _faults, _lifecycle, EventFD\n"
                 f"_lifecycle.default_backend = {_lifecycle.default_backend}\n"
                 f"_faults.arm({step!r}, 'kill')\nEventFD()\n")
    assert out.returncode == -signal.SIGKILL
    _lifecycle.sweep()
