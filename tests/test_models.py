"""The wake-up rule's model checker, run on the configurations the code relies on.

``tools/wake_model.py`` explores every interleaving, timeout, exception and SIGKILL point of
the post/account rule that ``mpeventfd/_core.c`` implements (docs/design.md, "Wake-ups"),
and the suite checks that it still finds the flaws of the broken variants, so a silently
weakened model cannot pass.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))

import wake_model

R = ("r",)


def W(v: int) -> tuple[str, int]:
    return ("w", v)


WAKE_CASES: list[tuple[str, list[list[Any]], dict[str, Any]]] = [
    ("A", [[R], [R], [W(1)]], {"timeouts": (0,)}),
    ("B", [[R], [R], [W(1)]], {"excs": (0,)}),
    ("C", [[R], [W(1), W(1), W(1)]], {"M": 4}),
    ("D", [[R], [R], [W(2)]], {"sem_mode": True, "timeouts": (0, 1), "M": 3}),
]


@pytest.mark.parametrize("variant", ["V3", "V4"], ids=["post-then-account", "post-after-unlock"])
@pytest.mark.parametrize(("name", "scripts", "kw"), WAKE_CASES, ids=[c[0] for c in WAKE_CASES])
def test_wake_rule_loses_no_wakeup(variant: str, name: str, scripts: list[list[Any]],
                                   kw: dict[str, Any]) -> None:
    """V4 is the rule the C core implements (account under the lock, post after it); V3,
    posting under the lock, is what it replaced."""
    found, _, _ = wake_model.check(variant, scripts, **kw)
    assert "LOST" not in found
    assert "ABSORB" not in found


KILL_CASES: list[tuple[str, list[list[Any]], dict[str, Any]]] = [
    ("K1", [[R], [W(1)]], {"kills": 1, "expiry": (0, 1)}),
    ("K2", [[R], [R], [W(1)]], {"kills": 1, "expiry": (0, 1, 2)}),
    ("K3", [[R], [R], [W(2)]], {"kills": 1, "expiry": (0, 1, 2), "sem_mode": True, "M": 3}),
    ("K4", [[W(2)], [R, R], [W(2)]], {"kills": 1, "expiry": (0, 1, 2), "M": 2}),
    ("K5", [[R], [W(1), W(1)]], {"kills": 2, "expiry": (0, 1), "M": 2}),
]


@pytest.mark.parametrize(("name", "scripts", "kw"), KILL_CASES, ids=[c[0] for c in KILL_CASES])
def test_a_killed_poster_delays_a_wakeup_by_one_step_at_most(
    name: str, scripts: list[list[Any]], kw: dict[str, Any]
) -> None:
    """With a SIGKILL at any step (a poster dying between its unlock and its posts, say),
    a waiter may sleep past its wake-up, but its bounded step always gets it going again,
    and without a kill nothing is ever lost."""
    found, _, _ = wake_model.check("V4", scripts, **kw)
    assert "UNRESCUED" not in found
    assert "LOST_NOKILL" not in found


def test_the_wake_checker_still_finds_w1_in_the_naive_rule() -> None:
    found, _, _ = wake_model.check("V1", [[R], [R], [W(1)]], excs=(0,))
    assert "LOST" in found


def test_the_rescue_check_finds_a_waiter_without_bounded_steps() -> None:
    """Without expiry for the reader, a lost post stays lost: the checker must say so."""
    found, _, _ = wake_model.check("V4", [[R], [W(1)]], kills=1, expiry=(1,))
    assert "UNRESCUED" in found


def test_two_semaphores_are_needed_w3() -> None:
    shared, _, _ = wake_model.check("V4", [[W(2)], [R, R], [W(2)]], M=2, shared_sem=True)
    split, _, _ = wake_model.check("V4", [[W(2)], [R, R], [W(2)]], M=2)
    assert "LOST" in shared
    assert "LOST_NOKILL" not in split
