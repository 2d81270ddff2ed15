"""When a node sends its heartbeat and when it reads its socket (timing, not safety).

Heartbeat wave
--------------
The view's smallest node ID is the *pacer*: it sends on its own timer, and every
other member sends the moment it hears the pacer. So a node's peers arrive in
one burst per interval instead of N-1 separate ones. A node that has just sent
waits for the pacer's next heartbeat instead (one gap of at most 1.5 intervals
while it falls into step). Rates stay one heartbeat per interval; a follower's
own timer, ``WAVE_SLACK`` later than the pacer's, is only the fallback (e.g.
when the pacer dies).

Quiet reading
-------------
While the cluster is *settled* (agreed, the same view and base everywhere,
nothing pending) no datagram needs an answer at once: the caller may leave
them in the socket until its next wake-up and hand them over with their arrival
times. The pacer wakes to send; a follower ``QUIET_SLACK`` after the pacer's
next heartbeat is due, which keeps the wave. One wake-up per interval, whatever
N is. Reading late only ever delays: a peer's silence is measured from the
arrival of its heartbeat and a lease from our own send times, so no verdict
comes sooner than it would have.

S1 never depends on anything in here.
"""

from __future__ import annotations

from collections.abc import Iterable

from lbd.protocol.peers import Peer

WAVE_SLACK = 0.1
"""A follower's own timer runs this fraction of an interval behind the pacer's wave."""
QUIET_SLACK = 0.05
"""A settled follower reads its socket this fraction of an interval after the pacer's
heartbeat is due (less than ``WAVE_SLACK``: it reads before its own timer)."""


def on_pacer_heartbeat(
    now: float, last_sent: float, next_heartbeat: float, interval: float
) -> float:
    """The next send time once the pacer's heartbeat is heard at ``now``."""
    if now - last_sent >= interval / 2:
        return min(next_heartbeat, now)  # answer the wave at once
    return max(next_heartbeat, now + interval * (1 + WAVE_SLACK))  # just sent: skip one


def after_send(now: float, pacer: Peer | None, interval: float) -> float:
    """The next send time after sending at ``now`` (a follower's is the fallback)."""
    following = pacer is not None and now - pacer.last_heard < interval
    return now + interval * (1 + WAVE_SLACK * following)


def settled(peers: Iterable[Peer], epoch: int, base: tuple[str, ...]) -> bool:
    """Whether every live peer is in our view and advertises it, agreed, with our
    (epoch, base), and hears us. The caller checks its own state (agreed, quorum,
    nothing pending) first."""
    for peer in peers:
        if peer.left or peer.declared_dead:
            continue
        hb = peer.last_heartbeat
        if (
            hb is None
            or not hb.agreed
            or not peer.in_view
            or not peer.view_match
            or peer.deaf_since is not None
            or peer.suspected
            or (hb.epoch, hb.base) != (epoch, base)
        ):
            return False
    return True


def quiet_until(
    next_heartbeat: float, pacer: Peer | None, interval: float, last_step: float
) -> float | None:
    """Until when a settled node may leave datagrams unread (``pacer`` None: we pace)."""
    until = next_heartbeat
    if pacer is not None:
        until = min(until, pacer.last_heard + interval * (1 + QUIET_SLACK))
    return until if until > last_step else None
