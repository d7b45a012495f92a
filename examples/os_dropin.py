"""The ``os.eventfd`` drop-in: one function body, run with ``os`` and with ``mpeventfd``.

``mpeventfd`` has the ``os`` module's names: ``eventfd()``, ``eventfd_read()``,
``eventfd_write()`` and the ``EFD_*`` flags, so code written against ``os`` runs unchanged
when handed the ``mpeventfd`` module instead (and then works across processes, and on
systems without ``os.eventfd``).  ``signal_and_count`` below is written once, against any
namespace with those names, and run with both.

One difference to keep in mind: ``os.eventfd()`` returns an int, ``mpeventfd.eventfd()`` an
``EventFD`` object.  ``mpeventfd.eventfd_read``/``eventfd_write`` accept the object (or its
``fileno()``), so code that only passes the return value of ``eventfd()`` around runs as is;
closing it is the one place that must tell the two apart (``close_eventfd`` below).

Run it with ``python examples/os_dropin.py``; it prints what each module gave (``os`` only
where ``os.eventfd`` exists, i.e. Linux) and exits 0 when they agree.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import mpeventfd


class EventFDModule(Protocol):
    """The part of ``os`` that ``signal_and_count`` uses; ``mpeventfd`` has the same names."""

    EFD_NONBLOCK: int
    EFD_SEMAPHORE: int

    def eventfd(self, initval: int, flags: int = ...) -> Any: ...  # os: int; mpeventfd: EventFD
    def eventfd_read(self, fd: Any) -> int: ...
    def eventfd_write(self, fd: Any, value: int) -> None: ...


def close_eventfd(fd: int | mpeventfd.EventFD) -> None:
    """Close what ``eventfd()`` returned: ``os.close`` for an int, ``.close()`` for an EventFD."""
    if isinstance(fd, int):
        os.close(fd)
    else:
        fd.close()


def signal_and_count(ns: EventFDModule) -> list[int]:
    """Plain eventfd code, written once: a counter, then a semaphore; returns what it read."""
    got: list[int] = []
    counter = ns.eventfd(0, ns.EFD_NONBLOCK)
    try:
        ns.eventfd_write(counter, 3)
        ns.eventfd_write(counter, 4)
        got.append(ns.eventfd_read(counter))  # 7: the writes add up
        try:
            ns.eventfd_read(counter)
        except BlockingIOError:
            got.append(0)  # empty, and non-blocking
    finally:
        close_eventfd(counter)
    tokens = ns.eventfd(2, ns.EFD_SEMAPHORE | ns.EFD_NONBLOCK)
    try:
        got.extend(ns.eventfd_read(tokens) for _ in range(2))  # 1, 1: one token each
        try:
            ns.eventfd_read(tokens)
        except BlockingIOError:
            got.append(0)
    finally:
        close_eventfd(tokens)
    return got


def main() -> int:
    results: dict[str, list[int]] = {"mpeventfd": signal_and_count(mpeventfd)}
    if hasattr(os, "eventfd"):
        results["os"] = signal_and_count(os)
    for name, got in results.items():
        print(f"{name:>9}: {got}")
    return 0 if all(got == [7, 0, 1, 1, 0] for got in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
