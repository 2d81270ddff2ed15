"""The cluster parameters every node must agree on, and their per-field digests.

Ownership and safety depend on more than the view: two nodes that differ in the
bucket count or the jhash seed each "agree" on a view while a quarter of the
clients are accepted by both; a fast-profile node among default ones claims a
hung node's slices while that node's longer lease still runs. So every heartbeat
carries (authenticated, inside the sealed body) one short digest per parameter,
and a peer whose digests differ from ours is never admitted, never counted
toward a quorum and never acknowledged: it is reported, naming the parameter.

Digests are per field, not one for the whole set, so that each side can say
*which* parameter differs. ``FIELDS`` is append-only, like message type numbers:
a field's position is its identity on the wire. A node that knows fewer fields
than a peer reports the extra ones by position.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from lbd.protocol.errors import ConfigError

FIELDS: tuple[str, ...] = (
    "protocol",     # the protocol version (wire layout and core rules)
    "buckets",
    "seed",
    "quorum",
    "timers",       # every timer value: a fast node among default ones breaks S1
    "prefix4",
    "prefix6",
    "balance",
    "vips",
    "mac_mode",
    "cluster_mac",
)  # fmt: skip
"""Append-only: never reorder, rename or remove one."""

DIGEST_LEN = 4
"""Bytes per field: a differing field passes unnoticed with probability 2**-32."""
MAX_FIELDS = 64
"""Most fields a heartbeat may carry (bounds what a peer can make us compare)."""
PROTOCOL = "lbd-2"
"""Bumped whenever nodes of two versions could not safely share one cluster."""

_DOMAIN = b"lbd-param\x00"


def digest_params(values: Mapping[str, str]) -> bytes:
    """The digests of ``values`` (canonical texts by field name), in ``FIELDS`` order.

    Every field must be given: a forgotten one would silently digest as agreed."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ConfigError(f"unknown agreed parameter(s): {', '.join(sorted(unknown))}")
    missing = [name for name in FIELDS if name not in values]
    if missing:
        raise ConfigError(f"agreed parameter(s) not given: {', '.join(missing)}")
    return b"".join(
        hashlib.blake2b(
            _DOMAIN + name.encode() + b"=" + values[name].encode(), digest_size=DIGEST_LEN
        ).digest()
        for name in FIELDS
    )


def differing(ours: bytes, theirs: bytes) -> tuple[str, ...]:
    """Names of the fields whose digests differ (``field #N`` for one we do not know)."""
    out = []
    for index in range(max(len(ours), len(theirs)) // DIGEST_LEN):
        at = index * DIGEST_LEN
        if ours[at : at + DIGEST_LEN] != theirs[at : at + DIGEST_LEN]:
            out.append(FIELDS[index] if index < len(FIELDS) else f"field #{index}")
    return tuple(out)


def valid_params_blob(blob: bytes) -> bool:
    """Whether ``blob`` has the shape of a digest list (a whole number of digests)."""
    return 0 < len(blob) <= MAX_FIELDS * DIGEST_LEN and len(blob) % DIGEST_LEN == 0
