"""The membership and handoff core of one node (sans-I/O).

Theory of operation
-------------------
Every node multicasts a heartbeat each ``interval``: its own descriptor (weight,
draining), its *view* (the sorted members it currently hears, each with
incarnation, weight and draining) and, per view member, the highest sequence it
received from that member (an *ack*). Ownership of the B buckets is a pure
function of a view (``ownership.compute_owners``), so nodes that advertise the
same view agree on every bucket's owner.

Three rules keep one owner per bucket at every instant (S1):

1. Break before make. When a node's view changes it first shrinks its held set
   to what it owns under the new view (the kernel is updated before the next
   heartbeat leaves: actions are ordered), then advertises the view.
2. Barrier. A node claims the buckets it gains under view V only when every
   other member of V advertises exactly V in a heartbeat that acknowledges a
   heartbeat we sent after adopting V (so the advertisement is fresh, not one
   overtaken by a later change), and V holds a quorum of the last agreed view.
3. Lease. The kernel accepts NEW connections only while a lease element lives.
   Its deadline is the send time of the newest of our heartbeats acknowledged by
   a quorum of the last agreed view (each ack counts only while the acker lists
   us), plus ``lease``. A peer stops acking us ``dead_after`` after it last heard
   us and ``lease`` is shorter than that (``Timers.validate``), so before a
   quorum can agree on a view without us our lease has expired in the kernel.
   When the lease lapses (lost quorum, or this process was stalled), the node
   drops every bucket and must pass a new barrier before claiming again. The
   kernel copy is renewed only once less than ``Timers.lease_refresh`` of it is
   left (or at once when it must shrink): every third heartbeat by default
   rather than every one. Renewing later only shortens the kernel lease, never extends it.

The quorum base is the last agreed view, numbered by an epoch; heartbeats carry
both, and a node adopts any newer base it hears of, so a node that missed an
agreement (hung, partitioned) never judges quorums by an outdated base. A node
that never agreed anything may start a cluster of one only if it never heard a
peer: two fresh nodes that lose each other must not both claim everything.

``quorum = none`` replaces rule 3's acknowledgements with "always": available
under partition, but two sides of a partition then both serve (documented).

The state and every query of it (timer, view, ownership, the lease a quorum
supports) live in ``nodestate.NodeState``; when to send and when to read (the
heartbeat wave, quiet reading) in ``pacing.py``; the quorum base's own transitions
(set, confirmed by a quorum of the previous base, persisted) in ``quorumbase.py``;
this module is the rest of the transitions.

Every entry point takes ``now`` (the caller's monotonic seconds, never less than
the last one given). The caller drains ``actions()`` in order (ApplyKernel before
Transmit matters), reads ``events()`` for logs, and calls ``handle_timer`` at
``get_timer()``. While the cluster is settled, ``quiet_until()`` lets it read its
socket once per interval instead of on every arrival (arrival times as ``now``).
"""

from __future__ import annotations

from collections.abc import Iterable

from lbd.protocol import events as ev
from lbd.protocol import pacing
from lbd.protocol.config import QuorumMode
from lbd.protocol.errors import AuthError, DecodeError, ReplayError, VersionError
from lbd.protocol.keyring import FINGERPRINT_LEN
from lbd.protocol.messages import HEALTH_MAX, MAX_NODES, Heartbeat, Leave, Member
from lbd.protocol.peers import Peer
from lbd.protocol.quorum import has_joint_quorum
from lbd.protocol.quorumbase import QuorumBase
from lbd.protocol.wire import Codec

FORGET_AFTER = 60.0
"""Seconds a dead or departed peer stays listed before it is forgotten."""
LEAVE_COPIES = 3
"""A leave is sent this many times: one lost datagram must not cost a quorum member."""
MAX_PEER_RECORDS = 2 * MAX_NODES
"""Peer records kept at most (members, joiners and the recently dead together)."""
AUTH_FAILURE = "authentication: wrong key file or cluster name?"


