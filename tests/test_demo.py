"""``python -m mpeventfd demo``: the first thing a new user runs."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from mpeventfd._cli.demo import micros


@pytest.mark.parametrize(("us", "text"), [
    (0.4, "0.4 µs"), (0.04, "0.04 µs"), (3.85, "3.9 µs"), (9.94, "9.9 µs"),
    (10.0, "10 µs"), (132.4, "132 µs"), (2896.0, "2,896 µs"),
])
def test_a_latency_below_ten_microseconds_keeps_a_decimal(us: float, text: str) -> None:
    assert micros(us) == text


@pytest.mark.parametrize(("us", "text"), [
    (9.96, "10 µs"), (0.096, "0.1 µs"), (0.0949, "0.09 µs"), (9.949, "9.9 µs"),
])
def test_a_figure_that_rounds_up_to_the_next_format_takes_it(us: float, text: str) -> None:
    """The format follows the rounded figure, and a printed figure reads back as itself
    (the demo's own test checks that of every figure it prints)."""
    assert micros(us) == text
    assert micros(float(text.split()[0].replace(",", ""))) == text


def test_the_demo_runs_every_act_exactly_and_prints_measured_latencies() -> None:
    run = subprocess.run([sys.executable, "-m", "mpeventfd", "demo"], capture_output=True,
                         text=True, timeout=100)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    for act in ("[1/3 fan-in", "[2/3 wake-up latency", "[3/3 work distribution"):
        assert act in out
    assert re.search(r"^all counts exact in [\d.]+ s$", out, re.M), out
    figures = re.findall(r"p50 ([\d.,]+) µs, p99 ([\d.,]+) µs", out)
    assert figures, out
    for figure in (f for pair in figures for f in pair):
        value = float(figure.replace(",", ""))
        assert value > 0, out  # ("0 µs" would read as "not measured")
        assert micros(value) == f"{figure} µs"
