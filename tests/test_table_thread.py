"""The daemon builds ownership tables in its table thread, never on the event loop.

``EffectsMixin.build_table`` (daemon/effects.py) with a stand-in driver: the build
runs on another thread than the loop's, its table comes back to the driver on the
loop, and of several requests queued behind a running build only the newest is
built (an older one is for a view the core no longer wants).
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from lbd.daemon import effects
from lbd.protocol import events as ev
from lbd.protocol.ownership import MemberWeights, Owners, compute_owners


class Shell(effects.EffectsMixin):
    def __init__(self) -> None:
        self.driver = self  # type: ignore[assignment]
        self.handed: list[tuple[MemberWeights, int]] = []
        self.stepped = 0
        self.done: asyncio.Future[None] | None = None
        self.expected = 0

    def table_built(self, weights: MemberWeights, owners: Owners, now: float) -> bool:
        self.handed.append((weights, threading.get_ident()))
        assert owners.shape == (64,)
        if len(self.handed) == self.expected and self.done is not None:
            self.done.set_result(None)
        return True

    def _stepped(self) -> None:
        self.stepped += 1


def request(*names: str) -> ev.BuildTable:
    return ev.BuildTable(tuple((name, 100) for name in names), 64, 0)


def test_tables_are_built_off_the_loop_and_only_the_newest_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    builders: list[int] = []
    release = threading.Event()

    def slow_build(weights: MemberWeights, buckets: int, seed: int) -> Owners:
        builders.append(threading.get_ident())
        assert release.wait(5), "the test never released the first build"
        return compute_owners(weights, buckets, seed)

    monkeypatch.setattr(effects, "compute_owners", slow_build)

    async def scenario() -> tuple[Shell, int]:
        shell = Shell()
        shell.done = asyncio.get_running_loop().create_future()
        shell.expected = 2
        shell.build_table(request("a", "b"))  # starts at once
        shell.build_table(request("a", "b", "c"))  # superseded before it starts
        shell.build_table(request("a", "c"))  # the newest: built next
        release.set()
        await asyncio.wait_for(shell.done, 5)
        return shell, threading.get_ident()

    shell, loop_thread = asyncio.run(scenario())
    assert [w for w, _ in shell.handed] == [request("a", "b").weights, request("a", "c").weights]
    assert len(builders) == 2 and loop_thread not in builders
    assert all(thread == loop_thread for _, thread in shell.handed)
    assert shell.stepped == 2
