"""Readiness (docs/design.md §5): ``fileno()`` is readable exactly while the counter is > 0.

Checked with every waiting mechanism a user may pick (``select.select``, ``select.poll``,
level-triggered ``select.epoll``, ``selectors.DefaultSelector`` and
``multiprocessing.connection.wait``), for writes and reads made here and in another process,
in both modes.  ``fileno()`` is the read end of the notifier pipe, not an eventfd: it never
reports ``POLLOUT`` (a Linux eventfd does while the counter is below ``MAX_VALUE``).

Then asyncio: ``aread()``/``awrite()`` with the default loop and, if it is installed, uvloop.

Every wait is bounded; processes are ordered by handshakes over pipes, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import importlib
import math
import os
import select
import selectors
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator
from multiprocessing import connection
from types import TracebackType
from typing import Any, Protocol

import pytest

from helpers import TIMEOUT, LineReader, fork_child, reap, stats, wait_readable
from mpeventfd import EFD_NONBLOCK, EFD_SEMAPHORE, MAX_VALUE, EventFD, _aio

# -- the waiting mechanisms -----------------------------------------------------------------


class Waiter(Protocol):
    """One way of asking "is this fd readable?", registered once, asked many times."""

    def ready(self, timeout: float) -> bool: ...
    def close(self) -> None: ...


class SelectWaiter:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def ready(self, timeout: float) -> bool:
        return bool(select.select([self.fd], [], [], timeout)[0])

    def close(self) -> None:
        pass


class PollWaiter:
    def __init__(self, fd: int) -> None:
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN)

    def ready(self, timeout: float) -> bool:
        events = self.poll.poll(math.ceil(timeout * 1000))
        return any(ev & select.POLLIN for _, ev in events)

    def close(self) -> None:
        pass


class EpollWaiter:
    """Level-triggered (no ``EPOLLET``): the default, and what the readiness rule is about."""

    def __init__(self, fd: int) -> None:
        self.epoll = select.epoll()
        self.epoll.register(fd, select.EPOLLIN)

    def ready(self, timeout: float) -> bool:
        return any(ev & select.EPOLLIN for _, ev in self.epoll.poll(timeout))

    def close(self) -> None:
        self.epoll.close()


class SelectorWaiter:
    def __init__(self, fd: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.selector.register(fd, selectors.EVENT_READ)

    def ready(self, timeout: float) -> bool:
        return bool(self.selector.select(timeout))

    def close(self) -> None:
        self.selector.close()


class ConnectionWaiter:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def ready(self, timeout: float) -> bool:
        return bool(connection.wait([self.fd], timeout))

    def close(self) -> None:
        pass


_no_poll = pytest.mark.skipif(not hasattr(select, "poll"), reason="no select.poll here")
_no_epoll = pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll is Linux-only")
WAITERS = [
    pytest.param(SelectWaiter, id="select"),
    pytest.param(PollWaiter, id="poll", marks=_no_poll),
    pytest.param(EpollWaiter, id="epoll", marks=_no_epoll),
    pytest.param(SelectorWaiter, id="selectors"),
    pytest.param(ConnectionWaiter, id="connection.wait"),
]


@pytest.fixture(params=WAITERS)
def waiter(request: pytest.FixtureRequest) -> Iterator[Callable[[int], Waiter]]:
    """A factory of waiters of one kind; every waiter made is closed after the test."""
    made: list[Waiter] = []

    def make(fd: int) -> Waiter:
        w: Waiter = request.param(fd)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


# -- a child process driven step by step ----------------------------------------------------


class Stepper:
    """A fork child that runs one action per byte from the parent and acknowledges each.

    The parent orders everything through two pipes (``go`` to start a step, ``ack`` when it
    is done), so no test needs a sleep; on the way out the child is always reaped.
    """

    def __init__(self, *actions: Callable[[], object]) -> None:
        go_r, self.go_w = os.pipe()
        self.ack_r, ack_w = os.pipe()

        def body() -> int:
            os.close(self.go_w)
            os.close(self.ack_r)
            for action in actions:
                if not wait_readable(go_r) or os.read(go_r, 1) != b"g":
                    return 2  # the parent gave up (closed the pipe) or timed out
                action()
                os.write(ack_w, b"k")
            return 0

        self.pid = fork_child(body)
        os.close(go_r)
        os.close(ack_w)

    def go(self) -> None:
        """Start the next step (do not wait for it)."""
        os.write(self.go_w, b"g")

    def acked(self) -> None:
        """Wait (bounded) until the step started by :meth:`go` is done."""
        assert wait_readable(self.ack_r), "the child did not finish its step in time"
        assert os.read(self.ack_r, 1) == b"k", "the child failed its step"

    def step(self) -> None:
        self.go()
        self.acked()

    def __enter__(self) -> Stepper:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        os.close(self.go_w)  # a child still waiting for a step sees EOF and leaves
        try:
            code = reap(self.pid)
        finally:
            os.close(self.ack_r)
        if exc_type is None:
            assert code == 0, f"child exited with {code}"


# -- readiness ------------------------------------------------------------------------------


def test_readable_exactly_while_the_counter_is_positive(
    waiter: Callable[[int], Waiter],
) -> None:
    with EventFD() as efd:
        w = waiter(efd.fileno())
        assert not w.ready(0)
        efd.write(0)  # changes nothing
        assert not w.ready(0)
        efd.write(1)
        assert w.ready(0)
        assert w.ready(0), "level-triggered: still readable when asked again"
        efd.write(5)
        assert w.ready(0)
        assert efd.read(timeout=0) == 6
        assert not w.ready(0), "a read to 0 leaves nothing readable behind"
        efd.write(MAX_VALUE)
        assert w.ready(0)
        assert efd.read(timeout=0) == MAX_VALUE
        assert not w.ready(0)


def test_a_positive_initval_is_readable_at_once(waiter: Callable[[int], Waiter]) -> None:
    with EventFD(3) as efd:
        w = waiter(efd.fileno())
        assert w.ready(0)
        assert efd.read(timeout=0) == 3
        assert not w.ready(0)


def test_semaphore_mode_stays_readable_while_tokens_remain(
    waiter: Callable[[int], Waiter],
) -> None:
    with EventFD(0, EFD_SEMAPHORE) as efd:
        w = waiter(efd.fileno())
        efd.write(3)
        for left in (2, 1, 0):
            assert w.ready(0)
            assert efd.read(timeout=0) == 1
            assert w.ready(0) == (left > 0), f"{left} tokens left"
        efd.write(1)
        assert w.ready(0)
        assert efd.read(timeout=0) == 1
        assert not w.ready(0)


def test_a_failed_read_or_write_changes_nothing(waiter: Callable[[int], Waiter]) -> None:
    with EventFD(0, EFD_NONBLOCK) as efd:
        w = waiter(efd.fileno())
        with pytest.raises(BlockingIOError):
            efd.read()
        assert not w.ready(0)
        efd.write(MAX_VALUE)
        with pytest.raises(BlockingIOError):
            efd.write(1)
        assert w.ready(0)
        assert efd.read() == MAX_VALUE
        assert not w.ready(0)


def test_a_write_in_another_process_makes_it_readable(waiter: Callable[[int], Waiter]) -> None:
    with EventFD() as efd, Stepper(lambda: efd.write(3)) as child:
        w = waiter(efd.fileno())
        assert not w.ready(0)
        child.go()
        assert w.ready(TIMEOUT), "the child's write never made fileno() readable"
        child.acked()
        assert w.ready(0)
        assert efd.read(timeout=0) == 3
        assert not w.ready(0)


@pytest.mark.parametrize("semaphore", [False, True], ids=["normal", "semaphore"])
def test_reads_in_another_process_clear_readiness_exactly_at_zero(
    waiter: Callable[[int], Waiter], semaphore: bool
) -> None:
    with EventFD(0, EFD_SEMAPHORE if semaphore else 0) as efd:
        got: list[int] = []  # in the child; it checks its own reads
        step_reads = [lambda: got.append(efd.read(timeout=TIMEOUT)) for _ in range(2)]

        def check() -> None:
            assert got == ([1, 1] if semaphore else [2, 3]), got

        with Stepper(*step_reads, check) as child:
            w = waiter(efd.fileno())
            efd.write(2)
            child.step()  # the child reads 1 (semaphore) or 2 (normal)
            assert w.ready(0) == semaphore, "one token must be left in semaphore mode"
            if not semaphore:
                efd.write(3)
            child.step()  # the last token, or the 3
            assert not w.ready(0)
            child.step()


def test_the_eventfd_object_itself_can_be_waited_on() -> None:
    with EventFD(1) as efd:
        # connection.wait documents "any object with a fileno()"; typeshed is narrower.
        waitable: list[Any] = [efd]
        assert select.select([efd], [], [], 0)[0] == [efd]
        ready: list[Any] = connection.wait(waitable, 0)
        assert ready == [efd]
        with selectors.DefaultSelector() as sel:
            sel.register(efd, selectors.EVENT_READ)
            assert [key.fileobj for key, _ in sel.select(0)] == [efd]
        efd.read(timeout=0)
        assert select.select([efd], [], [], 0)[0] == []
        assert connection.wait(waitable, 0) == []


# -- no POLLOUT: fileno() is a pipe's read end ----------------------------------------------


def test_fileno_is_the_read_end_of_a_pipe() -> None:
    with EventFD() as efd:
        fd = efd.fileno()
        assert stat.S_ISFIFO(os.fstat(fd).st_mode)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY


@pytest.mark.parametrize("counter", [0, 1, MAX_VALUE - 1, MAX_VALUE])
def test_fileno_never_reports_pollout(counter: int) -> None:
    """A Linux eventfd reports POLLOUT while the counter is below MAX_VALUE; ours never."""
    with EventFD() as efd:
        efd.write(counter)
        fd = efd.fileno()
        readable = counter > 0
        rlist, wlist, xlist = select.select([fd], [fd], [fd], 0)
        assert (rlist, wlist, xlist) == ([fd] if readable else [], [], [])
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ | selectors.EVENT_WRITE)
            masks = [mask for _, mask in sel.select(0)]
            assert masks == ([selectors.EVENT_READ] if readable else [])
        if hasattr(select, "poll"):
            p = select.poll()
            p.register(fd, select.POLLIN | select.POLLOUT | select.POLLPRI)
            assert p.poll(0) == ([(fd, select.POLLIN)] if readable else [])
        if hasattr(select, "epoll"):
            with select.epoll() as ep:
                ep.register(fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLPRI)
                assert ep.poll(0) == ([(fd, select.EPOLLIN)] if readable else [])


# -- asyncio ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uvloop_new_event_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None.  Module-scoped, so set up before the leak guard:
    libuv opens a process-wide pipe with its first loop and keeps it (not a leak of ours)."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    new_loop().close()
    return new_loop


Runner = Callable[[Callable[[], Awaitable[Any]]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(
    request: pytest.FixtureRequest,
    uvloop_new_event_loop: Callable[[], asyncio.AbstractEventLoop] | None,
) -> Runner:
    """Run a coroutine function to completion on a fresh loop of one kind, within TIMEOUT."""
    new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if request.param == "uvloop":
        if uvloop_new_event_loop is None:
            pytest.skip("uvloop is not installed (optional: the asyncio tests also run on it)")
        new_loop = uvloop_new_event_loop

    def runner(main: Callable[[], Awaitable[Any]]) -> Any:
        async def bounded() -> Any:
            return await asyncio.wait_for(main(), TIMEOUT)

        loop = new_loop()
        try:
            return loop.run_until_complete(bounded())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return runner


async def _until_waiting(*tasks: asyncio.Task[Any]) -> None:
    """Give the loop a few iterations, enough for every task to reach its wait; check that
    none has finished (there is nothing to read yet)."""
    for _ in range(10):
        await asyncio.sleep(0)
    assert not any(t.done() for t in tasks), "a task finished without anything to read"


def test_several_tasks_on_one_handle_are_all_served(run: Runner) -> None:
    n = 6

    async def main() -> list[int]:
        with EventFD(0, EFD_SEMAPHORE) as efd:
            tasks = [asyncio.create_task(efd.aread()) for _ in range(n)]
            await _until_waiting(*tasks)
            efd.write(n)
            got = await asyncio.gather(*tasks)
            assert efd.peek() == 0
            return got

    assert run(main) == [1] * n


def test_several_tasks_normal_mode_each_write_goes_whole_to_one(run: Runner) -> None:
    n = 4

    async def main() -> list[int]:
        with EventFD() as efd:
            tasks = [asyncio.create_task(efd.aread()) for _ in range(n)]
            await _until_waiting(*tasks)
            for k in range(1, n + 1):
                efd.write(k)  # one task takes all of it; the others go back to waiting
                while sum(t.done() for t in tasks) < k:  # bounded by run()'s timeout
                    await asyncio.sleep(0.001)
                assert sum(t.done() for t in tasks) == k
            return sorted(t.result() for t in tasks)

    assert run(main) == [1, 2, 3, 4]


def test_a_cancelled_aread_consumes_nothing(run: Runner) -> None:
    async def main() -> None:
        with EventFD() as efd:
            task = asyncio.create_task(efd.aread())
            await _until_waiting(task)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            efd.write(1)
            assert efd.read(timeout=0) == 1

    run(main)


def test_an_aread_cancelled_as_the_write_lands_consumes_nothing(run: Runner) -> None:
    async def main() -> None:
        with EventFD() as efd:
            task = asyncio.create_task(efd.aread())
            await _until_waiting(task)
            efd.write(1)  # readable now, but the task has not run yet ...
            task.cancel()  # ... and is cancelled before it can
            with pytest.raises(asyncio.CancelledError):
                await task
            assert efd.peek() == 1
            assert efd.read(timeout=0) == 1
            # The loop goes on serving the eventfd after the cancellation.
            again = asyncio.create_task(efd.aread())
            await _until_waiting(again)
            efd.write(2)
            assert await again == 2

    run(main)


def test_aread_is_woken_by_a_write_from_another_process(run: Runner) -> None:
    with EventFD() as efd, Stepper(lambda: efd.write(3)) as child:

        async def main() -> int:
            task = asyncio.create_task(efd.aread())
            await _until_waiting(task)
            child.go()  # the child writes while the task waits
            return await task

        assert run(main) == 3
        child.acked()
        assert efd.peek() == 0


@pytest.mark.parametrize("where", ["loop", "thread"])
def test_close_wakes_every_pending_aread_with_ebadf(run: Runner, where: str) -> None:
    async def main() -> list[BaseException | int]:
        efd = EventFD()
        tasks = [asyncio.create_task(efd.aread()) for _ in range(3)]
        await _until_waiting(*tasks)
        if where == "loop":
            efd.close()
        else:
            t = threading.Thread(target=efd.close)
            t.start()
            t.join(TIMEOUT)  # blocks the loop: the wake-ups wait in its queue meanwhile
            assert not t.is_alive()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(main)
    assert len(results) == 3
    for r in results:
        assert isinstance(r, OSError), r
        assert r.errno == errno.EBADF


def test_a_late_cancellation_after_close_leaves_the_reused_fd_number_alone(
    run: Runner,
) -> None:
    """close() wakes a pending aread and drops its registration; a cancellation that reaches
    the task before it runs drops that registration again.  By then the fd's number may name
    something else with a reader of its own (here another pipe): the stale registration
    must not remove that reader, or its owner would never be woken."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        efd = EventFD()
        task = asyncio.create_task(efd.aread())
        await _until_waiting(task)
        number = efd.fileno()
        r, w = os.pipe()
        efd.close()  # the task's future is resolved; it has not run yet
        task.cancel()  # so it ends with CancelledError at its await
        with pytest.raises(OSError):
            os.fstat(number)  # closed: the number is free
        os.dup2(r, number)  # now another read end of the other pipe
        fired: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not fired.done():
                fired.set_result(None)

        loop.add_reader(number, readable)
        try:
            with pytest.raises(asyncio.CancelledError):
                await task
            os.write(w, b"x")
            await asyncio.wait_for(fired, TIMEOUT)
        finally:
            loop.remove_reader(number)
            for fd in (number, r, w):
                os.close(fd)

    run(main)


