"""Figures the reliability tests produce, printed at the end of the run (README
"Reliability"): tests record them here, and conftest prints them."""

from __future__ import annotations

FIGURES: dict[str, list[float]] = {}
KILLED_STEPS: set[str] = set()


def record(name: str, value: float) -> None:
    FIGURES.setdefault(name, []).append(value)


def record_kill(step: str) -> None:
    """A test SIGKILLed a process at the named ``step`` (README "Reliability")."""
    KILLED_STEPS.add(step)
