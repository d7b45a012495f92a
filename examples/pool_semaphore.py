"""Semaphore mode: hand out N work tokens to the workers of a ``multiprocessing.Pool``.

With ``EFD_SEMAPHORE`` every ``read()`` takes exactly one token (it returns 1 and
decrements the counter), so the counter is a shared pile of work items that any number of
processes can take from without ever taking one twice.  The parent writes N tokens, each
pool task takes tokens with ``read(timeout=0)`` until the pile is empty (a non-blocking read
says so with ``BlockingIOError``), and reports how many it took.  The counts add up to N
exactly, however the tokens were spread over the workers.

Run it with ``python examples/pool_semaphore.py``; it prints how many tokens each worker
process took and exits 0 when the total is N.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter

from mpeventfd import EFD_SEMAPHORE, EventFD

TOKENS = 2000
WORKERS = 4
TASKS = 8


def take_tokens(efd: EventFD) -> tuple[int, int]:
    """Runs in a pool worker: take tokens until none is left; return (pid, tokens taken)."""
    taken = 0
    with efd:  # this task's handle (the pool unpickled a fresh one): close it when done
        while True:
            try:
                efd.read(timeout=0)  # semaphore mode: always 1
            except BlockingIOError:
                return os.getpid(), taken
            taken += 1
            sum(i * i for i in range(200))  # the "work" a token stands for


def main() -> int:
    with EventFD(0, EFD_SEMAPHORE) as efd:
        efd.write(TOKENS)  # the whole pile at once; a write never wakes more than it feeds
        with multiprocessing.Pool(WORKERS) as pool:
            reports = pool.map(take_tokens, [efd] * TASKS, chunksize=1)
            pool.close()
            pool.join()  # every worker reaped before the pool goes
        left = efd.peek()
    per_worker: Counter[int] = Counter()
    for pid, taken in reports:
        per_worker[pid] += taken
    total = sum(per_worker.values())
    print(f"{len(per_worker)} workers took {sorted(per_worker.values())} tokens: {total} of "
          f"{TOKENS}, {left} left")
    return 0 if total == TOKENS and left == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
