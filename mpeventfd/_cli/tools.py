"""``python -m mpeventfd ls`` and ``cleanup``.

``ls`` reads headers without taking any lock (so a stopped holder cannot hang it) and
never modifies anything.  ``cleanup`` removes exactly what the liveness test proves unused
(docs/design.md §9).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TextIO

from .. import _core, _liveness, _names, _registry


@dataclass(frozen=True)
class Info:
    """What ``ls`` reports about one eventfd."""

    name: str
    counter: int | None
    flags: str
    pids: tuple[int, ...]


def holders(names: list[str]) -> dict[str, set[int]]:
    """Map each name to the pids holding an fd of its state file (Linux ``/proc``).

    Matched by inode: the fd of a state file built with ``O_TMPFILE`` reads back as
    ``/dev/shm/#<ino> (deleted)`` even after it was linked under its name.
    """
    by_inode: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(_names.state_path(name))
        except OSError:
            continue
        by_inode[(st.st_dev, st.st_ino)] = name
    found: dict[str, set[int]] = {name: set() for name in names}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except FileNotFoundError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            owner = by_inode.get((st.st_dev, st.st_ino))
            if owner is not None:
                found[owner].add(pid)
    return found


def inspect(name: str, pids: set[int]) -> Info:
    """Read one header lock-free; a foreign or torn header shows as unknown."""
    path = _names.state_path(name)
    counter: int | None = None
    flags = "?"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return Info(name, None, "gone", tuple(sorted(pids)))
    try:
        header = _core.read_header(fd)
        counter = int(header["counter"])
        names = ["EFD_SEMAPHORE"] if header["semaphore"] else []
        names += ["EFD_NONBLOCK"] if header["nonblock"] else []
        flags = "|".join(names) or "none"
    except (OSError, ValueError):
        pass  # foreign, torn or corrupt: shown as unknown
    finally:
        os.close(fd)
    return Info(name, counter, flags, tuple(sorted(pids)))


def listing() -> list[Info]:
    """Every state file of this user, with its holders."""
    names = sorted({name for name, kind in _liveness.entries() if kind == ""})
    held = holders(names)
    return [inspect(n, held[n]) for n in names]


def ls_command(out: TextIO) -> int:
    infos = listing()
    if not infos:
        out.write("no eventfds\n")
        return 0
    # Only what belongs to the eventfd itself: EFD_CLOEXEC is per handle (see repr()).
    out.write(f"{'id':24} {'counter':>22} {'shared flags':28} pids\n")
    for info in infos:
        counter = "?" if info.counter is None else str(info.counter)
        pids = ",".join(map(str, info.pids)) or "-"
        out.write(f"{info.name:24} {counter:>22} {info.flags:28} {pids}\n")
    return 0


def cleanup_command(out: TextIO, quiet: bool = False) -> int:
    removed = _registry.sweep(skip_attached=True)
    if not quiet:
        for name in removed:
            out.write(f"removed {name}\n")
        out.write(f"{len(removed)} unused eventfd(s) removed\n")
    return 0
