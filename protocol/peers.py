"""What one node knows about each peer: liveness, advertised view, support.

A peer record is updated from that peer's authenticated heartbeats only. Whether
the peer currently *supports* us (lists us, with our incarnation, in its view and
acknowledges one of our heartbeats) is what our kernel lease rests on; whether it
advertises exactly our view, acknowledging a heartbeat we sent after adopting it,
is what our barrier rests on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from lbd.protocol.messages import Heartbeat, Member


class PeerState(Enum):
    JOINING = "joining"
    ACTIVE = "active"
    DRAINING = "draining"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@dataclass(slots=True)
class Peer:
    node_id: str
    incarnation: int
    weight: int
    draining: bool
    address: str
    first_heard: float
    """Start of the current run of continuous hearing (hold-down counts from here)."""
    last_heard: float
    last_seq: int
    last_heartbeat: Heartbeat | None = None
    ack_of_me: int = 0
    """Our highest seq its latest heartbeat acknowledges while listing us, else 0."""
    view_match: bool = False
    """Its latest heartbeat advertises exactly our current view."""
    last_listed_me: float = float("-inf")
    """When a heartbeat of this peer last listed us (with our incarnation)."""
    deaf_since: float | None = None
    """Set when the peer, though heard, has not listed us for ``dead_after``."""
    left: bool = False
    declared_dead: bool = False
    suspected: bool = False
    in_view: bool = False
    lists_stale_me: bool = False
    """Its latest heartbeat lists our ID with another incarnation than ours."""
    refused: bool = False
    """Kept out of a full view (reported once)."""
    key_id: bytes = b""
    name: str = ""
    """The name it sends (``Heartbeat.name``), for people."""
    """Fingerprint of the key its latest datagram was sealed with."""

    cached_member: Member | None = field(default=None, repr=False, compare=False)

    @property
    def member(self) -> Member:
        # One object while nothing changes: views then compare by identity (fast),
        # and a step builds no new objects for an unchanged view.
        m = self.cached_member
        if m is None or (m.incarnation, m.weight, m.draining) != (
            self.incarnation,
            self.weight,
            self.draining,
        ):
            m = self.cached_member = Member(
                self.node_id, self.incarnation, self.weight, self.draining
            )
        return m

    def silent_for(self, now: float) -> float:
        return now - self.last_heard

    def observe(self, heartbeat: Heartbeat, my_place: int | None, matches_my_view: bool) -> bool:
        """Record a heartbeat (``my_place``: our index in its view if it lists us
        with our incarnation; ``matches_my_view``: it advertises exactly our view);
        return whether it lists us.

        What we need from it (its ack of us, whether it matches our view) is
        computed once here, not on every step: steps are O(N), not O(N^2).
        """
        self.last_heartbeat = heartbeat
        self.ack_of_me = 0 if my_place is None else heartbeat.acks[my_place]
        self.view_match = matches_my_view
        return my_place is not None

    def state(self, now: float, suspect_after: float) -> PeerState:
        if self.left:
            return PeerState.LEFT
        if self.declared_dead or (self.deaf_since is not None and not self.in_view):
            return PeerState.DEAD
        if not self.in_view:
            return PeerState.JOINING
        if self.silent_for(now) > suspect_after or self.deaf_since is not None:
            return PeerState.SUSPECT
        if self.draining:
            return PeerState.DRAINING
        return PeerState.ACTIVE
