"""Crash safety: a process killed, stopped or interrupted at every named step.

For every step of every C section and wait: another process's next operation completes
within 1 s, the killed call was applied wholly or not at all, readiness equals
``counter > 0``, and nothing named leaks (the autouse leak guard).  Every test runs with
both lock kinds (docs/design.md, "Crash safety").
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

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
    FORKED,
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


# How often the main thread may go to sleep in one 100 ms step of its wait for a held lock
# (docs/design.md, "The lock"): once on a robust mutex (one timed wait); the byte lock polls
# with naps of 20 us doubling to 2 ms: 7 naps reach 2 ms (2.54 ms in all), then one per
# 2 ms and a last shorter one, 56 at most.  A loaded machine only makes a step's naps fewer.
SLEEPS_PER_STEP = {"robust": 1, "byte": 56}


def _sleeps_of(pid: int, tid: int) -> int:
    """How often a thread has gone to sleep: its voluntary context switches
    (proc_pid_status(5)).  Waiting for a CPU is not one, so load never adds any."""
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc")


def _main_sleeps() -> int:
    return _sleeps_of(os.getpid(), os.getpid())


def _lock_wait_sleeps(backend: str, seconds: float) -> int:
    """The most sleeps a main thread's wait of ``seconds`` for a held lock can take: one
    step per 100 ms begun, and two more for waits for the GIL on the way."""
    return math.ceil(round(seconds / _core.STEP_MAIN, 6)) * SLEEPS_PER_STEP[backend] + 2


def _watchdog(holder: int, seconds: float) -> tuple[int, int]:
    """A process that resumes ``holder`` unless told within ``seconds`` (a byte on the
    returned fd) that the test is over: a call held hostage by the holder then comes back,
    and fails, instead of hanging the suite.  Returns its pid and that fd."""
    done_r, done_w = os.pipe()

    def body() -> int:
        if select.select([done_r], [], [], seconds)[0]:
            return 0
        os.kill(holder, signal.SIGCONT)
        return 1
    pid = fork_child(body)
    os.close(done_r)
    return pid, done_w


def _still_stopped(holder: int) -> None:
    assert _state_of(holder) == "T", "the call came back only once the holder was resumed"


def _interrupt_once_waiting(go: int) -> int:
    """Child: once told (a byte on ``go``), SIGINT the parent as soon as its main thread
    has gone to sleep again.  That thread does nothing but read() by then, and its other
    thread waits inside read() without the GIL: that sleep is its wait for the stopped
    holder's lock."""
    parent = os.getppid()
    assert select.select([go], [], [], 60)[0]
    before = _sleeps_of(parent, parent)
    wait_until(lambda: _sleeps_of(parent, parent) > before)
    os.kill(parent, signal.SIGINT)
    return 0


def _kick_readers(efd: EventFD) -> None:
    """Set the readers' kick bit, as a lock-free commit does (docs/design.md, "Lock-free
    operations"), through the state file: without the lock, which the stopped holder has."""
    core = efd._core
    assert core is not None
    os.pwrite(core.fds[0], (1).to_bytes(8, sys.byteorder), _core.OFFSET_KICK)  # (bit 1)


