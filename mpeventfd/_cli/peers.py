"""The optional peers of ``python -m mpeventfd bench``: today iceoryx2 (Eclipse).

iceoryx2's events (``Notifier.notify``, ``Listener.blocking_wait``/``try_wait``) are the
strongest cross-process signal a Python program can pick besides ours.  Their API fits
three workloads: P1 (a post that wakes nobody: ``notify()`` to an attached listener that is
not waiting), P2 (a post and its consumption in one process: ``notify()`` + ``try_wait()``)
and P3 (ping-pong between two processes).  It fits no other: its events are not counters
(notifications of one event id coalesce, so P4's one-token-per-consumer and P5's exact sum
cannot be expressed), and a listener has no file descriptor (no P2A, no P6).

Everything iceoryx2 creates lives under one private root: a temporary directory for its
files and a prefix unique to this process for its shared-memory names, both removed when
each measurement ends (iceoryx2 keeps a global management segment after its last node is
gone, by design).  Its own signal handlers stay off: the benchmark keeps Python's Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

try:
    import iceoryx2 as iox
except ImportError:  # an optional extra
    iox = None

AVAILABLE = iox is not None
Timer = Callable[[], float]
INSTALL = "pip install 'mpeventfd[peers]'"
WAIT_LIMIT = 10.0  # s: a partner that answers nothing this long has failed
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (shm_overview(7))


def iceoryx2_version() -> str | None:
    """The installed iceoryx2's version, or None when it is not installed."""
    if iox is None:
        return None
    try:
        return metadata.version("iceoryx2")
    except metadata.PackageNotFoundError:
        return "?"


def prefix(pid: int) -> str:
    """What the names of process ``pid``'s iceoryx2 objects start with: its root directory
    (in the temporary directory) and its shared memory."""
    return f"iox2mpefd{pid}_"


class _Session:
    """One private iceoryx2 root: nodes made here share it and nothing else."""

    def __init__(self) -> None:
        assert iox is not None
        # A listener is a Unix socket under the root, and its path must fit sun_path (108
        # bytes on Linux, 104 on macOS: unix(7)): a long TMPDIR would not leave room.
        tmp = tempfile.gettempdir()
        self.root = tempfile.mkdtemp(prefix=prefix(os.getpid()),
                                     dir=tmp if len(tmp) <= 24 else "/tmp")
        self.prefix = prefix(os.getpid())
        self.config = iox.config.default()
        cfg = self.config.global_cfg
        cfg.root_path = iox.Path.new(self.root + "/")
        cfg.prefix = iox.FileName.new(self.prefix)

    def node(self) -> Any:
        assert iox is not None
        builder = iox.NodeBuilder.new().config(self.config)
        builder = builder.signal_handling_mode(iox.SignalHandlingMode.Disabled)
        return builder.create(iox.ServiceType.Ipc)

    def event(self, node: Any, name: str) -> Any:
        assert iox is not None
        return node.service_builder(iox.ServiceName.new(name)).event().open_or_create()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if os.path.isdir(SHM_DIR):
            for entry in os.listdir(SHM_DIR):
                if entry.startswith(self.prefix):
                    try:
                        os.unlink(os.path.join(SHM_DIR, entry))
                    except FileNotFoundError:
                        pass


@contextmanager
def _session() -> Iterator[_Session]:
    assert iox is not None
    iox.set_log_level(iox.LogLevel.Error)  # (it reports its default config at Info)
    session = _Session()
    try:
        yield session
    finally:
        session.remove()


def _wait(listener: Any) -> None:
    """Block until one notification arrives; fail after WAIT_LIMIT (a dead partner)."""
    assert iox is not None
    limit = iox.Duration.from_secs_f64(WAIT_LIMIT)
    deadline = time.monotonic() + WAIT_LIMIT
    while not listener.timed_wait(limit):
        if time.monotonic() > deadline:
            raise TimeoutError("the iceoryx2 partner sent nothing")


def notify_loop(n: int) -> Timer:
    """P1: ``notify()`` with a listener attached and not waiting (nobody to wake)."""
    def run() -> float:
        with _session() as s:
            node = s.node()
            event = s.event(node, "p1")
            listener = event.listener_builder().create()
            notifier = event.notifier_builder().create()
            try:
                notify = notifier.notify
                t0 = time.perf_counter()
                for _ in range(n):
                    notify()
                return (time.perf_counter() - t0) / n
            finally:
                notifier.delete()
                listener.delete()
                del event, node
    return run


def pair_loop(n: int) -> Timer:
    """P2: ``notify()`` then ``try_wait()`` in one process."""
    def run() -> float:
        with _session() as s:
            node = s.node()
            event = s.event(node, "p2")
            listener = event.listener_builder().create()
            notifier = event.notifier_builder().create()
            try:
                notify, take = notifier.notify, listener.try_wait
                t0 = time.perf_counter()
                for _ in range(n):
                    notify()
                    take()
                return (time.perf_counter() - t0) / n
            finally:
                notifier.delete()
                listener.delete()
                del event, node
    return run


def _read_step(fd: int) -> None:
    if os.read(fd, 1) != b"+":
        raise RuntimeError("the iceoryx2 partner failed while setting up")


def pingpong(n: int, warmup: int = 50) -> Timer:
    """P3: a blocking round trip between two processes, on two events.

    Each side builds its own node after the fork (nothing of iceoryx2 crosses a fork).  Both
    listeners exist before either notifier, in steps ordered by a pipe, so the first
    notification cannot find nobody to reach."""
    def run() -> float:
        with _session() as s:
            to_child_r, to_child_w = os.pipe()
            to_parent_r, to_parent_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(to_child_w)
                    os.close(to_parent_r)
                    node = s.node()
                    ping = s.event(node, "ping")
                    listener = ping.listener_builder().create()
                    os.write(to_parent_w, b"+")  # 1: the child listens
                    _read_step(to_child_r)  # 2: the parent listens
                    notifier = s.event(node, "pong").notifier_builder().create()
                    os.write(to_parent_w, b"+")  # 3: both may notify
                    for _ in range(n + warmup):
                        _wait(listener)
                        notifier.notify()
                    code = 0
                finally:
                    os._exit(code)
            os.close(to_child_r)
            os.close(to_parent_w)
            try:
                node = s.node()
                _read_step(to_parent_r)
                pong = s.event(node, "pong")
                listener = pong.listener_builder().create()
                os.write(to_child_w, b"+")
                _read_step(to_parent_r)
                notifier = s.event(node, "ping").notifier_builder().create()
                for _ in range(warmup):
                    notifier.notify()
                    _wait(listener)
                t0 = time.perf_counter()
                for _ in range(n):
                    notifier.notify()
                    _wait(listener)
                took = (time.perf_counter() - t0) / n
                notifier.delete()
                listener.delete()
                return took
            finally:
                os.close(to_child_w)
                os.close(to_parent_r)
                os.waitpid(pid, 0)
    return run
