"""Deterministic cluster simulator: real protocol cores on a virtual clock and network.

N ``Node`` cores exchange real sealed datagrams through a simulated multicast
segment (per-datagram delay, loss, symmetric and one-way partitions) on a virtual
clock. Each node has its own clock rate (skew) and a model of its kernel: the
owned-bucket set and a lease that expires on the node's clock even while its
daemon is hung, and that vanishes when the daemon crashes (owner table).

Faults: crash, hang/resume (SIGSTOP/SIGCONT), restart (new incarnation), link
partitions, heartbeat loss, join, graceful leave, drain/undrain, weight change.

Mistakes (S4): each node may run its own ``CoreConfig`` (other buckets, seed,
timers, shared daemon values) and its own ``Keyring``, both kept like the files
they model (a restart keeps them unless told otherwise); ``rekey`` reloads a
node's key file at run time (the three-step rotation, or a botched one); a node
added with another node's ``node_id`` is a clone of it (an image copied with its
machine-id), speaking from its own address.

Each node's core is driven by ``protocol/driver.py``, the daemon's own driver, so
that what is proved here is the order the daemon carries out; only the effects
are simulated. ``persist_delay`` models a slow disk: a node's base write lands
after a random delay and every later action of that node waits for it (default
0: at once). A write still in progress when its node crashes is lost; one that
lands while its node is hung is carried on from when it resumes. ``table_delay``
models the daemon's ownership builds in a thread: cores are made with
``defer_tables`` and each asked-for table comes back after a random delay (default
0: the core builds its tables itself, in the step).

Invariant S1 is checked whenever any node's kernel state changes (the only time
a node's accepting set can grow): no client may be accepted by two nodes at the
same instant. Two nodes that map clients to buckets alike (same buckets, seed
and source prefixes) are compared bucket by bucket; two that do not are compared
client by client over a fixed sample (``CLIENTS``: every address of
198.51.100.0/24 and 203.0.113.0/24 plus 128 IPv6 addresses of 2001:db8::/32),
each client mapped to a bucket the way each node's kernel does (``jhash``).
Nodes configured with disjoint VIP sets (``shared`` "vips") never share a client.
``Violation`` carries the seed so a failure can be replayed; ``Cluster.trail``
prints the event trail of the nodes involved. ``start`` and ``settle`` are the
tests' way in; the random fault schedules are in ``simschedules.py``.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from lbd.protocol import events as ev
from lbd.protocol.config import FAST_TIMERS, CoreConfig, Timers
from lbd.protocol.driver import Datagram, Driver
from lbd.protocol.jhash import bucket_of
from lbd.protocol.membership import Node
from lbd.protocol.ownership import compute_owners
from lbd.protocol.wire import Codec, Keyring

KEY = bytes(range(32))
WRONG_KEY = bytes(range(100, 132))
"""A key file from another cluster (or a typo'd copy): a mistake, never rotated to."""


def _client_sample() -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    v4 = [
        ipaddress.ip_address(f"{net}.{host}")
        for net in ("198.51.100", "203.0.113")
        for host in range(256)
    ]
    rng = random.Random(0x5151)
    v6 = [ipaddress.ip_address((0x20010DB8 << 96) | rng.getrandbits(96)) for _ in range(128)]
    return tuple(v4 + v6)


CLIENTS = _client_sample()
"""The clients S1 is checked for between nodes that map clients to buckets differently."""

Mapping = tuple[int, int, int, int]
"""How a node's kernel maps a client to a bucket: (buckets, seed, prefix4, prefix6)."""


def kernel_mapping(config: CoreConfig) -> Mapping:
    shared = dict(config.shared)
    return (
        config.buckets,
        config.seed,
        int(shared.get("prefix4") or 32),
        int(shared.get("prefix6") or 128),
    )


@functools.lru_cache(maxsize=64)
def client_buckets(mapping: Mapping) -> NDArray[np.int64]:
    """The bucket of every sampled client under ``mapping`` (the kernel-exact jhash)."""
    buckets, seed, prefix4, prefix6 = mapping
    return np.array(
        [bucket_of(a, buckets, seed, prefix4, prefix6) for a in CLIENTS], dtype=np.int64
    )


def accepted_clients(mapping: Mapping, accepted: frozenset[int]) -> NDArray[np.bool_]:
    """A mask over ``CLIENTS``: those a kernel accepting ``accepted`` buckets accepts."""
    owned = np.zeros(mapping[0], dtype=bool)
    owned[list(accepted)] = True
    mask: NDArray[np.bool_] = owned[client_buckets(mapping)]
    return mask


def same_keyring(a: Keyring, b: Keyring) -> bool:
    return (a.current, a.previous) == (b.current, b.previous)


def _ring_text(keyring: Keyring) -> str:
    previous = keyring.previous_fingerprint
    return keyring.current_fingerprint.hex() + ("" if previous is None else f"+{previous.hex()}")


class Violation(AssertionError):
    pass


@dataclass
class SimNode:
    name: str
    """The simulator's handle and the node's address (a clone has its own)."""
    rate: float
    offset: float
    core: Node | None = None
    driver: Driver | None = None
    """Its core's driver (a new one per start, like the daemon's)."""
    write_landed: bool = False
    """A base write landed while the node was hung: its driver hears so on resume."""
    tables_landed: list[ev.BuildTable] = field(default_factory=list)
    """Tables built while the node was hung: its driver gets them on resume."""
    state: str = "up"  # up | hung | crashed | left | removed
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
    persisted_params: bytes | None = None
    """The parameter digests the persisted base was agreed under."""
    persisted_credentials: bytes | None = None
    events: list[tuple[float, ev.Event]] = field(default_factory=list)
    node_id: str = ""
    """The ID its core speaks with (its name, unless it is a clone)."""
    config: CoreConfig | None = None
    """Its config file: kept across restarts unless ``add_node`` is given another."""
    keyring: Keyring | None = None
    """Its key file: kept across restarts, reloaded at run time by ``Cluster.rekey``."""
    mapping: Mapping = (0, 0, 0, 0)
    """How its kernel maps clients to buckets (from its running core's config)."""
    vips: frozenset[str] = frozenset()
    """The VIPs its kernel serves (empty: not configured, counts as every VIP)."""
    nonce: Callable[[int], bytes] | None = None
    mistaken: str = ""
    """The operator's mistake its files hold ("" none), for the schedules to undo
    (simschedules.py)."""

    def local(self, t: float) -> float:
        return self.offset + self.rate * t

    def real(self, local: float) -> float:
        return (local - self.offset) / self.rate

    def accepting(self, t: float) -> frozenset[int]:
        if self.state in ("crashed", "left", "removed") or self.lease_until_local is None:
            return frozenset()
        if self.local(t) >= self.lease_until_local:
            return frozenset()
        return self.kernel_set


class _Effects:
    """A simulated node's shell as its driver sees it: a trail, a disk, a kernel
    and the segment (``protocol.driver.Effects``)."""

    def __init__(self, cluster: Cluster, node: SimNode) -> None:
        self.cluster = cluster
        self.node = node

    def record(self, events: list[ev.Event]) -> None:
        now = self.cluster.now
        self.node.events.extend((now, event) for event in events)

    def persist_base(self, action: ev.PersistBase) -> None:
        assert self.node.driver is not None
        self.cluster._persist(self.node, self.node.driver, action)

    def apply_kernel(self, action: ev.ApplyKernel) -> bool:
        self.cluster._apply(self.node, action)
        return True  # a simulated kernel never refuses

    def build_table(self, action: ev.BuildTable) -> None:
        assert self.node.driver is not None
        self.cluster._build_table(self.node, self.node.driver, action)

    def transmit(self, data: bytes) -> None:
        self.cluster._multicast(self.node, data)


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
        persist_delay: tuple[float, float] = (0.0, 0.0),
        table_delay: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        for what, bounds in (("persist_delay", persist_delay), ("table_delay", table_delay)):
            if not 0.0 <= bounds[0] <= bounds[1]:
                raise ValueError(f"{what} {bounds}: want 0 <= lo <= hi")
        self.seed = seed
        self.persist_delay = persist_delay
        """How long a base write takes (uniform in [lo, hi]); 0: it lands at once."""
        self.table_delay = table_delay
        """How long an ownership table takes to build (uniform in [lo, hi]); 0: the
        cores build their own, in the step."""
        self.rng = random.Random(seed)
        self.config = (config or CoreConfig(buckets=buckets)).with_timers(timers).validate()
        self.timers = timers
        self.delay = delay
        self.skew = skew
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.queue: list[tuple[float, int, Callable[[], object]]] = []
        self.counter = itertools.count()
        self.loss = 0.0
        self.blocked: set[tuple[str, str]] = set()
        self.violations: list[str] = []
        self.kernel_changes = 0
        self.on_kernel_change: Callable[[SimNode], None] | None = None
        self.keyring = Keyring(KEY)
        """The cluster's key file as the operator distributes it (to new nodes)."""
        self.incarnations: dict[str, int] = {}
        """Last incarnation given per node ID: a later start gets a larger one, like
        the daemon's (max(stored + 1, milliseconds since the epoch))."""
        self.log: list[tuple[float, str]] = []
        """What was done to the cluster (starts, crashes, partitions, rekeys), for trails."""

    # ------------------------------------------------------------- scheduling

    def at(self, t: float, fn: Callable[[], object]) -> None:
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

    def add_node(
        self,
        name: str,
        weight: int = 100,
        *,
        config: CoreConfig | None = None,
        keyring: Keyring | None = None,
        node_id: str | None = None,
        base: tuple[tuple[str, ...], int, tuple[str, ...] | None] | None = None,
    ) -> SimNode:
        """Start (or restart) a node. ``config``/``keyring`` replace its files (by
        default a new node gets the cluster's); ``node_id`` another node's ID makes
        a clone; ``base`` replaces its persisted quorum base (a copied state dir)."""
        node = self.nodes.get(name)
        if node is None:
            rate = 1 + self.rng.uniform(-self.skew, self.skew)
            node = SimNode(name, rate, self.rng.uniform(0, 1000))
            self.nodes[name] = node
        if node_id is not None or not node.node_id:
            node.node_id = node_id or name
        if config is not None or node.config is None:
            node.config = (config or self.config).validate()
        if keyring is not None or node.keyring is None:
            node.keyring = keyring or self.keyring
        if base is not None:
            node.persisted_base = base
        node.incarnation = self.next_incarnation(node.node_id)
        node.mapping = kernel_mapping(node.config)
        node.vips = frozenset(v for v in dict(node.config.shared).get("vips", "").split(",") if v)
        node.state = "up"
        node.kernel_set = frozenset()
        node.lease_until_local = None
        node.inbox.clear()
        node.queued.clear()
        node.quiet_until_local = None
        node.write_landed = False
        node.tables_landed.clear()
        nonce_rng = random.Random(self.rng.getrandbits(64))
        node.nonce = nonce_rng.randbytes
        base_ids, epoch, previous = node.persisted_base  # what the daemon keeps in its state dir
        self.log.append(
            (
                self.now,
                f"{name}: start, incarnation {node.incarnation}"
                + ("" if node.node_id == name else f", node ID {node.node_id}"),
            )
        )
        node.core = Node(
            node.config,
            self._codec(node),
            node.node_id,
            node.incarnation,
            node.local(self.now),
            weight=weight,
            base=base_ids,
            epoch=epoch,
            previous_base=previous,
            base_params=node.persisted_params,
            base_credentials=node.persisted_credentials,
            defer_tables=self.table_delay[1] > 0,
        )
        node.driver = Driver(node.core, _Effects(self, node))
        self._step(node)
        return node

    def next_incarnation(self, node_id: str) -> int:
        """Above any incarnation of ``node_id`` used so far, the ones a core took on
        its own included (after a clone of its ID, ``membership._step``)."""
        used = [
            n.core.incarnation
            for n in self.nodes.values()
            if n.node_id == node_id and n.core is not None
        ]
        incarnation = max([self.incarnations.get(node_id, 0), *used]) + 1
        self.incarnations[node_id] = incarnation
        return incarnation

    def _codec(self, node: SimNode) -> Codec:
        assert node.config is not None and node.keyring is not None
        assert node.nonce is not None
        return Codec(node.config.cluster, node.keyring, nonce_source=node.nonce)

    def rekey(self, name: str, keyring: Keyring) -> None:
        """The node's key file is replaced and (if it runs) reloaded: SIGHUP."""
        node = self.nodes[name]
        node.keyring = keyring
        self.log.append((self.now, f"{name}: rekey to {_ring_text(keyring)}"))
        if node.core is not None and node.state in ("up", "hung"):
            node.core.set_codec(self._codec(node))

    def remove(self, name: str) -> None:
        """The node is stopped for good (a clone switched off): never restarted."""
        self.crash(name)
        self.nodes[name].state = "removed"

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        if node.state != "crashed":
            self.log.append((self.now, f"{name}: crash"))
        node.state = "crashed"
        node.kernel_set = frozenset()  # the owner table dies with the process
        node.lease_until_local = None
        node.timer_version += 1
        node.inbox.clear()
        node.queued.clear()

    def hang(self, name: str) -> None:
        node = self.nodes[name]
        if node.state == "up":
            self.log.append((self.now, f"{name}: hang"))
            node.state = "hung"
            node.timer_version += 1

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        if node.state != "hung":
            return
        node.state = "up"
        self.log.append((self.now, f"{name}: resume"))
        assert node.core is not None and node.driver is not None
        if node.write_landed:  # what waited for the write goes first
            node.write_landed = False
            node.driver.persisted(True)
        for action in node.tables_landed:
            self._hand_table(node, node.driver, action)
        node.tables_landed.clear()
        inbox = node.queued + node.inbox
        node.inbox, node.queued = [], []
        local = node.local(self.now)
        # A resumed loop may run its timer before or after it reads; what it reads
        # carries the arrival times (the daemon's kernel timestamps).
        if self.rng.random() < 0.5:
            node.core.handle_timer(local)
        self._step(node, inbox, local)

    def act(self, name: str, action: Callable[[Node, float], None]) -> None:
        node = self.nodes[name]
        if node.state == "up" and node.core is not None:
            action(node.core, node.local(self.now))
            self._step(node)

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.state in ("up", "hung")]

    # ----------------------------------------------------------------- engine

    def _step(
        self, node: SimNode, batch: list[Datagram] | None = None, timer_due: float | None = None
    ) -> None:
        """One input to the node's driver (what its socket held and/or its timer,
        or nothing after a direct core call), then its next wake-up."""
        assert node.driver is not None
        node.driver.feed(batch or [], timer_due)
        self._schedule_timer(node)

    def _apply(self, node: SimNode, action: ev.ApplyKernel) -> None:
        node.kernel_set = action.owned
        node.lease_until_local = action.lease_until
        self.kernel_changes += 1
        self._check_s1(node)
        if self.on_kernel_change is not None:
            self.on_kernel_change(node)

    def _persist(self, node: SimNode, driver: Driver, action: ev.PersistBase) -> None:
        """What the daemon keeps in its state dir, now or after ``persist_delay``."""

        def land() -> None:
            node.persisted_base = (action.base, action.epoch, action.previous)
            node.persisted_params = action.params
            node.persisted_credentials = action.credentials

        lo, hi = self.persist_delay
        if not hi:
            land()
            driver.persisted(True)
            return

        def landed() -> None:
            if node.driver is not driver or node.state in ("crashed", "removed"):
                return  # the process died before its write was done: the old base stays
            land()
            if node.state == "hung":
                node.write_landed = True  # the loop hears of it once resumed
            else:  # up, or left and finishing what waited (the daemon waits for it)
                driver.persisted(True)

        self.at(self.now + self.rng.uniform(lo, hi), landed)

    def _build_table(self, node: SimNode, driver: Driver, action: ev.BuildTable) -> None:
        """The daemon's build in a thread: the table comes back after ``table_delay``
        (lost if the process died first; held while it is hung)."""

        def built() -> None:
            if node.driver is not driver or node.state in ("crashed", "removed", "left"):
                return
            if node.state == "hung":
                node.tables_landed.append(action)
            else:
                self._hand_table(node, driver, action)
                self._schedule_timer(node)

        self.at(self.now + self.rng.uniform(*self.table_delay), built)

    def _hand_table(self, node: SimNode, driver: Driver, action: ev.BuildTable) -> None:
        owners = compute_owners(action.weights, action.buckets, action.seed)
        driver.table_built(action.weights, owners, node.local(self.now))

    def _schedule_timer(self, node: SimNode) -> None:
        assert node.driver is not None
        node.timer_version += 1
        # The driver's answer, as the daemon's: while the core is quiet, arrivals
        # wait in the socket and are read (with their arrival times) at the next
        # wake-up. The simulated socket is read whole: it never keeps a backlog.
        wake = node.driver.wakeup()
        node.quiet_until_local = wake.quiet_until
        if wake.deadline is None:
            return
        version = node.timer_version
        t = max(self.now, node.real(wake.deadline))

        def fire() -> None:
            if node.timer_version == version and node.state == "up":
                node.wakeups += 1
                self._step(node, self._take_queued(node), node.local(self.now))

        self.at(t, fire)

    @staticmethod
    def _take_queued(node: SimNode) -> list[Datagram]:
        """What waited in the socket (with arrival times as they are: the core
        counts one before its last step as at that step)."""
        queued, node.queued = node.queued, []
        return queued

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
                self._step(receiver, self._take_queued(receiver))

        return deliver

    def _check_s1(self, changed: SimNode) -> None:
        mine = changed.accepting(self.now)
        if not mine:
            return
        for other in self.nodes.values():
            if other is changed or (changed.vips and other.vips and not changed.vips & other.vips):
                continue  # no VIP in common: no client can reach both
            theirs = other.accepting(self.now)
            if other.mapping == changed.mapping:
                both = mine & theirs
                if both:
                    self._violated(
                        f"{changed.name} and {other.name} both accept "
                        f"{len(both)} buckets (e.g. {min(both)})"
                    )
            elif theirs:
                clients = np.flatnonzero(
                    accepted_clients(changed.mapping, mine)
                    & accepted_clients(other.mapping, theirs)
                )
                if len(clients):
                    client = int(clients[0])
                    self._violated(
                        f"{changed.name} and {other.name} both accept {len(clients)} of the "
                        f"{len(CLIENTS)} sampled clients (e.g. {CLIENTS[client]}: bucket "
                        f"{client_buckets(changed.mapping)[client]} of {changed.mapping[0]} "
                        f"on {changed.name}, {client_buckets(other.mapping)[client]} of "
                        f"{other.mapping[0]} on {other.name})"
                    )

    def _violated(self, what: str) -> None:
        message = f"seed {self.seed}: S1 violated at t={self.now:.4f}: {what}"
        self.violations.append(message)
        raise Violation(message)

    # -------------------------------------------------------------- analysis

    def trail(self, names: list[str] | None = None, since: float = 0.0, limit: int = 400) -> str:
        """What happened to the nodes ``names`` (all by default) since ``since``: the
        operations done to them and their cores' events, oldest first."""
        wanted = set(self.nodes) if names is None else set(names)
        lines = [
            (t, what)
            for t, what in self.log
            if t >= since and what.split(":", 1)[0] in wanted | {"net"}
        ]
        for node in self.nodes.values():
            if node.name in wanted:
                lines.extend((t, f"{node.name}: {e}") for t, e in node.events if t >= since)
        lines.sort(key=lambda line: line[0])
        return "\n".join(f"{t:9.4f} {text}" for t, text in lines[-limit:])

    def served(self) -> dict[int, list[str]]:
        """Which nodes accept each bucket now (those that map clients as the cluster's
        config does; see ``served_clients`` for all)."""
        out: dict[int, list[str]] = {b: [] for b in range(self.config.buckets)}
        mapping = kernel_mapping(self.config)
        for node in self.nodes.values():
            if node.mapping != mapping:
                continue
            for bucket in node.accepting(self.now):
                out[bucket].append(node.name)
        return out

    def served_clients(self) -> list[list[str]]:
        """Which nodes accept each sampled client now, each by its own mapping."""
        out: list[list[str]] = [[] for _ in CLIENTS]
        for node in self.nodes.values():
            accepted = node.accepting(self.now)
            if accepted:
                for client in np.flatnonzero(accepted_clients(node.mapping, accepted)):
                    out[int(client)].append(node.name)
        return out

    def expected_owners(self, members: list[SimNode]) -> dict[int, str]:
        weights = []
        for node in members:
            assert node.core is not None
            weight = 0 if node.core.draining else node.core.weight
            weights.append((node.node_id, weight))
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
        return {m.node_id for m in view} == {n.node_id for n in live} and len(live) == len(
            {n.node_id for n in live}
        )

    def check_served_as_expected(self) -> None:
        """L1/L2 at rest: each bucket accepted by exactly its computed owner."""
        live = [n for n in self.live() if n.core is not None and not n.core.has_left]
        expected = self.expected_owners(live)
        mapping = kernel_mapping(self.config)
        for node in self.nodes.values():
            if node.mapping != mapping and node.accepting(self.now):
                raise Violation(
                    f"seed {self.seed}: {node.name} serves with another "
                    f"mapping {node.mapping} than the cluster's {mapping}"
                )
        served = self.served()
        for bucket in range(self.config.buckets):
            want = expected.get(bucket)
            got = [self.nodes[name].node_id for name in served[bucket]]
            if (want is None and got) or (want is not None and got != [want]):
                raise Violation(
                    f"seed {self.seed}: bucket {bucket} served by {got}, expected {want}"
                )


def settle(cluster: Cluster, limit: float = 6.0) -> None:
    """Run until converged (bounded), plus one barrier round trip; then check L1/L2."""
    deadline = cluster.now + limit
    while cluster.now < deadline:
        cluster.run_until(cluster.now + cluster.timers.interval)
        if cluster.converged():
            cluster.run_until(
                cluster.now
                + 3 * (cluster.timers.interval + cluster.persist_delay[1] + cluster.table_delay[1])
            )
            cluster.check_served_as_expected()
            return
    raise AssertionError(f"no convergence within {limit}s:\n{cluster.trail(limit=60)}")


def start(
    n: int,
    seed: int = 1,
    timers: Timers | None = None,
    *,
    buckets: int = 256,
    config: CoreConfig | None = None,
) -> Cluster:
    """``n`` nodes n0..n{n-1} started together and settled."""
    cluster = Cluster(seed, timers or FAST_TIMERS, buckets=buckets, config=config)
    for i in range(n):
        cluster.add_node(f"n{i}")
    settle(cluster)
    return cluster
