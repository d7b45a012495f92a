"""``python -m mpeventfd bench``: SPEC §7 workloads, mpeventfd beside its baselines.

Every workload runs mpeventfd and its baselines interleaved in one process tree, after a
warm-up, for several repetitions with the garbage collector off; the report gives medians,
the spread, and ratios against ``os.eventfd`` and an ``os.pipe`` self-pipe.  This is a
benchmark, not a test: it prints PASS/MISS against the targets and never fails on them.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ._eventfd import EventFD

Timer = Callable[[], float]  # one repetition -> seconds per unit of work


@dataclass
class Result:
    """One workload: median and spread per implementation, and the verdict."""

    id: str
    title: str
    unit: str
    medians: dict[str, float] = field(default_factory=dict)
    spreads: dict[str, float] = field(default_factory=dict)
    target: str = ""
    ratio: float | None = None
    verdict: str = ""
    note: str = ""


def measure(timers: dict[str, Timer], reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Warm up, then run the timers interleaved ``reps`` times with the GC off."""
    for timer in timers.values():
        timer()
    samples: dict[str, list[float]] = {name: [] for name in timers}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            for name, timer in timers.items():
                samples[name].append(timer())
    finally:
        if enabled:
            gc.enable()
    medians = {n: statistics.median(s) for n, s in samples.items()}
    spreads = {n: (max(s) - min(s)) / statistics.median(s) for n, s in samples.items()}
    return medians, spreads


def loop_timer(fn: Callable[[], object], n: int) -> Timer:
    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n
    return run


# -- P1, P2: one process --------------------------------------------------------------------


def p1(reps: int, n: int) -> Result:
    efd = EventFD(1)
    kfd = os.eventfd(1) if hasattr(os, "eventfd") else -1
    r, w = os.pipe()
    try:
        timers = {"mpeventfd": loop_timer(lambda: efd.write(1), n)}
        if kfd >= 0:
            timers["os.eventfd"] = loop_timer(lambda: os.eventfd_write(kfd, 1), n)
        timers["os.pipe"] = _pipe_write_timer(r, w, n)
        med, spread = measure(timers, reps)
    finally:
        efd.close()
        if kfd >= 0:
            os.close(kfd)
        os.close(r)
        os.close(w)
    return _verdict(Result("P1", "write(1) while counter > 0", "µs/op", med, spread), 1.0)


def _pipe_write_timer(r: int, w: int, n: int) -> Timer:
    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(w, b"\x01")
            if _ % 1024 == 1023:
                os.read(r, 4096)
        elapsed = time.perf_counter() - t0
        os.set_blocking(r, False)
        try:
            while os.read(r, 65536):
                pass
        except BlockingIOError:
            pass
        os.set_blocking(r, True)
        return elapsed / n
    return run


def p2(reps: int, n: int) -> Result:
    efd = EventFD(0)
    kfd = os.eventfd(0) if hasattr(os, "eventfd") else -1
    r, w = os.pipe()

    def mine() -> None:
        efd.write(1)
        efd.read()

    def kernel() -> None:
        os.eventfd_write(kfd, 1)
        os.eventfd_read(kfd)

    def pipe() -> None:
        os.write(w, b"\x01")
        os.read(r, 1)

    try:
        timers = {"mpeventfd": loop_timer(mine, n)}
        if kfd >= 0:
            timers["os.eventfd"] = loop_timer(kernel, n)
        timers["os.pipe"] = loop_timer(pipe, n)
        med, spread = measure(timers, reps)
    finally:
        efd.close()
        if kfd >= 0:
            os.close(kfd)
        os.close(r)
        os.close(w)
    return _verdict(Result("P2", "write(1) + read() pair", "µs/pair", med, spread), 2.5)


# -- P3: ping-pong between two processes ----------------------------------------------------


def _pingpong(setup: Callable[[], tuple[Callable[[], object], Callable[[], object],
                                        Callable[[], object], Callable[[], object],
                                        Callable[[], None]]], n: int) -> Timer:
    """Round-trip time: parent writes A, child reads A and writes B, parent reads B."""
    def run() -> float:
        read_a, write_a, read_b, write_b, close = setup()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for _ in range(n + 50):
                    read_a()
                    write_b()
            except BaseException:
                code = 1
            os._exit(code)
        try:
            for _ in range(50):
                write_a()
                read_b()
            t0 = time.perf_counter()
            for _ in range(n):
                write_a()
                read_b()
            return (time.perf_counter() - t0) / n
        finally:
            os.waitpid(pid, 0)
            close()
    return run


