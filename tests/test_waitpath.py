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

from helpers import LineReader, fork_child, python, reap, shared_word, sleeping, stats, wait_until
from mpeventfd import EFD_SEMAPHORE, MAX_VALUE, EventFD, StateError, _core, _faults
from mpeventfd._probe import PLATFORM

# -- a committed write never gives up its post ------------------------------------------------


def _two_blocked_reader_threads(efd: EventFD, lines: LineReader) -> tuple[list[int], list[int]]:
    """Two processes, each with a thread blocked in read(), held at ``wait.accounted`` (the
    lock held) once woken, until a byte arrives on its gate."""
    gates = [os.pipe() for _ in range(2)]
    pids = []
    for gate_r, _ in gates:
        def body(gate: int = gate_r) -> int:
            _faults.arm("wait.accounted", f"block:{gate}")
            out: list[float] = []
            t = threading.Thread(target=lambda: out.append(efd.read(timeout=10) and
                                                           time.monotonic()))
            t.start()
            t.join(15)
            os.write(lines.w, f"{out[0] if out else -1}\n".encode())
            return 0
        pids.append(fork_child(body))
    return pids, [fd for gate in gates for fd in gate]


@pytest.mark.parametrize("how", ["awrite", "timed write"])
def test_a_lock_free_write_never_drops_its_post_while_the_lock_is_held(backend: str,
                                                                        how: str) -> None:
    """One reader is woken and held inside its section (lock held) for 20 ms; meanwhile the
    parent's write commits lock-free and needs a post for the second reader.  The post
    comes when the holder unlocks: both readers are back about 20 ms after the write.
    (It was once dropped after a 2 µs spin, or when the write's own timeout ran out: the
    second reader then slept until its wait step ended, 250 ms later.)"""
    lines = LineReader()
    with EventFD(0, EFD_SEMAPHORE) as efd:
        pids, gates = _two_blocked_reader_threads(efd, lines)
        try:
            wait_until(lambda: stats(efd)["waiting_r"] == 2)
            efd.write(1)
            wait_until(lambda: stats(efd)["waiting_r"] == 1 and stats(efd)["posted_r"] == 0)
            threading.Timer(0.02, lambda: [os.write(gates[1], b"x"), os.write(gates[3], b"x")]
                            ).start()
            t0 = time.monotonic()
            if how == "awrite":
                asyncio.run(efd.awrite(1))
            else:
                efd.write(1, timeout=0.005)  # its timeout ends before the holder unlocks
            back = sorted(float(lines.line()) - t0 for _ in pids)
        finally:
            for pid in pids:
                reap(pid)
            for fd in gates:
                os.close(fd)
        assert back[0] >= 0.0
        assert back[1] < 0.15, f"the second reader came back {back[1] * 1e3:.0f} ms late"
        assert efd.peek() == 0
    lines.close()


def test_a_lock_free_read_never_drops_its_writers_post_while_the_lock_is_held(
        backend: str) -> None:
    """The writers' half: a semaphore read makes room lock-free (aread's try_read, which
    waits for the lock about 1 ms only) while another process holds the lock; the blocked
    writer is posted when the holder unlocks, not when its wait step ends."""
    gate_r, gate_w = os.pipe()
    lines = LineReader()
    with EventFD(0, EFD_SEMAPHORE) as efd:
        efd.write(MAX_VALUE)
        def write_and_report() -> int:
            efd.write(1, timeout=10)
            os.write(lines.w, b"%f\n" % time.monotonic())
            return 0

        def hold_the_lock() -> int:
            _faults.arm("lock.taken", f"block:{gate_r}")
            efd.write(0)
            return 0

        writer = fork_child(write_and_report)
        wait_until(lambda: stats(efd)["waiting_w"] == 1 and sleeping(writer))
        holder = fork_child(hold_the_lock)
        wait_until(lambda: sleeping(holder))
        threading.Timer(0.02, os.write, (gate_w, b"x")).start()
        t0 = time.monotonic()
        assert efd._core is not None
        assert efd._core.try_read() == 1  # lock-free: MAX_VALUE -> MAX_VALUE - 1
        back = float(lines.line()) - t0
        assert reap(holder) == 0
        assert reap(writer) == 0
        assert back < 0.15, f"the writer came back {back * 1e3:.0f} ms late"
        assert efd.peek() == MAX_VALUE
    for fd in (gate_r, gate_w):
        os.close(fd)
    lines.close()


