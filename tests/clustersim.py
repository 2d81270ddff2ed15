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
lands while its node is hung is carried on from when it resumes.

Invariant S1 is checked whenever any node's kernel state changes (the only time
a node's accepting set can grow): no client may be accepted by two nodes at the
same instant. Two nodes that map clients to buckets alike (same buckets, seed
and source prefixes) are compared bucket by bucket; two that do not are compared
client by client over a fixed sample (``CLIENTS``: every address of
198.51.100.0/24 and 203.0.113.0/24 plus 128 IPv6 addresses of 2001:db8::/32),
each client mapped to a bucket the way each node's kernel does (``jhash``).
Nodes configured with disjoint VIP sets (``shared`` "vips") never share a client.
``Violation`` carries the seed so a failure can be replayed; ``Cluster.trail``
prints the event trail of the nodes involved.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from lbd.protocol import events as ev
from lbd.protocol.config import DEFAULT_TIMERS, FAST_TIMERS, CoreConfig, Timers
from lbd.protocol.driver import Datagram, Driver
from lbd.protocol.jhash import bucket_of
from lbd.protocol.membership import Node
from lbd.protocol.ownership import compute_owners
from lbd.protocol.wire import Codec, Keyring

KEY = bytes(range(32))
WRONG_KEY = bytes(range(100, 132))
"""A key file from another cluster (or a typo'd copy): a mistake, never rotated to."""


def _client_sample() -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    v4 = [ipaddress.ip_address(f"{net}.{host}")
          for net in ("198.51.100", "203.0.113") for host in range(256)]
    rng = random.Random(0x5151)
    v6 = [ipaddress.ip_address((0x20010DB8 << 96) | rng.getrandbits(96)) for _ in range(128)]
    return tuple(v4 + v6)


CLIENTS = _client_sample()
"""The clients S1 is checked for between nodes that map clients to buckets differently."""

Mapping = tuple[int, int, int, int]
"""How a node's kernel maps a client to a bucket: (buckets, seed, prefix4, prefix6)."""


def kernel_mapping(config: CoreConfig) -> Mapping:
    shared = dict(config.shared)
    return (config.buckets, config.seed, int(shared.get("prefix4") or 32),
            int(shared.get("prefix6") or 128))


@functools.lru_cache(maxsize=64)
def client_buckets(mapping: Mapping) -> np.ndarray:
    """The bucket of every sampled client under ``mapping`` (the kernel-exact jhash)."""
    buckets, seed, prefix4, prefix6 = mapping
    return np.array([bucket_of(a, buckets, seed, prefix4, prefix6) for a in CLIENTS],
                    dtype=np.int64)


