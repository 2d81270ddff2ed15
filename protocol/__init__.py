"""lbd's pure protocol core: wire format, ownership table, membership and handoff.

Nothing in this package touches sockets, asyncio or the clock: time is always a
``now`` argument (seconds, float, from the caller's monotonic clock). That rule is
enforced by tests/test_purity.py.
"""
