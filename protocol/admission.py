"""Who may take part: strangers, peers with other parameters, and identity clashes.

One mistaken node must never break the cluster (S4). Before a datagram reaches
the membership rules, this gate sorts out three kinds of sender:

* **Strangers**: datagrams that fail authentication (wrong key file, a typo in
  the cluster name) or carry another wire version. They are dropped and counted
  per source address; a node that has heard one never bootstraps a cluster on
  its own (it cannot tell a stranger from its own cluster misconfigured).
* **Mismatched peers**: authentic heartbeats whose parameter digests
  (``params.py``) differ from ours. Such a peer is never admitted, never counted
  toward a quorum and never acknowledged; we report which parameters differ.
* **Identity clashes**: another process speaks with our node ID (an image
  cloned with its machine-id). We learn it from our own ID arriving with another
  incarnation, or from a peer listing our ID with an incarnation newer than ours.
  While that lasts (and ``dead_after`` beyond), the node advertises itself as
  draining: it serves nothing, and its slices move through the normal safe
  handoff to the other members. Neither process can keep the ID's slices on a
  stale quorum (an exact-half quorum alone, say).

Everything here is bounded: a few dozen addresses and IDs at most, forgotten
after ``FORGET_AFTER`` of silence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lbd.protocol import events as ev
from lbd.protocol.messages import Heartbeat
from lbd.protocol.params import differing

FORGET_AFTER = 60.0
"""Seconds of silence after which a stranger or a mismatched peer is forgotten."""
MAX_STRANGERS = 32
MAX_MISMATCHED = 64
REPORT_WITHIN = 10.0
"""A problem is reported (``lbd-cli status``) while heard within this many seconds."""


@dataclass(slots=True)
class Stranger:
    """A source address whose datagrams we cannot open."""

    address: str
    reason: str
    count: int
    first_heard: float
    last_heard: float


@dataclass(slots=True)
class Mismatch:
    """A peer whose agreed parameters differ from ours."""

    node_id: str
    address: str
    incarnation: int
    fields: tuple[str, ...]
    count: int
    last_heard: float
    name: str = ""


@dataclass(slots=True)
class Clash:
    """Another process speaking with our node ID.

    ``direct``: we heard it ourselves and ``address`` is where it speaks from;
    else ``address`` is the peer that lists our ID with its newer incarnation."""

    address: str
    incarnation: int
    until: float
    direct: bool
    other_name: str = ""
    """The other process's name when it differs from ours: a wire-ID collision."""


