"""Regression tests for the findings of an adversarial review of the finished core.

Each test names the finding it guards; each failed before its fix.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import textwrap
import threading
import time

import pytest

from crashkit import killed, next_operation_within, victim, wait_until
from helpers import fork_child, forks_beside_threads, python, reap
from mpeventfd import EventFD, _faults, _lifecycle, _lock, recv_eventfd, send_eventfd
from mpeventfd._core import Core
from mpeventfd._state import S_LOCK, S_PID, S_WR, W_DIRTY, W_WR, slot_word


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lifecycle, "default_backend", _lifecycle.BACKENDS["fast"])


def closing(core: Core) -> bool:
    return core.closing


def core_of(efd: EventFD) -> Core:
    core = efd._core
    assert core is not None
    return core


@pytest.mark.parametrize("step", ["recover.elected", "recover.takeover"])
def test_f1_an_exception_in_the_prover_never_loses_the_token(fast: None, step: str) -> None:
    with EventFD(5) as efd:
        holder = victim(efd, "mutex.taken", "kill", lambda e: e.write(1))
        assert killed(reap(holder))
        def prover() -> int:
            _faults.arm(step, "raise")
            try:
                efd.write(1, timeout=5)
            except KeyboardInterrupt:
                return 0
            return 1
        assert reap(fork_child(prover)) == 0
        next_operation_within(efd)  # the token was given back (or is recoverable)
        assert efd.peek() == 5
        assert reap(fork_child(lambda: efd.write(1, timeout=1))) == 0
        assert efd.read(timeout=1) == 6


def test_f2_an_attach_revives_a_closing_core_instead_of_building_a_second() -> None:
    a, b = socket.socketpair()
    efd = EventFD(0)
    core = core_of(efd)
    got: list[int] = []

    def waiter() -> None:
        got.append(efd.read(timeout=10))

    t = threading.Thread(target=waiter)
    t.start()
    wait_until(lambda: core.words[W_WR] == 1)
    send_eventfd(a, efd)
    efd.close()  # the core is closing, but a thread still waits in it
    assert closing(core)
    again = recv_eventfd(b)
    assert again._core is core  # one core (one private descriptor) per process
    assert not closing(core)
    again.write(3)
    t.join(10)
    assert got == [3]  # the thread that waited through the close and revival got it
    again.close()
    a.close()
    b.close()


def test_f3_an_exception_entering_the_slow_path_leaves_our_word_idle(
    fast: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EventFD(1) as efd:
        core = core_of(efd)
        holder = victim(efd, "write.locked", "stop", lambda e: e.write(1))
        os.waitpid(holder, os.WUNTRACED)

        def interrupted(*args: object) -> int:
            raise KeyboardInterrupt  # as a handler would at the slow path's first line

        monkeypatch.setattr(Core, "_acquire_slow", interrupted)
        with pytest.raises(KeyboardInterrupt):
            efd.write(1, timeout=0.2)
        monkeypatch.undo()
        assert core.words[slot_word(core.slot, S_LOCK)] & 0xFF == 0  # IDLE
        os.kill(holder, signal.SIGKILL)
        assert killed(reap(holder))
        # Another process recovers the dead holder's token: our slot does not block it.
        assert reap(fork_child(lambda: efd.write(1, timeout=1))) == 0


def test_f4_a_stopped_claimer_gives_timeouterror_not_a_hang(fast: None) -> None:
    with EventFD(0) as efd:
        core = core_of(efd)
        efd.write(0)  # we hold our slot already
        def claimer() -> int:
            core.lockword = -1  # this child claims afresh, and stops holding the claim lock
            _faults.arm("attach.slot", "stop")
            efd.write(1)
            return 0
        stopped = fork_child(claimer)
        os.waitpid(stopped, os.WUNTRACED)
        def second() -> int:
            core.lockword = -1
            t0 = time.monotonic()
            try:
                efd.write(1, timeout=0.3)
            except TimeoutError:
                return 0 if time.monotonic() - t0 < 1.0 else 2
            return 1
        try:
            assert reap(fork_child(second), 10) == 0
        finally:
            os.kill(stopped, signal.SIGKILL)
            reap(stopped)


@forks_beside_threads
def test_f5_a_fork_child_lets_go_of_a_closing_cores_descriptors() -> None:
    efd = EventFD(0)
    core = core_of(efd)
    efd.write(0)
    private = core.private
    t = threading.Thread(target=lambda: efd.read(timeout=5))
    t.start()
    wait_until(lambda: core.words[W_WR] == 1)
    handle_fds = efd.fds
    efd.close()
    assert core.closing
    assert not core.released

    def child() -> int:
        for fd in (private, *handle_fds):
            try:
                os.fstat(fd)
            except OSError:
                continue
            return 1  # still open in the child: it would pin the parent's locks
        return 0

    assert reap(fork_child(child)) == 0
    writer = EventFD.__new__(EventFD)  # write through the core the waiter still uses
    writer._core, writer._owner = core, False
    writer.write(1)
    t.join(10)


class ForkingLock:
    """Stands in for a thread lock; forks once right after acquiring (a handler's fork)."""

    def __init__(self, real: threading.RLock, report: int) -> None:
        self.real, self.report, self.forked = real, report, False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self.real.acquire(blocking, timeout)
        if not self.forked:
            self.forked = True
            if os.fork() == 0:
                return got  # the child resumes the parent's frame
        return got

    def release(self) -> None:
        self.real.release()

    def _is_owned(self) -> bool:
        return self.real._is_owned()  # type: ignore[attr-defined, no-any-return]


def test_f6_a_frame_a_fork_copied_never_takes_the_token(fast: None) -> None:
    r, w = os.pipe()
    with EventFD(0) as efd:
        core = core_of(efd)
        efd.write(0)
        parent = os.getpid()
        core.tlock = ForkingLock(core.tlock, w)  # type: ignore[assignment]
        try:
            efd.write(1)
        except BaseException as e:
            if os.getpid() != parent:
                os.write(w, type(e).__name__.encode())
                os._exit(0)
            raise
        if os.getpid() != parent:
            os.write(w, b"completed")
            os._exit(0)
        core.tlock = core.tlock.real  # type: ignore[attr-defined]
        os.wait()
        assert os.read(r, 64) in (b"RuntimeError", b"ValueError")
        assert core.sem_m.value == 1  # the child did not keep a token
        assert reap(fork_child(lambda: efd.write(1, timeout=0.04))) == 0
        assert efd.read() == 2
    os.close(r)
    os.close(w)


FINALIZER_UNDER_LOCK = textwrap.dedent(
    """
    import gc, socket
    from mpeventfd import EventFD, recv_eventfd, send_eventfd, _lifecycle
    real = _lifecycle.validate
    def validate_then_collect(*args):
        real(*args)
        gc.collect()  # the cyclic GC runs here, with the registry lock held
    _lifecycle.validate = validate_then_collect
    garbage = [EventFD()]
    garbage.append(garbage)
    del garbage
    a, b = socket.socketpair()
    keep = EventFD()
    send_eventfd(a, keep)
    keep.close()
    got = recv_eventfd(b)
    got.write(1)
    assert got.read() == 1
    got.close()
    print("no deadlock")
    """
)


def test_f7_a_finalizer_under_the_registry_lock_does_not_deadlock() -> None:
    out = python(FINALIZER_UNDER_LOCK, timeout=30)
    assert "no deadlock" in out.stdout, out.stderr


def test_f8_settling_a_claim_keeps_a_pending_repair() -> None:
    with EventFD(0) as efd:
        core = core_of(efd)
        efd.write(0)
        w = core.words
        w[W_DIRTY] = 1
        core._settle_claim(w)
        assert w[W_DIRTY] == 1
        efd.write(0)  # the next section repairs
        assert w[W_DIRTY] == 0


def test_f10_f11_a_claim_is_settled_at_the_first_successful_entry(fast: None) -> None:
    with EventFD(0) as efd:
        core = core_of(efd)
        efd.write(0)
        w = core.words
        base = slot_word(core.slot, S_PID)
        w[base] = 0  # a holder that judged the slot dead zeroed our pid
        w[base + S_WR] = 1  # and a dead previous owner's registration
        w[W_WR] += 1
        core.fix_slot = True
        efd.write(0)
        assert w[base] == os.getpid()
        assert w[base + S_WR] == 0
        assert w[W_WR] == 0


@pytest.mark.parametrize("op", ["read", "write"])
def test_f9_keyboardinterrupt_after_the_commit_takes_the_call_back(backend: str,
                                                                   op: str) -> None:
    with EventFD(5) as efd:
        core = core_of(efd)
        efd.write(0)
        real = core.unlock

        def unlock_then_interrupt() -> object:
            real()
            core.unlock = real
            raise KeyboardInterrupt  # a handler, at the check after the unlock call
        core.unlock = unlock_then_interrupt
        with pytest.raises(KeyboardInterrupt):
            efd.read() if op == "read" else efd.write(7)
        assert efd.peek() == 5  # nothing consumed or added
        assert efd.read() == 5


def test_f12_a_borrowed_handle_racing_close_gets_ebadf() -> None:
    efd = EventFD(1)
    borrowed = EventFD._from_core(core_of(efd), owner=False)
    efd.close()
    for call in (borrowed.read, lambda: borrowed.write(1)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF


def test_f13_an_infinite_timeout_waits_for_ever() -> None:
    with EventFD(0) as efd:
        efd.write(2)
        assert efd.read(timeout=float("inf")) == 2
        threading.Timer(0.1, efd.write, (1,)).start()
        assert efd.read(timeout=1e300) == 1


# -- a second review, of the inlined critical section and the pipe as the lock carrier ----


@pytest.mark.skipif(not _lock.PIPE_PRIVATE, reason="the byte locks live on a lock file here")
def test_f14_a_replaced_fileno_never_becomes_a_childs_lock_carrier() -> None:
    """A fork child opens its private descriptor from fileno(): it checks the pipe's
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
        efd.write(1)  # the parent's private descriptor is the real pipe: it still works
        assert efd.read(timeout=1) == 1
    finally:
        os.close(impostor)
        os.dup2(core_of(efd).wfd, rfd)  # any fd at the number, for close() to close
        efd.close()


def test_f15_a_handlers_valueerror_during_the_read_spin_propagates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mpeventfd import _core

    if not _core.SPIN_READ:
        pytest.skip("no spin on one CPU")

    def handler_raises() -> None:
        raise ValueError("from a signal handler")

    with EventFD(0) as efd:
        monkeypatch.setattr(_core, "_yield", handler_raises)  # where handlers run
        with pytest.raises(ValueError, match="signal handler"):
            efd.read(timeout=1)
        monkeypatch.undo()
        efd.write(3)
        assert efd.read(timeout=1) == 3


@pytest.mark.parametrize("extra", [63, 64, 5000])
def test_f16_a_read_drains_a_pipe_holding_more_than_one_byte(extra: int) -> None:
    """Bytes beyond the usual one (left by a dead process, or written by someone holding
    the write end) are all drained by the n -> 0 read, through the private description
    (where preadv's RWF_NOWAIT is refused with EOPNOTSUPP)."""
    with EventFD(0) as efd:
        os.write(core_of(efd).wfd, b"\x01" * extra)
        efd.write(2)
        assert efd.read(timeout=1) == 2
        assert not select.select([efd], [], [], 0)[0]
        efd.write(1)  # and readiness still follows the counter afterwards
        assert select.select([efd], [], [], 0)[0]
        assert efd.read(timeout=1) == 1
        assert not select.select([efd], [], [], 0)[0]
