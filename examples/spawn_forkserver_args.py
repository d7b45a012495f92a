"""Spawn and forkserver: an EventFD handed to ``multiprocessing.Process`` as an argument.

Under "spawn" and "forkserver" a child is a fresh interpreter that inherits nothing, yet an
EventFD passed in ``Process(args=...)`` reaches it: multiprocessing sends its fds along with
the child's other resources, and the child's handle shares the parent's counter.  Each child
writes its share; the parent's ``read()`` then takes the sum.  The target function lives at
module level so the fresh interpreter can import it.

Run it with ``python examples/spawn_forkserver_args.py``; it prints one line per start method
and exits 0 when every sum is exact.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import ForkServerContext, SpawnContext

from mpeventfd import EventFD

# Seconds, against a hang only: on a loaded machine a fresh interpreter has taken more
# than 30 s to start and run its few lines.
GUARD = 120.0

CHILDREN = 3


def child(efd: EventFD, value: int) -> None:
    """Runs in the child: add ``value`` to the parent's counter."""
    efd.write(value)
    efd.close()


def run(ctx: SpawnContext | ForkServerContext) -> int:
    """Start CHILDREN children with the start method of ``ctx``; return what the parent reads."""
    with EventFD() as efd:
        procs = [ctx.Process(target=child, args=(efd, i + 1)) for i in range(CHILDREN)]
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join(GUARD)
        finally:
            for p in procs:
                if p.is_alive():  # only if something went wrong: never leave one behind
                    p.kill()
                    p.join()
        if any(p.exitcode != 0 for p in procs):
            return -1
        return efd.read(timeout=1)


def main() -> int:
    want = sum(range(1, CHILDREN + 1))
    ok = True
    for ctx in (multiprocessing.get_context("spawn"), multiprocessing.get_context("forkserver")):
        got = run(ctx)
        method = ctx.get_start_method()
        print(f"{method}: {CHILDREN} children wrote 1..{CHILDREN}, parent read {got}")
        ok = ok and got == want
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