def test_a_closed_aread_coroutine_leaves_no_registration_behind(run: Runner) -> None:
    """A coroutine closed at its await (GeneratorExit, not CancelledError) gives its waiter
    back like a cancelled one."""
    async def main() -> None:
        with EventFD() as efd:
            coro = efd.aread()
            coro.send(None)  # runs to its await of the registration's future
            assert [key for key in _aio._REGISTERED if key[1] == efd.fileno()]
            coro.close()
            assert not [key for key in _aio._REGISTERED if key[1] == efd.fileno()]

    run(main)


def test_a_cancelled_awrite_adds_nothing(run: Runner) -> None:
    async def main() -> None:
        with EventFD() as efd:
            efd.write(MAX_VALUE)
            writer = asyncio.create_task(efd.awrite(5))
            await _until_waiting(writer)
            writer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await writer
            assert efd.read(timeout=0) == MAX_VALUE
            assert efd.peek() == 0

    run(main)


def test_aread_on_a_new_eventfd_after_one_was_dropped_with_a_timed_out_aread(
    run: Runner,
) -> None:
    async def time_out_and_drop() -> int:
        a = EventFD()
        old = a.fileno()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(a.aread(), 0.05)  # times out: the aread is cancelled
        return old  # dropped without close(): the finalizer closes its fds

    async def main() -> int:
        # In a task of its own: from 3.12, wait_for runs the aread inside the calling task,
        # and the cancellation's traceback keeps ``a`` alive until that task ends.
        old = await asyncio.create_task(time_out_and_drop())
        gc.collect()
        with EventFD() as b:
            assert b.fileno() == old, "the fd number was not reused: nothing to show"
            task = asyncio.create_task(b.aread())
            await _until_waiting(task)
            b.write(1)
            return await asyncio.wait_for(task, 2)

    assert run(main) == 1


