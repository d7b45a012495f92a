"""This process's eventfds: one core per eventfd, the handles on it, and its detach.

A core is attached once per process and eventfd (``_create``, ``_attach``), whatever the
number of handles; it detaches when its last handle lets go.  Detaching closes this
process's fds and runs the liveness test (``_liveness``); a name that stays is left to the
janitor (``_janitor``).  Fork: the child builds a registry of its own from its parent's.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable

from . import _faults as F
from . import _liveness, _names
from ._core import Core
from ._janitor import Janitor

# Called with a core's fileno() just before its fds close (asyncio drops its reader there:
# _eventfd registers it).  A list, not a registry field: it survives fork children.
ON_DETACH: list[Callable[[int], None]] = []


def name_of(core: Core) -> str:
    """The 22-character name (the encoded id) of an attached core."""
    return _names.encode(core.ident)


class Registry:
    """The attached cores of this process and their handle counts, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cores: dict[bytes, Core] = {}  # ident -> the live core
        self.by_fileno: dict[int, Core] = {}
        self.refs: dict[Core, int] = {}  # handles per core; it detaches at 0
        self.closing: dict[bytes, Core] = {}  # closed, but a call in flight keeps it
        self.names_of: dict[Core, str] = {}  # their names (the ident goes with the mapping)
        self.janitor = Janitor(self._apply_release)

    # -- attach ----------------------------------------------------------------------------

    def add_locked(self, core: Core) -> None:
        """A core newly attached (``lock`` held)."""
        core.on_free = _on_free
        self.cores[core.ident] = core
        self.by_fileno[core.fds[1]] = core
        self.refs.setdefault(core, 0)

    def find_locked(self, ident: bytes) -> Core | None:
        """The core of ``ident`` attached here, reviving a closing one (``lock`` held).

        A core whose last handle closed while a thread still waits in it is used again: a
        second core would open a second private description, and classic ``fcntl`` locks
        belong to the process, so closing either would drop the other's locks.
        """
        core = self.cores.get(ident)
        if core is not None:
            return core
        core = self.closing.pop(ident, None)
        if core is None or not core.reopen():
            return None
        self.names_of.pop(core, None)
        self.add_locked(core)
        return core

    def names(self) -> frozenset[str]:
        with self.lock:
            return frozenset(_names.encode(ident) for ident in self.cores)

    # -- handles ---------------------------------------------------------------------------

    def retain(self, core: Core) -> None:
        with self.lock:
            self.refs[core] += 1

    def release(self, core: Core) -> None:
        """A handle let go of ``core`` (an explicit close): detach when it was the last."""
        with self.lock:
            if core not in self.refs:  # detached already (interpreter exit)
                return
            self.refs[core] -= 1
            if self.refs[core] > 0:
                return
            name = self._detach_locked(core)
        if name:
            self._after_free(name, core)

    def release_from_finalizer(self, core: Core) -> None:
        """Like :meth:`release`, from ``__del__``: never block on the lock.

        A finalizer can run at any bytecode, also while this very thread holds the lock (any
        allocation may start the cyclic GC): then the janitor does it.
        """
        if not self.lock.acquire(False):
            self.janitor.defer(core)
            return
        try:
            name = None
            if core in self.refs:  # (not detached already, at interpreter exit)
                self.refs[core] -= 1
                name = self._detach_locked(core) if self.refs[core] <= 0 else None
        finally:
            self.lock.release()
        if name:
            self._after_free(name, core)

    def _apply_release(self, core: object) -> None:
        assert isinstance(core, Core)
        self.release(core)

    # -- detach ----------------------------------------------------------------------------

    def _detach_locked(self, core: Core) -> str | None:
        """Unregister and close a core no handle refers to (``lock`` held).

        Returns its name if it was freed at once; else a thread of this process still waits
        in it, keeps waiting (as on Linux), and the last call out frees it (``_on_free``).
        """
        ident = core.ident
        name = _names.encode(ident)
        del self.refs[core]
        if self.cores.get(ident) is core:
            del self.cores[ident]
        fileno = core.fds[1]
        if self.by_fileno.get(fileno) is core:
            del self.by_fileno[fileno]
        for hook in ON_DETACH:
            hook(fileno)  # (no asyncio registration may outlive the fd)
        if core.close():
            return name
        self.closing[ident] = core
        self.names_of[core] = name
        return None

    def on_free(self, core: Core) -> None:
        """The last call in flight left a closed core and freed it."""
        with self.lock:
            name = self.names_of.pop(core, None)
            for ident, closing in list(self.closing.items()):
                if closing is core:
                    del self.closing[ident]
        if name:
            self._after_free(name, core)

    def _after_free(self, name: str, core: Core) -> None:
        """Our fds of ``name`` are closed: its names go if nobody holds any fd of it."""
        if F.ARMED:
            F.hit("detach.closed")
        if _liveness.remove_if_unused(name):
            return
        self.janitor.add(name, alone=core.alone, saw_death=core.saw_death)

    # -- exit and fork ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """Interpreter exit (also a multiprocessing child's exit): detach everything, then
        see every pending name through (:meth:`Janitor.finish`).  Cores in which a thread
        still waits stay: their last call frees them, or the exit does."""
        self.janitor.stop()
        self.janitor.apply_deferred()
        with self.lock:
            freed = [(core, self._detach_locked(core)) for core in list(self.cores.values())]
        for core, name in freed:
            if name:
                self._after_free(name, core)
        self.janitor.finish()

    def for_fork_child(self) -> Registry:
        """The child's own registry, built from this one, which the forking thread locked
        for the fork: no other thread was changing it, and the child touches nothing else
        of its parent's (without the GIL, a container another thread was inside at the fork
        would keep that thread's lock for ever)."""
        child = Registry()
        child.cores = dict(self.cores)
        child.by_fileno = dict(self.by_fileno)
        child.refs = dict(self.refs)
        # Closed cores kept only by another thread's call in flight (no such thread in the
        # child): let go of their copies now, or the child would pin the parent's names.
        for core in self.closing.values():
            core.close()
        for core in child.cores.values():
            try:
                core.own()  # attached here too: a parent that detaches first must see us
            except OSError:
                pass  # (fileno() was replaced: the first call says so)
        return child


