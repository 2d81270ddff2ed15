"""protocol/driver.py: the order in which the core's outputs are carried out.

A scripted core stands in for ``membership.Node`` (each call hands out what the
test queued); the effects record what was executed, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from lbd.protocol import events as ev
from lbd.protocol.config import CoreConfig
from lbd.protocol.driver import Datagram, Driver
from lbd.protocol.membership import Node
from lbd.protocol.ownership import MemberWeights, Owners
from lbd.protocol.wire import Codec, Keyring

BASE = ev.PersistBase(("a", "b"), 2)
APPLY = ev.ApplyKernel(frozenset({1, 2}), 10.0)
SEND = ev.Transmit(b"hb")


@dataclass
class ScriptedCore:
    steps: list[tuple[list[ev.Event], list[ev.Action]]] = field(default_factory=list)
    fed: list[tuple[list[Datagram], float | None]] = field(default_factory=list)
    timer: float | None = None
    quiet: float | None = None
    left: bool = False
    tables: list[tuple[MemberWeights, Owners, float]] = field(default_factory=list)
    _events: list[ev.Event] = field(default_factory=list)
    _actions: list[ev.Action] = field(default_factory=list)

    @property
    def has_left(self) -> bool:
        return self.left

    def step(self, actions: list[ev.Action], events: Sequence[ev.Event] = ()) -> None:
        """What the next core call outputs."""
        self._events.extend(events)
        self._actions.extend(actions)

    def receive_datagrams(self, batch: Sequence[Datagram], now: float | None = None) -> None:
        self.fed.append((list(batch), now))

    def events(self) -> list[ev.Event]:
        out, self._events = self._events, []
        return out

    def actions(self) -> list[ev.Action]:
        out, self._actions = self._actions, []
        return out

    def get_timer(self) -> float | None:
        return self.timer

    def quiet_until(self) -> float | None:
        return self.quiet

    def table_built(self, weights: MemberWeights, owners: Owners, now: float) -> None:
        self.tables.append((weights, owners, now))


@dataclass
class Recorder:
    done: list[object] = field(default_factory=list)
    accept: bool = True
    sync_persist: bool | None = None
    """None: a write stays in progress until the test completes it; else its outcome."""
    driver: Driver | None = None

    def record(self, events: list[ev.Event]) -> None:
        self.done.extend(events)

    def persist_base(self, action: ev.PersistBase) -> None:
        self.done.append(action)
        if self.sync_persist is not None:
            assert self.driver is not None
            self.driver.persisted(self.sync_persist)

    def apply_kernel(self, action: ev.ApplyKernel) -> bool:
        self.done.append(action)
        return self.accept

    def transmit(self, data: bytes) -> None:
        self.done.append(data)

    def build_table(self, action: ev.BuildTable) -> None:
        self.done.append(action)


def driven(**effects: object) -> tuple[ScriptedCore, Recorder, Driver]:
    core, recorder = ScriptedCore(), Recorder(**effects)  # type: ignore[arg-type]
    driver = Driver(core, recorder)
    recorder.driver = driver
    return core, recorder, driver


def test_feed_is_the_cores_receive_datagrams_call_and_an_empty_input_feeds_nothing() -> None:
    core, _, driver = driven()
    batch = [(b"x", "192.0.2.1", 1.5)]
    assert driver.feed(batch, None) and driver.feed([], 2.0) and driver.feed([])
    assert core.fed == [(batch, None), ([], 2.0)]


def test_events_are_recorded_before_the_steps_actions() -> None:
    core, rec, driver = driven()
    joined = ev.MemberJoined("b", 1)
    core.step([APPLY, SEND], [joined])
    assert driver.process()
    assert rec.done == [joined, APPLY, b"hb"]


def test_nothing_after_a_pending_persist_runs_until_it_completes() -> None:
    core, rec, driver = driven()
    core.step([SEND, BASE, APPLY, SEND])
    assert driver.process()
    assert rec.done == [b"hb", BASE] and driver.persisting and not driver.idle
    # Later steps queue behind the write, their events recorded at once.
    lapsed = ev.LeaseLapsed(2)
    core.step([ev.Transmit(b"later")], [lapsed])
    assert driver.feed([], 3.0)
    assert rec.done == [b"hb", BASE, lapsed]
    core.left = True
    assert not driver.left  # the leave waits for its last write
    assert driver.persisted(True)
    assert rec.done == [b"hb", BASE, lapsed, APPLY, b"hb", b"later"]
    assert driver.idle and driver.left


def test_a_write_that_completes_at_once_keeps_the_order() -> None:
    core, rec, driver = driven(sync_persist=True)
    second = ev.PersistBase(("a", "b", "c"), 3)
    core.step([BASE, SEND, second, APPLY])
    assert driver.process() and driver.idle
    assert rec.done == [BASE, b"hb", second, APPLY]


@pytest.mark.parametrize("sync", [False, True], ids=["later", "at-once"])
def test_a_failed_persist_stops_everything(sync: bool) -> None:
    core, rec, driver = driven(sync_persist=False if sync else None)
    core.step([BASE, APPLY, SEND])
    assert driver.process() is not sync
    if not sync:
        assert not driver.persisted(False)
    assert rec.done == [BASE] and driver.stopped and driver.idle
    core.step([SEND], [ev.LeaseLapsed(1)])
    assert not driver.feed([], 5.0)
    assert rec.done == [BASE]  # nothing more, ever
    with pytest.raises(RuntimeError):
        driver.persisted(True)


def test_a_refused_apply_stops_everything() -> None:
    core, rec, driver = driven(accept=False)
    core.step([SEND, APPLY, SEND, BASE])
    assert not driver.process()
    assert rec.done == [b"hb", APPLY] and driver.stopped
    rec.accept = True
    core.step([APPLY, SEND])
    assert not driver.process()
    assert rec.done == [b"hb", APPLY]


def test_wakeup_is_the_earlier_of_timer_and_quiet_window_unless_a_backlog_waits() -> None:
    core, _, driver = driven()
    core.timer, core.quiet = 5.0, 3.0
    wake = driver.wakeup()
    assert (wake.deadline, wake.quiet_until, wake.watch) == (3.0, 3.0, False)
    wake = driver.wakeup(backlog=True)  # read again at once: the socket is watched
    assert (wake.deadline, wake.quiet_until, wake.watch) == (5.0, None, True)
    core.quiet = 7.0
    assert driver.wakeup().deadline == 5.0 and not driver.wakeup().watch
    core.timer = None
    assert driver.wakeup().deadline == 7.0
    core.quiet = None
    wake = driver.wakeup()
    assert wake.deadline is None and wake.watch


def test_the_real_core_fits_the_driver() -> None:
    """A real core's first step (an empty owner set, its first heartbeat) goes
    through; mypy checks that ``Node`` is a ``Core``."""
    core = Node(CoreConfig(buckets=64), Codec("lbd", Keyring(bytes(32))), "a", 1, 0.0)
    rec = Recorder()
    driver = Driver(core, rec)
    assert driver.process()
    assert any(isinstance(item, ev.ApplyKernel) for item in rec.done)
    assert any(isinstance(item, bytes) for item in rec.done)
    wake = driver.wakeup()
    assert wake.deadline is not None and wake.deadline > 0.0