def accepted_clients(mapping: Mapping, accepted: frozenset[int]) -> np.ndarray:
    """A mask over ``CLIENTS``: those a kernel accepting ``accepted`` buckets accepts."""
    owned = np.zeros(mapping[0], dtype=bool)
    owned[list(accepted)] = True
    mask: np.ndarray = owned[client_buckets(mapping)]
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
    """The operator's mistake its files hold ("" none), for the schedules to undo."""

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
    ) -> None:
        if not 0.0 <= persist_delay[0] <= persist_delay[1]:
            raise ValueError(f"persist_delay {persist_delay}: want 0 <= lo <= hi")
        self.seed = seed
        self.persist_delay = persist_delay
        """How long a base write takes (uniform in [lo, hi]); 0: it lands at once."""
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

    def add_node(self, name: str, weight: int = 100, *, config: CoreConfig | None = None,
                 keyring: Keyring | None = None, node_id: str | None = None,
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
        nonce_rng = random.Random(self.rng.getrandbits(64))
        node.nonce = nonce_rng.randbytes
        base_ids, epoch, previous = node.persisted_base  # what the daemon keeps in its state dir
        self.log.append((self.now, f"{name}: start, incarnation {node.incarnation}"
                         + ("" if node.node_id == name else f", node ID {node.node_id}")))
        node.core = Node(node.config, self._codec(node), node.node_id, node.incarnation,
                         node.local(self.now), weight=weight, base=base_ids, epoch=epoch,
                         previous_base=previous, base_params=node.persisted_params,
                         base_credentials=node.persisted_credentials)
        node.driver = Driver(node.core, _Effects(self, node))
        self._step(node)
        return node

    def next_incarnation(self, node_id: str) -> int:
        """Above any incarnation of ``node_id`` used so far, the ones a core took on
        its own included (after a clone of its ID, ``membership._step``)."""
        used = [n.core.incarnation for n in self.nodes.values()
                if n.node_id == node_id and n.core is not None]
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

    def _step(self, node: SimNode, batch: list[Datagram] | None = None,
              timer_due: float | None = None) -> None:
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
            if other is changed or (changed.vips and other.vips
                                    and not changed.vips & other.vips):
                continue  # no VIP in common: no client can reach both
            theirs = other.accepting(self.now)
            if other.mapping == changed.mapping:
                both = mine & theirs
                if both:
                    self._violated(f"{changed.name} and {other.name} both accept "
                                   f"{len(both)} buckets (e.g. {min(both)})")
            elif theirs:
                clients = np.flatnonzero(accepted_clients(changed.mapping, mine)
                                         & accepted_clients(other.mapping, theirs))
                if len(clients):
                    client = int(clients[0])
                    self._violated(
                        f"{changed.name} and {other.name} both accept {len(clients)} of the "
                        f"{len(CLIENTS)} sampled clients (e.g. {CLIENTS[client]}: bucket "
                        f"{client_buckets(changed.mapping)[client]} of {changed.mapping[0]} "
                        f"on {changed.name}, {client_buckets(other.mapping)[client]} of "
                        f"{other.mapping[0]} on {other.name})")

    def _violated(self, what: str) -> None:
        message = f"seed {self.seed}: S1 violated at t={self.now:.4f}: {what}"
        self.violations.append(message)
        raise Violation(message)

    # -------------------------------------------------------------- analysis

    def trail(self, names: list[str] | None = None, since: float = 0.0,
              limit: int = 400) -> str:
        """What happened to the nodes ``names`` (all by default) since ``since``: the
        operations done to them and their cores' events, oldest first."""
        wanted = set(self.nodes) if names is None else set(names)
        lines = [(t, what) for t, what in self.log
                 if t >= since and what.split(":", 1)[0] in wanted | {"net"}]
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
        return ({m.node_id for m in view} == {n.node_id for n in live}
                and len(live) == len({n.node_id for n in live}))

    def check_served_as_expected(self) -> None:
        """L1/L2 at rest: each bucket accepted by exactly its computed owner."""
        live = [n for n in self.live() if n.core is not None and not n.core.has_left]
        expected = self.expected_owners(live)
        mapping = kernel_mapping(self.config)
        for node in self.nodes.values():
            if node.mapping != mapping and node.accepting(self.now):
                raise Violation(f"seed {self.seed}: {node.name} serves with another "
                                f"mapping {node.mapping} than the cluster's {mapping}")
        served = self.served()
        for bucket in range(self.config.buckets):
            want = expected.get(bucket)
            got = [self.nodes[name].node_id for name in served[bucket]]
            if (want is None and got) or (want is not None and got != [want]):
                raise Violation(
                    f"seed {self.seed}: bucket {bucket} served by {got}, expected {want}"
                )


# ------------------------------------------------------------------ schedules

FAULTS = ("crash", "hang", "restart", "partition", "oneway", "loss", "join", "leave",
          "drain", "weight")
MISTAKES = ("mismatch", "wrong-key", "rotation", "botched-rotation", "clone")
"""Operators' mistakes (``mistakes=True``): a node (re)started with a parameter the
others do not share, or with a wrong key or cluster name, and later restarted with
the right one; a key rotation node by node in random order (three steps, or a
botched one that skips a step); a clone of a live node's ID, later removed."""
SHARED = (("vips", "192.0.2.100/32"),)
"""The daemon-level agreed values of the mistake schedules' clusters."""


@dataclass
class ScheduleResult:
    seed: int
    nodes: int
    faults: list[str]
    kernel_changes: int
    settle_time: float


def run_random_schedule(seed: int, timers: Timers, nodes: int | None = None,
                        faults: int | None = None, buckets: int = 128, *,
                        mistakes: bool = False,
                        persist_delay: tuple[float, float] = (0.0, 0.0)) -> ScheduleResult:
    """One seeded random fault schedule; raises Violation on any S1/L1/L2 failure.

    ``mistakes``: operators' mistakes join the faults (``MISTAKES``) and a third of
    the schedules start as a bootstrap race (see ``_start_race``); without it a
    seed runs exactly the schedule it always did. ``persist_delay``: a slow disk
    (see ``Cluster``)."""
    rng = random.Random(seed)
    n = nodes or rng.choice((2, 3, 3, 3, 4, 5, 7))
    if mistakes:
        cluster, t, applied = _mistaken_schedule(seed, timers, n, faults, buckets=buckets,
                                                  rng=rng, persist_delay=persist_delay)
    else:
        cluster = Cluster(seed, timers, buckets=buckets, persist_delay=persist_delay)
        interval = timers.interval
        names = [f"n{i:02d}" for i in range(n)]
        for name in names:
            cluster.at(rng.uniform(0, 3 * interval), functools.partial(cluster.add_node, name))
        t = timers.startup_wait + 10 * interval
        cluster.run_until(t)
        extra = itertools.count(n)
        applied = []
        for _ in range(faults if faults is not None else rng.randint(1, 4)):
            t += rng.uniform(0.5, 12) * interval
            kind = rng.choice(FAULTS)
            applied.append(kind)
            _schedule_fault(cluster, rng, kind, t, extra)
        t += 30 * interval
    return _heal_and_converge(cluster, rng, n, applied, t, mistakes=mistakes)


def _heal_and_converge(cluster: Cluster, rng: random.Random, n: int, applied: list[str],
                       t: float, *, mistakes: bool) -> ScheduleResult:
    seed, timers = cluster.seed, cluster.timers
    interval = timers.interval
    cluster.run_until(t)
    if mistakes:
        _heal_mistakes(cluster)
    _heal(cluster, rng, keep_one_down=not mistakes or _formed(cluster))
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
        if (live and len(live) < cluster.config.bootstrap_expect
                and not any(n.persisted_base[0] for n in cluster.nodes.values())):
            # A node left before the first view formed: fewer remain than the first
            # start waits for (bootstrap_expect), by design.
            return ScheduleResult(seed, n, applied, cluster.kernel_changes, -1.0)
        states = {n.name: (n.state, n.core.agreed if n.core else None,
                           len(n.core.view) if n.core else 0) for n in cluster.nodes.values()}
        raise Violation(f"seed {seed}: no convergence within {bound:.2f}s after healing "
                        f"(faults {applied}): {states}")
    # Converged views claim at once; give the last barrier its round trip (each
    # of its three legs may wait for a base write).
    cluster.run_until(cluster.now + 3 * (interval + cluster.persist_delay[1]))
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
            cluster.at(later, lambda: _restart(cluster, name))
        elif kind in ("partition", "oneway"):
            names = list(cluster.nodes)
            side = set(rng.sample(names, rng.randint(1, max(1, len(names) - 1))))
            pairs = {(a, b) for a in names for b in names
                     if a != b and (a in side) != (b in side)}
            if kind == "oneway":
                pairs = {(a, b) for a, b in pairs if a in side}
            cluster.blocked |= pairs
            cluster.log.append((cluster.now, f"net: {kind} {sorted(side)} until {later:.4f}"))
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


def _restart(cluster: Cluster, name: str) -> None:
    if cluster.nodes[name].state != "removed":  # a removed clone stays off
        cluster.add_node(name)


def _mark_left(cluster: Cluster, name: str) -> None:
    node = cluster.nodes[name]
    if node.core is not None and node.core.has_left and node.state == "up":
        node.state = "left"


def _heal(cluster: Cluster, rng: random.Random, *, keep_one_down: bool = True) -> None:
    """End of faults: network healed, hung nodes resumed, crashed nodes restarted
    (one of them may stay down when ``keep_one_down``)."""
    cluster.blocked.clear()
    cluster.loss = 0.0
    for node in list(cluster.nodes.values()):
        if node.state == "hung":
            cluster.resume(node.name)
        elif node.core is not None and node.core.has_left:
            node.state = "left"
    crashed = [n.name for n in cluster.nodes.values() if n.state == "crashed"]
    keep_down = (crashed[0] if keep_one_down and len(crashed) == 1
                 and len(cluster.nodes) >= 3 and rng.random() < 0.5 else None)
    for name in crashed:
        if name != keep_down:
            cluster.add_node(name)
    for node in cluster.nodes.values():
        if node.state == "up" and node.core is not None and node.core.draining \
                and not node.core.has_left and rng.random() < 0.5:
            cluster.act(node.name, lambda core, now: core.set_draining(False, now))


# ---------------------------------------------------------- mistake schedules


@dataclass
class _Plan:
    extra: itertools.count[int]
    rotation_end: float = 0.0


def _mistaken_schedule(seed: int, timers: Timers, n: int, faults: int | None, *,
                       buckets: int, rng: random.Random,
                       persist_delay: tuple[float, float]) -> tuple[Cluster, float, list[str]]:
    """Start (a third of the time as a bootstrap race), then faults and mistakes mixed;
    returns the cluster, when to heal, and what was applied."""
    interval = timers.interval
    race = rng.random() < 1 / 3
    expect = rng.choice((2, n)) if race else 1
    config = CoreConfig(buckets=buckets, shared=SHARED, bootstrap_expect=expect)
    cluster = Cluster(seed, timers, config=config, persist_delay=persist_delay)
    names = [f"n{i:02d}" for i in range(n)]
    applied: list[str] = []
    if race:
        applied.append(f"race(expect={expect})")
        t = _start_race(cluster, rng, names, expect, applied)
    else:
        for name in names:
            cluster.at(rng.uniform(0, 3 * interval), functools.partial(cluster.add_node, name))
        t = timers.startup_wait + 10 * interval
    plan = _Plan(itertools.count(n))
    end = t
    for _ in range(faults if faults is not None else rng.randint(1, 4)):
        t += rng.uniform(0.5, 12) * interval
        if rng.random() < 0.6:
            kind = rng.choice(MISTAKES)
            end = max(end, _schedule_mistake(cluster, rng, kind, t, plan))
        else:
            kind = rng.choice(FAULTS)
            _schedule_fault(cluster, rng, kind, t, plan.extra)
            end = max(end, t + 16 * interval
                      + (cluster.timers.leave_timeout if kind == "leave" else 0.0))
        applied.append(kind)
    return cluster, max(t, end) + 30 * interval, applied


def _start_race(cluster: Cluster, rng: random.Random, names: list[str], expect: int,
                applied: list[str]) -> float:
    """A fresh cluster (no persisted bases) started over three start-up waits, maybe
    with a partition among the first starters; returns when faults may begin.

    With ``bootstrap_expect`` at most half the nodes, two sides of a partition could
    each reach it and each form a first view: no first start can tell (the README
    asks for the initial cluster size; test_sim_mistakes shows the split). Such
    races are partitioned only so that one side can reach it, and their faults wait
    until the cluster has formed; the others' faults hit the race itself."""
    timers = cluster.timers
    n = len(names)
    starts = [rng.uniform(0, 3 * timers.startup_wait) for _ in names]
    for name, at in zip(names, starts, strict=True):
        cluster.at(at, functools.partial(cluster.add_node, name))
    ready = max(starts)
    safe = 2 * expect > n
    if rng.random() < 0.5:
        sizes = [k for k in range(1, n) if safe or min(k, n - k) < expect]
        side = set(rng.sample(names, rng.choice(sizes)))
        pairs = {(a, b) for a in names for b in names if a != b and (a in side) != (b in side)}
        if rng.random() < 0.3:
            pairs = {(a, b) for a, b in pairs if a in side}
        cluster.blocked |= pairs
        healed = rng.uniform(0.5, 4) * timers.startup_wait
        cluster.at(healed, lambda: cluster.blocked.difference_update(pairs))
        cluster.log.append((0.0, f"net: partition {sorted(side)} until {healed:.3f}"))
        applied.append(f"split{len(side)}/{n}")
        ready = max(ready, healed)
    if safe:
        return rng.uniform(0.2, 1.0) * ready + 5 * timers.interval
    return ready + timers.startup_wait + 10 * timers.interval


def _wrong_config(config: CoreConfig, rng: random.Random) -> tuple[CoreConfig, str]:
    """``config`` with one agreed parameter changed, and which."""
    what = rng.choice(("buckets", "seed", "timers", "vips", "prefix4"))
    if what == "buckets":
        wrong = replace(config, buckets=rng.choice(
            [b for b in (64, 100, 256) if b != config.buckets]))
    elif what == "seed":
        wrong = replace(config, seed=config.seed ^ rng.randrange(1, 2**32))
    elif what == "timers":
        wrong = config.with_timers(DEFAULT_TIMERS if config.timers == FAST_TIMERS
                                   else FAST_TIMERS)
    elif what == "vips":
        wrong = replace(config, shared=(("vips", "192.0.2.101/32"),))
    else:
        wrong = replace(config, shared=(*config.shared, ("prefix4", "24")))
    return wrong, what


def _schedule_mistake(cluster: Cluster, rng: random.Random, kind: str, t: float,
                      plan: _Plan) -> float:
    """Schedule one mistake at ``t``; returns when its last step is done."""
    interval = cluster.timers.interval
    undo_at = t + rng.uniform(5, 40) * interval
    if kind == "mismatch":
        config, what = _wrong_config(cluster.config, rng)
        return _mistaken_restart(cluster, rng, t, undo_at=undo_at, plan=plan, what=what,
                                 config=config)
    if kind == "wrong-key":
        if rng.random() < 0.75:
            return _mistaken_restart(cluster, rng, t, undo_at=undo_at, plan=plan, what="key",
                                     keyring=Keyring(WRONG_KEY))
        typo = replace(cluster.config, cluster=cluster.config.cluster + "-typo")
        return _mistaken_restart(cluster, rng, t, undo_at=undo_at, plan=plan, what="cluster",
                                 config=typo)
    if kind in ("rotation", "botched-rotation"):
        return _schedule_rotation(cluster, rng, t, plan, botched=kind == "botched-rotation")
    assert kind == "clone"
    copy_state = rng.random() < 0.5
    # A quarter of the clones start while the original cannot hear them: stopped
    # (SIGSTOP) or deaf (a one-way partition into it), for a while.
    blind = rng.choice(("stopped", "deaf", "", "", "", "", "", ""))
    blind_until = t + rng.uniform(0.5, 10) * interval

    def clone() -> None:
        name = _pick(cluster, rng)
        if name is None:
            return
        original = cluster.nodes[name]
        twin = f"{original.node_id}~{next(plan.extra)}"
        if blind == "stopped":
            cluster.hang(name)
            cluster.at(blind_until, lambda: cluster.resume(name))
        elif blind == "deaf":
            pairs = {(other, name) for other in [*cluster.nodes, twin] if other != name}
            cluster.blocked |= pairs
            cluster.log.append((cluster.now, f"net: {name} deaf until {blind_until:.4f}"))
            cluster.at(blind_until, lambda: cluster.blocked.difference_update(pairs))
        cluster.add_node(twin, node_id=original.node_id, config=original.config,
                         keyring=original.keyring,
                         base=original.persisted_base if copy_state else ((), 0, None))
        cluster.at(undo_at, lambda: cluster.remove(twin))

    cluster.at(t, clone)
    return max(undo_at, blind_until)


def _mistaken_restart(cluster: Cluster, rng: random.Random, t: float, *, undo_at: float,
                      plan: _Plan, what: str, config: CoreConfig | None = None,
                      keyring: Keyring | None = None) -> float:
    """A live node restarted (or, a third of the time, a new node started) with a
    wrong config or key file; at ``undo_at`` restarted with the right ones."""
    fresh = rng.random() < 1 / 3
    gap = rng.uniform(0, 3) * cluster.timers.interval

    def start_mistaken(name: str) -> None:
        node = cluster.nodes.get(name)
        if node is not None and node.state == "removed":
            return
        if _twin_mistake(cluster, name, config, keyring):
            # Two first starts with one same mistake admit each other and form a
            # cluster of their own (bootstrap_expect = 2): two mistakes, past S4's
            # "one mistaken node" (test_sim_mistakes shows it). One at a time here.
            cluster.log.append((cluster.now, f"{name}: {what} mistake skipped (a twin)"))
            return
        if node is not None:
            cluster.crash(name)
        node = cluster.add_node(name, config=config, keyring=keyring)
        node.mistaken = what
        cluster.at(undo_at, lambda: _undo_mistake(cluster, name))

    def mistake() -> None:
        if fresh:
            start_mistaken(f"n{next(plan.extra):02d}")
            return
        name = _pick(cluster, rng)
        if name is not None:
            cluster.crash(name)
            cluster.at(cluster.now + gap, lambda: start_mistaken(name))

    cluster.at(t, mistake)
    return undo_at + gap


def _twin_mistake(cluster: Cluster, name: str, config: CoreConfig | None,
                  keyring: Keyring | None) -> bool:
    """Whether starting ``name`` with these files would make it a second first start
    (no quorum base) sharing one mistake with a running first start."""
    node = cluster.nodes.get(name)
    if node is not None and node.persisted_base[0]:
        return False
    config = config or (node.config if node is not None else None) or cluster.config
    keyring = keyring or (node.keyring if node is not None else None) or cluster.keyring
    return any(other.name != name and other.mistaken and other.state in ("up", "hung")
               and not other.persisted_base[0] and other.config == config
               and other.keyring is not None and other.keyring.current == keyring.current
               for other in cluster.nodes.values())


def _undo_mistake(cluster: Cluster, name: str) -> None:
    """The operator fixes the node's files (all its mistakes: they may have piled up)
    and restarts it if it runs."""
    node = cluster.nodes[name]
    if not node.mistaken or node.state == "removed":
        return
    assert node.keyring is not None
    if WRONG_KEY in (node.keyring.current, node.keyring.previous):
        node.keyring = cluster.keyring
    node.mistaken = ""
    node.config = cluster.config
    cluster.log.append((cluster.now, f"{name}: files fixed"))
    if node.state in ("up", "hung"):
        cluster.crash(name)
        cluster.add_node(name)


def _schedule_rotation(cluster: Cluster, rng: random.Random, t: float, plan: _Plan, *,
                       botched: bool) -> float:
    """A key rotation: each step copied to the nodes one by one, in random order and
    at random moments within the step's window, the next step only once every node
    has the previous one. ``botched``: one step skipped (mostly the first: sealing
    with a key the peers do not accept yet). Never two rotations at once."""
    interval = cluster.timers.interval
    skip = (0 if rng.random() < 0.7 else 1) if botched else None
    steps = 2 if botched else 3
    windows = [rng.uniform(1, 12) * interval for _ in range(steps)]
    gaps = [rng.uniform(0, 5) * interval for _ in range(steps)]
    new = rng.randbytes(32)
    at = max(t, plan.rotation_end + interval)
    starts = []
    for window, gap in zip(windows, gaps, strict=True):
        starts.append(at)
        at += window + gap
    plan.rotation_end = at

    def begin() -> None:
        old = cluster.keyring.current
        rings = [Keyring(old, new), Keyring(new, old), Keyring(new)]
        if skip is not None:
            del rings[skip]
        for start, window, ring in zip(starts, windows, rings, strict=True):
            cluster.at(start, functools.partial(step, ring, window))

    def step(ring: Keyring, window: float) -> None:
        cluster.keyring = ring  # what a node installed from now on gets
        names = [n.name for n in cluster.nodes.values() if n.state != "removed"]
        rng.shuffle(names)
        for name in names:
            cluster.at(cluster.now + rng.uniform(0, window),
                       functools.partial(_rekey_file, cluster, name, ring))

    cluster.at(starts[0], begin)
    return at


def _rekey_file(cluster: Cluster, name: str, ring: Keyring) -> None:
    node = cluster.nodes[name]
    if node.state == "removed":
        return
    cluster.rekey(name, ring)  # a wrong key file is replaced too; a wrong config stays


def _formed(cluster: Cluster) -> bool:
    """Whether every node has a quorum base (the first view was agreed)."""
    return all(n.persisted_base[0] for n in cluster.nodes.values() if n.state != "removed")


def _heal_mistakes(cluster: Cluster) -> None:
    """End of mistakes: every node's files fixed, mistaken nodes restarted. (The
    original of a removed clone is left alone: it must come back by itself.)"""
    for node in list(cluster.nodes.values()):
        if node.mistaken:
            _undo_mistake(cluster, node.name)


def settle(cluster: Cluster, limit: float = 6.0) -> None:
    """Run until converged (bounded), plus one barrier round trip; then check L1/L2."""
    deadline = cluster.now + limit
    while cluster.now < deadline:
        cluster.run_until(cluster.now + cluster.timers.interval)
        if cluster.converged():
            cluster.run_until(cluster.now + 3 * (cluster.timers.interval
                                                 + cluster.persist_delay[1]))
            cluster.check_served_as_expected()
            return
    raise AssertionError(f"no convergence within {limit}s:\n{cluster.trail(limit=60)}")


def start(n: int, seed: int = 1, timers: Timers | None = None, *, buckets: int = 256,
          config: CoreConfig | None = None) -> Cluster:
    """``n`` nodes n0..n{n-1} started together and settled."""
    cluster = Cluster(seed, timers or FAST_TIMERS, buckets=buckets, config=config)
    for i in range(n):
        cluster.add_node(f"n{i}")
    settle(cluster)
    return cluster