_current = Registry()
_fork_held = False


def current() -> Registry:
    """This process's registry (a fork child has a new one)."""
    return _current


def _on_free(core: Core) -> None:
    """The C core's callback once the last call in flight freed a closed core."""
    _current.on_free(core)


def sweep(skip_attached: bool = True) -> list[str]:
    """Remove every eventfd of this user no fd refers to (but those attached here)."""
    return _liveness.sweep(_current.names() if skip_attached else frozenset())


def shutdown() -> None:
    _current.shutdown()


def _before_fork() -> None:
    global _fork_held
    # (A timeout, not a wait: this very thread may hold it, in a finalizer's fork.)
    _fork_held = _current.lock.acquire(timeout=5)
    for core in list(_current.cores.values()):
        core.prepare_fork()


def _after_fork_parent() -> None:
    global _fork_held
    for core in list(_current.cores.values()):
        core.after_fork_parent()
    if _fork_held:
        _fork_held = False
        _current.lock.release()


def _after_fork_child() -> None:
    global _current, _fork_held
    _fork_held = False
    _current = _current.for_fork_child()


def _install_mp_finalizer(_: object) -> None:
    # A multiprocessing fork child clears the finalizers it inherited and leaves through
    # os._exit, skipping atexit; re-register so its exit detaches.
    from multiprocessing import util

    util.Finalize(None, shutdown, exitpriority=-100)


class _Anchor:
    """Something weakly referenceable for ``multiprocessing.util.register_after_fork``."""


_ANCHOR = _Anchor()
atexit.register(shutdown)
os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent,
                    after_in_child=_after_fork_child)


def _hook_multiprocessing() -> None:
    from multiprocessing import util

    util.register_after_fork(_ANCHOR, _install_mp_finalizer)


_hook_multiprocessing()
