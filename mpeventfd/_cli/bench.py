"""``python -m mpeventfd bench``: the README's performance workloads, beside baselines.

Every workload runs mpeventfd and its baselines interleaved in one run, after a warm-up,
for several repetitions with the garbage collector off, on the monotonic clock; the report
gives one value per implementation, its spread ((max - min) / median) and the ratio against
``os.eventfd`` (the pipe where there is no eventfd), with PASS/MISS against each target.  A
benchmark, not a test: it never fails on a ratio.

Which value: the workloads of one process (P1, P2, P7, C) measure a cost, what the code
needs when nothing disturbs it.  Other processes and the hypervisor only ever add to a
sample, and on a virtual machine they add tens of percent for seconds at a time, more to the
longer-running side; so these take the best of many short repetitions, as ``timeit``
advises, for every implementation alike (the median is in the JSON output too).  The
workloads of several processes measure what scheduling and wake-ups make of it, disturbance
included: they take medians, and their ratio is the median of per-repetition ratios (two
samples taken back to back see the same phase of the machine).

The strongest peers run beside the baselines where their API fits the workload: iceoryx2
in P1, P2 and P3 when it is installed (``pip install 'mpeventfd[peers]'``), and its column
says "not installed" when it is not (``peers.py``).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from .._core import SIZE
from .._probe import PLATFORM
from . import benchwork as work
from . import peers

HAS_EVENTFD = hasattr(os, "eventfd")
HAS_ICEORYX2 = peers.AVAILABLE
PEER_WORKLOADS = ("P1", "P2", "P3")  # where iceoryx2's API fits (peers.py says why)
BEST, MEDIAN = "best", "median"


@dataclass
class Result:
    """One workload: a value and a spread per implementation, and the verdict."""

    id: str
    title: str
    unit: str
    target: str
    values: dict[str, float] = field(default_factory=dict)
    spreads: dict[str, float] = field(default_factory=dict)
    ratio: float | None = None
    verdict: str = ""
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    stat: str = MEDIAN  # what ``values`` holds: BEST or MEDIAN of the samples
    per_rep: list[float] = field(default_factory=list)  # the ratio in each repetition
    limit: float | None = None  # the target as a ratio (for the plot)
    higher_is_better: bool = False
    tail: list[Result] = field(default_factory=list)  # a second statistic judged too (p99)

    def __post_init__(self) -> None:
        if self.samples and not self.values:
            pick = min if self.stat == BEST else statistics.median
            self.values = {n: pick(s) for n, s in self.samples.items()}
            self.spreads = {n: (max(s) - min(s)) / m if (m := statistics.median(s)) else 0.0
                            for n, s in self.samples.items()}

    @property
    def statistic(self) -> str:
        """How ``values`` and ``ratio`` were taken, in words."""
        if not self.samples:
            return "one measurement"
        reps = len(next(iter(self.samples.values())))
        if self.stat == BEST:
            return f"best of {reps}"
        return f"median of {reps}, ratio: median of per-repetition ratios"

    def ratios(self, name: str, base: str) -> list[float]:
        """The ratio of ``name`` to ``base`` in each repetition (samples taken together)."""
        return [a / b for a, b in zip(self.samples[name], self.samples[base], strict=True)]

    def ratio_of(self, name: str, base: str) -> float:
        """``name`` against ``base``: best over best, or the median paired ratio."""
        if self.stat == BEST:
            return self.values[name] / self.values[base]
        pairs = zip(self.samples[name], self.samples[base], strict=True)
        return statistics.median(a / b for a, b in pairs)


class _Progress:
    """One line on stderr while the benchmark runs: which workload, which repetition."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.t0 = 0.0
        self.head = ""
        self.reps = self.rep = 0

    def begin(self, index: int, count: int, wid: str, title: str, reps: int) -> None:
        if not self.t0:
            self.t0 = time.monotonic()
        self.head, self.reps, self.rep = f"[{index}/{count}] {wid} {title}", reps, 0
        if self.tty:
            self._show()
        else:
            print(f"{self.head} ...", file=sys.stderr, flush=True)

    def tick(self) -> None:
        self.rep += 1
        if self.tty:
            self._show()

    def clear(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def _show(self) -> None:
        line = (f"{self.head}: repetition {min(self.rep, self.reps)}/{self.reps}, "
                f"{time.monotonic() - self.t0:.0f} s so far")
        sys.stderr.write("\r\033[K" + line[:150])
        sys.stderr.flush()


_progress = _Progress()
T = TypeVar("T")


def measure(timers: dict[str, Callable[[], T]], reps: int) -> dict[str, list[T]]:
    """Warm up, then run the timers interleaved ``reps`` times with the GC off."""
    for timer in timers.values():
        timer()
    samples: dict[str, list[T]] = {name: [] for name in timers}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            for name, timer in timers.items():
                samples[name].append(timer())
            _progress.tick()
    finally:
        if enabled:
            gc.enable()
    return samples


def _judge(res: Result, limit: float, against: str = "os.eventfd",
           name: str = "mpeventfd") -> Result:
    """Ratio of ``name`` to the baseline (lower is better) against ``limit``."""
    base = against if against in res.samples else "os.pipe"
    res.limit = limit
    if base in res.samples:
        res.ratio = res.ratio_of(name, base)
        res.per_rep = res.ratios(name, base)
        res.verdict = "PASS" if res.ratio <= limit else "MISS"
    return res


def _timers(pairs: dict[str, Callable[[], float] | None]) -> dict[str, Callable[[], float]]:
    return {name: t for name, t in pairs.items() if t is not None}


def p1(reps: int, n: int) -> Result:
    samples = measure(_timers({
        "mpeventfd": work.write_loop(n),
        "os.eventfd": work.kernel_write_loop(n) if HAS_EVENTFD else None,
        "os.pipe": work.pipe_write_loop(n),
        "iceoryx2": peers.notify_loop(n) if HAS_ICEORYX2 else None,
    }), reps)
    return _peer_note(_judge(Result("P1", "write(1) while counter > 0, one process", "µs/op",
                                    "<= 0.2x", samples=samples, stat=BEST), 0.2))


def p2(reps: int, n: int) -> Result:
    samples = measure(_timers({
        "mpeventfd": work.pair_loop(n),
        "os.eventfd": work.kernel_pair_loop(n) if HAS_EVENTFD else None,
        "os.pipe": work.pipe_pair_loop(n),
        "iceoryx2": peers.pair_loop(n) if HAS_ICEORYX2 else None,
    }), reps)
    return _peer_note(_judge(Result("P2", "write(1) + read() pair, readiness not armed",
                                    "µs/pair", "<= 0.35x", samples=samples, stat=BEST), 0.35))


def p2_armed(reps: int, n: int) -> Result:
    samples = measure(_timers({
        "mpeventfd": work.pair_loop(n, armed=True),
        "os.eventfd": work.kernel_pair_loop(n) if HAS_EVENTFD else None,
        "os.pipe": work.pipe_pair_loop(n),
    }), reps)
    return _judge(Result("P2A", "write(1) + read() pair, after fileno()", "µs/pair",
                         "<= 1.3x", samples=samples, stat=BEST), 1.3)


def p3(reps: int, n: int) -> Result:
    samples = measure(_timers({
        "mpeventfd": work.pingpong("mpeventfd", n),
        "os.eventfd": work.pingpong("os.eventfd", n) if HAS_EVENTFD else None,
        "os.pipe": work.pingpong("os.pipe", n),
        "mp.Semaphore": work.pingpong("mp.Semaphore", n),
        "mp.Pipe": work.pingpong("mp.Pipe", n),
        "iceoryx2": peers.pingpong(n) if HAS_ICEORYX2 else None,
    }), reps)
    res = _judge(Result("P3", "blocking ping-pong between 2 processes", "µs/round trip",
                        "<= 1.1x eventfd and pipe", samples=samples), 1.1)
    pipe_ratio = res.ratio_of("mpeventfd", "os.pipe")
    # The kernel's round trip moves with how deeply idle CPUs sleep (2 µs awake, 50+ µs
    # deeply asleep): every repetition, with both sides' absolute values.
    base = "os.eventfd" if "os.eventfd" in samples else "os.pipe"
    each = "; ".join(f"{a * 1e6:.1f}/{b * 1e6:.1f}={a / b:.2f}x" for a, b in
                     zip(samples["mpeventfd"], samples[base], strict=True))
    res.note = f"{pipe_ratio:.2f}x the pipe; per repetition (µs, mpeventfd/{base}): {each}"
    if pipe_ratio > 1.1:
        res.verdict = "MISS"
    return _peer_note(res)


def _peer_note(res: Result) -> Result:
    """Say how mpeventfd compares with iceoryx2, or that iceoryx2 is not installed."""
    if "iceoryx2" in res.samples:
        text = f"{res.ratio_of('mpeventfd', 'iceoryx2'):.2f}x iceoryx2"
    else:
        text = f"iceoryx2 not installed ({peers.INSTALL})"
    res.note = f"{text}; {res.note}" if res.note else text
    return res


def p4(reps: int, n: int) -> Result:
    samples = measure(_timers({
        "mpeventfd": work.herd("mpeventfd", n),
        "os.eventfd": work.herd("os.eventfd", n) if HAS_EVENTFD else None,
    }), reps)
    res = _judge(Result("P4", "EFD_SEMAPHORE, 8 consumers blocked, 1 token at a time",
                        "µs consumer CPU/token", "<= 0.45x", samples=samples), 0.45)
    return res


def p5(reps: int, n: int) -> Result:
    samples = measure(_timers({
        "mpeventfd": work.fan_in("mpeventfd", n),
        "os.eventfd": work.fan_in("os.eventfd", n) if HAS_EVENTFD else None,
        "os.pipe": work.fan_in("os.pipe", n),
    }), reps)
    # Times per write: throughput is the inverse, so ">= 3x throughput" is "<= 1/3 the time".
    res = _judge(Result("P5", "fan-in: 4 producer processes write(1), 1 consumer",
                        "µs/write (exact sum)", ">= 3x throughput", samples=samples), 1 / 3)
    if res.ratio:
        res.note = f"throughput {1 / res.ratio:.2f}x os.eventfd"
    res.higher_is_better = True  # (plotted as throughput)
    return res


def p6(reps: int, n: int) -> Result:
    return _asyncio_row("P6", "asyncio", reps, n)


def p6_uvloop(reps: int, n: int) -> Result:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return Result("P6U", "asyncio wake-up latency on uvloop", "µs p50", "<= 1.1x",
                      verdict="SKIP", note="uvloop is not installed (pip install uvloop)")
    return _asyncio_row("P6U", "uvloop", reps, n)


def _asyncio_row(wid: str, loop: str, reps: int, n: int) -> Result:
    p50s: dict[str, list[float]] = {"mpeventfd": [], "os.eventfd": []}
    p99s: dict[str, list[float]] = {"mpeventfd": [], "os.eventfd": []}
    kinds = ["mpeventfd"] + (["os.eventfd"] if HAS_EVENTFD else [])
    timer = lambda: work.asyncio_latency(kinds, n, loop)  # noqa: E731
    for row in measure({"all kinds": timer}, reps)["all kinds"]:  # (warm-up, GC off)
        for kind, (p50, p99) in row.items():
            p50s[kind].append(p50)
            p99s[kind].append(p99)
    res = Result(wid, f"{loop} wake-up latency, aread() vs add_reader + eventfd_read",
                 "µs p50", "<= 1.1x p50 and p99", samples={k: v for k, v in p50s.items() if v})
    res = _judge(res, 1.1)
    if HAS_EVENTFD:
        tail = _judge(Result(f"{wid} p99", "p99", "µs p99", "<= 1.1x", samples=p99s), 1.1)
        res.tail = [tail]
        res.note = (f"p99 {tail.values['mpeventfd'] * 1e6:.0f} vs "
                    f"{tail.values['os.eventfd'] * 1e6:.0f} µs ({tail.ratio or 0:.2f}x)")
        if tail.verdict == "MISS":
            res.verdict = "MISS"
    return res


def p7(reps: int, n: int) -> Result:
    samples = measure({
        "1 attached": work.attached_pair_loop(0, n),
        "64 attached": work.attached_pair_loop(63, n),
    }, reps)
    res = Result("P7", "write+read pair with 1 vs 64 attached processes", "µs/pair",
                 "ratio <= 1.05", samples=samples, stat=BEST)
    res.ratio = res.ratio_of("64 attached", "1 attached")
    res.per_rep, res.limit = res.ratios("64 attached", "1 attached"), 1.05
    res.verdict = "PASS" if res.ratio <= 1.05 else "MISS"
    return res


def p8(reps: int, n: int) -> Result:
    fds, private = work.footprint()
    res = Result("P8", "footprint per eventfd", "fds / bytes", "<= 3 fds + 1 private, <= 64 KiB",
                 {"fds that travel": fds, "private fds per process": private,
                  "shared bytes": SIZE})
    ok = fds <= 3 and private <= 1 and SIZE <= 64 * 1024
    res.verdict = "PASS" if ok else "MISS"
    res.note = f"{fds} fds travel, {private} private per process, {SIZE:,} bytes shared"
    return res


def safety(reps: int, n: int) -> Result:
    """What each lock kind costs: the P2 pair with the robust mutex and the byte lock."""
    timers = {"mpeventfd": work.pair_loop(n), "byte lock": work.pair_loop(n, "byte")}
    if PLATFORM.robust_mutex:
        timers["robust mutex"] = work.pair_loop(n, "robust")
    samples = measure(timers, reps)
    res = Result("C", "lock kinds: write+read pair", "µs/pair", "(reported, no target)",
                 samples=samples, stat=BEST)
    res.verdict = "INFO"
    if PLATFORM.robust_mutex:
        res.ratio = res.ratio_of("byte lock", "robust mutex")
        res.note = f"the kernel byte lock costs {res.ratio:.2f}x the robust mutex"
    return res


SCALE_N = (8, 64, 256)  # + 1,024 outside --quick
IDLE_TARGET = {8: 0.02, 64: 0.02, 256: 0.02, 1024: 0.05}  # cores
_quick = False  # set by run(): P9 leaves out 1,024 waiters in a quick run


def p9(reps: int, n: int) -> Result:
    """N processes blocked in semaphore-mode read() in their main threads (Linux: /proc).

    One row per N and figure, each judged on its own: the CPU the idle waiters burn (an
    absolute target), the hand-off p99 against os.eventfd's at the same N, and the CPU per
    token (against 0.1x os.eventfd's at N = 256; the kernel wakes every reader per token).
    """
    res = Result("P9", "N processes blocked in read(), 1 token at a time", "µs", "see rows")
    if not HAS_EVENTFD or not os.path.isdir("/proc/self"):
        res.verdict, res.note = "SKIP", "needs os.eventfd and /proc (Linux)"
        return res
    kinds = ["mpeventfd", "os.eventfd"]
    for waiters in SCALE_N + (() if _quick else (1024,)):
        idle: dict[str, list[float]] = {k: [] for k in kinds}
        p50: dict[str, list[float]] = {k: [] for k in kinds}
        p99: dict[str, list[float]] = {k: [] for k in kinds}
        cpu: dict[str, list[float]] = {k: [] for k in kinds}
        for rep in range(reps):
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                cores, latencies, per_token = work.scale(kind, waiters, n)
                q = statistics.quantiles(latencies, n=100)
                idle[kind].append(cores)
                p50[kind].append(q[49])
                p99[kind].append(q[98])
                cpu[kind].append(per_token)
            _progress.tick()
        limit = IDLE_TARGET[waiters]
        row = Result(f"P9 idle N={waiters}", f"{waiters} idle waiters' CPU", "cores",
                     f"<= {limit} cores", samples=idle, limit=limit)
        row.ratio = row.values["mpeventfd"] / limit  # (of the target: plotted as such)
        row.per_rep = [x / limit for x in idle["mpeventfd"]]
        row.verdict = "PASS" if row.values["mpeventfd"] <= limit else "MISS"
        row.note = f"{row.values['mpeventfd']:.4f} cores; os.eventfd {row.values['os.eventfd']:.4f}"
        tail = _judge(Result(f"P9 p99 N={waiters}", f"{waiters} waiters: hand-off p99",
                             "µs p99", "<= 1.0x", samples=p99), 1.0)
        m50, k50 = statistics.median(p50["mpeventfd"]), statistics.median(p50["os.eventfd"])
        tail.note = f"p50 {m50 * 1e6:.0f} vs {k50 * 1e6:.0f} µs"
        per = Result(f"P9 CPU N={waiters}", f"{waiters} waiters: CPU per token", "µs/token",
                     "<= 0.1x" if waiters == 256 else "(reported)", samples=cpu)
        if waiters == 256:
            per = _judge(per, 0.1)
        else:
            per.ratio = per.ratio_of("mpeventfd", "os.eventfd")
            per.per_rep = per.ratios("mpeventfd", "os.eventfd")
            per.verdict = "INFO"
        res.tail += [row, tail, per]
    missed = [t.id for t in res.tail if t.verdict == "MISS"]
    res.verdict = "MISS" if missed else "PASS"
    res.note = f"missed: {', '.join(missed)}" if missed else "every row met"
    return res


SPINS = (0.0, 10e-6, 25e-6, 50e-6)


def spin(reps: int, n: int) -> Result:
    """What the read spin costs (CPU per blocking read that finds nothing) and buys (P3)."""
    samples = measure({**{f"cpu, spin {t * 1e6:.0f} µs": work.empty_read_cpu(t, n)
                          for t in SPINS},
                       **{f"P3, spin {t * 1e6:.0f} µs": work.pingpong_with_spin(t, n)
                          for t in SPINS}}, reps)
    res = Result("S", "read spin: CPU per empty blocking read; P3 round trip", "µs",
                 "(chooses the default)", samples=samples)
    res.verdict = "INFO"
    cost = [res.values[f"cpu, spin {t * 1e6:.0f} µs"] - res.values["cpu, spin 0 µs"]
            for t in SPINS]
    trip = [res.values[f"P3, spin {t * 1e6:.0f} µs"] for t in SPINS]
    res.note = "; ".join(f"spin {t * 1e6:.0f} µs: +{c * 1e6:.1f} µs CPU, P3 {p * 1e6:.1f} µs"
                         for t, c, p in zip(SPINS, cost, trip, strict=True))
    return res


WORKLOADS: dict[str, Callable[[int, int], Result]] = {
    "P1": p1, "P2": p2, "P2A": p2_armed, "P3": p3, "P4": p4, "P5": p5, "P6": p6,
    "P6U": p6_uvloop, "P7": p7, "P8": p8, "P9": p9, "C": safety, "S": spin,
}
# (repetitions, work per repetition) for a full run and for --quick.  The single-process
# workloads take many short repetitions (see the module docstring).  P5's repetitions are
# long: one of 200,000 writes lasted 16-40 ms, a few scheduler ticks, so that where the
# scheduler put five processes at the start decided it (per-repetition ratios 1.6-4.9x,
# medians 2.6-3.2x over three sets of seven); with 1,000,000 the medians were 3.4-3.8x.
SIZES: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "P1": ((41, 30_000), (15, 8_000)), "P2": ((41, 15_000), (15, 4_000)),
    "P2A": ((41, 15_000), (15, 4_000)),
    "P3": ((7, 3_000), (3, 500)), "P4": ((7, 2_000), (3, 300)),
    "P5": ((7, 1_000_000), (3, 100_000)),
    "P6": ((7, 2_000), (3, 300)), "P7": ((41, 8_000), (15, 2_000)), "P8": ((1, 1), (1, 1)),
    "C": ((41, 15_000), (15, 4_000)), "P6U": ((7, 2_000), (3, 300)), "S": ((5, 300), (2, 50)),
    "P9": ((3, 300), (1, 100)),  # (repetitions per N, tokens per repetition)
}