def test_timed_out_areads_leave_no_registration_behind(run: Runner) -> None:
    """A cancelled aread() removes its add_reader registration (closed loops are not kept)."""

    with EventFD() as efd:
        async def main() -> None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(efd.aread(), 0.05)

        for _ in range(3):
            run(main)
        assert not [key for key in _aio._REGISTERED if key[1] == efd.fileno()]


# -- the pipe behind fileno(), when users or dead processes meddle with it ------------------


def test_a_user_who_makes_the_pipe_blocking_and_reads_it_cannot_hang_us() -> None:
    """fileno()'s description is shared with the user; the library drains through a
    description of its own (or by FIONREAD), so a drain can never block."""
    with EventFD(0) as efd:
        efd.write(3)
        os.set_blocking(efd.fileno(), True)  # shared description: affects the library too
        assert os.read(efd.fileno(), 1)  # a user drains the byte behind our back
        assert efd.read(timeout=1) == 3  # must not block while draining
        efd.write(1)  # 0 -> n writes the byte again: readiness is repaired
        assert bool(select.select([efd], [], [], 0)[0])
        assert efd.read(timeout=1) == 1
        assert not select.select([efd], [], [], 0)[0]


@pytest.mark.parametrize("extra", [63, 64, 5000])
def test_a_read_drains_a_pipe_holding_more_than_one_byte(extra: int) -> None:
    """Bytes beyond the usual one (left by a dead process, or written by someone holding
    the write end) are all drained by the n -> 0 read.  (Once only 64 bytes were.)"""
    with EventFD(0) as efd:
        os.write(efd.fds[2], b"\x01" * extra)
        efd.write(2)
        assert efd.read(timeout=1) == 2
        assert not select.select([efd], [], [], 0)[0]
        efd.write(1)  # and readiness still follows the counter afterwards
        assert select.select([efd], [], [], 0)[0]
        assert efd.read(timeout=1) == 1


