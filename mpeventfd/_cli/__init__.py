"""The command line's programs: ``demo``, ``bench``, ``ls`` and ``cleanup``.

They use the library; the library never imports them (``tests/test_layers.py`` checks
both directions).  ``demo`` is written against the public API only, as a user's program
would be; ``bench`` and ``tools`` also read a few internals (the lock kind, the spin
setting, the waiter counts, the header) that no public name exposes.
"""