# -- idle waiters cost nothing ----------------------------------------------------------------


def _report_looks(efd: EventFD, out: int, seconds: float) -> int:
    before = stats(efd)
    try:
        efd.read(timeout=seconds)
    except TimeoutError:
        pass
    after = stats(efd)
    os.write(out, b"%d %d\n" % (after["looks"] - before["looks"],
                                after["looks_locked"] - before["looks_locked"]))
    return 0


@pytest.mark.parametrize("thread", ["main", "other"])
def test_an_idle_waiter_looks_without_taking_the_lock(backend: str, thread: str) -> None:
    """A blocked read whose steps expire looks at the counter and sleeps again: no lock,
    nothing scanned.  Only the main thread wakes often (for signals)."""
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
        looks, locked = map(int, lines.line().split())
        assert reap(pid) == 0
    lines.close()
    assert locked == 0
    if thread == "main":
        assert 8 <= looks <= 16  # every 90-100 ms, for Ctrl-C
    else:
        assert 1 <= looks <= 3  # every 500 ms: a dead peer's leftovers


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


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_256_blocked_readers_cost_nothing_and_take_every_token_once(backend: str) -> None:
    """256 processes blocked in read() (their main threads): together they burn almost no
    CPU, a write is not slowed by them, and 256 tokens go to 256 readers, one each.  (The
    same 256 once burned a whole core, and a write(0) waited 23 ms at the median.)"""
    lines = LineReader()
    with EventFD(0, EFD_SEMAPHORE) as efd:
        pids = _blocked_readers(efd, 256, lines.w)
        try:
            wait_until(lambda: stats(efd)["waiting_r"] == 256, timeout=60)
            wait_until(lambda: all(sleeping(pid) for pid in pids), timeout=30)
            cpu0, t0 = _cpu_seconds(pids), time.monotonic()
            writes = []
            while time.monotonic() - t0 < 1.0:
                w0 = time.perf_counter()
                efd.write(0)
                writes.append(time.perf_counter() - w0)
                time.sleep(0.005)
            cores = (_cpu_seconds(pids) - cpu0) / (time.monotonic() - t0)
            for _ in range(256):
                efd.write(1)
            got = [int(lines.line()) for _ in pids]
        finally:
            for pid in pids:
                reap(pid)
        assert got == [1] * 256
        assert efd.peek() == 0
        assert stats(efd)["waiting_r"] == 0
    lines.close()
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
    (it once burned a core until its deadline, and a blocking call spun for ever)."""
    efd = EventFD(0)
    kind = _core.OFFSET_MUTEX + 16  # glibc's __kind, on every 64-bit target it supports
    fd = efd.fds[0]
    saved = os.pread(fd, 4, kind)
    os.pwrite(fd, (126).to_bytes(4, sys.byteorder), kind)  # no mutex type has this value
    try:
        t0 = time.monotonic()
        op = (lambda: efd.write(0, timeout=2)) if call == "write" else (
            lambda: efd.read(timeout=2))
        with pytest.raises(StateError, match="Invalid argument"):
            op()
        assert time.monotonic() - t0 < 0.5
        t0 = time.process_time()
        with pytest.raises(StateError):
            efd.write(0)  # blocking: raises too, at once
        assert time.process_time() - t0 < 0.5
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


def test_a_signal_ends_a_wait_of_the_main_thread_within_100_ms() -> None:
    """A signal delivered to another thread interrupts nothing in the main thread's wait:
    the main thread still runs the handler within a step of 100 ms."""
    with EventFD(0) as efd:
        hit: list[float] = []

        def handler(signum: int, frame: object) -> None:
            hit.append(time.monotonic())
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGUSR1, handler)
        blocker = threading.Thread(target=lambda: time.sleep(0.5))
        blocker.start()
        try:
            sent: list[float] = []

            def send() -> None:
                sent.append(time.monotonic())
                assert blocker.ident is not None
                signal.pthread_kill(blocker.ident, signal.SIGUSR1)  # not the main thread

            threading.Timer(0.2, send).start()
            with pytest.raises(KeyboardInterrupt):
                efd.read(timeout=5)
        finally:
            signal.signal(signal.SIGUSR1, old)
            blocker.join(5)
        assert hit[0] - sent[0] < 0.12
        assert stats(efd)["waiting_r"] == 0