# -- readiness arming: the pipe mirrors the counter once a pollable fd was handed out -------


def _poll_on_request(efd: EventFD, ask: int, answer: int) -> int:
    """Arm by calling fileno() here, in another process; then report readiness on request."""
    fd = efd.fileno()
    os.write(answer, b"armed\n")
    while True:
        request = os.read(ask, 1)
        if request != b"?":
            return 0
        os.write(answer, b"1\n" if select.select([fd], [], [], 0)[0] else b"0\n")


@pytest.mark.parametrize("semaphore", [False, True], ids=["normal", "semaphore"])
def test_an_eventfd_armed_in_one_process_is_exact_when_polled_there(semaphore: bool) -> None:
    """This process never calls fileno(): it changes the counter with 0 -> n and n -> 0
    transitions before and after another process armed readiness; that one polls."""
    ask_r, ask_w = os.pipe()
    lines = LineReader()
    flags = EFD_SEMAPHORE if semaphore else 0
    with EventFD(5, flags) as efd:
        efd.read()
        efd.write(3)  # transitions before anyone armed: no pipe byte yet
        pid = fork_child(lambda: _poll_on_request(efd, ask_r, lines.w))
        try:
            assert lines.line() == "armed"
            for op in ["read", "read", "read", "write", "write", "read", "read", "read"]:
                if op == "write":
                    efd.write(1)
                else:
                    try:
                        efd.read(timeout=0)
                    except BlockingIOError:
                        pass
                os.write(ask_w, b"?")
                assert lines.line() == ("1" if efd.peek() else "0"), (op, efd.peek())
        finally:
            os.write(ask_w, b".")
            assert reap(pid) == 0
    os.close(ask_r)
    os.close(ask_w)
    lines.close()


def test_readiness_is_not_armed_until_a_pollable_fd_is_handed_out() -> None:
    with EventFD(0) as efd:
        efd.write(1)
        assert not stats(efd)["armed"]
        assert efd.read() == 1
        efd.fileno()
        assert stats(efd)["armed"]
    for arm in (lambda e: e.fds, lambda e: e.handle, lambda e: select.select([e], [], [], 0)):
        with EventFD(2) as efd:
            arm(efd)
            assert stats(efd)["armed"]
            assert select.select([efd.fds[1]], [], [], 0)[0]  # the counter's 2 shows at once
