"""The model checkers behind the two protocols, run on the configurations the code relies on.

``tools/lock_model.py`` (lock-protocol.md Appendix A) explores every interleaving and every
SIGKILL point of the fast mutex's recoverable protocol (§5', ``mpeventfd/_fastmutex.py``);
``tools/wake_model.py`` (design-review.md Appendix A) does the same for the wake-up rule
(``mpeventfd/_waiters.py``).  Each suite also checks that the checker still finds the flaws
of the broken variants, so a silently weakened model cannot pass.

How the code maps onto the lock model: ENTERING before every semaphore operation
(``Core.op``, ``_spin``, ``take_step``), IDLE after the release post, ASIDE while
standing aside (``_stand_aside``), claims that lock the liveness byte and then re-read the
word (``_claim_fast``), and the prover's C1 -> failed trywait -> C2 proof (``_prove``).
The code adds nothing the model forbids: its spin is more trywaits while ENTERING, and the
kernel lock around claims only narrows the claim interleavings.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))

import lock_model  # type: ignore[import-not-found]
import wake_model  # type: ignore[import-not-found]

R = ("r",)


def W(v: int) -> tuple[str, int]:
    return ("w", v)


@pytest.mark.parametrize(
    ("procs", "ops", "kills", "respawns"),
    [(3, 2, 1, 0), (3, 1, 2, 1), (4, 1, 1, 0)],
)
def test_fast_mutex_protocol_is_safe_under_kills(procs: int, ops: int, kills: int,
                                                 respawns: int) -> None:
    verdict, states, _ = lock_model.bfs(lock_model.fixed_model(procs, ops, kills,
                                                               respawns=respawns))
    assert verdict == "SAFE", states


@pytest.mark.parametrize("broken", [{"drop_seq": True}, {"no_trywait": True}])
def test_the_lock_checker_still_finds_the_broken_variants(broken: dict[str, Any]) -> None:
    verdict, _, _ = lock_model.bfs(lock_model.fixed_model(3, 2, 1, **broken)
                                   if "drop_seq" in broken
                                   else lock_model.fixed_model(3, 1, 1, **broken))
    assert verdict == "VIOLATION"


def test_fast_mutex_protocol_makes_progress() -> None:
    verdict, states, _ = lock_model.bfs(lock_model.fixed_model(3, 1, 1), liveness=True)
    assert verdict not in ("STUCK", "VIOLATION"), states


WAKE_CASES: list[tuple[str, list[list[Any]], dict[str, Any]]] = [
    ("A", [[R], [R], [W(1)]], {"timeouts": (0,)}),
    ("B", [[R], [R], [W(1)]], {"excs": (0,)}),
    ("C", [[R], [W(1), W(1), W(1)]], {"M": 4}),
    ("D", [[R], [R], [W(2)]], {"sem_mode": True, "timeouts": (0, 1), "M": 3}),
]


@pytest.mark.parametrize(("name", "scripts", "kw"), WAKE_CASES, ids=[c[0] for c in WAKE_CASES])
def test_wake_rule_loses_no_wakeup(name: str, scripts: list[list[Any]],
                                   kw: dict[str, Any]) -> None:
    found, _, _ = wake_model.check("V3", scripts, **kw)
    assert "LOST" not in found
    assert "ABSORB" not in found


def test_the_wake_checker_still_finds_w1_in_the_naive_rule() -> None:
    found, _, _ = wake_model.check("V1", [[R], [R], [W(1)]], excs=(0,))
    assert "LOST" in found


def test_two_semaphores_are_needed_w3() -> None:
    shared, _, _ = wake_model.check("V3", [[W(2)], [R, R], [W(2)]], M=2, shared_sem=True)
    split, _, _ = wake_model.check("V3", [[W(2)], [R, R], [W(2)]], M=2)
    assert "LOST" in shared
    assert "LOST_NOKILL" not in split