def _mp_pair() -> tuple[Callable[[], object], Callable[[], object], Callable[[], object],
                        Callable[[], object], Callable[[], None]]:
    a, b = EventFD(), EventFD()

    def close() -> None:
        a.close()
        b.close()
    return a.read, lambda: a.write(1), b.read, lambda: b.write(1), close


def _os_pair() -> tuple[Callable[[], object], Callable[[], object], Callable[[], object],
                        Callable[[], object], Callable[[], None]]:
    a, b = os.eventfd(0), os.eventfd(0)

    def close() -> None:
        os.close(a)
        os.close(b)
    return (lambda: os.eventfd_read(a), lambda: os.eventfd_write(a, 1),
            lambda: os.eventfd_read(b), lambda: os.eventfd_write(b, 1), close)


def _pipe_pair() -> tuple[Callable[[], object], Callable[[], object], Callable[[], object],
                          Callable[[], object], Callable[[], None]]:
    ra, wa = os.pipe()
    rb, wb = os.pipe()

    def close() -> None:
        for fd in (ra, wa, rb, wb):
            os.close(fd)
    return (lambda: os.read(ra, 1), lambda: os.write(wa, b"x"),
            lambda: os.read(rb, 1), lambda: os.write(wb, b"x"), close)


def p3(reps: int, n: int) -> Result:
    timers = {"mpeventfd": _pingpong(_mp_pair, n)}
    if hasattr(os, "eventfd"):
        timers["os.eventfd"] = _pingpong(_os_pair, n)
    timers["os.pipe"] = _pingpong(_pipe_pair, n)
    med, spread = measure(timers, reps)
    res = Result("P3", "blocking ping-pong, 2 processes", "µs/round trip", med, spread)
    res = _verdict(res, 1.15)
    pipe_ratio = med["mpeventfd"] / med["os.pipe"]
    res.note = f"{pipe_ratio:.2f}x the pipe (target 1.2x)"
    if pipe_ratio > 1.2:
        res.verdict = "MISS"
    return res


# -- reporting ------------------------------------------------------------------------------


def _verdict(res: Result, limit: float) -> Result:
    base = res.medians.get("os.eventfd", res.medians.get("os.pipe"))
    if base:
        res.ratio = res.medians["mpeventfd"] / base
        res.target = f"<= {limit}x"
        res.verdict = "PASS" if res.ratio <= limit else "MISS"
    return res


WORKLOADS: dict[str, Callable[[int, int], Result]] = {"P1": p1, "P2": p2, "P3": p3}
SIZES = {"P1": (200_000, 20_000), "P2": (100_000, 10_000), "P3": (3_000, 500)}


def run(quick: bool = False, json_path: str | None = None, plot_path: str | None = None,
        only: str | None = None) -> int:
    """Run the benchmark and print the table; return 0 (ratios never fail it)."""
    reps = 3 if quick else 7
    chosen = [w.strip().upper() for w in only.split(",")] if only else list(WORKLOADS)
    results = []
    for wid in chosen:
        full, small = SIZES[wid]
        res = WORKLOADS[wid](reps, small if quick else full)
        results.append(res)
        _print_row(res)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"machine": _machine(), "results": [asdict(r) for r in results]}, f,
                      indent=2)
    if plot_path:
        _plot(results, plot_path)
    return 0


def _print_row(res: Result) -> None:
    cells = ", ".join(f"{k} {v * 1e6:.2f}" for k, v in res.medians.items())
    ratio = f"{res.ratio:.2f}x" if res.ratio is not None else "-"
    print(f"{res.id} {res.title}: {cells} {res.unit}; ratio {ratio} {res.target} "
          f"{res.verdict} {res.note}".rstrip())


def _machine() -> dict[str, Any]:
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count()}


def _plot(results: list[Result], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'mpeventfd[plot]'")
        return
    ids = [r.id for r in results if r.ratio is not None]
    ratios = [r.ratio for r in results if r.ratio is not None]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(ids, ratios)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("mpeventfd / baseline")
    fig.tight_layout()
    fig.savefig(path)
