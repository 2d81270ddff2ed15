"""The authenticated wire format: Heartbeat/Leave <-> one sealed UDP datagram.

Theory of operation
-------------------
Every datagram is an envelope around an encrypted msgpack body::

    offset  size  field
    0       2     magic b"LB"
    2       1     wire version (2)
    3       4     key fingerprint: SHA-256(b"lbd-key-id" + key)[:4] (``keyring.py``)
    7       12    nonce (random, from ``nonce_source``)
    19      n+16  ChaCha20-Poly1305 ciphertext of the body, then its tag

The body is a msgpack array of the message's fields (``wirebody.py``), in which
the view, the acks and the base travel as compact bins (``wirebins.py``). This
module seals and opens the envelope; the layout of what is inside is theirs.

Why this layout: with 8-hex IDs a view member costs 18 bytes (13 in the view,
5 in the acks) and a base member outside the view 5, so a heartbeat whose view
and base hold 64 distinct nodes, every field at its widest and a 64-character
name, seals to 1364 bytes: one 1500-byte frame (``FRAME_PAYLOAD``, 1472 bytes
of UDP payload over IPv4). That holds up to 69 nodes; from 70 on a heartbeat may
take two or more frames (IP fragments). ``heartbeat_size_bound`` gives the worst
case for any count (4844 bytes at 256). The daemon's incarnations are
milliseconds since the epoch, good until the year 10889 in their 6 bytes; 5-byte
seqs last 34 years of 1000 heartbeats a second. Version 2 added ``params``,
``name`` and this layout, version 3 ``health``; a datagram of another version is
refused as an unknown version (counted, and named in status: a rolling upgrade
across a version runs as two clusters, the upgraded side taking over as it gains
the majority).

The associated data is the 19 header bytes followed by the UTF-8 cluster name,
so the header cannot be altered and a datagram for another cluster fails
authentication even when both clusters share a key.

``Codec.open`` works from the cheapest check to the dearest: size (before
anything is parsed or decrypted), magic, version, key lookup, AEAD tag, msgpack
decoding under tight limits, then strict field validation. Its one promise is
that *any* input either yields a valid Heartbeat/Leave or raises DecodeError
(AuthError, VersionError and ReplayError are subclasses), never another
exception. ``Codec.seal`` refuses (ValueError) any message that a receiver
would refuse or could not receive unchanged.

Replays are not the codec's business: a sealed datagram is self-contained. The
caller passes every *opened* message through a ReplayGuard (``replay.py``).

Nonces are random 96-bit values. The chance that two datagrams under one key
share a nonce after n datagrams (all senders together) is about n**2 / 2**97,
some 2**-33 after 2**32 datagrams: rotate the key long before that.

The keyring, the replay guard, the body's limits and ``key_fingerprint`` are
importable from here too, as they were before they had modules of their own.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import msgpack
from cryptography.exceptions import InvalidTag

from lbd.protocol.errors import AuthError, ConfigError, DecodeError, VersionError
from lbd.protocol.keyring import FINGERPRINT_LEN, KEY_LEN, Keyring, key_fingerprint
from lbd.protocol.messages import MAX_NODE_ID_LEN, MAX_NODES, MAX_WEIGHT, Message
from lbd.protocol.params import DIGEST_LEN, FIELDS, MAX_FIELDS
from lbd.protocol.replay import ReplayGuard
from lbd.protocol.wirebins import MAX_INCARNATION, MAX_SEQ, widest_bins
from lbd.protocol.wirebody import (
    HEARTBEAT_FIELDS,
    MAX_COUNTER,
    MAX_HELD,
    body_of,
    message_from_body,
)

__all__ = [
    "FINGERPRINT_LEN",
    "FRAME_PAYLOAD",
    "HEADER_LEN",
    "KEY_LEN",
    "MAGIC",
    "MAX_COUNTER",
    "MAX_DATAGRAM",
    "MAX_HELD",
    "MAX_INCARNATION",
    "MAX_SEQ",
    "MIN_DATAGRAM",
    "NONCE_LEN",
    "TAG_LEN",
    "WIRE_VERSION",
    "Codec",
    "Keyring",
    "NonceSource",
    "ReplayGuard",
    "heartbeat_size_bound",
    "key_fingerprint",
]

MAGIC = b"LB"
WIRE_VERSION = 3
NONCE_LEN = 12
TAG_LEN = 16
_VERSION_AT, _FINGERPRINT_AT, _NONCE_AT = 2, 3, 7  # offsets into the header
HEADER_LEN = _NONCE_AT + NONCE_LEN  # 19
# The smallest body (a one-byte msgpack value) is still a byte.
MIN_DATAGRAM = HEADER_LEN + TAG_LEN + 1
MAX_DATAGRAM = 65000  # under UDP's 65507: the largest heartbeat possible fits (~37 kB)
FRAME_PAYLOAD = 1500 - 20 - 8  # UDP payload of one Ethernet frame over IPv4: 1472

NonceSource = Callable[[int], bytes]

# Decoding limits for the body, the only msgpack value: the only strings are the
# sender and the name (node IDs, at most 64 characters), the only arrays the body
# itself, maps and extension types never occur, and the only bins are the four
# binary fields, none larger than a datagram. So a hostile body can make msgpack
# allocate no more than a valid one could.
_BODY_LIMITS: dict[str, int] = {
    "max_str_len": MAX_NODE_ID_LEN,
    "max_bin_len": MAX_DATAGRAM,
    "max_array_len": HEARTBEAT_FIELDS,
    "max_map_len": 0,
    "max_ext_len": 0,
}


class Codec:
    """Seals messages into datagrams and opens datagrams into messages."""

    __slots__ = ("_associated_suffix", "_cluster_name", "_keyring", "_nonce_source")

    def __init__(
        self,
        cluster_name: str,
        keyring: Keyring,
        nonce_source: NonceSource = os.urandom,
    ) -> None:
        if not isinstance(cluster_name, str) or not cluster_name:
            raise ConfigError("cluster name must be a non-empty string")
        try:
            self._associated_suffix = cluster_name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError("cluster name is not encodable as UTF-8") from exc
        if not isinstance(keyring, Keyring):
            raise ConfigError("keyring must be a Keyring")
        self._cluster_name = cluster_name
        self._keyring = keyring
        self._nonce_source = nonce_source

    @property
    def cluster_name(self) -> str:
        return self._cluster_name

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    def seal(self, message: Message) -> bytes:
        """Encode, encrypt and authenticate message with the current key.

        Raises ValueError if message would not pass the receivers' validation or
        could not reach them unchanged (a number too wide for its bytes, a base
        out of order): that is a bug in the caller, and better found here than
        by every peer.
        """
        body = body_of(message)
        try:
            message_from_body(body)
        except DecodeError as exc:
            raise ValueError(f"refusing to seal an invalid message: {exc}") from exc
        nonce = self._nonce_source(NONCE_LEN)
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_LEN:
            raise ConfigError(f"nonce source must return {NONCE_LEN} bytes")
        header = MAGIC + bytes((WIRE_VERSION,)) + self._keyring.current_fingerprint + nonce
        plaintext = msgpack.packb(body)
        sealed = self._keyring.sealing_aead().encrypt(
            nonce, plaintext, header + self._associated_suffix
        )
        datagram = header + sealed
        if len(datagram) > MAX_DATAGRAM:
            # Unreachable while MAX_NODES and MAX_NODE_ID_LEN keep their values.
            raise ValueError(f"sealed message is {len(datagram)} bytes, over {MAX_DATAGRAM}")
        return datagram

    def open(self, data: bytes) -> Message:
        """Authenticate, decrypt and validate one datagram.

        Returns a valid Heartbeat or Leave, or raises DecodeError (AuthError when
        the key or cluster is wrong or the datagram was altered). Nothing else.
        Replay checking is the caller's: see ReplayGuard.
        """
        if not isinstance(data, bytes):
            raise DecodeError("datagram is not bytes")
        # Size first: nothing of an over- or undersized datagram is looked at.
        if len(data) < MIN_DATAGRAM:
            raise DecodeError(f"datagram too short ({len(data)} bytes)")
        if len(data) > MAX_DATAGRAM:
            raise DecodeError(f"datagram too long ({len(data)} bytes)")
        if data[:_VERSION_AT] != MAGIC:
            raise DecodeError("bad magic")
        if data[_VERSION_AT] != WIRE_VERSION:
            raise VersionError(f"wire version {data[_VERSION_AT]}, not {WIRE_VERSION}")
        aead = self._keyring.opening_aead(data[_FINGERPRINT_AT:_NONCE_AT])
        if aead is None:
            raise AuthError("unknown key fingerprint")
        header = data[:HEADER_LEN]
        try:
            plaintext = aead.decrypt(
                data[_NONCE_AT:HEADER_LEN], data[HEADER_LEN:], header + self._associated_suffix
            )
        except InvalidTag:
            raise AuthError("authentication failed (wrong key or cluster, or altered)") from None
        return message_from_body(_unpack_body(plaintext))


def _unpack_body(plaintext: bytes) -> object:
    try:
        return msgpack.unpackb(
            plaintext, raw=False, use_list=False, strict_map_key=True, **_BODY_LIMITS
        )
    # ValueError covers ExtraData, FormatError, StackError and UnicodeDecodeError;
    # UnpackException covers OutOfData, which is not a ValueError.
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        # msgpack's messages are short ("3 exceeds max_array_len(2)"); cap them anyway.
        raise DecodeError(f"malformed body: {type(exc).__name__}: {str(exc)[:80]}") from None


def heartbeat_size_bound(
    members: int, name_len: int = MAX_NODE_ID_LEN, params_len: int = DIGEST_LEN * len(FIELDS)
) -> int:
    """The largest sealed heartbeat whose view and base hold ``members`` distinct
    nodes, all with 8-hex IDs (``messages.wire_id``), given a name of ``name_len``
    characters and ``params_len`` bytes of digests (by default all of ``FIELDS``).

    Every number at its widest, and whatever split of the nodes between the view
    and the base (the view holding the sender, the base at most MAX_NODES). 1364
    bytes at 64 nodes, within one frame (``FRAME_PAYLOAD``); 18 bytes more for
    each node past that.
    """
    if type(members) is not int or not 1 <= members <= 2 * MAX_NODES:
        raise ValueError(f"members must be an int in 1..{2 * MAX_NODES}")
    if type(name_len) is not int or not 0 <= name_len <= MAX_NODE_ID_LEN:
        raise ValueError(f"name_len must be an int in 0..{MAX_NODE_ID_LEN}")
    if (
        type(params_len) is not int
        or not 0 < params_len <= MAX_FIELDS * DIGEST_LEN
        or params_len % DIGEST_LEN
    ):
        raise ValueError(f"params_len must be 1..{MAX_FIELDS} digests of {DIGEST_LEN} bytes")
    fixed = (
        1  # the array header (fixarray of 15)
        + 1  # message type
        + _str_size(8)  # sender: 8 hex digits
        + _uint_size(MAX_INCARNATION)
        + _uint_size(MAX_SEQ)
        + _uint_size(MAX_WEIGHT)
        + 1  # draining
        + 1  # agreed
        + 1  # health: a fixint
        + _uint_size(MAX_HELD)
        + _uint_size(MAX_COUNTER)  # epoch
        + _bin_size(params_len)
        + _str_size(name_len)
    )
    worst = 0
    for in_view in range(1, min(members, MAX_NODES) + 1):
        # The base holds as many of the nodes as it may; more never makes it smaller.
        outside = min(members - in_view, MAX_NODES)
        variable = sum(map(_bin_size, widest_bins(in_view, outside)))
        worst = max(worst, variable)
    return HEADER_LEN + TAG_LEN + fixed + worst


def _uint_size(value: int) -> int:
    """Bytes of msgpack's shortest encoding of a non-negative int."""
    return (
        1
        if value < 0x80
        else 2
        if value < 2**8
        else 3
        if value < 2**16
        else (5 if value < 2**32 else 9)
    )


def _str_size(length: int) -> int:
    return length + (1 if length < 32 else 2 if length < 2**8 else 3 if length < 2**16 else 5)


def _bin_size(length: int) -> int:
    return length + (2 if length < 2**8 else 3 if length < 2**16 else 5)
