"""The state one node keeps, and every question asked of it (sans-I/O).

``NodeState`` holds what ``membership.Node`` (the transitions: inputs, steps,
outputs) reads and writes, and answers the queries: the timer, quiet reading,
the current view, holdings and lease, ownership, the ``lbd-cli members`` rows,
and the derived facts the steps need (the bases a decision needs a quorum of,
the lease a quorum currently supports, whether the barrier is complete). The
theory of operation is in ``membership.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lbd.protocol import events as ev
from lbd.protocol import pacing
from lbd.protocol.admission import Gate
from lbd.protocol.config import CoreConfig, QuorumMode
from lbd.protocol.messages import Member, health_words
from lbd.protocol.ownership import MemberWeights, Owners, compute_owners, weights_of
from lbd.protocol.params import digest_params
from lbd.protocol.peers import Peer, PeerState
from lbd.protocol.quorum import lease_deadline
from lbd.protocol.replay import ReplayGuard
from lbd.protocol.report import MemberInfo, member_rows, view_digest
from lbd.protocol.wire import Codec

TIMER_SLACK = 1e-6
"""Seconds added to every deadline handed to the caller's timer."""

TABLES_KEPT = 4
"""Ownership tables a node keeps (the newest views'), each ``buckets`` × 2 bytes."""


@dataclass(slots=True)
class Counters:
    accepted: int = 0
    malformed: int = 0
    forged: int = 0
    replayed: int = 0
    own_echo: int = 0
    sent: int = 0
    view_changes: int = 0
    mismatched: int = 0
    foreign_version: int = 0
    refused: int = 0
    copies: int = 0
    second_process: int = 0
    """Datagrams of a second process with a member's ID (another address)."""
    """The newest heartbeat of a peer once more (multicast plus unicast ``peers``)."""