TITLES = {
    "P1": "write(1), counter > 0", "P2": "write+read pair, not armed", "P2A": "armed pair",
    "P3": "ping-pong", "P4": "8 blocked semaphore readers", "P5": "fan-in of 4 producers",
    "P6": "asyncio latency", "P6U": "uvloop latency", "P7": "64 attached processes",
    "P8": "footprint", "P9": "many blocked readers", "C": "lock kinds", "S": "read spin",
}
PLOT_HELP = ("--plot needs matplotlib: in a checkout of mpeventfd, pip install -e '.[plot]'; "
             "for an installed mpeventfd, pip install 'mpeventfd[plot]'")


def run(quick: bool = False, json_path: str | None = None, plot_path: str | None = None,
        only: str | None = None) -> int:
    """Run the benchmark, print the table; return 0 (ratios never fail it)."""
    chosen = [w.strip().upper() for w in only.split(",")] if only else list(WORKLOADS)
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown:
        print(f"unknown workloads: {', '.join(unknown)} (choose from {', '.join(WORKLOADS)})")
        return 2
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        print(PLOT_HELP, file=sys.stderr)
        return 2
    global _quick
    _quick = quick
    machine = _machine()
    print(f"mpeventfd bench ({'quick' if quick else 'full'}) on {machine['summary']}")
    results = []
    for index, wid in enumerate(chosen, 1):
        reps, n = SIZES[wid][1 if quick else 0]
        _progress.begin(index, len(chosen), wid, TITLES.get(wid, ""), reps)
        res = WORKLOADS[wid](reps, n)
        _progress.clear()
        results.append(res)
        _print_line(res)
    print()
    _print_table(results, machine)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"machine": machine, "quick": quick, "sizes": SIZES,
                       "results": [asdict(r) for r in results]}, f, indent=2)
    if plot_path:
        _plot(results, plot_path, machine)
    return 0


