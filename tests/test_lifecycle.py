"""Lifecycle of named objects (docs/design.md §9): they exist while some fd exists anywhere."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import pytest

from helpers import (
    FORK,
    finish,
    fork_child,
    forks_beside_threads,
    long_steps,
    mpefd_entries,
    python,
    reap,
    reaped,
    stats,
    wait_readable,
    wait_until,
)
from mpeventfd import (
    EventFD,
    _core,
    _create,
    _faults,
    _names,
    _registry,
    from_handle,
    recv_eventfd,
    send_eventfd,
)
from mpeventfd._probe import PLATFORM

LOCK_FILE = PLATFORM.carrier == _core.CARRIER_FILE


def name_of(efd: EventFD) -> str:
    return efd.handle.split(":")[1]


def names_of(efd: EventFD) -> set[str]:
    """The state file, the two semaphores, and the lock file where locks live on one."""
    name = name_of(efd)
    lock = {f"{name}.lock"} if LOCK_FILE else set()
    return {name} | {f"{name}-{k}" for k in "rw"} | lock


NAMES_PER_EVENTFD = 3 + LOCK_FILE


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def cleanup_cli() -> str:
    out = subprocess.run([sys.executable, "-m", "mpeventfd", "cleanup"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_close_removes_every_name_at_once() -> None:
    before = mpefd_entries()
    efd = EventFD()
    assert mpefd_entries() - before == names_of(efd)
    efd.close()
    assert mpefd_entries() == before


def test_garbage_collection_removes_every_name() -> None:
    before = mpefd_entries()
    efd = EventFD(1)
    efd.write(1)
    del efd
    gc.collect()
    assert mpefd_entries() == before


def test_owner_only_mode_on_every_named_object() -> None:
    old = os.umask(0)
    try:
        with EventFD() as efd:
            paths = [_names.state_path(name_of(efd))]
            paths += [_names.sem_file(name_of(efd), k) for k in "rw"]
            for path in paths:
                st = os.stat(path)
                assert stat.S_IMODE(st.st_mode) == 0o600, path
                assert st.st_uid == os.geteuid()
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    "ending",
    ["pass", "raise SystemExit(3)", "raise RuntimeError('uncaught')"],
    ids=["normal-exit", "sys-exit", "uncaught-exception"],
)
def test_exit_without_close_leaves_nothing(ending: str) -> None:
    before = mpefd_entries()
    code = f"from mpeventfd import EventFD\nkeep = EventFD(5)\nkeep.write(1)\n{ending}\n"
    python(code)
    assert mpefd_entries() == before


@pytest.mark.parametrize("death", ["os._exit(0)", "os.kill(os.getpid(), 9)"])
def test_os_exit_or_sigkill_then_cleanup_leaves_shm_as_it_was(death: str) -> None:
    before = mpefd_entries()
    code = f"import os\nfrom mpeventfd import EventFD\nkeep = EventFD(5)\n{death}\n"
    python(code)
    assert len(mpefd_entries() - before) == NAMES_PER_EVENTFD  # no finalizer ran
    out = cleanup_cli()
    assert "1 unused eventfd(s) removed" in out
    assert mpefd_entries() == before


def test_creation_sweeps_debris_of_dead_processes() -> None:
    before = mpefd_entries()
    python("import os\nfrom mpeventfd import EventFD\nkeep = EventFD()\nos._exit(0)\n")
    assert len(mpefd_entries() - before) == NAMES_PER_EVENTFD
    _create._last_sweep = 0.0  # let the next creation sweep now
    with EventFD() as efd:
        assert mpefd_entries() - before == names_of(efd)


def _hold(efd: EventFD, go: threading.Event) -> None:
    go.wait(20)  # returns without close(): the fork child leaves through os._exit


def test_multiprocessing_fork_child_as_last_holder() -> None:
    before = mpefd_entries()
    go = FORK.Event()
    efd = EventFD()
    p = FORK.Process(target=_hold, args=(efd, go))
    p.start()
    with reaped(p):
        mine = names_of(efd)
        efd.close()
        assert mine <= mpefd_entries()  # the child still holds it
        go.set()
        assert finish(p) == 0
    assert wait_for(lambda: mpefd_entries() == before, 5)


def test_2000_cycles_while_another_thread_spawns_subprocesses() -> None:
    """A fork+exec in flight holds copies of our fds for an instant (the janitor retests)."""
    before = mpefd_entries()
    stop = threading.Event()

    def spawner() -> None:
        while not stop.is_set():
            subprocess.run(["/bin/true"], check=True)  # (absolute: PATH may be bare)

    t = threading.Thread(target=spawner)
    t.start()
    try:
        for _ in range(2000):
            EventFD().close()
    finally:
        stop.set()
        t.join(30)
    assert wait_for(lambda: mpefd_entries() == before, 10), mpefd_entries() - before


def _attach_detach_loop(sock: socket.socket, inherited: EventFD, rounds: int) -> None:
    inherited.close()  # from here on every handle is a fresh attach
    for _ in range(rounds):
        sock.sendall(b"?")
        with recv_eventfd(sock) as efd:
            efd.write(1)
    sock.sendall(b"!")


def _cleanup_loop(stop: threading.Event) -> None:
    while not stop.is_set():
        _registry.sweep(skip_attached=False)


def test_cleanup_looping_while_8_processes_attach_and_detach() -> None:
    before = mpefd_entries()
    rounds = 40
    stop = FORK.Event()
    with EventFD() as efd:
        pairs = [socket.socketpair() for _ in range(8)]
        workers = [FORK.Process(target=_attach_detach_loop, args=(b, efd, rounds))
                   for _, b in pairs]
        sweeper = FORK.Process(target=_cleanup_loop, args=(stop,))
        for p in [*workers, sweeper]:
            p.start()
        with reaped(*workers, sweeper):
            served = 0
            open_socks = [a for a, _ in pairs]
            deadline = time.monotonic() + 120
            while open_socks:
                assert time.monotonic() < deadline
                for a in list(open_socks):
                    a.settimeout(0.001)
                    try:
                        req = a.recv(1)
                    except TimeoutError:
                        continue
                    if req == b"?":
                        send_eventfd(a, efd)
                        served += 1
                    else:
                        open_socks.remove(a)
            for p in workers:
                assert finish(p, 60) == 0
            stop.set()
            assert finish(sweeper, 60) == 0
        assert served == 8 * rounds
        assert efd.read(timeout=5) == 8 * rounds
        for a, b in pairs:
            a.close()
            b.close()
    assert wait_for(lambda: not mpefd_entries() - before, 5)


def test_cleanup_never_removes_an_object_held_elsewhere() -> None:
    with EventFD() as efd:
        mine = names_of(efd)
        efd.set_inheritable(True)
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE, pass_fds=efd.fds,
        )
        try:
            efd.close()  # only the other process holds it now
            assert mine <= mpefd_entries()
            cleanup_cli()
            assert mine <= mpefd_entries()
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(20)
    # Its last holder exited without running mpeventfd code: our janitor's retest (or a
    # cleanup) removes the names.
    assert wait_for(lambda: not mine & mpefd_entries(), 5)


def test_ls_shows_a_live_object_and_its_pids() -> None:
    r, w = os.pipe()
    with EventFD(7) as efd:
        p = FORK.Process(target=os.read, args=(r, 1))
        p.start()
        with reaped(p):
            out = subprocess.run([sys.executable, "-m", "mpeventfd", "ls"],
                                 capture_output=True, text=True, timeout=60)
            os.write(w, b"x")
            assert finish(p) == 0
        line = next(x for x in out.stdout.splitlines() if x.startswith(name_of(efd)))
        assert " 7 " in f" {line} "
        assert str(os.getpid()) in line
        assert str(p.pid) in line
    os.close(r)
    os.close(w)


def test_names_removed_from_outside_are_never_recreated() -> None:
    """systemd RemoveIPC: live handles keep working; new attaches fail clearly."""
    with EventFD() as efd:
        name = name_of(efd)
        for kind in "rw":
            os.unlink(_names.sem_file(name, kind))
        os.unlink(_names.state_path(name))
        if LOCK_FILE:
            os.unlink(_names.lock_path(name))
        efd.write(2)
        assert efd.read() == 2
        efd.set_inheritable(True)
        out = python(textwrap.dedent(
            """
            import sys
            from mpeventfd import from_handle
            try:
                from_handle(sys.argv[1])
            except FileNotFoundError as e:
                print("missing:", e)
            """), efd.handle, pass_fds=efd.fds)
        assert "missing" in out.stdout, out.stderr
        assert not names_of(efd) & mpefd_entries()


def test_from_handle_of_a_closed_eventfd_in_this_process_fails_clean() -> None:
    efd = EventFD()
    handle = efd.handle
    efd.close()
    with pytest.raises((ValueError, OSError)):
        from_handle(handle)


def test_multiprocessing_resource_sharer_last_holder() -> None:
    """A handle sent through a Queue and closed by the sender: the receiver keeps it alive."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    before = mpefd_entries()
    with EventFD() as efd:
        q.put(efd)
        received = q.get(timeout=20)  # same process: resolves to the same core
        received.write(1)
        assert efd.read() == 1
        received.close()
    q.close()
    q.join_thread()
    assert mpefd_entries() == before


