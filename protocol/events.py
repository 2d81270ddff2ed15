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
    """Two processes speak with one node ID: a configuration error.

    ``also_at`` empty: the clash is with our own ID (``address`` is the other
    process, ``ours`` our incarnation): this node serves nothing while it lasts.
    ``address`` empty: the same, learnt from the peer at ``also_at`` that lists our
    ID with the newer ``incarnation``. Both set: a peer's older incarnation still
    speaks from ``address`` while its newer one (``ours``) speaks from ``also_at``."""

    node_id: str
    incarnation: int
    address: str = ""
    also_at: str = ""
    ours: int = 0


@dataclass(frozen=True, slots=True)
class StrangerHeard:
    """Datagrams from ``address`` that cannot be opened (``reason``), first heard."""

    address: str
    reason: str


@dataclass(frozen=True, slots=True)
class ParameterMismatch:
    """A peer's agreed parameters differ from ours in ``fields``: it is not admitted.
    Empty ``fields``: it now agrees again."""

    node_id: str
    address: str
    fields: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MemberRefused:
    """A peer was not admitted: the view already holds the most members allowed."""

    node_id: str
    limit: int


@dataclass(frozen=True, slots=True)
class BaseChanged:
    """The quorum base changed (for logs; ``PersistBase`` is the order to store it).

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
    | StrangerHeard
    | ParameterMismatch
    | MemberRefused
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
class PersistBase:
    """Store the quorum base durably before anything that follows is carried out.

    Ordered before the heartbeat that advertises the base (and before a claim made
    under it): a peer may confirm a base change on seeing it, so a restart must
    never come back with an older base. If the shell cannot store it, it must
    carry out none of the actions that follow (and stop: fail closed)."""

    base: tuple[str, ...]
    epoch: int
    previous: tuple[str, ...] | None = None
    params: bytes | None = None
    """The parameter digests it was agreed under (given back as ``base_params``)."""
    credentials: bytes | None = None
    """Digest of the cluster name and key it was agreed under (``base_credentials``)."""


@dataclass(frozen=True, slots=True)
class Transmit:
    data: bytes


@dataclass(frozen=True, slots=True)
class BuildTable:
    """Build the ownership table of ``weights`` (``ownership.compute_owners``) and
    hand it back with ``Node.table_built``.

    Asked only by a core made with ``defer_tables``: a table of many members with
    distinct weights takes tens of milliseconds, too long for the shell's loop, so
    the shell builds it elsewhere (the daemon: in a thread). Until it comes back the
    core stays on its current view, as if it had not yet heard of the change. Not
    ordered with the other actions: it changes nothing outside the core."""

    weights: tuple[tuple[str, int], ...]
    """(node ID, effective weight) per member, sorted by ID (``normalize_members``)."""
    buckets: int
    seed: int


Action = PersistBase | ApplyKernel | Transmit | BuildTable