class NodeState:
    """Fields and queries of one node; ``membership.Node`` adds the transitions."""

    def __init__(
        self,
        config: CoreConfig,
        codec: Codec,
        node_id: str,
        incarnation: int,
        now: float,
        *,
        weight: int = 100,
        draining: bool = False,
        base: Iterable[str] = (),
        epoch: int = 0,
        previous_base: Iterable[str] | None = None,
        name: str = "",
        base_params: bytes | None = None,
        base_credentials: bytes | None = None,
        defer_tables: bool = False,
    ) -> None:
        """``base``/``epoch``/``previous_base``: the quorum base persisted by the previous
        run (from ``BaseChanged``): a restarted node must not start a cluster of its own
        while the cluster it belonged to may be alive but unheard (hung, partitioned),
        nor forget that a base change was still unconfirmed."""
        self.config = config.validate()
        self.timers = config.timers
        self.node_id = node_id
        self.name = name
        """For people: ``node_id`` is then ``messages.wire_id(name)`` (the daemon's way)."""
        self.incarnation = incarnation
        self.weight = weight
        self.draining = draining
        self.health = 0
        """Why this node is unhealthy (``messages.HEALTH_*``), as its heartbeats say."""
        self.counters = Counters()
        self._clashing = False
        self._codec = codec
        self._replay = ReplayGuard()
        self._peers: dict[str, Peer] = {}
        self._seq = 0
        self._sent_at: dict[int, float] = {}
        self._started = now
        self._last_step = now
        self._self_cached: Member | None = None
        self._view: tuple[Member, ...] = (self._self_member(),)
        self._view_seen_equal: tuple[Member, ...] | None = None
        self._listing: tuple[tuple[Member, ...] | None, int | None, int | None] = (None, None, None)
        self._digest: tuple[tuple[Member, ...] | None, str] = (None, "")
        self._sorted_base_of: tuple[frozenset[str] | None, tuple[str, ...]] = (None, ())
        self._barrier_seq = 1
        self._agreed = False
        self._base: frozenset[str] = frozenset(base)
        self._epoch = epoch
        self._prev_base: frozenset[str] | None = frozenset(previous_base) if previous_base else None
        self._adopted_base = False
        # The parameter digests the base was agreed under (None: unknown, an older
        # record). Restarted with other parameters, this node may be the one mistaken
        # node: it must not win an exact-half quorum on that base (quorum.py).
        self._base_params = base_params
        self._base_credentials = base_credentials
        self._credentials: tuple[Codec | None, bytes] = (None, b"")
        # The bases advertised since the base changed from _lineage_of, whose epoch
        # was _prev_epoch (unknown for a previous base restored from disk).
        self._prev_epoch: int | None = None
        self._lineage_of: frozenset[str] | None = None
        self._lineage: set[tuple[str, ...]] = set()
        self._heard_peer = False
        self._reported_base = (self._epoch, self._base, self._prev_base)
        self._held: frozenset[int] = frozenset()
        self._applied: tuple[frozenset[int], float | None] = (frozenset(), None)
        self._quorum_ok = True
        self._next_heartbeat = now
        self._last_sent = -1e18
        self._prompt_at: float | None = None
        self._leaving_since: float | None = None
        self._left = False
        self.defer_tables = defer_tables
        """Ownership tables come from the shell (``BuildTable``/``table_built``), not
        from a build inside the step: the daemon builds them in a thread."""
        self._tables: dict[MemberWeights, Owners] = {}
        self._table_asked: MemberWeights | None = None
        self._view_pending = False
        """A new view waits for its table (only with defer_tables)."""
        self._view_weights: tuple[tuple[Member, ...] | None, MemberWeights] = (None, ())
        self._actions: list[ev.Action] = []
        self._events: list[ev.Event] = []
        self.params = digest_params(self.config.agreed_values())
        self._gate = Gate(
            node_id, incarnation, self.params, self.timers.dead_after, self._events, name=name
        )
        self._last_key_id = b""
        self._step(now)

    def _step(self, now: float) -> None:
        """One step of the transitions: ``membership.Node`` has them."""
        raise NotImplementedError

    # ---------------------------------------------------------------- queries

    def get_timer(self) -> float | None:
        if self._left:
            return None
        t = self.timers
        deadlines = [self._next_heartbeat, self._started + t.startup_wait]
        if self._prompt_at is not None:
            deadlines.append(self._prompt_at)
        lease_until = self._applied[1]
        if lease_until is not None:
            deadlines.append(lease_until)
        if self._leaving_since is not None:
            deadlines.append(self._leaving_since + t.leave_timeout)
        clash_until = self._gate.clash_deadline()
        if clash_until is not None:
            deadlines.append(clash_until)
        for peer in self._peers.values():
            if peer.left or peer.declared_dead:
                continue
            deadlines.append(peer.last_heard + t.dead_after)
            if peer.deaf_since is None:
                deadlines.append(max(peer.first_heard, peer.last_listed_me) + t.dead_after)
            else:
                deadlines.append(peer.deaf_since + t.dead_after)
            if not peer.in_view:
                deadlines.append(peer.first_heard + t.join_holddown)
        # Deadlines already reached have been acted on; only future ones wake us.
        future = [d for d in deadlines if d > self._last_step]
        # Woken a hair early (clock rounding), a deadline would not count as reached
        # and would only be seen at the next heartbeat: aim just past it.
        return min(future) + TIMER_SLACK if future else self._last_step + t.interval

    def quiet_until(self) -> float | None:
        """Until when the caller may leave arriving datagrams unread (then hand them
        to ``receive_datagrams`` with their arrival times), or None: read each one
        as it comes. Only while the cluster is settled (``pacing.py``)."""
        if (
            self._left
            or self._leaving_since is not None
            or not self._agreed
            or not self._quorum_ok
            or self._prev_base is not None
            or self._prompt_at is not None
            or not pacing.settled(self._peers.values(), self._epoch, self._sorted_base())
        ):
            return None
        pacer = self._view[0].node_id
        until = pacing.quiet_until(
            self._next_heartbeat,
            None if pacer == self.node_id else self._peers[pacer],
            self.timers.interval,
            self._last_step,
        )
        # A wake-up like get_timer's: woken a hair early, the heartbeat due then would
        # not be sent, and the same deadline would wake us again at once.
        return None if until is None else until + TIMER_SLACK

    @property
    def advertised_draining(self) -> bool:
        """Draining as peers see it: the operator's flag, or an identity clash."""
        return self.draining or self._clashing

    @property
    def held(self) -> frozenset[int]:
        return self._held

    @property
    def view(self) -> tuple[Member, ...]:
        return self._view

    @property
    def agreed(self) -> bool:
        return self._agreed

    @property
    def lease_until(self) -> float | None:
        return self._applied[1]

    @property
    def has_left(self) -> bool:
        return self._left

    @property
    def quorum_ok(self) -> bool:
        return self._quorum_ok

    @property
    def base(self) -> frozenset[str]:
        return self._base

    @property
    def epoch(self) -> int:
        return self._epoch

    def digest(self) -> str:
        if self._digest[0] is not self._view:  # the view tuple is replaced on every change
            self._digest = (self._view, view_digest(self._view))
        return self._digest[1]

    def owners(self) -> Owners:
        """Owner (index into ``view``) of every bucket under the current view."""
        weights = self._current_weights()
        owners = self._tables.get(weights)
        if owners is None:  # only without defer_tables: a deferred view waits for its table
            owners = compute_owners(weights, self.config.buckets, self.config.seed)
            self._keep_table(weights, owners)
        return owners

    def _current_weights(self) -> MemberWeights:
        if self._view_weights[0] is not self._view:
            self._view_weights = (self._view, weights_of(self._view))
        return self._view_weights[1]

    def table_built(self, weights: MemberWeights, owners: Owners, now: float) -> None:
        """The table a ``BuildTable`` asked for; the view waiting for it can now be
        taken (in this step)."""
        if owners.shape != (self.config.buckets,):
            raise ValueError(f"a table of {owners.shape} for {self.config.buckets} buckets")
        self._keep_table(weights, owners)
        if self._table_asked == weights:
            self._table_asked = None
        if not self._left:  # a build may finish after the leave: nothing more to do
            self._step(max(now, self._last_step))

    def _table_ready(self, view: tuple[Member, ...]) -> bool:
        """Whether ``view`` may be taken now; if not, its table is asked for (once)."""
        if not self.defer_tables:
            return True
        weights = weights_of(view)
        if weights in self._tables:
            return True
        if self._table_asked != weights:
            self._table_asked = weights
            self._actions.append(ev.BuildTable(weights, self.config.buckets, self.config.seed))
        return False

    def _keep_table(self, weights: MemberWeights, owners: Owners) -> None:
        # A few recent views: the current one (never dropped: a deferring core
        # would have to build it on the loop), and the ones a flap goes back to.
        self._tables.pop(weights, None)
        self._tables[weights] = owners
        current = self._current_weights()
        for old in [w for w in self._tables if w != current][: -TABLES_KEPT + 1 or None]:
            del self._tables[old]

    def members(self, now: float) -> list[MemberInfo]:
        held = len(self._held)
        me = MemberInfo(
            self.node_id,
            "self",
            self._self_state(),
            held,
            100.0 * held / self.config.buckets,
            self.weight,
            0,
            self.incarnation,
            True,
            self._codec.keyring.current_fingerprint.hex(),
            name=self.name or self.node_id,
            health=health_words(self.health),
        )
        return member_rows(
            me,
            self._peers.values(),
            self._gate.mismatched.values(),
            buckets=self.config.buckets,
            interval=self.timers.interval,
            now=now,
        )

    def problems(self, now: float) -> list[str]:
        """Why this node does not (fully) take part, one line each (``lbd-cli status``,
        the systemd STATUS line): admission problems, and a bootstrap still waiting."""
        lines = self._gate.problems(now)
        if (
            not self._base
            and not self._agreed
            and len(self._view) < self.config.bootstrap_expect
            and now >= self._started + self.timers.startup_wait
        ):
            lines.append(
                f"first start: waiting for bootstrap_expect = {self.config.bootstrap_expect} "
                f"members to form the cluster, {len(self._view)} in view (a first start "
                "never forms a cluster with fewer)"
            )
        return lines

    def name_of(self, node_id: str) -> str:
        """The name a node ID goes by (its own ID when it sent none, or is unknown)."""
        if node_id == self.node_id:
            return self.name or node_id
        peer = self._peers.get(node_id)
        if peer is not None and peer.name:
            return peer.name
        mismatch = self._gate.mismatched.get(node_id)
        return mismatch.name if mismatch is not None and mismatch.name else node_id

    @property
    def strangers(self) -> list[tuple[str, str, int]]:
        """(address, reason, datagrams) of every source we cannot open, for logs."""
        return [(s.address, s.reason, s.count) for s in self._gate.strangers.values()]

    # ------------------------------------------------ derived facts for steps

    def _self_member(self) -> Member:
        m = self._self_cached
        draining = self.advertised_draining
        if m is None or (m.weight, m.draining) != (self.weight, draining):
            m = self._self_cached = Member(self.node_id, self.incarnation, self.weight, draining)
        return m

    def _self_state(self) -> str:
        if self._leaving_since is not None:
            return PeerState.LEFT.value if self._left else "leaving"
        if self._clashing:
            return "duplicate-id"
        if self.draining:
            return PeerState.DRAINING.value
        return PeerState.ACTIVE.value if self._agreed else PeerState.JOINING.value

    def _bases(self) -> list[frozenset[str]]:
        """The bases every decision needs a quorum of (two while a change is unconfirmed)."""
        bases = [self._base]
        if self._prev_base is not None:
            bases.append(self._prev_base)
        return bases

    def _lease_candidate(self, now: float) -> float | None:
        lease = self.timers.lease
        if self.config.quorum is QuorumMode.NONE or not self._base:
            return now + lease
        anchors: list[tuple[float, str]] = [(now, self.node_id)]
        for peer in self._peers.values():
            sent = self._sent_at.get(peer.ack_of_me)
            if sent is not None and not peer.left:
                anchors.append((sent, peer.node_id))
        tie_break = self._tie_break(now)
        deadlines = [
            lease_deadline(anchors, base, lease, tie_break) for base in self._bases() if base
        ]
        if any(d is None for d in deadlines):
            return None
        deadline = min(d for d in deadlines if d is not None)
        return deadline if deadline > now else None

    def credentials(self) -> bytes:
        """Digest of the cluster name and sealing key: what a base is agreed under.
        Asked on every step (the lease): hashed once per codec, which a rotation replaces."""
        if self._credentials[0] is not self._codec:
            digest = hashlib.blake2b(
                self._codec.cluster_name.encode()
                + b"\x00"
                + self._codec.keyring.current_fingerprint,
                digest_size=8,
            ).digest()
            self._credentials = (self._codec, digest)
        return self._credentials[1]

    def _tie_break(self, now: float) -> bool:
        """Whether an exact half of our base may win. Not for a node that may be the
        one mistaken node: restarted with other parameters than its base was agreed
        under, or hearing nodes it cannot admit while its key or cluster name is not
        the one its base was agreed under (the node that kept them is the right one)."""
        if self._base_params is not None and self._base_params != self.params:
            return False
        return (
            self._base_credentials is None
            or self._base_credentials == self.credentials()
            or not self._gate.heard_strangers(now, self.timers.dead_after)
        )

    def _peers_on_our_view(self) -> list[Peer] | None:
        """The peer of every other member of our view, if each advertises exactly our
        view (with the incarnation our view lists); else None."""
        peers = []
        for member in self._view:
            if member.node_id == self.node_id:
                continue
            peer = self._peers.get(member.node_id)
            if peer is None or peer.incarnation != member.incarnation or not peer.view_match:
                return None
            peers.append(peer)
        return peers

    def _barrier_complete(self) -> bool:
        peers = self._peers_on_our_view()
        return peers is not None and all(p.ack_of_me >= self._barrier_seq for p in peers)

    def _others_agreed(self) -> bool:
        """Every other member of our view has agreed exactly our view."""
        peers = self._peers_on_our_view()
        return peers is not None and all(
            p.last_heartbeat is not None and p.last_heartbeat.agreed for p in peers
        )

    def _admitted(self) -> bool:
        """The others already agreed a view with us (and released what we gain)."""
        return len(self._view) > 1 and self._others_agreed()

    def _my_place(self, view: tuple[Member, ...]) -> int | None:
        """Our index in ``view`` if it lists us with our incarnation, else None.
        Looked up once per view object: a settled cluster's heartbeats share one."""
        if self._listing[0] is not view:
            place = next((i for i, m in enumerate(view) if m.node_id == self.node_id), None)
            listed = None if place is None else view[place].incarnation
            if listed != self.incarnation:
                place = None
            self._listing = (view, place, listed)
        return self._listing[1]

    def _listed_incarnation(self, view: tuple[Member, ...]) -> int | None:
        """The incarnation ``view`` lists our node ID with (None: not listed)."""
        self._my_place(view)
        return self._listing[2]

    def _sorted_base(self) -> tuple[str, ...]:
        # Compared with every heartbeat's base: sorted once per base, not per datagram.
        if self._sorted_base_of[0] is not self._base:
            self._sorted_base_of = (self._base, tuple(sorted(self._base)))
        return self._sorted_base_of[1]

    def _own_buckets(self) -> frozenset[int]:
        if self.advertised_draining:
            return frozenset()
        my_index = next(i for i, m in enumerate(self._view) if m.node_id == self.node_id)
        return frozenset(np.flatnonzero(self.owners() == my_index).tolist())
