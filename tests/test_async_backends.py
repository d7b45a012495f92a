"""``aread()``/``awrite()`` on every event loop people use: asyncio, uvloop and trio, driven
through anyio (which runs on either); real processes hand out tokens, hold the lock and
empty a full counter.

The asyncio-only details (one shared ``add_reader`` registration, its fate when a loop or
an fd goes) are in test_readiness.py; here, the guarantees every library gets.
"""

from __future__ import annotations

import errno
import importlib.util
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from crashkit import victim
from helpers import fork_child, reap, stats
from mpeventfd import EFD_SEMAPHORE, MAX_VALUE, EventFD, _aio

TIMEOUT = 20.0
BACKENDS = ["asyncio", "uvloop", "trio"]


@pytest.fixture(scope="module")
def uvloop_ready() -> bool:
    """Whether uvloop is here.  Module-scoped, so set up before the leak guard: libuv opens
    a process-wide pipe with its first loop and keeps it (not a leak of ours)."""
    if importlib.util.find_spec("uvloop") is None:
        return False
    import uvloop

    uvloop.new_event_loop().close()
    return True


@pytest.fixture(params=BACKENDS)
def run(request: pytest.FixtureRequest,
        uvloop_ready: bool) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Run a coroutine function to completion on one library, within TIMEOUT."""
    backend, options = request.param, {}
    if backend == "uvloop":
        if not uvloop_ready:
            pytest.skip("uvloop is not installed here")
        backend, options = "asyncio", {"use_uvloop": True}

    def runner(main: Callable[[], Awaitable[Any]]) -> Any:
        async def bounded() -> Any:
            with anyio.fail_after(TIMEOUT):
                return await main()
        return anyio.run(bounded, backend=backend, backend_options=options)
    return runner


Runner = Callable[[Callable[[], Awaitable[Any]]], Any]


def _write_when_told(efd: EventFD, go: int, value: int) -> int:
    os.read(go, 1)
    efd.write(value)
    return 0


def test_semaphore_tokens_go_one_per_task_whoever_waits(run: Runner) -> None:
    """Any number of tasks on one handle: 6 tokens written at once by another process,
    while 6 tasks wait, go one to each (trio allows one waiting task per fd: the others
    park behind it)."""
    with EventFD(0, EFD_SEMAPHORE) as efd:
        go_r, go_w = os.pipe()
        writer = fork_child(lambda: _write_when_told(efd, go_r, 6))

        async def main() -> list[int]:
            got: list[int] = []

            async def reader() -> None:
                got.append(await efd.aread())

            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(reader)
                await anyio.wait_all_tasks_blocked()  # every reader waits in aread()
                os.write(go_w, b"w")
            return got

        try:
            assert run(main) == [1] * 6
        finally:
            os.close(go_w)  # (a writer still waiting sees EOF, writes and leaves)
            os.close(go_r)
            assert reap(writer) == 0
        assert efd.peek() == 0


def test_normal_mode_each_write_goes_whole_to_one_task(run: Runner) -> None:
    with EventFD(0) as efd:
        async def main() -> list[int]:
            send, receive = anyio.create_memory_object_stream[int](10)
            async with send, receive, anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(lambda: _read_into(efd, send.clone()))
                got = []
                for v in (10, 20, 30):
                    efd.write(v)
                    got.append(await receive.receive())
            return got

        assert sorted(run(main)) == [10, 20, 30]


async def _read_into(efd: EventFD, out: Any) -> None:
    async with out:
        await out.send(await efd.aread())


def test_a_cancelled_aread_consumes_nothing(run: Runner) -> None:
    """Cancelled by a deadline while it waits, or just after a write made the fd readable
    and before the task ran again: either way the value stays for the next reader."""
    with EventFD(0, EFD_SEMAPHORE) as efd:
        async def main() -> tuple[int, int]:
            with anyio.move_on_after(0.05) as scope:
                await efd.aread()
            assert scope.cancelled_caught
            async with anyio.create_task_group() as tg:
                tg.start_soon(efd.aread)
                await anyio.wait_all_tasks_blocked()  # it waits on the fd
                efd.write(2)  # readable now; the task has not run since
                tg.cancel_scope.cancel()
            left = efd.peek()
            return left, await efd.aread()

        assert run(main) == (2, 1)
        assert efd.peek() == 1


def test_close_ends_every_pending_aread_with_ebadf(run: Runner) -> None:
    """Under trio the fd is announced with notify_closing before it closes: a task asleep
    on a closed fd would never wake."""
    efd = EventFD(0)

    async def main() -> list[int]:
        errors: list[int] = []

        async def reader() -> None:
            try:
                await efd.aread()
            except OSError as e:
                errors.append(e.errno or 0)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()  # all three asleep on the fd
            efd.close()
        return errors

    assert run(main) == [errno.EBADF] * 3


STOPPED_FOR = 0.3  # s: how long the readers meet the stopped writer (the window observed)


def _tries_bound(elapsed: float) -> int:
    """The most try_read calls one backing-off aread can make in ``elapsed`` seconds: its
    first, one per doubling up to READ_RETRY_MAX, then one per READ_RETRY_MAX (a sleep
    never ends early, so a loaded machine only makes fewer)."""
    doublings = math.ceil(math.log2(_aio.READ_RETRY_MAX / _aio.READ_RETRY_FIRST))
    return 2 + doublings + math.ceil(elapsed / _aio.READ_RETRY_MAX)


@pytest.mark.parametrize("tasks", [1, 50])
def test_an_aread_woken_inside_a_stopped_writers_section_neither_spins_nor_blocks(
        run: Runner, tasks: int) -> None:
    """A 0 -> n write puts its pipe byte in before its commit, so an aread is woken while
    the writer still holds the lock.  Here the writer stays stopped at that point: the
    areads must wait for it neither by polling the readable pipe (it once spun the loop at
    full CPU) nor by blocking the loop (50 tasks each waiting 1 ms for the lock at every
    back-off step once kept it blocked most of the time).  Counted, not timed: one wait for
    the lock in vain (a "stall", the loop blocked for 1 ms) whatever the number of tasks,
    and no more try_read calls than the back-off schedule allows; then the 3 arrives once
    the writer is resumed."""
    with EventFD() as efd:
        efd.fileno()  # armed: the stopped write has put its pipe byte in
        holder = victim(efd, "write.pipe", "stop", lambda e: e.write(3))
        try:
            os.waitpid(holder, os.WUNTRACED)  # stopped with the lock held, before its commit

            async def main() -> tuple[list[int], dict[str, int], dict[str, int], float]:
                got: list[int] = []

                async def reader() -> None:
                    got.append(await efd.aread())

                async with anyio.create_task_group() as tg:
                    before, t0 = stats(efd), time.monotonic()
                    for _ in range(tasks):
                        tg.start_soon(reader)
                    # (the loop serves this task meanwhile: it could not run if blocked)
                    while (time.monotonic() - t0 < STOPPED_FOR
                           or stats(efd)["try_read_stalls"] == before["try_read_stalls"]):
                        await anyio.sleep(0.01)
                    after, elapsed = stats(efd), time.monotonic() - t0
                    assert not got
                    os.kill(holder, signal.SIGCONT)
                    while not got:
                        await anyio.sleep(0.001)
                    tg.cancel_scope.cancel()  # (normal mode: the 3 goes whole to one task)
                return got, before, after, elapsed

            got, before, after, elapsed = run(main)
        finally:
            os.kill(holder, signal.SIGCONT)
            assert reap(holder) == 3  # its write completed
    assert got == [3]
    assert after["try_read_stalls"] - before["try_read_stalls"] == 1
    tries = after["try_reads"] - before["try_reads"]
    assert tasks <= tries <= tasks * _tries_bound(elapsed), (tries, elapsed)


def test_awrite_completes_and_wakes_an_aread(run: Runner) -> None:
    with EventFD(0) as efd:
        async def main() -> int:
            got: list[int] = []

            async def reader() -> None:
                got.append(await efd.aread())

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.wait_all_tasks_blocked()  # the reader waits on the fd
                await efd.awrite(7)
            return got[0]

        assert run(main) == 7


def test_awrite_at_max_value_waits_without_blocking_the_loop(run: Runner) -> None:
    """No room: awrite backs off on the loop (the loop runs this task meanwhile) until a
    read in another process makes some; a cancelled awrite adds nothing."""
    with EventFD(0) as efd:
        efd.write(MAX_VALUE)
        go_r, go_w = os.pipe()
        reader = fork_child(lambda: _read_when_told(efd, go_r))

        async def main() -> int:
            with anyio.move_on_after(0.05) as scope:
                await efd.awrite(5)  # cancelled while it waits for room
            assert scope.cancelled_caught
            async with anyio.create_task_group() as tg:
                tg.start_soon(efd.awrite, 5)
                await anyio.wait_all_tasks_blocked()  # it backs off: no room
                assert efd.peek() == MAX_VALUE
                os.write(go_w, b"r")
            return efd.peek()

        try:
            assert run(main) == 5  # the cancelled awrite added nothing
        finally:
            os.close(go_w)
            os.close(go_r)
            assert reap(reader) == 0


def _read_when_told(efd: EventFD, go: int) -> int:
    if os.read(go, 1) != b"r":
        return 2
    return 0 if efd.read() == MAX_VALUE else 1