def test_sigkilled_holders_never_block_others() -> None:
    with EventFD() as efd:
        p = FORK.Process(target=time.sleep, args=(30,))
        p.start()
        with reaped(p):
            os.kill(p.pid or 0, signal.SIGKILL)
            p.join(10)
        efd.write(1)
        assert efd.read() == 1


# -- close and revival while a thread still waits -------------------------------------------


def test_close_from_another_thread_while_one_blocks_in_read() -> None:
    """The waiting thread keeps the resources it uses until it leaves (closing a semaphore
    under a waiter once crashed the interpreter)."""
    efd = EventFD(0)
    got: list[object] = []

    def reader() -> None:
        try:
            got.append(efd.read(timeout=2))
        except BaseException as e:
            got.append(e)

    t = threading.Thread(target=reader)
    t.start()
    wait_until(lambda: stats(efd)["waiting_r"] == 1)
    handle = efd.handle
    efd.set_inheritable(True)
    fds = efd.fds
    attach = "import sys\nfrom mpeventfd import from_handle\nfrom_handle(sys.argv[1]).write(7)\n"
    out = python(attach, handle, pass_fds=fds)
    efd.close()
    assert out.returncode == 0, out.stderr
    t.join(10)
    assert got == [7] or isinstance(got[0], TimeoutError)


