"""The one driver of the core: inputs in, outputs carried out in order, next wake-up.

Why one driver
--------------
The core (``membership.Node``) only computes; what keeps S1 is also *how* its
outputs are carried out: a ``PersistBase`` is on disk before anything after it
(the claim, the heartbeat that advertises the base), a kernel release happens
before the heartbeat that says so (break before make), a refused kernel apply
stops everything after it. The simulator (``lbd.testbed.clustersim``) proves S1 on
random schedules, but a proof covers only the code it runs: three hand-written
loops (daemon, simulator, peer emulator) drifted apart, and a loop the simulator
does not run is a loop nobody proved. So all three drive the core through this
module, and only the effects differ: the daemon writes with fsync in a thread and
talks to nftables; the simulator models a disk (optionally slow), a kernel and a
network on a virtual clock; the emulator sends and skips the kernel.

Theory of operation
-------------------
A shell implements ``Effects`` and owns one ``Driver`` per core. Every input is
one call: ``feed(batch, timer_due)`` for what the socket held and/or a due timer
(exactly ``core.receive_datagrams``), or ``process()`` after the shell called a
core method itself (``set_draining``, ``leave``, ``set_weight``, ...). Each call:

1. hands the step's events to ``Effects.record`` first (a simulator's violation
   trail then shows the step that caused it, and the daemon's journal says why
   before what);
2. queues the step's actions behind any still waiting and executes them in order:
   ``PersistBase`` starts a durable write (``Effects.persist_base``) and everything
   after it waits until the shell reports ``persisted(ok)`` (at once, or later from
   another callback); ``ApplyKernel`` returns whether the kernel took it;
   ``Transmit`` sends. A failed write or a refused apply *stops* the driver: the
   queue is dropped and nothing more is ever executed (the shell fails closed).
   ``BuildTable`` (only from a core made with ``defer_tables``) starts building an
   ownership table elsewhere (``Effects.build_table``) and holds nothing up: the
   shell hands the table back with ``table_built``, which steps the core.

``wakeup(backlog)`` says when the shell must call again: the core's timer, or the
end of its quiet window (``quiet_until``: the socket need not be watched, arrivals
are read at the wake-up with their arrival times), unless the socket still holds
a backlog. ``idle`` (no write pending) and ``left`` tell a leaving shell when it
may go.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from lbd.protocol import events as ev
from lbd.protocol.ownership import MemberWeights, Owners

Datagram = tuple[bytes, str, float]
"""(data, source address, arrival time on the core's clock)."""


class Core(Protocol):
    """What the driver uses of ``membership.Node``."""

    @property
    def has_left(self) -> bool: ...

    def receive_datagrams(self, batch: Sequence[Datagram], now: float | None = None) -> None: ...

    def events(self) -> list[ev.Event]: ...

    def actions(self) -> list[ev.Action]: ...

    def get_timer(self) -> float | None: ...

    def quiet_until(self) -> float | None: ...

    def table_built(self, weights: MemberWeights, owners: Owners, now: float) -> None: ...


class Effects(Protocol):
    """What a shell does for the driver; called only in the core's order."""

    def record(self, events: list[ev.Event]) -> None:
        """One step's events (log them, keep them for a trail)."""

    def persist_base(self, action: ev.PersistBase) -> None:
        """Start storing the base durably; report the outcome with
        ``Driver.persisted`` (from within this call, or later)."""

    def apply_kernel(self, action: ev.ApplyKernel) -> bool:
        """Make the kernel enforce ``action``; False: it refused (the driver stops)."""

    def transmit(self, data: bytes) -> None:
        """Send one datagram (lossy: a failure is the shell's to count)."""

    def build_table(self, action: ev.BuildTable) -> None:
        """Start building ``action``'s ownership table away from the loop; hand it
        back with ``Driver.table_built`` (never from within this call)."""


@dataclass(frozen=True, slots=True)
class Wakeup:
    """When to call the driver again, and whether to watch the socket meanwhile."""

    deadline: float | None
    """The core's clock; None: only an arrival (or the operator) wakes it."""
    quiet_until: float | None
    """Arrivals before this may wait in the socket (None: read each as it comes)."""

    @property
    def watch(self) -> bool:
        return self.quiet_until is None


class Driver:
    """Feeds one core and carries out its actions, in order, through ``effects``."""

    def __init__(self, core: Core, effects: Effects) -> None:
        self.core = core
        self.effects = effects
        self.persisting = False
        """A base write was started and has not completed: every later action waits."""
        self.stopped = False
        """A write failed or the kernel refused: nothing is executed any more."""
        self._queue: collections.deque[ev.Action] = collections.deque()
        self._running = False

    # ----------------------------------------------------------------- inputs

    def feed(self, batch: Sequence[Datagram], timer_due: float | None = None) -> bool:
        """What the socket held (oldest first) and/or a due timer, then ``process``.
        False: the driver is stopped."""
        if batch or timer_due is not None:
            self.core.receive_datagrams(batch, timer_due)
        return self.process()

    def process(self) -> bool:
        """After any core call: record its events, execute its actions in order.
        False: the driver is stopped (the step's outputs are dropped)."""
        events = self.core.events()
        actions = self.core.actions()
        if self.stopped:
            return False
        if events:
            self.effects.record(events)
        self._queue.extend(actions)
        return self._run()

    def persisted(self, ok: bool) -> bool:
        """The write ``persist_base`` started is done: on success the actions that
        waited run now; on failure the driver stops. False: stopped."""
        if not self.persisting:
            raise RuntimeError("persisted() without a write in progress")
        self.persisting = False
        if not ok:
            self._stop()
            return False
        if self._running:  # completed within persist_base: the running loop goes on
            return True
        return self._run()

    def table_built(self, weights: MemberWeights, owners: Owners, now: float) -> bool:
        """The table a ``BuildTable`` asked for: the core takes it (and may move to
        the view it was waiting for), then ``process``. False: stopped."""
        if self.stopped:
            return False
        self.core.table_built(weights, owners, now)
        return self.process()

    # ---------------------------------------------------------------- outputs

    def _run(self) -> bool:
        self._running = True
        try:
            while self._queue and not self.persisting and not self.stopped:
                action = self._queue.popleft()
                if isinstance(action, ev.PersistBase):
                    self.persisting = True
                    self.effects.persist_base(action)
                elif isinstance(action, ev.ApplyKernel):
                    if not self.effects.apply_kernel(action):
                        self._stop()
                elif isinstance(action, ev.BuildTable):
                    self.effects.build_table(action)
                else:
                    self.effects.transmit(action.data)
        finally:
            self._running = False
        return not self.stopped

    def _stop(self) -> None:
        self.stopped = True
        self.persisting = False
        self._queue.clear()

    # ---------------------------------------------------------------- queries

    @property
    def idle(self) -> bool:
        """Nothing waits: no write in progress, no action queued behind one."""
        return not self.persisting and not self._queue

    @property
    def left(self) -> bool:
        """The core left the cluster and everything it ordered was carried out."""
        return self.core.has_left and self.idle

    def wakeup(self, backlog: bool = False) -> Wakeup:
        """The next deadline: the core's timer or, unless the socket still holds a
        ``backlog``, the end of its quiet window (then the socket is not watched)."""
        deadline = self.core.get_timer()
        quiet = None if backlog else self.core.quiet_until()
        if quiet is not None:
            deadline = quiet if deadline is None else min(deadline, quiet)
        return Wakeup(deadline, quiet)