@forks_beside_threads
def test_a_stopped_holder_takes_no_deadline_hostage(backend: str) -> None:
    """A timed call raises at its deadline, a non-blocking one after the documented
    patience (1 s, which a live holder never comes near), Ctrl-C reaches a main thread
    waiting for the lock, and close() returns under a thread waiting for the lock.  (A
    timed read once returned only when the stopped peer was resumed, 5.4 s later.)

    No clock bounds these from above: a loaded machine keeps a process off the CPU for
    longer than any bound would allow.  Instead, each call must come back while the holder
    is still stopped (only a watchdog resumes it, after 60 s: a call held hostage fails
    instead of hanging), and a timed call may go to sleep only as often as the steps of
    its wait allow (waiting for a CPU is no sleep): one that overstayed its deadline or
    its patience by more than a step would sleep more.  The lower bounds are the clock's.
    """
    efd = EventFD(0)
    # A thread blocked in read() from the start (it registers while the lock is free); a
    # kick at the end sends it after the lock.
    got: list[int] = []
    blocked = threading.Thread(target=lambda: got.append(efd.read(timeout=90)))
    blocked.start()
    wait_until(lambda: stats(efd)["waiting_r"] == 1)
    holder = _stopped_holder(efd)
    dog, dog_done = _watchdog(holder, 60)
    go_r, go_w = os.pipe()
    sender = fork_child(lambda: _interrupt_once_waiting(go_r))
    try:
        # The call, what it raises, when at the earliest, how long it waits for the lock.
        calls: list[tuple[Callable[[], object], type[OSError], float, float]] = [
            (lambda: efd.read(timeout=2), TimeoutError, 1.95, 2.0),
            (lambda: efd.write(1, timeout=0.2), TimeoutError, 0.19, 0.2),
            (lambda: efd.read(timeout=0), BlockingIOError, 0.95, 1.0),  # the patience
        ]
        for call, error, earliest, wait in calls:
            t0, sleeps = time.monotonic(), _main_sleeps()
            with pytest.raises(error):
                call()
            sleeps = _main_sleeps() - sleeps
            assert time.monotonic() - t0 >= earliest  # not before its deadline
            _still_stopped(holder)  # not when the holder goes on
            assert sleeps <= _lock_wait_sleeps(backend, wait)  # nor a step after its deadline
        # Ctrl-C: the child signals once this read sleeps in its wait for the lock (the
        # go-ahead is inside the check too: should this thread sleep anywhere before the
        # read, for the GIL say, the KeyboardInterrupt must not escape it).
        def go_and_read() -> None:
            os.write(go_w, b"x")
            efd.read()  # waits for the lock for ever, but for Ctrl-C

        with pytest.raises(KeyboardInterrupt):
            go_and_read()
        _still_stopped(holder)
        assert reap(sender) == 0
        # The blocked thread's next look finds the kick (as a lock-free commit leaves it)
        # and goes for the lock: from then on it waits for the lock inside its call.
        looks = stats(efd)["looks_locked"]
        _kick_readers(efd)
        wait_until(lambda: stats(efd)["looks_locked"] == looks + 1)
        efd.close()  # the last handle, while a thread of ours waits for the lock
        assert blocked.is_alive()  # close() did not wait for the call in flight
        assert not got
        _still_stopped(holder)
    finally:
        if sender in FORKED:  # (the test failed before Ctrl-C)
            os.kill(sender, signal.SIGKILL)
            reap(sender)
        with contextlib.suppress(BrokenPipeError):  # (unless it fired, and is gone)
            os.write(dog_done, b"x")
        os.kill(holder, signal.SIGCONT)
        assert reap(holder) == 3
        reap(dog)
        for fd in (dog_done, go_r, go_w):
            os.close(fd)
    blocked.join(20)
    assert got == [3]  # the waiting read went on after close(), as on Linux


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


def _counted_read(efd: EventFD, out: int, posts_only: bool) -> int:
    """Child: one ``read(timeout=10)``, then "value posts looks" on ``out``: the value read
    (-1: TimeoutError), and how this process's read came back: the posts it consumed
    (``woken``) and its looks that said go (``looks_locked``).  No clock needed.

    ``posts_only``: the read runs in a thread whose wait steps outlast its deadline
    (``_core._step``): it comes back by a post, or at its deadline (with no look).
    Otherwise in the main thread, which looks every 100 ms."""
    got: list[int] = []

    def read_once() -> None:
        try:
            got.append(efd.read(timeout=10))
        except TimeoutError:
            got.append(-1)

    before = stats(efd)
    if posts_only:
        _core._step(3600.0)  # (this child's own; it exits after the read)
        thread = threading.Thread(target=read_once)
        thread.start()
        thread.join(20)
    else:
        read_once()
    after = stats(efd)
    posts = after["woken"] - before["woken"]
    looks = after["looks_locked"] - before["looks_locked"]
    os.write(out, f"{got[0] if got else -2} {posts} {looks}\n".encode())
    return 0


def _how_it_read(lines: LineReader) -> tuple[int, ...]:
    """(value, posts consumed, looks that said go) of a _counted_read child."""
    return tuple(int(word) for word in lines.line().split())


