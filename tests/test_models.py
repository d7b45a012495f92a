"""The wake-up channel's model checker, run on the configurations the code relies on.

``tools/wake_model.py`` models the C core's own steps: lock-free commits and their loads,
sections as sequences of stores under the lock, posts after the unlock, the kick, the looks
of expiring waiters, and a SIGKILL at any step.  The suite checks that the code as it is
loses no wake-up, and that the checker still finds each flaw of the code as it was, so that a
silently weakened model cannot pass.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))

from wake_model import NOW, OLD, Config, Variant, check, trace

R = ("r",)


def W(v: int) -> tuple[str, int]:
    return ("w", v)


# Readers and writers of every kind, with timeouts: no configuration may lose a wake-up.
CASES: dict[str, dict[str, Any]] = {
    "A-normal-timeout": {"scripts": [[R], [R], [W(1)]], "timeouts": (0,)},
    "C-writes-before-the-reader-runs": {"scripts": [[R], [W(1), W(1), W(1)]], "M": 4},
    "D-semaphore-timeouts": {"scripts": [[R], [R], [W(2)]], "sem": True, "timeouts": (0, 1),
                             "M": 3},
    "E-readers-and-writers": {"scripts": [[W(2)], [R, R], [W(2)]], "M": 2},
    "G-lock-free-write-beside-a-woken-reader": {"scripts": [[R], [R], [W(1), W(1)]],
                                                "sem": True, "M": 3},
    "H-lock-free-write-beside-a-write0": {"scripts": [[R], [R], [W(1), W(1)], [W(0)]],
                                          "sem": True, "M": 3},
    "WR-lock-free-read-beside-a-holder": {"scripts": [[W(1)], [R], [W(0)]], "sem": True,
                                          "M": 3, "c0": 3},
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_core_loses_no_wakeup_without_a_kill(name: str) -> None:
    """Without a death no waiter ever depends on its own step: every wake-up is a post."""
    found, parent, _ = check(Config(**CASES[name]))
    assert "LOST" not in found, trace(parent, found["LOST"])


KILL_CASES: dict[str, dict[str, Any]] = {
    "K1": {"scripts": [[R], [W(1)]], "kills": 1, "expiry": (0, 1)},
    "K2": {"scripts": [[R], [R], [W(1)]], "kills": 1, "expiry": (0, 1, 2)},
    "K3": {"scripts": [[R], [R], [W(2)]], "kills": 1, "expiry": (0, 1, 2), "sem": True,
           "M": 3},
    "K4": {"scripts": [[W(2)], [R, R], [W(2)]], "kills": 1, "expiry": (0, 1, 2), "M": 2},
    "K5": {"scripts": [[R], [W(1), W(1)]], "kills": 2, "expiry": (0, 1), "M": 2},
    "K6": {"scripts": [[R], [R], [W(1), W(1)], [W(0)]], "kills": 1, "expiry": (0, 1, 2, 3),
           "sem": True, "M": 3},
}


@pytest.mark.parametrize("name", list(KILL_CASES))
def test_a_kill_at_any_step_delays_a_wakeup_by_one_look_at_most(name: str) -> None:
    """A SIGKILL anywhere (a poster between its unlock and its posts, a holder inside its
    section, a lock-free writer before its kick) may leave a waiter asleep; its own
    bounded step's look always gets it going again."""
    found, parent, _ = check(Config(**KILL_CASES[name]))
    assert "UNRESCUED" not in found, trace(parent, found["UNRESCUED"])
    assert "LOST_NOKILL" not in found, trace(parent, found["LOST_NOKILL"])


def test_the_checker_finds_the_skipped_post_with_the_old_store_order() -> None:
    """W and P in two words, stored W then P and loaded W then P, in the old code (whose
    unregistering sections did not run the rule again): a lock-free write reads a torn
    pair, "no post needed", and a reader sleeps with a token there.  Packed into one word,
    the same code loses nothing."""
    case = Config(**CASES["H-lock-free-write-beside-a-write0"],
                  variant=Variant(packed=False, post="wait", rule_everywhere=False))
    found, parent, _ = check(case)
    assert "LOST_NOKILL" in found
    assert any("loads W=" in line for line in trace(parent, found["LOST_NOKILL"]))
    case.variant = Variant(packed=True, post="wait", rule_everywhere=False)
    assert "LOST_NOKILL" not in check(case)[0]


@pytest.mark.parametrize("case", ["G-lock-free-write-beside-a-woken-reader",
                                  "WR-lock-free-read-beside-a-holder"])
def test_the_checker_finds_the_skipped_post_with_the_old_give_up(case: str) -> None:
    """A lock-free commit that gives its post up when the lock is busy (the old 2 µs spin
    of awrite()'s path) leaves a waiter asleep: for readers in the old code, and for
    writers even with the rule at the end of every section.  With the kick, nothing."""
    old = Variant(post="give_up", rule_everywhere=case.startswith("WR"))
    found, parent, _ = check(Config(**CASES[case], variant=old))
    assert "LOST_NOKILL" in found
    assert any("GIVES UP" in line for line in trace(parent, found["LOST_NOKILL"]))
    assert "LOST" not in check(Config(**CASES[case], variant=NOW))[0]


def test_the_old_code_as_a_whole_loses_wakeups_the_new_does_not() -> None:
    for name in ("G-lock-free-write-beside-a-woken-reader",
                 "H-lock-free-write-beside-a-write0"):
        assert "LOST_NOKILL" in check(Config(**CASES[name], variant=OLD))[0]
        assert "LOST" not in check(Config(**CASES[name], variant=NOW))[0]


def test_writers_of_different_sizes_wait_one_look_at_most() -> None:
    """A writer that cannot fit may consume the post of one that can (posts are anonymous,
    and no exact rule exists for writers of different sizes: docs/design.md §6); the
    fitting writer's own look gets it going.  The checker must see both halves."""
    case = Config(scripts=[[W(1)], [W(2)], [R], [W(0)]], sem=True, M=3, c0=3)
    found, _, _ = check(case)
    assert "LOST_NOKILL" in found
    case.expiry = (0, 1)
    found, _, _ = check(case)
    assert "UNRESCUED" not in found


def test_the_rescue_check_finds_a_waiter_without_bounded_steps() -> None:
    """Without expiry for the reader, a post lost with its poster stays lost."""
    found, _, _ = check(Config(scripts=[[R], [W(1)]], kills=1, expiry=(1,)))
    assert "UNRESCUED" in found