def test_an_attach_revives_a_closing_core_instead_of_building_a_second() -> None:
    """One core (one private description) per process and eventfd: classic fcntl locks
    belong to the process, and a second description would drop the first one's."""
    a, b = socket.socketpair()
    efd = EventFD(0)
    core = efd._core
    assert core is not None
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(efd.read(timeout=10)))
    t.start()
    wait_until(lambda: stats(efd)["waiting_r"] == 1)
    send_eventfd(a, efd)
    efd.close()  # the core is closed, but a thread still waits in it
    assert core.closed
    assert not core.freed
    again = recv_eventfd(b)
    assert again._core is core
    assert not getattr(core, "closed")  # (revived)  # noqa: B009
    again.write(3)
    t.join(10)
    assert got == [3]  # the thread that waited through the close and revival got it
    again.close()
    a.close()
    b.close()


@forks_beside_threads
def test_a_fork_child_lets_go_of_a_closed_cores_fds() -> None:
    """A core kept only by another thread's call: the child has no such thread, so it
    closes its copies at once (else it would pin the parent's names)."""
    gate_r, gate_w = os.pipe()
    try:
        with long_steps():  # the reader comes back by the post alone
            efd = EventFD(0)
            core = efd._core
            assert core is not None
            pipe = os.fstat(efd.fileno())
            t = threading.Thread(target=lambda: efd.read(timeout=20))
            t.start()
            wait_until(lambda: stats(efd)["waiting_r"] == 1)
            efd.close()
            assert core.closed
            assert not core.freed

            def child() -> int:
                for fd in os.listdir("/proc/self/fd"):
                    try:
                        st = os.stat(f"/proc/self/fd/{fd}")
                    except OSError:
                        continue
                    if (st.st_dev, st.st_ino) == (pipe.st_dev, pipe.st_ino):
                        return 1  # a copy of the pipe (an end, or the private description)
                return 0

            assert reap(fork_child(child)) == 0
            writer = EventFD._from_core(core, owner=False)  # write through the waiter's core
            core.reopen()
            # The woken reader waits at the gate, so its call, not our close, is the last one
            # out and frees the core (a close() that freed it would leave the names to us).
            _faults.arm("wait.woken", f"block:{gate_r}")
            writer.write(1)
            assert not core.close()
            os.write(gate_w, b"x")
            t.join(20)
            assert core.freed
    finally:
        _faults.disarm()
        os.close(gate_r)
        os.close(gate_w)


FINALIZER_UNDER_LOCK = textwrap.dedent(
    """
    import gc, socket
    from mpeventfd import EventFD, recv_eventfd, send_eventfd, _attach
    real = _attach._check_kind
    def check_then_collect(*args):
        real(*args)
        gc.collect()  # the cyclic GC runs here, with the registry lock held
    _attach._check_kind = check_then_collect
    garbage = [EventFD()]
    garbage.append(garbage)
    del garbage
    a, b = socket.socketpair()
    keep = EventFD()
    send_eventfd(a, keep)
    keep.close()
    got = recv_eventfd(b)
    got.write(1)
    assert got.read() == 1
    got.close()
    print("no deadlock")
    """
)


def test_a_finalizer_under_the_registry_lock_does_not_deadlock() -> None:
    out = python(FINALIZER_UNDER_LOCK)
    assert "no deadlock" in out.stdout, out.stderr


