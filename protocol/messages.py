"""Message values exchanged between nodes (decoded form), and their limits.

Message type numbers are append-only: never reuse or renumber one, so that
mixed-version clusters can at least tell what they cannot read.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import IntEnum

from lbd.protocol.errors import DecodeError

MAX_NODES = 256
MAX_NODE_ID_LEN = 64
MAX_WEIGHT = 1000
# Why a node is unhealthy, as its heartbeats say (0: healthy). Flags, not names, so
# that a heartbeat of 69 nodes still fits one frame; the names stay in the node's
# own status and journal.
HEALTH_CHECK = 1  # a configured check fails
HEALTH_INTERFACE = 2  # a tracked interface is down
HEALTH_AGENT = 4  # the load agent said "down"
HEALTH_MAX = HEALTH_CHECK | HEALTH_INTERFACE | HEALTH_AGENT
_HEALTH_WORDS = ((HEALTH_CHECK, "check"), (HEALTH_INTERFACE, "interface"), (HEALTH_AGENT, "agent"))
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


class MessageType(IntEnum):
    HEARTBEAT = 1
    LEAVE = 2


@dataclass(frozen=True, slots=True)
class Member:
    """One node as a view lists it. Ownership depends on id, weight and draining."""

    node_id: str
    incarnation: int
    weight: int
    draining: bool


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Periodic state of the sender.

    ``view`` is the sender's current membership, sorted by node ID; ``acks[i]`` is
    the highest sequence the sender has received from ``view[i]`` (0 for itself or
    nothing yet). An ack is also the sender's support for that member's lease.
    ``agreed`` says the sender has completed the barrier on ``view``; ``held`` is
    how many buckets the sender currently has in its kernel set. ``base`` is the
    sender's quorum base (the node IDs of the last agreed view) and ``epoch`` its
    generation: a node adopts any newer base it hears of, so a node that missed
    an agreement (hung, partitioned) never judges quorums by an outdated base.
    """

    sender: str
    incarnation: int
    seq: int
    weight: int
    draining: bool
    view: tuple[Member, ...]
    acks: tuple[int, ...]
    agreed: bool
    held: int
    epoch: int = 0
    base: tuple[str, ...] = ()
    params: bytes = b"\x00\x00\x00\x00"
    """Digests of the sender's agreed parameters (``params.py``): a peer whose
    digests differ from ours is never admitted."""
    name: str = ""
    """The sender's node name, for people (logs, ``lbd-cli``); when given, ``sender``
    must be ``wire_id(name)``. Empty: the sender's ID is its name."""
    health: int = 0
    """Why the sender is unhealthy (``HEALTH_*`` flags), 0 if it is healthy."""


@dataclass(frozen=True, slots=True)
class Leave:
    """The sender has released every bucket and dropped its lease; forget it now."""

    sender: str
    incarnation: int
    seq: int


Message = Heartbeat | Leave


WIRE_ID_PATTERN = re.compile(r"[0-9a-f]{8}")
"""A wire ID: 8 lowercase hex digits, sent as 4 bytes."""


def wire_id(name: str) -> str:
    """The short ID a node named ``name`` goes by in the protocol (views, bases, acks):
    4 bytes on the wire instead of up to 64, so that a heartbeat of a 64-node cluster
    fits one Ethernet frame. Two names with one wire ID clash like a cloned node ID
    and are refused with both names (``admission.py``)."""
    return hashlib.blake2b(b"lbd-wire-id\x00" + name.encode(), digest_size=4).hexdigest()


def validate_node_id(node_id: object) -> str:
    """Return node_id if it is a valid node ID, else raise DecodeError."""
    if not isinstance(node_id, str) or not NODE_ID_PATTERN.fullmatch(node_id):
        raise DecodeError(f"invalid node id {node_id!r}")
    return node_id


def health_words(flags: int) -> str:
    """``"ok"``, or the reasons of a ``HEALTH_*`` value: ``"unhealthy: check, agent"``."""
    words = [word for bit, word in _HEALTH_WORDS if flags & bit]
    return f"unhealthy: {', '.join(words)}" if words else "ok"
