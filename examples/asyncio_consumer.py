"""asyncio: one consumer task awaits ``efd.aread()`` while producer processes ``write()``.

``aread()`` waits for the eventfd to become readable through the running loop (no thread,
no blocking call), then reads; in normal mode one read takes everything written since the
last one, so the consumer sees batches whose sum is exactly what the producers wrote.  A
second task keeps ticking meanwhile, to show the loop is never blocked.

Run it with ``python examples/asyncio_consumer.py``; it prints the total and the number of
batches it arrived in, and exits 0 when the total is exact.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time

from mpeventfd import EventFD

# Seconds, against a hang only: on a loaded machine a fresh interpreter has taken more
# than 30 s to start and run its few lines.
GUARD = 120.0

PRODUCERS = 4
WRITES = 500


def produce(efd: EventFD, writes: int) -> None:
    """Runs in a producer process: signal the consumer ``writes`` times, in bursts."""
    for i in range(writes):
        efd.write(1)
        if i % 50 == 49:
            time.sleep(0.002)  # spread the writes out a little, as real producers would
    efd.close()


async def consume(efd: EventFD, expected: int) -> tuple[int, int]:
    """Await ``aread()`` until ``expected`` has arrived; return (total, batches)."""
    total = batches = 0
    while total < expected:
        total += await efd.aread()
        batches += 1
    return total, batches


async def tick(stop: asyncio.Event) -> int:
    """A task that only runs if the loop is free; returns how often it ran."""
    ticks = 0
    while not stop.is_set():
        ticks += 1
        await asyncio.sleep(0.001)
    return ticks


async def run(efd: EventFD, expected: int) -> tuple[int, int, int]:
    stop = asyncio.Event()
    ticker = asyncio.create_task(tick(stop))
    try:
        total, batches = await asyncio.wait_for(consume(efd, expected), timeout=GUARD)
    finally:
        stop.set()
    return total, batches, await ticker


def main() -> int:
    expected = PRODUCERS * WRITES
    with EventFD() as efd:
        procs = [
            multiprocessing.Process(target=produce, args=(efd, WRITES))
            for _ in range(PRODUCERS)
        ]
        try:
            for p in procs:  # started before the loop runs: no fork from inside a running loop
                p.start()
            total, batches, ticks = asyncio.run(run(efd, expected))
        finally:
            for p in procs:
                if p.pid is not None:
                    p.join(GUARD)
                if p.is_alive():
                    p.kill()
                    p.join()
    print(f"{PRODUCERS} producers wrote {expected}; the consumer read {total} in {batches} "
          f"batches while the loop ticked {ticks} times")
    ok = total == expected and all(p.exitcode == 0 for p in procs)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