DEFERRED_AT_EXIT = textwrap.dedent(
    """
    import threading
    from mpeventfd import EventFD, _faults, _registry
    reached = threading.Event()
    def slow_step(step):
        reached.set()
        threading.Event().wait(1.0)  # a release that takes a while (a busy machine)
    efd = EventFD()
    print(efd.handle.split(":")[1], flush=True)
    _faults.arm("detach.closed", slow_step)
    with _registry.current().lock:
        del efd  # the finalizer cannot take the lock: the janitor thread releases it
    assert reached.wait(10)
    # exits now, with the janitor between closing the fds and removing the names
    """
)


def test_the_exit_waits_for_a_release_the_janitor_has_begun() -> None:
    """A release the janitor thread has begun when the interpreter exits is finished, not
    cut off: daemon threads are frozen at exit, and one frozen between closing the fds and
    removing the names left them in /dev/shm (the test above caught it now and then)."""
    out = python(DEFERRED_AT_EXIT)
    assert out.returncode == 0, out.stderr
    name = out.stdout.strip()
    assert not any(name in entry for entry in mpefd_entries())


REAPED = textwrap.dedent(
    """
    import os, subprocess, sys
    from mpeventfd import EventFD
    go = int(sys.argv[1])
    efd = EventFD(0, 0)  # inheritable
    child = subprocess.Popen([sys.executable, "-c", "import os, sys; os.read(int(sys.argv[1]), 1)",
                              str(go)], pass_fds=(*efd.fds, go),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(efd.handle.split(":")[1], child.pid, flush=True)
    # exits now, before the exec'd child that holds the fds and never attached
    """
)


def _reapers(name: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"reap" in argv and name.encode() in argv:
            pids.append(int(pid))
    return pids


def test_names_go_when_an_exec_child_outlives_the_creator_without_attaching() -> None:
    """The creator exits while an exec'd child holds the fds without from_handle: no
    finalizer will run anywhere, so a reaper waits for the last fd.  (Once the names
    stayed until `cleanup` or a later creation swept them.)"""
    go_r, go_w = os.pipe()
    out = python(REAPED, str(go_r), pass_fds=(go_r,))
    assert out.returncode == 0, out.stderr
    name, _ = out.stdout.split()
    assert os.path.exists(_names.state_path(name))  # held by the exec'd child
    wait_until(lambda: bool(_reapers(name)))
    reapers = _reapers(name)
    os.write(go_w, b"x")  # the child exits: the last fd goes
    wait_until(lambda: not os.path.exists(_names.state_path(name)))
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in reapers))
    assert not any(name in entry for entry in mpefd_entries())
    for fd in (go_r, go_w):
        os.close(fd)


@pytest.mark.parametrize("wait", ["at once", "after the child runs"])
def test_a_parent_detaching_before_its_attached_fork_child_starts_no_reaper(wait: str) -> None:
    """The child will liveness-test when it detaches: no process is needed for that, also
    when the parent closes before the child has run at all (with OFD locks the child
    inherits its attached mark; with classic locks it takes it as it starts)."""
    if wait == "at once" and PLATFORM.carrier != _core.CARRIER_PIPE:
        pytest.skip("classic fcntl locks are not inherited: the child marks itself")
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    efd = EventFD()
    name = name_of(efd)
    def child() -> None:
        os.write(ready_w, b"x")
        os.read(r, 1)

    pid = fork_child(child)
    if wait != "at once":
        assert wait_readable(ready_r)
    efd.close()  # the child holds the fds, attached, and will detach at its exit
    assert os.path.exists(_names.state_path(name))
    assert not _reapers(name)
    os.write(w, b"x")
    assert reap(pid) == 0
    wait_until(lambda: not os.path.exists(_names.state_path(name)))
    for fd in (r, w, ready_r, ready_w):
        os.close(fd)


def test_ls_shows_the_eventfds_own_flags_and_nothing_per_handle() -> None:
    """Close-on-exec is per handle (repr() shows it); ls shows what every handle shares.
    (ls once printed flags 0 for an eventfd whose repr said EFD_CLOEXEC.)"""
    from mpeventfd import EFD_NONBLOCK, EFD_SEMAPHORE

    with EventFD(2, EFD_SEMAPHORE | EFD_NONBLOCK) as shared, EventFD(1) as plain:
        out = subprocess.run([sys.executable, "-m", "mpeventfd", "ls"],
                             capture_output=True, text=True, timeout=60)
        lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
        assert lines[name_of(shared)].split()[2] == "EFD_SEMAPHORE|EFD_NONBLOCK"
        assert lines[name_of(plain)].split()[2] == "none"
        assert "EFD_CLOEXEC" in repr(plain)
        assert "EFD_CLOEXEC" not in out.stdout
