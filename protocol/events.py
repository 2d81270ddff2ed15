"""Typed events the core reports for logs and the journal, and actions for its shell.

Events are facts ("member B declared dead"); actions are orders the shell must
carry out in the order given (apply the kernel state, then transmit), because
break-before-make depends on releasing in the kernel before advertising.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MemberJoined:
    node_id: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberRestarted:
    node_id: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberSuspected:
    node_id: str
    silent_for: float


@dataclass(frozen=True, slots=True)
class MemberDead:
    node_id: str
    silent_for: float


@dataclass(frozen=True, slots=True)
class MemberLeft:
    node_id: str


@dataclass(frozen=True, slots=True)
class ViewChanged:
    members: tuple[str, ...]
    digest: str


@dataclass(frozen=True, slots=True)
class ViewAgreed:
    members: tuple[str, ...]
    digest: str
    owned: int


@dataclass(frozen=True, slots=True)
class BucketsReleased:
    count: int
    owned: int


@dataclass(frozen=True, slots=True)
class BucketsGained:
    count: int
    owned: int


@dataclass(frozen=True, slots=True)
class QuorumLost:
    heard: int
    needed_of: int


@dataclass(frozen=True, slots=True)
class QuorumRegained:
    heard: int
    needed_of: int


@dataclass(frozen=True, slots=True)
class LeaseLapsed:
    """The lease ran out (quorum lost, or this process was stalled): all buckets dropped."""

    dropped: int


@dataclass(frozen=True, slots=True)
class DuplicateNodeId:
    """Another process speaks with this node's ID: a configuration error."""

    node_id: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class BaseChanged:
    """The quorum base changed: the shell persists it so a restart remembers it.

    ``previous`` is the base before it while the change is unconfirmed (a quorum of
    the previous base has not adopted it yet), else None: a restart must keep
    needing both, or a stale quorum of the previous base could act beside it.
    """

    base: tuple[str, ...]
    epoch: int
    previous: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class LeftCluster:
    node_id: str


Event = (
    MemberJoined
    | MemberRestarted
    | MemberSuspected
    | MemberDead
    | MemberLeft
    | ViewChanged
    | ViewAgreed
    | BucketsReleased
    | BucketsGained
    | QuorumLost
    | QuorumRegained
    | LeaseLapsed
    | DuplicateNodeId
    | BaseChanged
    | LeftCluster
)


@dataclass(frozen=True, slots=True)
class ApplyKernel:
    """Make the kernel accept exactly ``owned`` until ``lease_until`` (caller's clock).

    ``lease_until`` None means no lease: the node accepts no NEW connection.
    """

    owned: frozenset[int]
    lease_until: float | None


@dataclass(frozen=True, slots=True)
class Transmit:
    data: bytes


Action = ApplyKernel | Transmit
