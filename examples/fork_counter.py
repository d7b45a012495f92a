"""Fork counter: forked children signal a parent through one eventfd.

Shows that an EventFD is shared across ``os.fork`` exactly like a kernel eventfd: each
child adds to the counter, and the parent's blocking ``read()`` takes everything written
so far.  Run it with ``python examples/fork_counter.py``; it prints the total and exits 0.
"""

from __future__ import annotations

import os

from mpeventfd import EventFD

CHILDREN = 4
WRITES = 100


def main() -> int:
    with EventFD() as efd:
        pids = []
        for _ in range(CHILDREN):
            pid = os.fork()
            if pid == 0:
                for _ in range(WRITES):
                    efd.write(1)
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        total = efd.read(timeout=5)
    print(f"{CHILDREN} children wrote {total} times in all")
    return 0 if total == CHILDREN * WRITES else 1


if __name__ == "__main__":
    raise SystemExit(main())
