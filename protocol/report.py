"""What a node tells its operator: the rows of ``lbd-cli members`` and the view digest."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from lbd.protocol.admission import Mismatch
from lbd.protocol.messages import Member, health_words
from lbd.protocol.peers import Peer


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """One row of ``lbd-cli members``."""

    node_id: str
    address: str
    state: str
    slices: int
    share: float
    weight: int
    last_heard_ms: int | None
    incarnation: int
    is_self: bool
    key: str = ""
    """Fingerprint of the key its datagrams are sealed with (key rotation)."""
    mismatch: tuple[str, ...] = ()
    """The agreed parameters it differs in (state "mismatch": not admitted)."""
    name: str = ""
    """The node's name (``node_id`` is then its wire ID)."""
    health: str = "ok"
    """``ok`` or why it is unhealthy (``messages.health_words``), as it last said."""


def view_digest(view: tuple[Member, ...]) -> str:
    """A short name for a view (logs, ``lbd-cli``); not used for any decision."""
    text = ";".join(f"{m.node_id},{m.incarnation},{m.weight},{int(m.draining)}" for m in view)
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def member_rows(
    me: MemberInfo,
    peers: Iterable[Peer],
    mismatched: Iterable[Mismatch],
    *,
    buckets: int,
    interval: float,
    now: float,
) -> list[MemberInfo]:
    """Our own row and one per known peer, sorted by name. A peer's slices are what
    its last heartbeat says it holds, counted only while it is in our view. Peers whose
    parameters differ get a row in state "mismatch" (never admitted)."""
    rows = [me]
    suspect_after = 2 * interval
    for peer in peers:
        heartbeat = peer.last_heartbeat
        in_view = peer.in_view and not (peer.left or peer.declared_dead)
        slices = heartbeat.held if heartbeat is not None and in_view else 0
        rows.append(
            MemberInfo(
                peer.node_id,
                peer.address,
                peer.state(now, suspect_after).value,
                slices,
                100.0 * slices / buckets,
                peer.weight,
                round(1000 * peer.silent_for(now)),
                peer.incarnation,
                False,
                peer.key_id.hex(),
                name=peer.name or peer.node_id,
                health=health_words(heartbeat.health) if heartbeat is not None else "ok",
            )
        )
    listed = {row.node_id: row for row in rows}
    for m in mismatched:
        known = listed.get(m.node_id)
        if known is not None and (known.is_self or known.incarnation >= m.incarnation):
            continue  # the admitted incarnation is newer: the mismatch is history
        if known is not None:
            rows.remove(known)  # restarted with other parameters: not admitted now
        rows.append(
            MemberInfo(
                m.node_id,
                m.address,
                "mismatch",
                0,
                0.0,
                0,
                round(1000 * (now - m.last_heard)),
                m.incarnation,
                False,
                "",
                m.fields,
                m.name or m.node_id,
            )
        )
    rows.sort(key=lambda r: (r.name or r.node_id, r.node_id))  # as people read them
    return rows