class Gate:
    """The admission checks of one node (see the module doc)."""

    def __init__(
        self,
        node_id: str,
        incarnation: int,
        params: bytes,
        hold: float,
        events: list[ev.Event],
        *,
        name: str = "",
    ) -> None:
        self.node_id = node_id
        self.name = name
        self.incarnation = incarnation
        self.params = params
        self._hold = hold
        self._events = events
        self.strangers: dict[str, Stranger] = {}
        self.mismatched: dict[str, Mismatch] = {}
        self.clash: Clash | None = None
        self.newest_clone = 0
        """The newest incarnation of our ID that another process used."""
        self.outgrown = 0
        """The clone incarnation we took a new one above: hearing it again makes us
        neither the newer process nor a new clash worth a new incarnation."""
        self._clashes_reported: set[tuple[str, str]] = set()

    # ------------------------------------------------------------- strangers

    def stranger(self, address: str, reason: str, now: float) -> None:
        known = self.strangers.get(address)
        if known is None:
            if len(self.strangers) >= MAX_STRANGERS:
                oldest = min(self.strangers.values(), key=lambda s: s.last_heard)
                del self.strangers[oldest.address]
            self.strangers[address] = Stranger(address, reason, 1, now, now)
            self._events.append(ev.StrangerHeard(address, reason))
            return
        known.count += 1
        known.last_heard = now
        known.reason = reason

    # ------------------------------------------------------------ parameters

    def admits(self, hb: Heartbeat, address: str, now: float) -> bool:
        """Whether a heartbeat's parameters match ours; a mismatch is recorded."""
        sender, incarnation, params, name = hb.sender, hb.incarnation, hb.params, hb.name
        if params == self.params:
            if self.mismatched.pop(sender, None) is not None:
                self._events.append(ev.ParameterMismatch(sender, address, ()))
            return True
        fields = differing(self.params, params)
        known = self.mismatched.get(sender)
        if known is None or known.fields != fields or known.incarnation != incarnation:
            if known is None and len(self.mismatched) >= MAX_MISMATCHED:
                oldest = min(self.mismatched.values(), key=lambda m: m.last_heard)
                del self.mismatched[oldest.node_id]
            self.mismatched[sender] = Mismatch(sender, address, incarnation, fields, 1, now, name)
            self._events.append(ev.ParameterMismatch(sender, address, fields))
            return False
        known.count += 1
        known.last_heard = now
        known.address = address
        return False

    # -------------------------------------------------------------- identity

    def own_id_heard(self, incarnation: int, address: str, now: float, name: str = "") -> None:
        """A datagram with our node ID: our own echo, a clone's, or one of a node whose
        name shares our wire ID (``name`` differs from ours)."""
        if incarnation != self.incarnation or (name and self.name and name != self.name):
            self._clash(
                address, incarnation, now, direct=True, other_name=name if name != self.name else ""
            )
            if self.outgrown < incarnation < self.incarnation and self.clash is not None:
                # We are the newer process beside a live older one: the clone (a
                # restart never hears its previous run). Out for good, until the
                # operator restarts us with a node ID of our own: resuming once the
                # original is out of earshot (a partition) would give one ID a vote
                # on both sides.
                self.clash.until = math.inf

    def listed_newer(self, incarnation: int, address: str, now: float) -> None:
        """A peer (at ``address``) lists our ID with a newer incarnation than ours:
        it hears another process that uses our ID."""
        self._clash(address, incarnation, now, direct=False)

    def stale_sender(
        self, sender: str, incarnation: int, address: str, current: str, current_incarnation: int
    ) -> None:
        """A peer's older incarnation still speaks from another address than its newer
        one: two processes share that ID. Reported once per pair of addresses."""
        key = (sender, address)
        if key in self._clashes_reported or len(self._clashes_reported) >= MAX_MISMATCHED:
            return
        self._clashes_reported.add(key)
        self._events.append(
            ev.DuplicateNodeId(sender, incarnation, address, current, current_incarnation)
        )

    def _clash(
        self, address: str, incarnation: int, now: float, *, direct: bool, other_name: str = ""
    ) -> None:
        if not other_name:  # a collision of two names is not fixed by a new incarnation
            self.newest_clone = max(self.newest_clone, incarnation)
        known = self.clash
        if known is None or now >= known.until:
            self._events.append(
                ev.DuplicateNodeId(
                    self.node_id,
                    incarnation,
                    address if direct else "",
                    "" if direct else address,
                    self.incarnation,
                )
            )
        elif known.direct and not direct:
            known.until = max(known.until, now + self._hold)  # keep naming the one we heard
            return
        elif known.until == math.inf:
            return  # out for good already
        self.clash = Clash(address, incarnation, now + self._hold, direct, other_name)

    def reincarnate(self, incarnation: int) -> None:
        """We took a new incarnation (above every clone's): our own from now on."""
        self.outgrown = self.newest_clone
        self.incarnation = incarnation

    def clashing(self, now: float) -> bool:
        return self.clash is not None and now < self.clash.until

    def clash_deadline(self) -> float | None:
        return None if self.clash is None or self.out_for_good() else self.clash.until

    def out_for_good(self) -> bool:
        """We are the newer of two live processes with one node ID (see own_id_heard)."""
        return self.clash is not None and self.clash.until == math.inf

    # ------------------------------------------------------------- upkeep

    def forget_silent(self, now: float) -> None:
        for address in [a for a, s in self.strangers.items() if now - s.last_heard > FORGET_AFTER]:
            del self.strangers[address]
        for node_id in [n for n, m in self.mismatched.items() if now - m.last_heard > FORGET_AFTER]:
            del self.mismatched[node_id]
        if self.clash is not None and now - self.clash.until > FORGET_AFTER:
            self.clash = None

    def heard_strangers(self, now: float, within: float) -> bool:
        """Whether any stranger or mismatched peer was heard in the last ``within``."""
        return any(now - s.last_heard <= within for s in self.strangers.values()) or any(
            now - m.last_heard <= within for m in self.mismatched.values()
        )

    def problems(self, now: float) -> list[str]:
        """One line per current admission problem, for ``lbd-cli status`` and STATUS."""
        lines = []
        if self.clashing(now) and self.clash is not None:
            where = (
                f"the process at {self.clash.address}"
                if self.clash.direct
                else f"another process (peer {self.clash.address} lists it)"
            )
            if self.clash.other_name:
                lines.append(
                    f"node names {self.name} and {self.clash.other_name} (at "
                    f"{self.clash.address}) share the wire ID {self.node_id}: serving nothing "
                    "while both speak; rename one"
                )
            else:
                how_long = (
                    "until restarted (this process is the newer one)"
                    if self.clash.until == math.inf
                    else "while both speak"
                )
                lines.append(
                    f"node ID {self.name or self.node_id} is also used by {where} "
                    f"(incarnation {self.clash.incarnation}, this one {self.incarnation}): "
                    f"serving nothing {how_long}; give each node its own node_id "
                    "(cloned /etc/machine-id?)"
                )
        for m in sorted(self.mismatched.values(), key=lambda m: m.node_id):
            if now - m.last_heard <= REPORT_WITHIN:
                lines.append(
                    f"node {m.name or m.node_id} at {m.address} disagrees on "
                    f"{', '.join(m.fields)}: "
                    "not admitted (every node must have the same value)"
                )
        for s in sorted(self.strangers.values(), key=lambda s: s.address):
            if now - s.last_heard <= REPORT_WITHIN:
                lines.append(f"hearing {s.count} datagrams from {s.address} that fail {s.reason}")
        return lines
