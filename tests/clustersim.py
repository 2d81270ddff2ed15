"""Deterministic cluster simulator: real protocol cores on a virtual clock and network.

N ``Node`` cores exchange real sealed datagrams through a simulated multicast
segment (per-datagram delay, loss, symmetric and one-way partitions) on a virtual
clock. Each node has its own clock rate (skew) and a model of its kernel: the
owned-bucket set and a lease that expires on the node's clock even while its
daemon is hung, and that vanishes when the daemon crashes (owner table).

Faults: crash, hang/resume (SIGSTOP/SIGCONT), restart (new incarnation), link
partitions, heartbeat loss, join, graceful leave, drain/undrain, weight change.

Invariant S1 is checked whenever any node's kernel state changes (the only time
a node's accepting set can grow): no bucket may be accepted by two nodes at the
same instant. ``Violation`` carries the seed so a failure can be replayed.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from lbd.protocol import events as ev
from lbd.protocol.config import CoreConfig, Timers
from lbd.protocol.membership import Node
from lbd.protocol.ownership import compute_owners
from lbd.protocol.wire import Codec, Keyring

KEY = bytes(range(32))


class Violation(AssertionError):
    pass


@dataclass
class SimNode:
    name: str
    rate: float
    offset: float
    core: Node | None = None
    state: str = "up"  # up | hung | crashed | left
    kernel_set: frozenset[int] = frozenset()
    lease_until_local: float | None = None
    inbox: list[tuple[bytes, str, float]] = field(default_factory=list)
    """Datagrams that arrived while hung, with their local arrival times."""
    queued: list[tuple[bytes, str, float]] = field(default_factory=list)
    """Datagrams left unread in a quiet window, with their local arrival times."""
    quiet_until_local: float | None = None
    wakeups: int = 0
    """Times the daemon would have woken: timer fires and datagrams read on arrival."""
    timer_version: int = 0
    incarnation: int = 0
    persisted_base: tuple[tuple[str, ...], int, tuple[str, ...] | None] = ((), 0, None)
    events: list[tuple[float, ev.Event]] = field(default_factory=list)

    def local(self, t: float) -> float:
        return self.offset + self.rate * t

    def real(self, local: float) -> float:
        return (local - self.offset) / self.rate

    def accepting(self, t: float) -> frozenset[int]:
        if self.state in ("crashed", "left") or self.lease_until_local is None:
            return frozenset()
        if self.local(t) >= self.lease_until_local:
            return frozenset()
        return self.kernel_set


class Cluster:
    def __init__(
        self,
        seed: int,
        timers: Timers,
        *,
        buckets: int = 256,
        delay: tuple[float, float] = (0.0001, 0.002),
        skew: float = 0.01,
        config: CoreConfig | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = (config or CoreConfig(buckets=buckets)).with_timers(timers).validate()
        self.timers = timers
        self.delay = delay
        self.skew = skew
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.counter = itertools.count()
        self.loss = 0.0
        self.blocked: set[tuple[str, str]] = set()
        self.violations: list[str] = []
        self.kernel_changes = 0
        self.on_kernel_change: Callable[[SimNode], None] | None = None

    # ------------------------------------------------------------- scheduling

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (t, next(self.counter), fn))

    def run_until(self, t_end: float, max_events: int = 2_000_000) -> None:
        for _ in range(max_events):
            if not self.queue or self.queue[0][0] > t_end:
                self.now = max(self.now, t_end)
                return
            t, _, fn = heapq.heappop(self.queue)
            self.now = t
            fn()
        raise Violation(f"seed {self.seed}: event budget exhausted before t={t_end}")

    # ------------------------------------------------------------------ nodes

    def add_node(self, name: str, weight: int = 100) -> SimNode:
        node = self.nodes.get(name)
        if node is None:
            rate = 1 + self.rng.uniform(-self.skew, self.skew)
            node = SimNode(name, rate, self.rng.uniform(0, 1000))
            self.nodes[name] = node
        node.incarnation += 1
        node.state = "up"
        node.kernel_set = frozenset()
        node.lease_until_local = None
        node.inbox.clear()
        node.queued.clear()
        node.quiet_until_local = None
        nonce_rng = random.Random(self.rng.getrandbits(64))
        codec = Codec(self.config.cluster, Keyring(KEY), nonce_source=nonce_rng.randbytes)
        base, epoch, previous = node.persisted_base  # what the daemon keeps in its state dir
        node.core = Node(self.config, codec, name, node.incarnation, node.local(self.now),
                         weight=weight, base=base, epoch=epoch, previous_base=previous)
        self._drain(node)
        return node

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        node.state = "crashed"
        node.kernel_set = frozenset()  # the owner table dies with the process
        node.lease_until_local = None
        node.timer_version += 1
        node.inbox.clear()
        node.queued.clear()

    def hang(self, name: str) -> None:
        node = self.nodes[name]
        if node.state == "up":
            node.state = "hung"
            node.timer_version += 1

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        if node.state != "hung":
            return
        node.state = "up"
        assert node.core is not None
        inbox = node.queued + node.inbox
        node.inbox, node.queued = [], []
        local = node.local(self.now)
        # A resumed loop may run its timer before or after it reads; what it reads
        # carries the arrival times (the daemon's kernel timestamps).
        if self.rng.random() < 0.5:
            node.core.handle_timer(local)
        node.core.receive_datagrams(inbox, local)
        self._drain(node)

    def act(self, name: str, action: Callable[[Node, float], None]) -> None:
        node = self.nodes[name]
        if node.state == "up" and node.core is not None:
            action(node.core, node.local(self.now))
            self._drain(node)

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.state in ("up", "hung")]

    # ----------------------------------------------------------------- engine

    def _drain(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        for action in core.actions():
            if isinstance(action, ev.ApplyKernel):
                node.kernel_set = action.owned
                node.lease_until_local = action.lease_until
                self.kernel_changes += 1
                self._check_s1(node)
                if self.on_kernel_change is not None:
                    self.on_kernel_change(node)
            else:
                self._multicast(node, action.data)
        for event in core.events():
            node.events.append((self.now, event))
            if isinstance(event, ev.BaseChanged):
                node.persisted_base = (event.base, event.epoch, event.previous)
        self._schedule_timer(node)

    def _schedule_timer(self, node: SimNode) -> None:
        assert node.core is not None
        node.timer_version += 1
        deadline = node.core.get_timer()
        # Like the daemon: while the core is quiet, arrivals wait in the socket and
        # are read (with their arrival times) at the next wake-up.
        quiet = node.core.quiet_until()
        node.quiet_until_local = quiet
        if quiet is not None:
            deadline = quiet if deadline is None else min(deadline, quiet)
        if deadline is None:
            return
        version = node.timer_version
        t = max(self.now, node.real(deadline))

        def fire() -> None:
            if node.timer_version == version and node.state == "up":
                assert node.core is not None
                node.wakeups += 1
                self._read_queued(node, timer_due=True)
                self._drain(node)

        self.at(t, fire)

    def _read_queued(self, node: SimNode, timer_due: bool = False) -> None:
        """What waited in the socket, then the timer if due (as the daemon reads)."""
        assert node.core is not None
        queued, node.queued = node.queued, []
        if queued or timer_due:
            # Arrival times as they are: the core counts one before its last step as
            # at that step.
            node.core.receive_datagrams(
                queued, node.local(self.now) if timer_due else None)

    def _multicast(self, sender: SimNode, data: bytes) -> None:
        for receiver in self.nodes.values():
            if receiver is sender or (sender.name, receiver.name) in self.blocked:
                continue
            if self.loss and self.rng.random() < self.loss:
                continue
            delay = self.rng.uniform(*self.delay)
            self.at(self.now + delay, self._deliverer(receiver, data, sender.name))

    def _deliverer(self, receiver: SimNode, data: bytes, source: str) -> Callable[[], None]:
        def deliver() -> None:
            if receiver.state == "hung":
                if len(receiver.inbox) < 256:  # a socket buffer is finite
                    receiver.inbox.append((data, source, receiver.local(self.now)))
            elif receiver.state == "up" and receiver.core is not None:
                local = receiver.local(self.now)
                quiet = receiver.quiet_until_local
                if quiet is not None and local < quiet:
                    if len(receiver.queued) < 256:  # a socket buffer is finite
                        receiver.queued.append((data, source, local))
                    return
                # Woken by this one: it is read with whatever still waited, in one
                # batch, as the daemon's read on arrival does.
                receiver.wakeups += 1
                receiver.queued.append((data, source, local))
                self._read_queued(receiver)
                self._drain(receiver)

        return deliver

    def _check_s1(self, changed: SimNode) -> None:
        mine = changed.accepting(self.now)
        if not mine:
            return
        for other in self.nodes.values():
            if other is changed:
                continue
            both = mine & other.accepting(self.now)
            if both:
                message = (
                    f"seed {self.seed}: S1 violated at t={self.now:.4f}: {changed.name} and "
                    f"{other.name} both accept {len(both)} buckets (e.g. {min(both)})"
                )
                self.violations.append(message)
                raise Violation(message)

    # -------------------------------------------------------------- analysis

    def served(self) -> dict[int, list[str]]:
        """Which nodes accept each bucket now."""
        out: dict[int, list[str]] = {b: [] for b in range(self.config.buckets)}
        for node in self.nodes.values():
            for bucket in node.accepting(self.now):
                out[bucket].append(node.name)
        return out

    def expected_owners(self, members: list[SimNode]) -> dict[int, str]:
        weights = []
        for node in members:
            assert node.core is not None
            weight = 0 if node.core.draining else node.core.weight
            weights.append((node.name, weight))
        names = sorted(name for name, _ in weights)
        owners = compute_owners(weights, self.config.buckets, self.config.seed)
        return {b: names[i] for b, i in enumerate(owners.tolist()) if i >= 0}

    def converged(self) -> bool:
        """Every live node agreed on one view whose members are exactly the live nodes."""
        live = [n for n in self.live() if n.core is not None and not n.core.has_left]
        if not live:
            return True
        views = set()
        for node in live:
            assert node.core is not None
            if node.state != "up" or not node.core.agreed:
                return False
            views.add(node.core.view)
        if len(views) != 1:
            return False
        (view,) = views
        return {m.node_id for m in view} == {n.name for n in live}

    def check_served_as_expected(self) -> None:
        """L1/L2 at rest: each bucket accepted by exactly its computed owner."""
        live = [n for n in self.live() if n.core is not None and not n.core.has_left]
        expected = self.expected_owners(live)
        served = self.served()
        for bucket in range(self.config.buckets):
            want = expected.get(bucket)
            got = served[bucket]
            if (want is None and got) or (want is not None and got != [want]):
                raise Violation(
                    f"seed {self.seed}: bucket {bucket} served by {got}, expected {want}"
                )


# ------------------------------------------------------------------ schedules

FAULTS = ("crash", "hang", "restart", "partition", "oneway", "loss", "join", "leave",
          "drain", "weight")


@dataclass
class ScheduleResult:
    seed: int
    nodes: int
    faults: list[str]
    kernel_changes: int
    settle_time: float


def run_random_schedule(seed: int, timers: Timers, nodes: int | None = None,
                        faults: int | None = None, buckets: int = 128) -> ScheduleResult:
    """One seeded random fault schedule; raises Violation on any S1/L1/L2 failure."""
    rng = random.Random(seed)
    n = nodes or rng.choice((2, 3, 3, 3, 4, 5, 7))
    cluster = Cluster(seed, timers, buckets=buckets)
    interval = timers.interval
    names = [f"n{i:02d}" for i in range(n)]
    for name in names:
        cluster.at(rng.uniform(0, 3 * interval), lambda name=name: cluster.add_node(name))
    t = timers.startup_wait + 10 * interval
    cluster.run_until(t)
    extra = itertools.count(n)
    applied: list[str] = []
    for _ in range(faults if faults is not None else rng.randint(1, 4)):
        t += rng.uniform(0.5, 12) * interval
        kind = rng.choice(FAULTS)
        applied.append(kind)
        _schedule_fault(cluster, rng, kind, t, extra)
    t += 30 * interval
    cluster.run_until(t)
    _heal(cluster, rng)
    start = cluster.now
    bound = timers.startup_wait + 4 * timers.dead_after + 20 * interval
    step = interval
    while cluster.now < start + bound:
        cluster.run_until(cluster.now + step)
        if cluster.converged():
            break
    else:
        live = [n for n in cluster.live() if n.core is not None and not n.core.has_left]
        if live and all(n.core is not None and not n.core.quorum_ok for n in live):
            # Too many nodes gone (crashed for good, or left while a peer was hung and
            # missed the agreement): the survivors cannot know they may serve. That
            # is unavailability by design (README, "Quorum"), never a safety issue.
            return ScheduleResult(seed, n, applied, cluster.kernel_changes, -1.0)
        states = {n.name: (n.state, n.core.agreed if n.core else None,
                           len(n.core.view) if n.core else 0) for n in cluster.nodes.values()}
        raise Violation(f"seed {seed}: no convergence within {bound:.2f}s after healing "
                        f"(faults {applied}): {states}")
    # Converged views claim at once; give the last barrier its round trip.
    cluster.run_until(cluster.now + 3 * interval)
    cluster.check_served_as_expected()
    return ScheduleResult(seed, n, applied, cluster.kernel_changes, cluster.now - start)


def _pick(cluster: Cluster, rng: random.Random) -> str | None:
    up = [n.name for n in cluster.nodes.values() if n.state == "up"]
    return rng.choice(up) if up else None


def _schedule_fault(cluster: Cluster, rng: random.Random, kind: str, t: float,
                    extra: itertools.count[int]) -> None:
    interval = cluster.timers.interval
    later = t + rng.uniform(1, 15) * interval

    def fault() -> None:
        name = _pick(cluster, rng)
        if name is None:
            return
        if kind == "crash":
            cluster.crash(name)
        elif kind == "hang":
            cluster.hang(name)
            cluster.at(later, lambda: cluster.resume(name))
        elif kind == "restart":
            cluster.crash(name)
            cluster.at(later, lambda: cluster.add_node(name))
        elif kind in ("partition", "oneway"):
            names = list(cluster.nodes)
            side = set(rng.sample(names, rng.randint(1, max(1, len(names) - 1))))
            pairs = {(a, b) for a in names for b in names
                     if a != b and (a in side) != (b in side)}
            if kind == "oneway":
                pairs = {(a, b) for a, b in pairs if a in side}
            cluster.blocked |= pairs
            cluster.at(later, lambda: cluster.blocked.difference_update(pairs))
        elif kind == "loss":
            cluster.loss = rng.uniform(0.0, 0.3)
            cluster.at(later, lambda: setattr(cluster, "loss", 0.0))
        elif kind == "join":
            cluster.add_node(f"n{next(extra):02d}")
        elif kind == "leave":
            cluster.act(name, lambda core, now: core.leave(now))
            cluster.at(later + cluster.timers.leave_timeout, lambda: _mark_left(cluster, name))
        elif kind == "drain":
            cluster.act(name, lambda core, now: core.set_draining(True, now))
            cluster.at(later, lambda: cluster.act(
                name, lambda core, now: core.set_draining(False, now)))
        elif kind == "weight":
            weight = rng.choice((50, 100, 200))
            cluster.act(name, lambda core, now: core.set_weight(weight, now))

    cluster.at(t, fault)


def _mark_left(cluster: Cluster, name: str) -> None:
    node = cluster.nodes[name]
    if node.core is not None and node.core.has_left and node.state == "up":
        node.state = "left"


def _heal(cluster: Cluster, rng: random.Random) -> None:
    """End of faults: network healed, hung nodes resumed, crashed nodes restarted."""
    cluster.blocked.clear()
    cluster.loss = 0.0
    for node in list(cluster.nodes.values()):
        if node.state == "hung":
            cluster.resume(node.name)
        elif node.core is not None and node.core.has_left:
            node.state = "left"
    crashed = [n.name for n in cluster.nodes.values() if n.state == "crashed"]
    keep_down = (crashed[0] if len(crashed) == 1 and len(cluster.nodes) >= 3
                 and rng.random() < 0.5 else None)
    for name in crashed:
        if name != keep_down:
            cluster.add_node(name)
    for node in cluster.nodes.values():
        if node.state == "up" and node.core is not None and node.core.draining \
                and not node.core.has_left and rng.random() < 0.5:
            cluster.act(node.name, lambda core, now: core.set_draining(False, now))
