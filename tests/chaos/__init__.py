"""The project's own chaos suite: the order system as separate processes,
a nemesis that kills, stops and restarts them (and the servers, which are
private to the run), then the invariants. ``test_chaos.py`` is the short
bounded form the test command runs; ``python -m tests.chaos --minutes N``
the long one."""
