"""herd_floor: what P4's consumers cost when a wake-up is a bare POSIX named semaphore.

P4 (``python -m mpeventfd bench``) measures the CPU that 8 consumer processes, blocked in a
semaphore-mode ``read()``, spend per token handed out one at a time, against the kernel's
eventfd.  mpeventfd wakes a consumer through a named POSIX semaphore, and a main thread
waits on it in steps of at most 100 ms, so that Python's signal handlers run (docs/design.md §7).
This tool runs P4's own harness (``benchwork.consumer_cpu``: the same Python loop, the same
acknowledgements) around four waits, in turns, and prints each one's CPU per token and its
ratio to the kernel's in the same turn:

- ``os.eventfd``: the kernel's semaphore-mode eventfd (every blocked reader wakes per token);
- ``mpeventfd``: ``EventFD(0, EFD_SEMAPHORE)``;
- ``sem, 100 ms steps``: one named semaphore from ``posix_ipc``, each consumer looping on
  ``acquire(0.1)``: no shared counter, no lock, no registration, only the wait;
- ``sem, untimed``: the same with ``acquire()``, which no main thread may use.

The last two are the floor under mpeventfd's row on the machine at hand: what the wake-up
mechanism itself costs.  Linux only (``os.eventfd``, ``/proc``).

    python tools/herd_floor.py [turns] [tokens]     (run it in a private /dev/shm)
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

import posix_ipc

from mpeventfd._cli import benchwork

STEP = 0.1  # a main thread's longest wait step (mpeventfd/_core.c: STEP_MAIN)


def _sem(timed: bool) -> Callable[[int], float]:
    def run(n: int) -> float:
        sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX)
        sem.unlink()  # (the mapping lives on in this process and its children)
        acquire = sem.acquire

        def take() -> None:
            if not timed:
                acquire()
                return
            while True:
                try:
                    acquire(STEP)
                    return
                except posix_ipc.BusyError:
                    pass

        def give(v: int) -> None:
            for _ in range(v):
                sem.release()

        try:
            return benchwork.consumer_cpu(take, give, n)
        finally:
            sem.close()
    return run


KINDS: dict[str, Callable[[int], float]] = {
    "os.eventfd": lambda n: benchwork.herd("os.eventfd", n)(),
    "mpeventfd": lambda n: benchwork.herd("mpeventfd", n)(),
    "sem, 100 ms steps": _sem(True),
    "sem, untimed": _sem(False),
}


def main() -> int:
    turns = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    cpu: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(turns):
        for kind, run in KINDS.items():
            cpu[kind].append(run(tokens) * 1e6)
    kernel = cpu["os.eventfd"]
    for kind, values in cpu.items():
        ratios = [v / k for v, k in zip(values, kernel, strict=True)]
        print(f"{kind:18s} {statistics.median(values):6.2f} µs/token (median of {turns}), "
              f"ratio {statistics.median(ratios):.2f} (turns {min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
