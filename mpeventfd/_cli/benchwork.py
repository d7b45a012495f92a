"""The workloads behind ``python -m mpeventfd bench``, one timer factory per row.

A factory returns a timer: a callable that sets up (untimed), runs the timed part once, tears
down, and returns seconds per unit of work.  Every process it starts is reaped before it
returns, and everything it creates is closed.
"""

from __future__ import annotations

import asyncio
import mmap
import multiprocessing
import os
import select
import statistics
import struct
import time
from collections.abc import Callable

from mpeventfd import EFD_SEMAPHORE, EventFD

from .. import _core, _create

Timer = Callable[[], float]
_clock = time.perf_counter
_STAMP = struct.Struct("Q")


def _child(body: Callable[[], object]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def _reap(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# -- P1 / P2: one process -------------------------------------------------------------------


def write_loop(n: int) -> Timer:
    def run() -> float:
        with EventFD(1) as efd:
            write = efd.write
            t0 = _clock()
            for _ in range(n):
                write(1)
            return (_clock() - t0) / n
    return run


def kernel_write_loop(n: int) -> Timer:
    def run() -> float:
        fd = os.eventfd(1)
        try:
            write = os.eventfd_write
            t0 = _clock()
            for _ in range(n):
                write(fd, 1)
            return (_clock() - t0) / n
        finally:
            os.close(fd)
    return run


def pipe_write_loop(n: int) -> Timer:
    """A self-pipe's wake-up: one byte per write (drained between batches, untimed)."""
    def run() -> float:
        r, w = os.pipe()
        try:
            elapsed = 0.0
            done = 0
            while done < n:
                batch = min(4096, n - done)
                t0 = _clock()
                for _ in range(batch):
                    os.write(w, b"\x01")
                elapsed += _clock() - t0
                os.read(r, batch)
                done += batch
            return elapsed / n
        finally:
            os.close(r)
            os.close(w)
    return run


def pair_loop(n: int, lock: str | None = None, armed: bool = False) -> Timer:
    """The write+read pair; ``lock`` picks the lock kind ("robust", "byte"), ``armed``
    asks for fileno() first (the pipe then mirrors the counter)."""
    def run() -> float:
        saved = EventFD._mutex_kind
        if lock is not None:
            EventFD._mutex_kind = _create.LOCK_KINDS[lock]
        try:
            efd = EventFD(0)
        finally:
            EventFD._mutex_kind = saved
        with efd:
            if armed:
                efd.fileno()
            write, read = efd.write, efd.read
            t0 = _clock()
            for _ in range(n):
                write(1)
                read()
            return (_clock() - t0) / n
    return run


def kernel_pair_loop(n: int) -> Timer:
    def run() -> float:
        fd = os.eventfd(0)
        try:
            t0 = _clock()
            for _ in range(n):
                os.eventfd_write(fd, 1)
                os.eventfd_read(fd)
            return (_clock() - t0) / n
        finally:
            os.close(fd)
    return run


def pipe_pair_loop(n: int) -> Timer:
    def run() -> float:
        r, w = os.pipe()
        try:
            t0 = _clock()
            for _ in range(n):
                os.write(w, b"\x01")
                os.read(r, 1)
            return (_clock() - t0) / n
        finally:
            os.close(r)
            os.close(w)
    return run


# -- P3: ping-pong --------------------------------------------------------------------------

Ends = tuple[Callable[[], object], Callable[[], object], Callable[[], object],
             Callable[[], object], Callable[[], None]]


def _closer(*closes: Callable[[], object]) -> Callable[[], None]:
    def close() -> None:
        for c in closes:
            c()
    return close


def _ends(kind: str) -> Ends:
    """(read A, write A, read B, write B, close) for one kind of channel."""
    if kind == "mpeventfd":
        a, b = EventFD(), EventFD()
        return a.read, lambda: a.write(1), b.read, lambda: b.write(1), _closer(a.close, b.close)
    if kind == "os.eventfd":
        fa, fb = os.eventfd(0), os.eventfd(0)
        return (lambda: os.eventfd_read(fa), lambda: os.eventfd_write(fa, 1),
                lambda: os.eventfd_read(fb), lambda: os.eventfd_write(fb, 1),
                _closer(lambda: os.close(fa), lambda: os.close(fb)))
    if kind == "os.pipe":
        ra, wa = os.pipe()
        rb, wb = os.pipe()
        return (lambda: os.read(ra, 1), lambda: os.write(wa, b"x"),
                lambda: os.read(rb, 1), lambda: os.write(wb, b"x"),
                _closer(*(lambda fd=fd: os.close(fd) for fd in (ra, wa, rb, wb))))
    ctx = multiprocessing.get_context("fork")
    if kind == "mp.Semaphore":
        sa, sb = ctx.Semaphore(0), ctx.Semaphore(0)
        return sa.acquire, sa.release, sb.acquire, sb.release, _closer()
    here, there = ctx.Pipe()  # mp.Pipe: duplex, a socketpair
    return (there.recv_bytes, lambda: here.send_bytes(b"x"), here.recv_bytes,
            lambda: there.send_bytes(b"x"), _closer(here.close, there.close))


def pingpong(kind: str, n: int) -> Timer:
    def run() -> float:
        read_a, write_a, read_b, write_b, close = _ends(kind)
        try:
            pid = _child(lambda: [(read_a(), write_b()) for _ in range(n + 50)])
            try:
                for _ in range(50):
                    write_a()
                    read_b()
                t0 = _clock()
                for _ in range(n):
                    write_a()
                    read_b()
                return (_clock() - t0) / n
            finally:
                _reap(pid)
        finally:
            close()
    return run


# -- P4: eight consumers, one token at a time -----------------------------------------------

CONSUMERS = 8
WARMUP = 100


def _release(stop: mmap.mmap, give: Callable[[int], None], pids: list[int]) -> None:
    """Tell blocked children to stop (``stop[0]``), wake each with a token, and reap them."""
    stop[0] = 1
    if pids:
        give(len(pids))
    for pid in pids:
        _reap(pid)


def _cpu_ns(pid: int) -> int:
    """CPU time a process has used, in ns (``/proc/<pid>/schedstat``; Linux)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def _cpu_of(pids: list[int]) -> float:
    return sum(_cpu_ns(pid) for pid in pids) / 1e9


def herd(kind: str, n: int) -> Timer:
    """Consumer CPU per token: 8 blocked readers, a producer handing out single tokens.

    The kernel wakes every blocked reader on each write (docs/linux-eventfd.md R27); the
    semaphore channel wakes one.
    """
    def run() -> float:
        if kind == "mpeventfd":
            with EventFD(0, EFD_SEMAPHORE) as efd:
                return consumer_cpu(efd.read, efd.write, n)
        fd = os.eventfd(0, os.EFD_SEMAPHORE)
        try:
            return consumer_cpu(lambda: os.eventfd_read(fd),
                                lambda v: os.eventfd_write(fd, v), n)
        finally:
            os.close(fd)
    return run


def consumer_cpu(take: Callable[[], object], give: Callable[[int], None], n: int) -> float:
    """CONSUMERS processes loop on ``take()``; ``give(1)`` hands out n tokens one at a time.

    Returns the consumers' CPU seconds per token.  Each token is acknowledged on a separate
    kernel eventfd (the same for every kind), so tokens go out one at a time.  The caller
    owns what ``take`` and ``give`` use; a fork child inherits it.
    """
    stop = mmap.mmap(-1, 8)
    ack = os.eventfd(0)

    def consume() -> None:
        while True:
            take()
            if stop[0]:
                return
            os.eventfd_write(ack, 1)

    pids: list[int] = []
    try:
        pids = [_child(consume) for _ in range(CONSUMERS)]
        for _ in range(WARMUP):  # every consumer has run and touched its pages
            give(1)
            os.eventfd_read(ack)
        before = _cpu_of(pids)
        for _ in range(n):
            give(1)
            os.eventfd_read(ack)
        cpu = _cpu_of(pids) - before
    finally:
        _release(stop, give, pids)
        os.close(ack)
        stop.close()
    return cpu / n


# -- P5: fan-in -----------------------------------------------------------------------------

PRODUCERS = 4


def fan_in(kind: str, n: int) -> Timer:
    """Four producers write(1) n/4 times each; one consumer sums until exact.  s/write.

    Each side loops over its implementation's own call, bound to a local name, as P1 does
    (a lambda per call would add the same 40-50 ns to every implementation and measure the
    harness instead)."""
    per = n // PRODUCERS
    total = per * PRODUCERS

    def run() -> float:
        go_r, go_w = os.pipe()
        if kind == "mpeventfd":
            efd = EventFD()

            def producer() -> None:
                write = efd.write
                os.read(go_r, 1)
                for _ in range(per):
                    write(1)

            consume: Callable[[], int] = efd.read
            close: Callable[[], object] = efd.close
        elif kind == "os.eventfd":
            fd = os.eventfd(0)

            def producer() -> None:
                write = os.eventfd_write
                os.read(go_r, 1)
                for _ in range(per):
                    write(fd, 1)

            consume = lambda: os.eventfd_read(fd)  # noqa: E731
            close = lambda: os.close(fd)  # noqa: E731
        else:
            r, w = os.pipe()

            def producer() -> None:
                write, byte = os.write, b"\x01"
                os.read(go_r, 1)
                for _ in range(per):
                    write(w, byte)

            consume = lambda: len(os.read(r, 65536))  # noqa: E731
            close = _closer(lambda: os.close(r), lambda: os.close(w))

        pids = [_child(producer) for _ in range(PRODUCERS)]
        try:
            got = 0
            t0 = _clock()
            os.write(go_w, b"x" * PRODUCERS)
            while got < total:
                got += consume()
            elapsed = _clock() - t0
        finally:
            for pid in pids:
                _reap(pid)
            close()
            os.close(go_r)
            os.close(go_w)
        if got != total:
            raise AssertionError(f"fan-in sum {got} != {total}")
        return elapsed / total
    return run


# -- P6: asyncio wake-up latency ------------------------------------------------------------


WAKE_AFTER_NS = 100_000


def asyncio_latency(kinds: list[str], n: int,
                    loop_factory: str = "asyncio") -> dict[str, tuple[float, float]]:
    """p50 and p99 seconds from a write in another process to the awaiting task's wake.

    Every kind ("mpeventfd", "os.eventfd") is measured in one writer and one awaiting
    process, sample by sample in turn (the order alternating), so that all of them see the
    same CPU placement and idle states: a pair of processes placed otherwise moves either
    kind's latency by 2x (6 against 13 µs, measured), which separate pairs per kind turned
    into noise in the ratio.  ``loop_factory`` is "asyncio" (the default loop) or "uvloop".
    """
    stamp = mmap.mmap(-1, 8)
    ack_r, ack_w = os.pipe()
    efd = EventFD()
    fd = os.eventfd(0, os.EFD_NONBLOCK) if "os.eventfd" in kinds else -1
    signals: dict[bytes, Callable[[], object]] = {
        b"m": lambda: efd.write(1), b"k": lambda: os.eventfd_write(fd, 1)}
    codes = {"mpeventfd": b"m", "os.eventfd": b"k"}

    def writer() -> None:
        os.close(ack_w)  # so that the task's failure ends this loop (EOF, KeyError)
        for _ in range(n * len(kinds)):
            code = os.read(ack_r, 1)  # one sample at a time: no coalescing
            # Write only once the task is surely waiting (it gets there within ~10 µs of
            # its ack): a write that lands earlier times the task's own way to its wait,
            # not a wake-up.  Spinning, so that the writer is not waking up itself.
            until = time.monotonic_ns() + WAKE_AFTER_NS
            while time.monotonic_ns() < until:
                pass
            _STAMP.pack_into(stamp, 0, time.monotonic_ns())
            signals[code]()

    async def wait_kernel(loop: asyncio.AbstractEventLoop) -> None:
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        os.eventfd_read(fd)

    async def consume() -> dict[str, list[float]]:
        loop = asyncio.get_running_loop()
        samples: dict[str, list[float]] = {kind: [] for kind in kinds}
        for i in range(n):
            for kind in kinds if i % 2 else kinds[::-1]:
                os.write(ack_w, codes[kind])
                if kind == "mpeventfd":
                    await efd.aread()
                else:
                    await wait_kernel(loop)
                samples[kind].append((time.monotonic_ns() - _STAMP.unpack_from(stamp)[0]) / 1e9)
        return samples

    pid = _child(writer)
    try:
        if loop_factory == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
            try:
                samples = loop.run_until_complete(consume())
            finally:
                loop.close()
        else:
            samples = asyncio.run(consume())
    finally:
        os.close(ack_w)
        _reap(pid)
        efd.close()
        if fd >= 0:
            os.close(fd)
        os.close(ack_r)
        stamp.close()
    out = {}
    for kind, got in samples.items():
        qs = statistics.quantiles(got, n=100)
        out[kind] = (qs[49], qs[98])
    return out


# -- P7 / P8 --------------------------------------------------------------------------------


def attached_pair_loop(others: int, n: int) -> Timer:
    """A write+read pair while ``others`` more processes are attached (each owns a slot)."""
    def run() -> float:
        hold_r, hold_w = os.pipe()
        ready_r, ready_w = os.pipe()
        with EventFD(0) as efd:
            def attach_and_wait() -> None:
                try:
                    efd.read(timeout=0.001)  # an operation: claims this process's slot
                except TimeoutError:
                    pass
                finally:
                    os.write(ready_w, b"x")  # (even failing: the parent counts them all)
                os.read(hold_r, 1)

            pids = [_child(attach_and_wait) for _ in range(others)]
            try:
                # Every one has attached and is asleep: none may still be starting up
                # beside the timed loop (a sleep of 50 ms here let some run into it).
                for _ in range(others):
                    os.read(ready_r, 1)
                write, read = efd.write, efd.read
                for _ in range(1_000):  # untimed: the fork made this process's pages
                    write(1)            # copy-on-write, and the first touches fault
                    read()
                t0 = _clock()
                for _ in range(n):
                    write(1)
                    read()
                return (_clock() - t0) / n
            finally:
                os.write(hold_w, b"x" * others)
                for pid in pids:
                    _reap(pid)
                os.close(hold_r)
                os.close(hold_w)
                os.close(ready_r)
                os.close(ready_w)
    return run


def footprint() -> tuple[int, int]:
    """(fds that travel, private fds this process opened besides them)."""
    if not os.path.isdir("/proc/self/fd"):
        with EventFD() as efd:
            return len(efd.fds), 1
    before = _open_fds()
    with EventFD() as efd:
        efd.write(1)
        efd.read()
        opened = _open_fds() - before
        return len(efd.fds), len(opened - set(efd.fds))


def _open_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))  # the fd listdir itself used is closed again by now
        except OSError:
            continue
        fds.add(int(name))
    return fds


# -- S: what the read spin costs and buys ---------------------------------------------------


def empty_read_cpu(spin: float, n: int) -> Timer:
    """CPU seconds per blocking read that finds nothing (it times out after 1 ms)."""
    def run() -> float:
        old = _core._spin(spin)
        try:
            with EventFD(0) as efd:
                t0 = time.process_time()
                for _ in range(n):
                    try:
                        efd.read(timeout=0.001)
                    except TimeoutError:
                        pass
                return (time.process_time() - t0) / n
        finally:
            _core._spin(old)
    return run


def pingpong_with_spin(spin: float, n: int) -> Timer:
    """P3's round trip with a given read spin, in both processes."""
    inner = pingpong("mpeventfd", n)

    def run() -> float:
        old = _core._spin(spin)  # (the forked partner inherits the setting)
        try:
            return inner()
        finally:
            _core._spin(old)
    return run


# -- P9: many processes blocked in read() ---------------------------------------------------


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def scale(kind: str, waiters: int, tokens: int, idle: float = 1.0,
          interval: float = 0.002) -> tuple[float, list[float], float]:
    """``waiters`` processes blocked in semaphore-mode ``read()`` in their main threads.

    Returns (the cores they burn while nothing happens, measured over ``idle`` seconds; the
    hand-off latency of each of ``tokens`` tokens, from the parent's write to a reader's
    return; their CPU seconds per token).  The parent hands out one token every
    ``interval`` seconds and waits for each to be taken before the next, so every latency
    is one hand-off's.  Linux only (``/proc``).
    """
    stop = mmap.mmap(-1, 8)
    ack_r, ack_w = os.pipe()
    if kind == "mpeventfd":
        efd = EventFD(0, EFD_SEMAPHORE)
        take: Callable[[], object] = efd.read
        give: Callable[[int], None] = efd.write
        close: Callable[[], None] = efd.close
    else:
        fd = os.eventfd(0, os.EFD_SEMAPHORE)
        take = lambda: os.eventfd_read(fd)  # noqa: E731
        give = lambda v: os.eventfd_write(fd, v)  # noqa: E731
        close = lambda: os.close(fd)  # noqa: E731

    def waiter() -> None:
        while True:
            take()
            t = time.monotonic_ns()
            if stop[0]:
                return
            os.write(ack_w, _STAMP.pack(t))

    pids: list[int] = []
    try:
        pids = [_child(waiter) for _ in range(waiters)]
        deadline = time.monotonic() + 60 + waiters / 10
        # Asleep in read(), every one (and registered, for mpeventfd): none may still be
        # starting up, or faulting in pages, beside the measurement.
        while not (all(_state(pid) == "S" for pid in pids) and (
                kind != "mpeventfd" or efd._core is None
                or efd._core.stats()["waiting_r"] == waiters)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{waiters} waiters did not all block in read()")
            time.sleep(0.01)
        time.sleep(0.2)  # (one more step of the main threads' wake-ups before measuring)
        cpu0, t0 = _cpu_of(pids), time.monotonic()
        time.sleep(idle)
        cores = (_cpu_of(pids) - cpu0) / (time.monotonic() - t0)
        latencies = []
        cpu0 = _cpu_of(pids)
        tick = time.monotonic()
        for _ in range(tokens):
            sent = time.monotonic_ns()
            give(1)
            if not select.select([ack_r], [], [], 10)[0]:
                raise RuntimeError("a token was not taken within 10 s")
            latencies.append((_STAMP.unpack(os.read(ack_r, 8))[0] - sent) / 1e9)
            tick += interval
            pause = tick - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        per_token = (_cpu_of(pids) - cpu0) / tokens
    finally:
        _release(stop, give, pids)
        close()
        os.close(ack_r)
        os.close(ack_w)
        stop.close()
    return cores, latencies, per_token