def _fmt(value: float, unit: str) -> str:
    if unit.startswith("fds"):
        return f"{value:,.0f}"
    if unit == "cores":
        return f"{value:.4f}"
    return f"{value * 1e6:.2f}"


def _ratio_text(res: Result) -> str:
    if res.ratio is None:
        return "-"
    if res.higher_is_better:
        return f"{1 / res.ratio:.2f}x thr"
    if res.unit == "cores":
        return f"{res.ratio:.2f}x target"
    return f"{res.ratio:.2f}x"


def _print_line(res: Result) -> None:
    cells = ", ".join(f"{k} {_fmt(v, res.unit)}" for k, v in res.values.items())
    print(f"  {res.id}: {res.title}; {cells} {res.unit} ({res.statistic}); "
          f"ratio {_ratio_text(res)} (target {res.target}) {res.verdict} {res.note}".rstrip(),
          flush=True)
    for row in res.tail if res.id == "P9" else ():
        _print_line(row)


def _print_table(results: list[Result], machine: dict[str, Any]) -> None:
    """The summary table: plain text (rich draws it when installed)."""
    head = ("id", "workload", "statistic", "mpeventfd", "os.eventfd", "os.pipe", "iceoryx2",
            "ratio", "target", "verdict")
    rows = []
    for r in (x for res in results for x in ((res, *res.tail) if res.id == "P9" else (res,))):
        get = r.values.get
        cells = [_fmt(v, r.unit) if v is not None else "-"
                 for v in (get("mpeventfd"), get("os.eventfd"), get("os.pipe"),
                           get("iceoryx2"))]
        if r.id in PEER_WORKLOADS and not HAS_ICEORYX2:
            cells[-1] = "not installed"
        stat = r.statistic.split(",")[0]
        rows.append((r.id, r.title[:44], stat, *cells, _ratio_text(r), r.target, r.verdict))
    title = f"mpeventfd vs baselines (µs; ratio = mpeventfd / os.eventfd) on {machine['summary']}"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
        print(title)
        for row in (head, *rows):
            print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))
        return
    table = Table(title=title)
    for col in head:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped or logged: rich would wrap the table to 80 columns
        console = Console(width=160)
    console.print(table)


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpu": cpu, "cpus": os.cpu_count(), "start_method": multiprocessing.get_start_method(),
            "lock": "robust mutex" if PLATFORM.mutex_kind == 1 else "kernel byte lock",
            "iceoryx2": peers.iceoryx2_version() or "not installed"}
    info["summary"] = (f"{info['cpus']} x {info['cpu']}, {info['platform']}, "
                       f"Python {info['python']}, {info['lock']}")
    return info


