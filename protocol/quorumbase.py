"""The quorum base of one node: the last agreed view, numbered by an epoch (sans-I/O).

Quorums are judged by the base, never by the current view alone, so that
sequential failures can shrink the cluster while a partitioned minority cannot
claim. When the base changes, the previous one stays in force (a decision then
needs a quorum of both, ``NodeState._bases``) until a quorum of it has adopted
the change. Every change is made durable (``PersistBase``) in the step that
makes it, before that step's heartbeat can advertise it. ``membership.Node``
calls these from its transitions; the theory of operation is there.
"""

from __future__ import annotations

from lbd.protocol import events as ev
from lbd.protocol.nodestate import NodeState
from lbd.protocol.quorum import has_quorum


def _accepts_nothing(action: ev.Action) -> bool:
    return isinstance(action, ev.ApplyKernel) and (not action.owned or action.lease_until is None)


class QuorumBase(NodeState):
    """The base's transitions: set, confirmed, persisted, and quorum kept or lost."""

    def _confirm_base_change(self) -> None:
        """Drop the previous base once a quorum of it has adopted the change."""
        previous = self._prev_base
        if previous is None:
            return
        # (epoch, base) as adoption orders them: an equal epoch with another base (a
        # stale node's own claim) is not an adoption of ours. So is a base we have
        # advertised since the change, at an epoch after the previous base's: a
        # peer that adopted it and then left or died no longer judges by the
        # previous base alone, and waiting for it to adopt our latest epoch would
        # keep the previous base (and its quorum) alive forever.
        ours = (self._epoch, self._sorted_base())
        since = self._prev_epoch if self._lineage_of is previous else None
        adopted = {
            p.node_id
            for p in self._peers.values()
            if (hb := p.last_heartbeat) is not None
            and (
                (hb.epoch, hb.base) >= ours
                or (since is not None and hb.epoch > since and hb.base in self._lineage)
            )
        }
        adopted.add(self.node_id)
        if has_quorum(adopted, previous):
            self._prev_base = None

    def _set_base(self, base: frozenset[str], epoch: int) -> None:
        if self._base and base != self._base:
            self._prev_base = self._base
            self._prev_epoch = self._epoch
        self._base = base
        self._epoch = epoch
        # Agreed by us or adopted from an admitted peer: under our parameters, name and
        # key either way.
        self._base_params = self.params
        self._base_credentials = self.credentials()

    def _track_quorum(self, candidate: float | None) -> None:
        ok = candidate is not None
        if ok == self._quorum_ok:
            return
        self._quorum_ok = ok
        heard = (
            sum(
                1
                for p in self._peers.values()
                if p.node_id in self._base and not p.declared_dead and not p.left
            )
            + 1
        )
        event = ev.QuorumRegained if ok else ev.QuorumLost
        self._events.append(event(heard, len(self._base)))

    def _persist_base_change(self, first_action: int) -> None:
        """Queue PersistBase for a base that changed in the step whose actions start at
        ``first_action``, and say so."""
        if (self._epoch, self._base, self._prev_base) == self._reported_base:
            return
        self._reported_base = (self._epoch, self._base, self._prev_base)
        previous = None if self._prev_base is None else tuple(sorted(self._prev_base))
        # Durable before this step's claim and heartbeat, which may advertise it;
        # but after a kernel state that accepts nothing (a lapse, a full release):
        # giving up must never wait for a disk (the soak saw a resumed node keep
        # serving for the length of an fsync while its peers had taken over).
        at = first_action
        while at < len(self._actions) and _accepts_nothing(self._actions[at]):
            at += 1
        self._actions.insert(
            at,
            ev.PersistBase(
                self._sorted_base(),
                self._epoch,
                previous,
                self._base_params,
                self._base_credentials,
            ),
        )
        self._events.append(ev.BaseChanged(self._sorted_base(), self._epoch, previous))
