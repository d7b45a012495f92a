"""The wait path: level-triggered posts, idle waiters that cost nothing, the waiter limit,
and the core's defences against a damaged page (docs/design.md, "Wake-ups" and "Waiting").
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import statistics
import sys
import textwrap
import threading
import time

import pytest

from helpers import (
    LineReader,
    fork_child,
    python,
    reap,
    shared_word,
    sleeping,
    stats,
    wait_readable,
    wait_until,
)
from mpeventfd import EFD_SEMAPHORE, MAX_VALUE, EventFD, StateError, _core, _faults
from mpeventfd._probe import PLATFORM

KICK_READERS, KICK_WRITERS = 1, 2  # the kick word's bits (_core.c)

# -- a committed write never gives up its post ------------------------------------------------


def _blocked_reader_thread(efd: EventFD, lines: LineReader, gate: int) -> int:
    """A process with one thread blocked in read(), held at ``wait.woken`` once posted
    (before it takes the lock) until a byte arrives on ``gate``.  Its wait steps outlast
    the test (``_core._step``), so it comes back by a post or at its deadline, never by a
    look.  It reports what it read, the posts it consumed and the steps it looked after."""
    def body() -> int:
        _core._step(3600.0)
        _faults.arm("wait.woken", f"block:{gate}")
        before = stats(efd)
        out: list[int] = []
        t = threading.Thread(target=lambda: out.append(efd.read(timeout=10)))
        t.start()
        t.join(15)
        after = stats(efd)
        os.write(lines.w, b"%d %d %d\n" % (out[0] if out else -1,
                                           after["woken"] - before["woken"],
                                           after["looks"] - before["looks"]))
        return 0
    return fork_child(body)


def _lock_is_held(efd: EventFD) -> bool:
    """True while another process holds the lock (a free lock gets a harmless write(0))."""
    assert efd._core is not None
    return not efd._core.try_write(0)


@pytest.mark.parametrize("how", ["awrite", "timed write"])
def test_a_lock_free_write_never_drops_its_post_while_the_lock_is_held(backend: str,
                                                                        how: str) -> None:
    """Reader A is posted and held before it takes the lock; another process holds the
    lock past its own section's post rule; the parent's write then commits lock-free (A has
    not taken its token: the counter is above 0) and needs a post for reader B.  Only the
    holder's unlock can serve that write's kick, and it does, while A is still held.  (The
    post was once dropped after a 2 µs spin, or when the write's own timeout ran out: B
    then slept until its wait step ended.)  Counted, not timed: the readers' wait steps
    outlast the test, so each consumed a post or it would have waited out its deadline."""
    lines = LineReader()
    gate_r, gate_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pids: list[int] = []
    try:
        with EventFD(0, EFD_SEMAPHORE) as efd:
            pids += [_blocked_reader_thread(efd, lines, gate_r) for _ in range(2)]
            wait_until(lambda: stats(efd)["waiting_r"] == 2)
            efd.write(1)  # locked (0 -> 1): posts reader A
            wait_until(lambda: stats(efd)["sem_r"] == 0)  # A took it: held at the gate

            def hold_the_lock() -> int:
                _faults.arm("write.posted", f"block:{hold_r}")  # past its post rule
                efd.write(0)
                return 0

            holder = fork_child(hold_the_lock)
            pids.append(holder)
            wait_until(lambda: _lock_is_held(efd))
            deadline = time.monotonic() + 0.005
            if how == "awrite":
                asyncio.run(efd.awrite(1))
            else:
                efd.write(1, timeout=0.005)
            s = stats(efd)
            # Committed lock-free (1 -> 2), the lock held: its kick waits for the holder.
            assert (s["counter"], s["kick"], s["posted_r"]) == (2, KICK_READERS, 1)
            if how == "timed write":  # the write's own timeout runs out before the unlock
                wait_until(lambda: time.monotonic() > deadline)
            os.write(hold_w, b"x")  # the holder unlocks: its unlock serves the kick
            pids.remove(holder)
            assert reap(holder) == 0
            s = stats(efd)
            assert (s["posted_r"], s["kick"]) == (2, 0), "the write's post was dropped"
            os.write(gate_w, b"xx")  # both readers go on
            got = sorted(tuple(map(int, lines.line().split())) for _ in range(2))
            assert got == [(1, 1, 0)] * 2  # each read 1, woken by a post, no step ended
            assert efd.peek() == 0
            assert stats(efd)["sem_r"] == 0
    finally:
        os.write(gate_w, b"xx")
        os.write(hold_w, b"x")
        for pid in pids:
            reap(pid)
        for fd in (gate_r, gate_w, hold_r, hold_w):
            os.close(fd)
        lines.close()


def test_a_lock_free_read_never_drops_its_writers_post_while_the_lock_is_held(
        backend: str) -> None:
    """The writers' half: a semaphore read makes room lock-free (aread's try_read, which
    waits for the lock about 1 ms only) while another process holds the lock; the blocked
    writer is posted when the holder unlocks, not when its wait step ends.  The writer's
    wait steps outlast the test: it consumed a post, or it would have waited out its
    deadline."""
    gate_r, gate_w = os.pipe()
    lines = LineReader()
    pids: list[int] = []
    try:
        with EventFD(0, EFD_SEMAPHORE) as efd:
            efd.write(MAX_VALUE)

            def write_and_report() -> int:
                _core._step(3600.0)
                before = stats(efd)
                t = threading.Thread(target=efd.write, args=(1,), kwargs={"timeout": 10})
                t.start()
                t.join(15)
                after = stats(efd)
                os.write(lines.w, b"%d %d\n" % (after["woken"] - before["woken"],
                                                after["looks"] - before["looks"]))
                return 0

            def hold_the_lock() -> int:
                _faults.arm("lock.taken", f"block:{gate_r}")
                efd.write(0)
                return 0

            pids.append(fork_child(write_and_report))
            wait_until(lambda: stats(efd)["waiting_w"] == 1)
            pids.append(fork_child(hold_the_lock))
            wait_until(lambda: _lock_is_held(efd))
            assert efd._core is not None
            assert efd._core.try_read() == 1  # lock-free: MAX_VALUE -> MAX_VALUE - 1
            s = stats(efd)
            assert (s["kick"], s["posted_w"]) == (KICK_WRITERS, 0)  # left for the holder
            os.write(gate_w, b"x")
            woken, looks = map(int, lines.line().split())
            assert (woken, looks) == (1, 0), "the writer was not posted"
            assert efd.peek() == MAX_VALUE
            assert stats(efd)["sem_w"] == 0
    finally:
        os.write(gate_w, b"x")
        for pid in pids:
            reap(pid)
        for fd in (gate_r, gate_w):
            os.close(fd)
        lines.close()


# -- idle waiters cost nothing ----------------------------------------------------------------


# The wait steps of _core.c: a blocked main thread looks every STEP_MAIN (for signals), any
# other thread every STEP_OTHER; a step ends on a STEP_GRID boundary (at least step - grid
# after it began, at most step).
STEP_MAIN, STEP_OTHER, STEP_GRID = _core.STEP_MAIN, _core.STEP_OTHER, _core.STEP_GRID


def _unavailable() -> float:
    """Seconds the calling thread has so far spent running or waiting for a CPU
    (proc_pid_schedstat(5)), plus the time the hypervisor stole from every CPU
    (proc_stat(5)): whatever a loaded machine adds to a wait, and a wait step's sleep
    does not include."""
    with open("/proc/thread-self/schedstat") as f:
        ran, queued = map(int, f.read().split()[:2])
    with open("/proc/stat") as f:
        steal = int(f.readline().split()[8])
    return (ran + queued) / 1e9 + steal / os.sysconf("SC_CLK_TCK")


def _report_looks(efd: EventFD, out: int, seconds: float) -> int:
    """Wait ``seconds`` in read(), then report the looks and locked looks it made, how long
    it took, and how much of that it slept (not running, not waiting for a CPU)."""
    before, off0, t0 = stats(efd), _unavailable(), time.monotonic()
    try:
        efd.read(timeout=seconds)
    except TimeoutError:
        pass
    t1, off1, after = time.monotonic(), _unavailable(), stats(efd)
    os.write(out, b"%d %d %.6f %.6f\n" % (after["looks"] - before["looks"],
                                          after["looks_locked"] - before["looks_locked"],
                                          t1 - t0, (t1 - t0) - (off1 - off0)))
    return 0


@pytest.mark.parametrize("thread", ["main", "other"])
def test_an_idle_waiter_looks_without_taking_the_lock(backend: str, thread: str) -> None:
    """A blocked read whose steps expire looks at the counter and sleeps again: no lock,
    nothing scanned.  Only the main thread wakes often (for signals).

    How often is judged against the time the waiter slept, not the time that passed: on a
    loaded machine a woken thread may wait hundreds of milliseconds for a CPU, and the
    kernel counts that wait (as it counts its running time), which the test subtracts.
    Each look follows a sleep of at least step - grid, and every sleep, the last one too,
    lasts at most one step; a main thread on the 500 ms step would make 2 looks, not 12."""
    lines = LineReader()
    with EventFD(0) as efd:
        def body() -> int:
            if thread == "main":
                return _report_looks(efd, lines.w, 1.25)
            t = threading.Thread(target=_report_looks, args=(efd, lines.w, 1.25))
            t.start()
            t.join(10)
            return 0
        pid = fork_child(body)
        fields = lines.line().split()
        assert reap(pid) == 0
    lines.close()
    looks, locked = int(fields[0]), int(fields[1])
    elapsed, slept = float(fields[2]), float(fields[3])
    step = STEP_MAIN if thread == "main" else STEP_OTHER  # for Ctrl-C; a dead peer's leftovers
    assert locked == 0
    assert looks * (step - STEP_GRID) <= elapsed, f"{looks} looks in {elapsed:.3f} s"
    # (20 ms: the timer slack of a dozen sleeps, and the wake-ups' way to the run queue)
    assert (looks + 1) * step >= slept - 0.02, f"{looks} looks, {slept:.3f} s slept"


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def _blocked_readers(efd: EventFD, n: int, out: int) -> list[int]:
    def body() -> int:
        value = efd.read(timeout=60)
        os.write(out, b"%d\n" % value)
        return 0
    return [fork_child(body) for _ in range(n)]


def _idle_readers(efd: EventFD, n: int, out: int, window: int) -> list[int]:
    """``n`` processes blocked in read() (their main threads).  Another thread of each waits
    for a byte on ``window`` (the parent's idle window is over) and reports what the wait
    has done so far: its looks, those that took the lock, and the seconds since it began.
    The main thread reports the token it reads later."""
    def body() -> int:
        before, t0 = stats(efd), time.monotonic()

        def report_idle() -> None:
            os.read(window, 1)
            now, after = time.monotonic(), stats(efd)
            os.write(out, b"%d %d %.6f\n" % (after["looks"] - before["looks"],
                                             after["looks_locked"] - before["looks_locked"],
                                             now - t0))

        t = threading.Thread(target=report_idle)
        t.start()
        value = efd.read(timeout=60)
        t.join(60)
        os.write(out, b"%d\n" % value)
        return 0
    return [fork_child(body) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_256_blocked_readers_cost_nothing_and_take_every_token_once(backend: str) -> None:
    """256 processes blocked in read() (their main threads): together they burn almost no
    CPU, a write never finds the lock taken by them, and 256 tokens go to 256 readers, one
    each.  (The same 256 once burned a whole core, and a write(0) waited 23 ms at the
    median.)

    Nothing here is a wall-clock latency, which a loaded machine stretches: while idle no
    waiter took the lock (its looks say so, and every write found the lock free at once),
    none looked more often than its 90 ms step allows, and the CPU figures are the waiters'
    own CPU time and the writer thread's, to which a busy neighbour adds nothing."""
    lines = LineReader()
    window_r, window_w = os.pipe()
    try:
        with EventFD(0, EFD_SEMAPHORE) as efd:
            assert efd._core is not None
            pids = _idle_readers(efd, 256, lines.w, window_r)
            try:
                wait_until(lambda: stats(efd)["waiting_r"] == 256, timeout=60)
                wait_until(lambda: all(sleeping(pid) for pid in pids), timeout=30)
                cpu0, t0 = _cpu_seconds(pids), time.monotonic()
                free, writes = [], []
                while time.monotonic() - t0 < 1.0:
                    w0 = time.thread_time()
                    free.append(efd._core.try_write(0))  # False: the lock was taken
                    writes.append(time.thread_time() - w0)
                    time.sleep(0.005)
                cores = (_cpu_seconds(pids) - cpu0) / (time.monotonic() - t0)
                os.write(window_w, b"x" * len(pids))  # the idle window is over
                idle = [lines.line().split() for _ in pids]
                for _ in range(256):
                    efd.write(1)
                got = [int(lines.line()) for _ in pids]
            finally:
                os.write(window_w, b"x" * len(pids))
                for pid in pids:
                    reap(pid)
            assert got == [1] * 256
            assert efd.peek() == 0
            assert stats(efd)["waiting_r"] == 0
    finally:
        for fd in (window_r, window_w):
            os.close(fd)
        lines.close()
    assert sum(int(locked) for _, locked, _ in idle) == 0, "an idle waiter took the lock"
    assert all(free), f"{free.count(False)} of {len(free)} writes found the lock taken"
    for looks, _, seconds in idle:  # each look ends a sleep of at least 90 ms
        assert int(looks) * (STEP_MAIN - STEP_GRID) <= float(seconds), (looks, seconds)
    assert cores < 0.1, f"256 idle waiters used {cores:.3f} cores"
    assert statistics.median(writes) < 0.005
    assert sorted(writes)[len(writes) * 99 // 100] < 0.05


@pytest.mark.slow
def test_1024_processes_wait_and_the_1025th_gets_eusers() -> None:
    """The page has 1,024 waiter slots: 1,024 processes blocked at once all work, and the
    next one to wait gets EUSERS, with the limit in its message (a non-blocking call,
    which never waits, still works for it)."""
    lines = LineReader()
    with EventFD(0, EFD_SEMAPHORE) as efd:
        pids = _blocked_readers(efd, _core.NSLOTS, lines.w)
        try:
            wait_until(lambda: stats(efd)["waiting_r"] == _core.NSLOTS, timeout=120)

            def late() -> int:
                try:
                    efd.read(timeout=5)
                except OSError as e:
                    ok = e.errno == errno.EUSERS and str(_core.NSLOTS) in str(e)
                    try:
                        efd.read(timeout=0)
                    except BlockingIOError:
                        return 0 if ok else 2
                return 1
            assert reap(fork_child(late)) == 0
            efd.write(_core.NSLOTS)
            got = [int(lines.line(timeout=60)) for _ in pids]
        finally:
            for pid in pids:
                reap(pid, timeout=60)
        assert got == [1] * _core.NSLOTS
        assert efd.peek() == 0
    lines.close()


# -- a damaged or foreign page ----------------------------------------------------------------


def test_attach_works_on_a_small_thread_stack() -> None:
    """from_handle() and recv_eventfd() read the state header onto the stack: only the
    header, never the whole 33 KB page, so a thread made with threading.stack_size(32768)
    (53,248 on 3.14+, its least) attaches (it once died with SIGSEGV)."""
    with EventFD(3) as efd:
        efd.set_inheritable(True)
        out = python(textwrap.dedent("""
            import socket, sys, threading
            from mpeventfd import _core, from_handle, recv_eventfd, send_eventfd
            for size in (32768, 53248):  # (3.14 refuses less than 53,248 bytes)
                try:
                    threading.stack_size(size)
                    break
                except ValueError:
                    pass
            got = []
            def attach():
                got.append(_core.read_header(int(sys.argv[1].split(":")[2]))["counter"])
                with from_handle(sys.argv[1]) as e:
                    a, b = socket.socketpair()
                    send_eventfd(a, e)
                    with recv_eventfd(b) as again:
                        got.append(again.peek())
                    a.close(); b.close()
            t = threading.Thread(target=attach)
            t.start(); t.join()
            print(got)
            """), efd.handle, pass_fds=efd.fds)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[3, 3]"


@pytest.mark.skipif(_core.LIBC != 1 or not PLATFORM.robust_mutex,
                    reason="scribbles over glibc's pthread_mutex_t")
@pytest.mark.parametrize("call", ["write", "read"])
def test_a_damaged_mutex_raises_at_once_instead_of_spinning(call: str) -> None:
    """A mutex whose type word another process scribbled over returns EINVAL: only EBUSY
    and ETIMEDOUT mean "busy", so the call raises StateError saying what the lock returned
    (it once burned a core until its deadline, and a blocking call spun for ever).  A call
    that took EINVAL for "busy" would end in TimeoutError at its deadline, or never; the
    CPU time it spent, which a loaded machine does not add to, shows it did not spin."""
    efd = EventFD(0)
    kind = _core.OFFSET_MUTEX + 16  # glibc's __kind, on every 64-bit target it supports
    fd = efd.fds[0]
    saved = os.pread(fd, 4, kind)
    os.pwrite(fd, (126).to_bytes(4, sys.byteorder), kind)  # no mutex type has this value
    try:
        t0 = time.thread_time()
        op = (lambda: efd.write(0, timeout=2)) if call == "write" else (
            lambda: efd.read(timeout=2))
        with pytest.raises(StateError, match="Invalid argument"):  # not TimeoutError
            op()
        assert time.thread_time() - t0 < 0.5
        t0 = time.thread_time()
        with pytest.raises(StateError):
            efd.write(0)  # blocking: raises too, at once
        assert time.thread_time() - t0 < 0.5
    finally:
        os.pwrite(fd, saved, kind)
        efd.close()


@pytest.mark.skipif(not PLATFORM.robust_mutex, reason="no robust mutexes here")
@pytest.mark.parametrize(("field", "value"), [("libc", None), ("ptr_bits", 32),
                                               ("mutex_size", 48)])
def test_a_robust_mutex_of_another_libc_is_refused(field: str, value: int | None) -> None:
    """The header records which C library laid out the robust mutex (glibc's lock word is
    musl's type field), its pointer width and sizeof(pthread_mutex_t); an attacher built
    otherwise is refused with both named (they once locked each other out for good)."""
    other = 2 if _core.LIBC == 1 else 1  # musl for glibc, else glibc
    with EventFD(0) as efd:
        original = shared_word(efd, field, other if value is None else value)
        try:
            efd.set_inheritable(True)
            out = python(textwrap.dedent("""
                import sys
                from mpeventfd import StateError, from_handle
                try:
                    from_handle(sys.argv[1])
                except StateError as e:
                    print("refused:", e)
                """), efd.handle, pass_fds=efd.fds)
        finally:
            shared_word(efd, field, original)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout
    if field == "libc":
        assert "musl" in out.stdout
        assert "glibc" in out.stdout
    else:
        assert f"{value}" in out.stdout


def test_the_read_spin_can_change_while_reads_wait() -> None:
    """The spin is an atomic word: bench and tests change it while other threads' slow
    paths read it without the GIL (ThreadSanitizer found the plain double racing)."""
    with EventFD(0) as efd:
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                try:
                    efd.read(timeout=0.001)
                except TimeoutError:
                    pass

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        old = _core._spin(0.0)
        try:
            for k in range(2000):
                _core._spin((k % 3) * 10e-6)
        finally:
            _core._spin(old)
            stop.set()
            for t in threads:
                t.join(10)
        efd.write(1)
        assert efd.read() == 1


class _Handled(Exception):
    """What the test's signal handler raises (not KeyboardInterrupt: a handler that ran too
    late, outside pytest.raises, would stop the whole session)."""


def test_a_signal_ends_a_wait_of_the_main_thread_within_100_ms() -> None:
    """A signal delivered to another thread interrupts nothing in the main thread's wait:
    the main thread still runs the handler at the end of its current wait step (100 ms:
    test_an_idle_waiter_looks_without_taking_the_lock), not at its deadline.  Counted in
    steps, not timed: from the moment the signal is pending for Python (its C handler has
    written to the wakeup fd), the main thread looks at most once more (after the check
    for signals it had just made) before the handler runs."""
    with EventFD(0) as efd:
        looks: dict[str, int] = {}

        def handler(signum: int, frame: object) -> None:
            looks["handled"] = stats(efd)["looks"]
            raise _Handled

        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        stop = threading.Event()
        blocker = threading.Thread(target=stop.wait, args=(30,))  # the signal goes to it
        blocker.start()

        def send() -> None:
            wait_until(lambda: stats(efd)["waiting_r"] == 1)  # the main thread waits
            assert blocker.ident is not None
            signal.pthread_kill(blocker.ident, signal.SIGUSR1)  # not the main thread
            assert wait_readable(wake_r), "the signal never arrived"
            looks["pending"] = stats(efd)["looks"]

        sender = threading.Thread(target=send)
        old = signal.signal(signal.SIGUSR1, handler)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            sender.start()
            with pytest.raises(_Handled):
                efd.read(timeout=10)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            signal.signal(signal.SIGUSR1, old)
            stop.set()
            blocker.join(5)
            sender.join(15)
            os.close(wake_r)
            os.close(wake_w)
        assert looks["handled"] - looks["pending"] <= 1, looks
        assert stats(efd)["waiting_r"] == 0