def _plot(results: list[Result], path: str, machine: dict[str, Any]) -> None:
    """Each ratio against its target, with every repetition's ratio as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [x for r in results for x in (r, *r.tail) if x.per_rep and x.limit is not None]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(shown) + 1.6))
    for y, r in enumerate(reversed(shown)):
        def flip(x: float, r: Result = r) -> float:
            return 1 / x if r.higher_is_better else x

        dots = [flip(x) for x in r.per_rep]
        value, target = flip(r.ratio or 1.0), flip(r.limit or 1.0)
        if r.unit == "cores":  # an absolute target: drawn as the fraction of it
            target = 1.0
        color = "tab:green" if r.verdict == "PASS" else "tab:red"
        ax.scatter(dots, [y] * len(dots), s=12, color=color, alpha=0.45, zorder=2)
        ax.scatter([value], [y], s=90, marker="D", color=color, zorder=3)
        ax.scatter([target], [y], s=160, marker="|", color="black", zorder=4)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([r.id if r.id.startswith("P9") else
                        f"{r.id} {'throughput' if r.higher_is_better else 'time'}"
                        .replace("p99 time", "p99") for r in reversed(shown)])
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("mpeventfd / os.eventfd (throughput: higher is better; else lower;\n"
                  "P9 idle: mpeventfd's cores / the target)")
    ax.set_title("mpeventfd against os.eventfd: value (diamond), each repetition (dots),\n"
                 "target (bar); green: target met", fontsize=9)
    fig.text(0.01, 0.01, machine["summary"], fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