def test_registrations_of_killed_waiters_are_swept_where_they_matter(backend: str) -> None:
    """Dead waiters' registrations are harmless until the rule counts a dead one's consumed
    post as still on its way: a live reader then finds, at its next look, that it could
    proceed without a post, takes the lock, and sweeps them (no idle waiter ever scans).

    How each reader came back is counted, not timed: a reader meant to be posted waits in
    steps that outlast its deadline, so a missed post shows as no post consumed."""
    lines = LineReader()
    with EventFD(0) as efd:
        pids = [fork_child(lambda: efd.read(timeout=30)) for _ in range(3)]
        wait_until(lambda: stats(efd)["waiting_r"] == 3)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            assert killed(reap(pid))
        reader = fork_child(lambda: _counted_read(efd, lines.w, posts_only=True))
        wait_until(lambda: stats(efd)["waiting_r"] == 4)
        efd.write(1)  # the dead are registered, yet the live reader gets the post
        assert _how_it_read(lines) == (1, 1, 0)  # by a post, not by a look
        assert reap(reader) == 0
        # A waiter consumes its post and dies before accounting it: the rule now believes
        # that post is still on its way to a waiter.
        victim_pid = victim(efd, "wait.woken", "kill", read)
        wait_until(lambda: sleeping(victim_pid) and stats(efd)["waiting_r"] == 4)
        efd.write(1)
        assert killed(reap(victim_pid))
        assert stats(efd)["posted_r"] == 1
        assert efd.read(timeout=0) == 1  # (the victim's token: nobody took it)
        reader = fork_child(lambda: _counted_read(efd, lines.w, posts_only=False))
        wait_until(lambda: sleeping(reader) and stats(efd)["waiting_r"] == 5)
        efd.write(1)  # no post: the rule counts the dead one's as pending
        # Its next look (a main thread's step) found the 1: a deadline reached with no
        # look, or a post, would count otherwise.
        assert _how_it_read(lines) == (1, 0, 1)
        assert reap(reader) == 0
        assert (stats(efd)["waiting_r"], stats(efd)["posted_r"]) == (0, 0)  # swept
        reader = fork_child(lambda: _counted_read(efd, lines.w, posts_only=True))
        wait_until(lambda: stats(efd)["waiting_r"] == 1)
        efd.write(1)
        assert _how_it_read(lines) == (1, 1, 0)  # a post again
        assert reap(reader) == 0
    lines.close()


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
def test_kill_during_detach_of_the_last_holder(backend: str, step: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The last holder dies inside its detach.  Our own handle closed first, so our janitor
    retests the name; it stays out of this (else, once the child's fds are closed, its
    retest could remove the names before the child reaches its step)."""
    monkeypatch.setattr(_liveness, "retest", lambda name: False)
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
    step finds the counter all the same, and the accounting drops the phantom post.

    The reader (a main thread: 100 ms steps) says how it came back: by a look that found
    the 3, with no post consumed.  Without bounded steps it would come back only at its
    deadline, which takes the 3 too but looks no more."""
    lines = LineReader()
    with EventFD(0) as efd:
        reader = fork_child(lambda: _counted_read(efd, lines.w, posts_only=False))
        wait_until(lambda: stats(efd)["waiting_r"] == 1)
        writer = victim(efd, "lock.unlocked", "kill", lambda e: e.write(3))
        assert killed(reap(writer))
        assert _how_it_read(lines) == (3, 0, 1)  # its step's look, not a post or the deadline
        assert reap(reader) == 0
        next_operation_within(efd)
        words = stats(efd)
        assert (words["waiting_r"], words["posted_r"]) == (0, 0)
        check_usable(efd)
    lines.close()


def _waiters_posts_sem(efd: EventFD) -> tuple[int, int, int]:
    words = stats(efd)
    return words["waiting_r"], words["posted_r"], words["sem_r"]


def test_a_waiter_that_times_out_holding_a_consumed_post_gives_it_back(backend: str) -> None:
    """X consumed a post, then could not get the lock (a stopped holder) before its
    deadline.  It gives the post back: another reader takes it, and is then woken by the
    next write's post, not by the end of its wait step.  (The post was once lost until X's
    process used the eventfd again.)

    Counted, not timed: the reader's wait steps outlast its deadline, so it can only come
    back by posts, and must consume two: X's, given back, and the write's."""
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
        reader = fork_child(lambda: _counted_read(efd, lines.w, posts_only=True))
        # The reader consumed X's post, accounted it and waits again (X's registration is
        # still counted, its post is not): a post X kept would leave P at 1 for ever.
        wait_until(lambda: _waiters_posts_sem(efd) == (2, 0, 0))
        efd.write(1)
        assert _how_it_read(lines) == (1, 2, 0)  # X's post, then the write's; no look
        assert reap(reader) == 0
        os.write(done_w, b"x")
        assert reap(xpid) == 0
    for fd in (go_r, go_w, done_r, done_w):
        os.close(fd)
    lines.close()