class Node(QuorumBase):
    """One node's membership and handoff: feed it inputs, drain its actions.

    Constructed with ``NodeState``'s arguments; takes its first step at once."""

    # ----------------------------------------------------------------- inputs

    def receive_datagram(self, data: bytes, address: str, now: float) -> None:
        message = self._open(data, address, max(now, self._last_step))
        if message is not None and self._take(message, address, now, self._last_key_id):
            self._step(now)

    def receive_datagrams(
        self, batch: Iterable[tuple[bytes, str, float]], now: float | None = None
    ) -> None:
        """Datagrams that waited in the socket (see ``quiet_until``), each with its
        arrival time, oldest first; then one step: at ``now`` if given (the caller's
        timer is due as well), else at the latest arrival. An arrival before the
        last step counts as at that step: time never runs backwards in here."""
        stepped_at = None
        for data, address, arrived in batch:
            at = max(arrived, self._last_step)
            message = self._open(data, address, at)
            if message is not None and self._take(message, address, at, self._last_key_id):
                stepped_at = at if stepped_at is None else max(stepped_at, at)
        if now is not None:
            self.handle_timer(now)
        elif stepped_at is not None:
            self._step(stepped_at)

    def receive_message(self, message: Heartbeat | Leave, address: str, now: float) -> None:
        """An authenticated, decoded datagram (what ``receive_datagram`` opens)."""
        if self._take(message, address, now):
            self._step(now)

    def _open(self, data: bytes, address: str, now: float) -> Heartbeat | Leave | None:
        if self._left:
            return None
        try:
            message = self._codec.open(data)
        except AuthError:
            self.counters.forged += 1
            self._gate.stranger(address, AUTH_FAILURE, now)
            self._heard_peer = True  # a cluster we cannot read may be ours, misconfigured
        except VersionError as exc:
            self.counters.foreign_version += 1
            self._gate.stranger(address, f"the version check ({exc}: another lbd release?)", now)
            self._heard_peer = True
        except DecodeError:
            self.counters.malformed += 1
        else:
            self._last_key_id = data[3 : 3 + FINGERPRINT_LEN]
            return message
        return None

    def _take(
        self, message: Heartbeat | Leave, address: str, now: float, key_id: bytes = b""
    ) -> bool:
        """Record one message; whether it was accepted (and a step is due)."""
        if self._left:
            return False
        if message.sender == self.node_id:
            self.counters.own_echo += 1
            # A clone's first datagram changes what we advertise: step at once.
            was_clashing = self._clashing
            self._gate.own_id_heard(
                message.incarnation,
                address,
                now,
                message.name if isinstance(message, Heartbeat) else "",
            )
            return not was_clashing and self._gate.clashing(now)
        known = self._peers.get(message.sender)
        if (
            known is not None
            and message.incarnation > known.incarnation
            and address != known.address
            and not (known.left or known.declared_dead)
            and now - known.last_heard < self.timers.dead_after
        ):
            # A restart speaks from the node's own address; a newer incarnation from
            # elsewhere while the one we know still speaks is a second process with
            # that ID (a clone). Taking it for a restart would hand the ID's slices
            # on while the first process may still hold them on a live lease: it
            # replaces nothing until the one we know falls silent for dead_after.
            self.counters.second_process += 1
            self._gate.stale_sender(
                message.sender, message.incarnation, address, known.address, known.incarnation
            )
            return False
        if (
            known is not None
            and isinstance(message, Heartbeat)
            and known.last_seq == message.seq
            and known.incarnation == message.incarnation
        ):
            # The newest heartbeat again: with multicast and ``peers`` both, every
            # heartbeat arrives twice. Not a replay worth a warning; dropped all the same.
            self.counters.copies += 1
            return False
        try:
            self._replay.check(message.sender, message.incarnation, message.seq)
        except ReplayError:
            self.counters.replayed += 1
            if (
                known is not None
                and message.incarnation < known.incarnation
                and address != known.address
            ):
                self._gate.stale_sender(
                    message.sender, message.incarnation, address, known.address, known.incarnation
                )
            return False
        if isinstance(message, Heartbeat) and not self._gate.admits(message, address, now):
            self.counters.mismatched += 1
            self._heard_peer = True
            return False
        if message.sender not in self._peers and len(self._peers) >= MAX_PEER_RECORDS:
            self.counters.refused += 1
            return False
        self.counters.accepted += 1
        self._heard_peer = True
        if isinstance(message, Leave):
            self._on_leave(message)
        else:
            self._on_heartbeat(message, address, now, key_id)
        return True

    def handle_timer(self, now: float) -> None:
        if not self._left:
            self._step(now)

    def set_draining(self, draining: bool, now: float) -> None:
        if self._leaving_since is None:
            self.draining = draining
            self._step(now)

    def set_weight(self, weight: int, now: float) -> None:
        self.weight = weight
        self._step(now)

    def set_health(self, health: int, now: float) -> None:
        """Why this node is unhealthy (``messages.HEALTH_*``, 0: healthy), for its
        heartbeats. Only a report: the shell drains an unhealthy node itself."""
        if not 0 <= health <= HEALTH_MAX:
            raise ValueError(f"health must be in 0..{HEALTH_MAX}")
        self.health = health
        self._step(now)

    def every_member_unhealthy(self) -> bool:
        """This node and every other member of its view report themselves unhealthy
        (by their latest heartbeats): then nobody is better placed to serve."""
        if not self.health:
            return False
        for member in self._view:
            peer = self._peers.get(member.node_id)
            if member.node_id != self.node_id and (
                peer is None or peer.last_heartbeat is None or not peer.last_heartbeat.health
            ):
                return False
        return True

    def set_codec(self, codec: Codec) -> None:
        """Key rotation: the sender/replay state is kept, only the keys change."""
        self._codec = codec

    def leave(self, now: float) -> None:
        """Graceful leave: drain through the handoff, then announce and forget."""
        if self._leaving_since is None and not self._left:
            self._leaving_since = now
            self.draining = True
            self._step(now)

    # ---------------------------------------------------------------- outputs

    def actions(self) -> list[ev.Action]:
        out, self._actions = self._actions, []
        return out

    def events(self) -> list[ev.Event]:
        # Emptied in place: the admission gate appends to this very list.
        out = list(self._events)
        self._events.clear()
        return out

    # ------------------------------------------------------------------ steps

    def _on_leave(self, message: Leave) -> None:
        peer = self._peers.get(message.sender)
        if peer is not None and peer.incarnation == message.incarnation and not peer.left:
            peer.left = True
            # It drained, released everything and dropped its lease before saying
            # so. If we both agreed the same view (it draining), that view is our
            # quorum base and it can shrink by the leaver: any two quorums of the
            # old and the shrunk base still intersect. A node on an older view
            # keeps its base (shrinking a stale base is how split brains start).
            last = peer.last_heartbeat
            if (
                self._agreed
                and last is not None
                and last.agreed
                and last.draining
                and peer.view_match
            ):
                self._base = self._base - {peer.node_id}
                self._epoch += 1
            self._events.append(ev.MemberLeft(peer.node_id))

    def _on_heartbeat(self, hb: Heartbeat, address: str, now: float, key_id: bytes) -> None:
        peer = self._peers.get(hb.sender)
        if peer is None or hb.incarnation > peer.incarnation:
            was_member = peer is not None and peer.in_view and not peer.left
            peer = Peer(
                hb.sender,
                hb.incarnation,
                hb.weight,
                hb.draining,
                address,
                first_heard=now,
                last_heard=now,
                last_seq=hb.seq,
            )
            # A restart of a current member replaces it at once: its buckets stay
            # mapped to its ID and its old process (and kernel table) is gone.
            peer.in_view = was_member
            if was_member:
                self._events.append(ev.MemberRestarted(hb.sender, hb.incarnation))
            self._peers[hb.sender] = peer
        elif hb.incarnation < peer.incarnation or peer.left:
            return
        if peer.declared_dead:
            peer.declared_dead = False
            peer.in_view = False
            peer.first_heard = now
        peer.suspected = False
        peer.last_heard = now
        peer.last_seq = hb.seq
        peer.weight = hb.weight
        peer.draining = hb.draining
        peer.address = address
        if key_id:
            peer.key_id = key_id
        peer.name = hb.name
        if (hb.epoch, hb.base) > (self._epoch, self._sorted_base()):
            # A newer agreement we missed (hung, partitioned, or just slower):
            # quorums are judged by the newest base anyone knows, never a stale one.
            self._set_base(frozenset(hb.base), hb.epoch)
            self._adopted_base = True
        # Heartbeats of a settled cluster carry one decoded view object (wirebins.py memo):
        # once it compared equal to ours, identity answers for the rest.
        matches = hb.view is self._view_seen_equal
        if not matches and hb.view == self._view:
            matches, self._view_seen_equal = True, hb.view
        place = self._my_place(hb.view)
        peer.lists_stale_me = False
        if place is None:
            listed = self._listed_incarnation(hb.view)
            peer.lists_stale_me = listed is not None
            if listed is not None and listed > self.incarnation:
                self._gate.listed_newer(listed, address, now)
        if peer.observe(hb, place, matches):
            peer.last_listed_me = now
            if peer.deaf_since is not None:
                peer.deaf_since = None
                if not peer.in_view:
                    peer.first_heard = now  # back from deafness: a fresh hold-down
        if peer.view_match and not (hb.agreed and self._agreed):
            self._schedule_prompt(now)
        if self._view[0].node_id == hb.sender and peer.in_view:
            self._next_heartbeat = pacing.on_pacer_heartbeat(
                now, self._last_sent, self._next_heartbeat, self.timers.interval
            )

    def _schedule_prompt(self, now: float) -> None:
        at = max(now, self._last_sent + self.timers.prompt_gap)
        if self._prompt_at is None or at < self._prompt_at:
            self._prompt_at = at

    def _step(self, now: float) -> None:
        self._last_step = now
        first_action = len(self._actions)
        clashing = self._gate.clashing(now)
        if clashing != self._clashing:
            self._clashing = clashing  # advertised as draining: the handoff moves our slices
            self._self_cached = None
            if not clashing and self._gate.newest_clone >= self.incarnation:
                # The clone is gone, but peers remember its newer incarnation of our ID
                # and refuse ours as stale: take one above it, as a restart would.
                self.incarnation = self._gate.newest_clone + 1
                self._gate.reincarnate(self.incarnation)
                self._listing = (None, None, None)
                self._events.append(ev.MemberRestarted(self.node_id, self.incarnation))
        self._step_inner(now)
        self._persist_base_change(first_action)

    def _step_inner(self, now: float) -> None:
        self._confirm_base_change()
        self._update_liveness(now)
        self._update_view(now)
        self._check_lapse(now)
        self._check_adopted_base(now)
        self._try_claim(now)
        candidate = self._lease_candidate(now)
        self._track_quorum(candidate)
        if self._try_finish_leave(now):
            return
        send_due = now >= self._next_heartbeat or (
            self._prompt_at is not None and now >= self._prompt_at
        )
        lease = self._applied[1]
        if candidate is not None and (
            lease is None
            or candidate < lease
            or (candidate > lease and lease - now < self.timers.lease_refresh)
        ):
            lease = candidate
        if (self._held, lease) != self._applied:
            self._apply(self._held, lease)
        if send_due and self._gate.out_for_good():
            # The newer of two processes with one ID says nothing at all: a silent clone
            # has no vote anywhere, and the original (draining while it hears us) can
            # take its place back once we are gone.
            self._next_heartbeat = now + self.timers.interval
            self._prompt_at = None
        elif send_due:
            self._send_heartbeat(now)

    def _update_liveness(self, now: float) -> None:
        t = self.timers
        self._gate.forget_silent(now)
        for node_id in list(self._peers):
            peer = self._peers[node_id]
            silent = peer.silent_for(now)
            if (peer.left or peer.declared_dead) and silent > FORGET_AFTER:
                del self._peers[node_id]
                continue
            if peer.left or peer.declared_dead:
                continue
            if silent >= t.dead_after:
                peer.declared_dead = True
                peer.deaf_since = None
                self._events.append(ev.MemberDead(node_id, silent))
                continue
            unlisted = now - max(peer.first_heard, peer.last_listed_me)
            if peer.deaf_since is None and unlisted >= t.dead_after:
                # Heard, but it does not hear us: stop supporting its lease now and
                # drop it from the view once that support has surely run out.
                peer.deaf_since = now
                self._events.append(ev.MemberSuspected(node_id, unlisted))
            elif silent > 2 * t.interval and peer.in_view and not peer.suspected:
                peer.suspected = True
                self._events.append(ev.MemberSuspected(node_id, silent))

    def _update_view(self, now: float) -> None:
        decisions, view = self._next_view(now)
        self._view_pending = view != self._view and not self._table_ready(view)
        if self._view_pending:
            # The table comes from the shell. Until then this node stays on its view
            # (nothing below happens yet): it claims nothing (``_try_claim``) and
            # acks no peer the new view drops (``_send_heartbeat``), so waiting is
            # like hearing of the change later, never like not believing it. The
            # agreement on this view is over (a leave must not count it as absorbed).
            self._agreed = False
            return
        for peer, eligible in decisions:
            if peer.in_view and not eligible and not (peer.left or peer.declared_dead):
                self._events.append(ev.MemberDead(peer.node_id, now - peer.last_listed_me))
            if eligible and not peer.in_view:
                self._events.append(ev.MemberJoined(peer.node_id, peer.incarnation))
            peer.in_view = eligible
        if view == self._view:
            return
        self._view = view
        self._view_seen_equal = None
        for peer in self._peers.values():
            peer.view_match = peer.last_heartbeat is not None and peer.last_heartbeat.view == view
        self._agreed = False
        self._barrier_seq = self._seq + 1
        self.counters.view_changes += 1
        self._events.append(ev.ViewChanged(tuple(m.node_id for m in view), self.digest()))
        kept = self._held & self._own_buckets()
        released = len(self._held) - len(kept)
        self._held = kept
        if released:
            self._events.append(ev.BucketsReleased(released, len(kept)))
        self._next_heartbeat = now

    def _next_view(self, now: float) -> tuple[list[tuple[Peer, bool]], tuple[Member, ...]]:
        """Which peers belong to the view now, and that view (changes only a refused
        newcomer's record: the view is full)."""
        holddown = self.timers.join_holddown
        dead_after = self.timers.dead_after
        members = [self._self_member()]
        decisions = []
        for peer in self._peers.values():
            if peer.left or peer.declared_dead:
                eligible = False
            elif peer.in_view:
                eligible = peer.deaf_since is None or now < peer.deaf_since + dead_after
            else:
                # A newcomer that lists us with another incarnation than ours has not
                # heard us since we restarted: a live peer corrects that within an
                # interval, replayed heartbeats of a dead member (captured before our
                # restart) never do, so they never make it a member again.
                eligible = (
                    peer.deaf_since is None
                    and now - peer.first_heard >= holddown
                    and not peer.lists_stale_me
                )
            if eligible and not peer.in_view and len(members) >= MAX_NODES:
                # The view is full: ownership is defined for at most MAX_NODES members.
                if not peer.refused:
                    peer.refused = True
                    self.counters.refused += 1
                    self._events.append(ev.MemberRefused(peer.node_id, MAX_NODES))
                eligible = False
            decisions.append((peer, eligible))
            if eligible:
                members.append(peer.member)
        return decisions, tuple(sorted(members, key=lambda m: m.node_id))

    def _check_lapse(self, now: float) -> None:
        lease_until = self._applied[1]
        if lease_until is None or now < lease_until:
            return
        self._lapse(now)

    def _check_adopted_base(self, now: float) -> None:
        """A lease granted under a base we just learnt was superseded must not outlive
        the adoption: if the new bases support none, drop it now, before any heartbeat
        advertises the new base (a peer confirming the change on seeing it may claim)."""
        if not self._adopted_base:
            return
        self._adopted_base = False
        if self._applied[1] is not None and self._lease_candidate(now) is None:
            self._lapse(now)

    def _lapse(self, now: float) -> None:
        dropped = len(self._held)
        self._held = frozenset()
        self._agreed = False
        self._barrier_seq = self._seq + 1
        self._next_heartbeat = now  # the new barrier needs a fresh heartbeat to ack
        self._apply(self._held, None)
        if dropped:
            self._events.append(ev.LeaseLapsed(dropped))

    def _try_claim(self, now: float) -> None:
        if self._view_pending:
            return  # an agreement on a view this node already knows is over
        if self._agreed or self._clashing:
            # While another process speaks with our ID, quorums that count "our" ID
            # are ambiguous: agree nothing, change no base.
            return
        if now < self._started + self.timers.startup_wait and not self._admitted():
            # Start-up listening is for forming a view; a node the others have
            # already agreed a view with (released its slices for) joins at once:
            # waiting here left those slices unserved for ~1 s on every rejoin.
            return
        if not self._base and (
            len(self._view) < self.config.bootstrap_expect
            or self._gate.heard_strangers(now, self.timers.dead_after)
        ):
            # A first start forms the cluster's first view only with this many members
            # (consul's bootstrap_expect), and never while it hears nodes it cannot
            # admit (a wrong key, other parameters): those may be the cluster it was
            # meant to join, and two such newcomers must not start one beside it.
            return
        if not self._base and (
            (self._heard_peer and len(self._view) == 1)
            or any(
                not p.in_view and not p.left and not p.declared_dead and p.deaf_since is None
                for p in self._peers.values()
            )
        ):
            # A newcomer never forms a view while a peer it hears is pending, and once
            # it has heard anyone it never starts a cluster of its own: two fresh nodes
            # that lose each other would otherwise both claim everything.
            return
        if not self._barrier_complete():
            return
        ids = frozenset(m.node_id for m in self._view)
        if self.config.quorum is QuorumMode.MAJORITY and not has_joint_quorum(
            ids, self._bases(), self._tie_break(now)
        ):
            return
        saved = (
            self._base,
            self._epoch,
            self._prev_base,
            self._prev_epoch,
            self._base_params,
            self._base_credentials,
        )
        self._set_base(
            ids,
            1
            + max(
                [self._epoch]
                + [
                    p.last_heartbeat.epoch
                    for m in self._view
                    if (p := self._peers.get(m.node_id)) is not None
                    and p.last_heartbeat is not None
                ]
            ),
        )
        candidate = self._lease_candidate(now)
        if candidate is None or candidate <= now:
            (
                self._base,
                self._epoch,
                self._prev_base,
                self._prev_epoch,
                self._base_params,
                self._base_credentials,
            ) = saved
            return
        target = self._own_buckets()
        gained = len(target - self._held)
        self._held = target
        self._agreed = True
        self._events.append(ev.ViewAgreed(tuple(sorted(ids)), self.digest(), len(target)))
        if gained:
            self._events.append(ev.BucketsGained(gained, len(target)))

    def _try_finish_leave(self, now: float) -> bool:
        if self._leaving_since is None:
            return False
        absorbed = self._agreed and self._others_agreed()
        if not absorbed and now < self._leaving_since + self.timers.leave_timeout:
            return False
        self._held = frozenset()
        self._apply(self._held, None)
        if absorbed and self.node_id in self._base and len(self._base) > 1:
            # Peers shrink their base by us on our leave (``_on_leave``); so does the
            # base we leave behind on disk. Restarted with settings the others do not
            # share (a rolling change), we cannot learn their newer base: ours must
            # not make us a quorum member of a cluster that already went on without us.
            self._set_base(self._base - {self.node_id}, self._epoch + 1)
            self._prev_base = None
        for _ in range(LEAVE_COPIES if not self._gate.out_for_good() else 0):
            self._seq += 1
            self._actions.append(
                ev.Transmit(self._codec.seal(Leave(self.node_id, self.incarnation, self._seq)))
            )
            self.counters.sent += 1
        self._left = True
        self._events.append(ev.LeftCluster(self.node_id))
        return True

    def _apply(self, held: frozenset[int], lease_until: float | None) -> None:
        self._applied = (held, lease_until)
        if self._actions and isinstance(self._actions[-1], ev.ApplyKernel):
            self._actions.pop()  # a newer kernel state supersedes an unsent one
        self._actions.append(ev.ApplyKernel(held, lease_until))

    def _send_heartbeat(self, now: float) -> None:
        if self._prev_base is not None:  # what peers may adopt of an unconfirmed change
            if self._lineage_of is not self._prev_base:
                self._lineage_of, self._lineage = self._prev_base, set()
            self._lineage.add(self._sorted_base())
        self._seq += 1
        self._sent_at[self._seq] = now
        horizon = now - self.timers.lease - self.timers.dead_after
        for seq in [s for s, t in self._sent_at.items() if t < horizon]:
            del self._sent_at[seq]
        acks = []
        for member in self._view:
            peer = self._peers.get(member.node_id)
            # in_view and not declared_dead: always so for a view member, except
            # while a new view waits for its table (a peer it drops is not supported).
            supported = (
                peer is not None
                and peer.incarnation == member.incarnation
                and peer.deaf_since is None
                and peer.in_view
                and not peer.declared_dead
                and not peer.left
            )
            acks.append(peer.last_seq if supported and peer is not None else 0)
        heartbeat = Heartbeat(
            sender=self.node_id,
            incarnation=self.incarnation,
            seq=self._seq,
            weight=self.weight,
            draining=self.advertised_draining,
            view=self._view,
            acks=tuple(acks),
            agreed=self._agreed,
            held=len(self._held),
            epoch=self._epoch,
            base=self._sorted_base(),
            params=self.params,
            name=self.name,
            health=self.health,
        )
        self._actions.append(ev.Transmit(self._codec.seal(heartbeat)))
        self.counters.sent += 1
        self._last_sent = now
        self._next_heartbeat = pacing.after_send(
            now, self._peers.get(self._view[0].node_id), self.timers.interval
        )
        self._prompt_at = None
