"""The drop-in for pipe-based wake-ups (README, "Replacing a self-pipe"): a self-pipe loop.

The loops are the ones of ``examples/selectors_self_pipe.py`` (imported from the file, so the
example and its test cannot drift apart): ``PipeLoop`` wakes through an ``os.pipe``,
``EventFDLoop`` is the same loop with the pipe swapped for an EventFD.  Wake-ups coalesce
into one read, the writer never blocks or fails, and the pipe version hits
``BlockingIOError`` once about 64 KiB of one-byte wake-ups are pending.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from helpers import TIMEOUT, fork_child, reap

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "selectors_self_pipe.py"
BURST = 100_000


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("selectors_self_pipe", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def eventfd_loop(example: ModuleType) -> Iterator[Any]:
    loop = example.EventFDLoop()
    yield loop
    loop.close()


@pytest.fixture
def pipe_loop(example: ModuleType) -> Iterator[Any]:
    loop = example.PipeLoop()
    yield loop
    loop.close()


def _pipe_capacity() -> int | None:
    """A fresh pipe's capacity where the OS tells it (Linux ``F_GETPIPE_SZ``)."""
    get = getattr(fcntl, "F_GETPIPE_SZ", None)
    if get is None:
        return None
    r, w = os.pipe()
    try:
        return fcntl.fcntl(w, get)
    finally:
        os.close(r)
        os.close(w)


def test_a_burst_of_wakeups_coalesces_into_one_select_and_one_read(
    example: ModuleType, eventfd_loop: Any
) -> None:
    assert example.burst(eventfd_loop, BURST) == BURST  # no BlockingIOError, no block
    turn = eventfd_loop.run_once(timeout=TIMEOUT)
    assert turn == example.Turn(events=1, reads=1, wakeups=BURST, callbacks=BURST)
    # Drained: readable no more, so an idle loop is never woken for nothing.
    assert eventfd_loop.run_once(timeout=0) == example.Turn(0, 0, 0, 0)
    # And the next wake-up wakes it again.
    assert example.burst(eventfd_loop, 1) == 1
    assert eventfd_loop.run_once(timeout=TIMEOUT) == example.Turn(1, 1, 1, 1)


def test_the_pipe_version_fails_after_about_64_kib(
    example: ModuleType, pipe_loop: Any
) -> None:
    sent = example.burst(pipe_loop, BURST)
    assert 4096 <= sent < BURST, "a pipe holds one byte per pending wake-up, and fills"
    capacity = _pipe_capacity()
    if capacity is not None:
        assert sent == capacity  # 65536 unless the admin changed the pipe limits
    turn = pipe_loop.run_once(timeout=TIMEOUT)
    assert turn.events == 1
    assert turn.wakeups == sent, "the drain must read every byte back"
    assert turn.reads == -(-sent // 4096), "one read per 4 KiB"
    assert turn.callbacks == sent + 1  # the one whose wake-up failed was queued too
    assert pipe_loop.run_once(timeout=0).events == 0


def test_both_loops_run_every_callback_exactly_once(
    example: ModuleType, eventfd_loop: Any, pipe_loop: Any
) -> None:
    for loop in (eventfd_loop, pipe_loop):
        ran: list[int] = []
        for i in range(1000):
            loop.call_soon_threadsafe(functools.partial(ran.append, i))
        turn = loop.run_once(timeout=TIMEOUT)
        assert (turn.events, turn.wakeups, turn.callbacks) == (1, 1000, 1000)
        assert ran == list(range(1000))


def test_wakeups_from_threads_while_the_loop_runs(
    example: ModuleType, eventfd_loop: Any
) -> None:
    threads, each = 4, 20_000
    total = threads * each
    errors: list[BaseException] = []
    ran = [0]

    def callback() -> None:
        ran[0] += 1  # only the loop thread runs callbacks

    def producer() -> None:
        try:
            for _ in range(each):
                eventfd_loop.call_soon_threadsafe(callback)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=producer) for _ in range(threads)]
    for t in workers:
        t.start()
    turns = wakeups = 0
    deadline = time.monotonic() + TIMEOUT
    try:
        while ran[0] < total and time.monotonic() < deadline:
            turn = eventfd_loop.run_once(timeout=1)
            turns += turn.events
            wakeups += turn.wakeups
    finally:
        for t in workers:
            t.join(TIMEOUT)
    assert not any(t.is_alive() for t in workers)
    # A callback is queued before its wake-up is written: the last wake-ups may land after
    # the last callback ran.  Every writer is done now; take what is left.
    wakeups += eventfd_loop.run_once(timeout=0).wakeups
    assert errors == [], "a writer must never fail or block"
    assert ran[0] == total
    assert wakeups == total, "every wake-up is counted once, none lost or doubled"
    assert turns < total, "wake-ups coalesce while the loop is busy"


def test_a_wakeup_from_another_process(example: ModuleType, eventfd_loop: Any) -> None:
    """What a pipe gives only by inheritance, an eventfd gives to any process it reaches."""
    efd = eventfd_loop._efd  # the loop's own wake-up channel, inherited by the fork child

    def child() -> None:
        for _ in range(1000):
            efd.write(1)

    pid = fork_child(child)
    try:
        woken = 0
        deadline = time.monotonic() + TIMEOUT
        while woken < 1000 and time.monotonic() < deadline:
            woken += eventfd_loop.run_once(timeout=1).wakeups
    finally:
        assert reap(pid) == 0
    assert woken == 1000
    assert eventfd_loop.run_once(timeout=0).events == 0
