"""``python -m mpeventfd demo``: a short tour of what the library does, with real processes.

Three acts, a few seconds in all:

1. fan-in: producer processes ``write()`` random amounts into one eventfd while the consumer
   blocks in ``read()``; every count arrives, exactly once;
2. wake-up latency: a ping-pong between two processes, beside the same ping-pong on the
   kernel's ``os.eventfd`` where it exists;
3. work distribution: a semaphore-mode eventfd hands out tokens to worker processes, each
   token to exactly one worker.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from typing import Any, TextIO

from mpeventfd import EFD_SEMAPHORE, EventFD

PRODUCERS = 4
WRITES_PER_PRODUCER = 1500
PINGS = 400
TOKENS = 2000
WORKERS = 4


@dataclass
class Row:
    act: str
    processes: int
    count: str
    exact: bool
    latency: str = ""
    notes: list[str] = field(default_factory=list)


class Progress:
    """One updating line on a terminal; plain lines when output is not a TTY."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()

    def update(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K  " + text)
            self.out.flush()

    def done(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        self.out.write("  " + text + "\n")
        self.out.flush()


# -- act 1: fan-in --------------------------------------------------------------------------


def _producer(efd: EventFD, seed: int, writes: int, report: Any) -> None:
    rng = random.Random(seed)
    total = 0
    for i in range(writes):
        v = rng.randint(1, 9)
        efd.write(v)
        total += v
        if i % 100 == 0:
            time.sleep(rng.random() / 1000)
    report.put((os.getpid(), writes, total))


def fan_in(ctx: Any, progress: Progress) -> Row:
    report = ctx.Queue()
    with EventFD() as efd:
        procs = [
            ctx.Process(target=_producer, args=(efd, seed, WRITES_PER_PRODUCER, report))
            for seed in range(PRODUCERS)
        ]
        for p in procs:
            p.start()
        expected = reads = got = 0
        reports: list[tuple[int, int, int]] = []
        try:
            while len(reports) < PRODUCERS or got < expected:
                try:
                    got += efd.read(timeout=0.05)
                    reads += 1
                except TimeoutError:
                    pass
                while not report.empty():
                    reports.append(report.get())
                    expected = sum(r[2] for r in reports)
                progress.update(f"consumer has read {got:,} in {reads:,} reads")
        finally:
            for p in procs:
                p.join(10)
        for pid, writes, total in sorted(reports):
            progress.done(f"producer pid {pid}: {writes:,} writes adding up to {total:,}")
        progress.done(
            f"consumer pid {os.getpid()}: {reads:,} reads returned {got:,} "
            f"(written {expected:,}): {'exact' if got == expected else 'MISMATCH'}"
        )
        return Row("fan-in", PRODUCERS + 1, f"{got:,} / {expected:,}", got == expected)


# -- act 2: latency -------------------------------------------------------------------------

def _ponger(inbox: EventFD, outbox: EventFD, n: int) -> None:
    # A module-level target with the eventfds as arguments: under spawn and forkserver
    # (the default from 3.14) the target and its arguments are pickled.
    for _ in range(n):
        stamp = inbox.read()
        outbox.write(stamp & 0xFFFF_FFFF)


def _ping(read: Callable[[], int], write: Callable[[int], None], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        write(1)
        read()
        samples.append((time.perf_counter_ns() - t0) / 2000)  # one way, in µs
    return samples


def micros(us: float) -> str:
    """A latency for people: whole µs from 10 up, one decimal below (a sub-µs figure shown
    as "0 µs" reads as "not measured"), two below 0.1.  The format follows the figure as
    rounded, so that 9.96 shows as "10 µs", not "10.0 µs"."""
    if float(f"{us:.1f}") >= 10:
        return f"{us:,.0f} µs"
    return f"{us:.1f} µs" if float(f"{us:.2f}") >= 0.1 else f"{us:.2f} µs"


BLOCK = 20  # round trips per turn: the two ping-pongs take turns, so both see the same machine


def latency(ctx: Any, progress: Progress) -> Row:
    with EventFD() as a, EventFD() as b:
        p = ctx.Process(target=_ponger, args=(a, b, PINGS))
        p.start()
        kernel = _kernel_partner()
        ours: list[float] = []
        theirs: list[float] = []
        try:
            for _ in range(PINGS // BLOCK):
                ours += _ping(b.read, a.write, BLOCK)
                if kernel:
                    theirs += _ping(kernel[1], kernel[2], BLOCK)
        finally:
            p.join(10)
            if kernel:
                kernel[3]()
    p50, p99 = _percentiles(ours)
    text = f"mpeventfd: p50 {micros(p50)}, p99 {micros(p99)} one way ({PINGS} round trips)"
    notes = []
    if theirs:
        k50, k99 = _percentiles(theirs)
        text += (f"; os.eventfd, in turns with it: p50 {micros(k50)}, p99 {micros(k99)}.  "
                 "The kernel's figure depends on how deeply idle CPUs sleep (a partner woken "
                 "from a deep idle state takes tens of µs); a blocking mpeventfd read watches "
                 "the counter for 10 µs first, so this partner rarely sleeps at all")
        notes.append(f"os.eventfd p50 {micros(k50)}, p99 {micros(k99)}")
    progress.done(text)
    return Row("latency", 2, f"{PINGS} round trips", True, f"{micros(p50)} / {micros(p99)}",
               notes)


def _kernel_partner() -> tuple[int, Callable[[], int], Callable[[int], None],
                               Callable[[], None]] | None:
    """A forked os.eventfd ponger: (pid, read, write, finish), or None without eventfd."""
    if not hasattr(os, "eventfd"):
        return None
    a, b = os.eventfd(0), os.eventfd(0)
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(PINGS):
                os.eventfd_read(a)
                os.eventfd_write(b, 1)
        finally:
            os._exit(0)

    def finish() -> None:
        os.waitpid(pid, 0)
        os.close(a)
        os.close(b)

    return pid, lambda: os.eventfd_read(b), lambda v: os.eventfd_write(a, v), finish


def _percentiles(samples: list[float]) -> tuple[float, float]:
    qs = statistics.quantiles(samples, n=100)
    return qs[49], qs[98]


# -- act 3: work distribution ---------------------------------------------------------------


def _worker(efd: EventFD, taken: Synchronized[int], stopping: Any, report: Any) -> None:
    mine = 0
    while True:
        efd.read()
        if stopping.is_set():
            break
        mine += 1
        with taken.get_lock():
            taken.value += 1
    report.put((os.getpid(), mine))


def distribution(ctx: Any, progress: Progress) -> Row:
    report = ctx.Queue()
    taken = ctx.Value("q", 0)
    stopping = ctx.Event()
    with EventFD(0, EFD_SEMAPHORE) as efd:
        procs = [ctx.Process(target=_worker, args=(efd, taken, stopping, report))
                 for _ in range(WORKERS)]
        for p in procs:
            p.start()
        try:
            for i in range(TOKENS // 100):
                efd.write(100)
                progress.update(f"{(i + 1) * 100:,} tokens handed out, {taken.value:,} taken")
            deadline = time.monotonic() + 30
            while taken.value < TOKENS and time.monotonic() < deadline:
                time.sleep(0.01)
            stopping.set()
            efd.write(WORKERS)  # one stop token per worker
            counts = sorted(report.get(timeout=10) for _ in procs)
        finally:
            for p in procs:
                p.join(10)
        left = efd.peek()
    for pid, n in counts:
        progress.done(f"worker pid {pid}: took {n:,} tokens")
    total = sum(n for _, n in counts)
    exact = total == TOKENS and left == 0
    progress.done(f"{total:,} of {TOKENS:,} tokens taken, each exactly once: "
                  f"{'exact' if exact else 'MISMATCH'}")
    return Row("semaphore", WORKERS + 1, f"{total:,} / {TOKENS:,}", exact)


# -- the tour -------------------------------------------------------------------------------


def run(out: TextIO = sys.stdout) -> int:
    """Run the demo; return 0 when every count was exact."""
    ctx = multiprocessing.get_context()
    progress = Progress(out)
    out.write(f"mpeventfd demo: eventfd semantics across processes "
              f"(start method {ctx.get_start_method()}, pid {os.getpid()})\n\n")
    acts = [
        ("1/3 fan-in: 4 producer processes write() into one eventfd; "
         "the consumer blocks in read()", fan_in),
        ("2/3 wake-up latency: ping-pong between two processes", latency),
        ("3/3 work distribution: EFD_SEMAPHORE hands tokens to 4 worker processes",
         distribution),
    ]
    rows = []
    t0 = time.monotonic()
    for title, act in acts:
        out.write(f"[{title}]\n")
        rows.append(act(ctx, progress))
        out.write("\n")
    _table(out, rows)
    ok = all(r.exact for r in rows)
    out.write(f"\n{'all counts exact' if ok else 'COUNTS DID NOT MATCH'} "
              f"in {time.monotonic() - t0:.1f} s\n")
    return 0 if ok else 1


def _table(out: TextIO, rows: list[Row]) -> None:
    head = ("act", "processes", "count (got / sent)", "exact", "latency p50 / p99")
    cells = [head] + [
        (r.act, str(r.processes), r.count, "yes" if r.exact else "NO", r.latency or "-")
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    out.write("summary\n" + line + "\n")
    for i, c in enumerate(cells):
        out.write("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + "\n")
        if i == 0:
            out.write(line + "\n")
    out.write(line + "\n")
