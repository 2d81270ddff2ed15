"""The authenticated wire format: Heartbeat/Leave <-> one sealed UDP datagram.

Theory of operation
-------------------
Every datagram is an envelope around an encrypted msgpack body::

    offset  size  field
    0       2     magic b"LB"
    2       1     wire version (2)
    3       4     key fingerprint: SHA-256(b"lbd-key-id" + key)[:4]
    7       12    nonce (random, from ``nonce_source``)
    19      n+16  ChaCha20-Poly1305 ciphertext of the body, then its tag

The body is a msgpack array: ``[2, sender, incarnation, seq]`` for a Leave,
``[1, sender, incarnation, seq, weight, draining, view, acks, agreed, held,
epoch, base, params, name]`` for a Heartbeat. ``sender`` and ``name`` are str,
the flags bools, the numbers ints; ``view``, ``acks``, ``base`` and ``params``
are bins laid out as below, all numbers in them big-endian and unsigned.

*ID encoding*, for every node ID inside a bin: a tag byte, then

* tag 0: 4 bytes, an ID of 8 lowercase hex digits (``messages.wire_id``);
* tag 1..64: that many ASCII bytes, a valid node ID *not* of that form.

One spelling per ID: an 8-hex ID sent with tag 1..64 is refused, as are tags
65..255.

``view``: the members, strictly sorted by node ID (as str), 1..MAX_NODES of
them, the sender among them; each is its ID encoding, the incarnation in 6
bytes, then 2 bytes holding the weight (0..MAX_WEIGHT) in bits 0..14 and
draining in bit 15 (``0x8000``).

``acks``: exactly len(view) 5-byte numbers, ``acks[i]`` being view[i]'s.

``base``: a bitmap over the view, ceil(len(view) / 8) bytes, bit i (counted
from the most significant bit of the first byte) set when view[i] is in the
base, the bits past len(view) zero; then the base members that are not in the
view, strictly sorted, each in the ID encoding. The decoded base is the sorted
tuple of all of them, at most MAX_NODES.

``params``: per-field digests of the parameters every node must agree on
(``params.py``). ``name``: the sender's node name, or empty; when given,
``sender`` must be ``wire_id(name)``.

Limits: incarnations (the sender's, every view member's, a Leave's) are
0..2**48-1 (``MAX_INCARNATION``; the daemon's are milliseconds since the epoch,
good until the year 10889); seq (1..) and acks are 0..2**40-1 (``MAX_SEQ``,
34 years of 1000 heartbeats a second); epoch 0..2**63-1; held 0..65536.

Why this layout: with 8-hex IDs a view member costs 18 bytes (13 in the view,
5 in the acks) and a base member outside the view 5, so a heartbeat whose view
and base hold 64 distinct nodes, every field at its widest and a 64-character
name, seals to 1363 bytes: one 1500-byte frame (``FRAME_PAYLOAD``, 1472 bytes
of UDP payload over IPv4). That holds up to 70 nodes; from 71 on a heartbeat may
take two or more frames (IP fragments). ``heartbeat_size_bound`` gives the worst
case for any count (4843 bytes at 256). The view and the base each travel as a bin
of their own so that a receiver can recognise the ones it already validated
by their bytes; since the base's bitmap refers to the view, a base is
recognised by the (view, base) bytes together. Every bin has one spelling per
value, so equal bytes mean an equal value and nothing else does. Version 2
added ``params``, ``name`` and this layout; a version-1 datagram is refused as
an unknown version.

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
caller passes every *opened* message through a ReplayGuard.

Nonces are random 96-bit values. The chance that two datagrams under one key
share a nonce after n datagrams (all senders together) is about n**2 / 2**97,
some 2**-33 after 2**32 datagrams: rotate the key long before that.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from lbd.protocol.errors import (
    AuthError,
    ConfigError,
    DecodeError,
    ReplayError,
    VersionError,
)
from lbd.protocol.messages import (
    MAX_NODE_ID_LEN,
    MAX_NODES,
    MAX_WEIGHT,
    NODE_ID_PATTERN,
    WIRE_ID_PATTERN,
    Heartbeat,
    Leave,
    Member,
    Message,
    MessageType,
    validate_node_id,
    wire_id,
)
from lbd.protocol.params import DIGEST_LEN, FIELDS, MAX_FIELDS, valid_params_blob

_K = TypeVar("_K")
_T = TypeVar("_T")

MAGIC = b"LB"
WIRE_VERSION = 2
KEY_LEN = 32
FINGERPRINT_LEN = 4
NONCE_LEN = 12
TAG_LEN = 16
_VERSION_AT, _FINGERPRINT_AT, _NONCE_AT = 2, 3, 7  # offsets into the header
HEADER_LEN = _NONCE_AT + NONCE_LEN  # 19
# The smallest body (a one-byte msgpack value) is still a byte.
MIN_DATAGRAM = HEADER_LEN + TAG_LEN + 1
MAX_DATAGRAM = 65000  # under UDP's 65507: the largest heartbeat possible fits (~37 kB)
FRAME_PAYLOAD = 1500 - 20 - 8  # UDP payload of one Ethernet frame over IPv4: 1472
MAX_INCARNATION = 2**48 - 1  # 6 bytes on the wire
MAX_SEQ = 2**40 - 1  # seq and acks: 5 bytes on the wire
MAX_COUNTER = 2**63 - 1  # epoch: fits a signed 64-bit int everywhere
MAX_HELD = 65536  # buckets a node can hold at most (the largest bucket count)

_KEY_ID_DOMAIN = b"lbd-key-id"
_HEARTBEAT_FIELDS = 14
_LEAVE_FIELDS = 4

# The binary fields (see the module docstring).
_WIRE_ID_TAG = 0  # then the 4 bytes of an 8-hex ID
_WIRE_ID_BYTES = 4
_MEMBER_TAIL = struct.Struct(">HIH")  # incarnation (16 high + 32 low bits), weight|draining
_DRAINING_BIT = 0x8000
_ACK_BYTES = 5
_FEW_ACKS = 8  # up to this many, shifting the acks out of one int beats widening them
_ACK_SHIFTS = tuple(tuple(range(8 * _ACK_BYTES * (n - 1), -1, -8 * _ACK_BYTES))
                    for n in range(_FEW_ACKS + 1))
_INCARNATION_LOW = 0xFFFFFFFF

# Decoding limits for the body, the only msgpack value: the only strings are the
# sender and the name (node IDs, at most 64 characters), the only arrays the body
# itself, maps and extension types never occur, and the only bins are the four
# binary fields, none larger than a datagram. So a hostile body can make msgpack
# allocate no more than a valid one could.
_BODY_LIMITS: dict[str, int] = {
    "max_str_len": MAX_NODE_ID_LEN,
    "max_bin_len": MAX_DATAGRAM,
    "max_array_len": _HEARTBEAT_FIELDS,
    "max_map_len": 0,
    "max_ext_len": 0,
}

NonceSource = Callable[[int], bytes]


def key_fingerprint(key: bytes) -> bytes:
    """The 4-byte ID that tells receivers which key sealed a datagram."""
    return hashlib.sha256(_KEY_ID_DOMAIN + key).digest()[:FINGERPRINT_LEN]


def _check_key(key: object, what: str) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_LEN:
        raise ConfigError(f"{what} key must be {KEY_LEN} bytes")
    return key


class Keyring:
    """The cluster key, plus a second accepted key while a rotation is under way.

    Datagrams are always sealed with ``current``; ones sealed with either key are
    opened. A rotation without a gap has three steps, each taken on every node
    before the next: ``Keyring(old, new)`` (accept the new key), ``Keyring(new,
    old)`` (seal with it), ``Keyring(new)``. Sealing with a key that a peer does
    not accept yet makes that peer declare us dead.
    """

    __slots__ = ("_aead_by_fingerprint", "_current", "_current_fingerprint", "_previous")

    def __init__(self, current: bytes, previous: bytes | None = None) -> None:
        self._current = _check_key(current, "current")
        self._previous = None if previous is None else _check_key(previous, "previous")
        self._current_fingerprint = key_fingerprint(current)
        self._aead_by_fingerprint: dict[bytes, ChaCha20Poly1305] = {}
        if self._previous is not None and self._previous != current:
            previous_fingerprint = key_fingerprint(self._previous)
            if previous_fingerprint == self._current_fingerprint:
                # 1 in 2**32: receivers could not tell the keys apart.
                raise ConfigError("current and previous keys share a fingerprint; pick a new key")
            self._aead_by_fingerprint[previous_fingerprint] = ChaCha20Poly1305(self._previous)
        self._aead_by_fingerprint[self._current_fingerprint] = ChaCha20Poly1305(current)

    @property
    def current(self) -> bytes:
        return self._current

    @property
    def previous(self) -> bytes | None:
        return self._previous

    @property
    def current_fingerprint(self) -> bytes:
        return self._current_fingerprint

    @property
    def previous_fingerprint(self) -> bytes | None:
        """The other accepted key's fingerprint (None: only one key)."""
        others = [fp for fp in self._aead_by_fingerprint if fp != self._current_fingerprint]
        return others[0] if others else None

    @property
    def fingerprints(self) -> list[bytes]:
        """Every accepted key's fingerprint, the sealing one first."""
        return sorted(self._aead_by_fingerprint, key=lambda fp: fp != self._current_fingerprint)

    def rotated(self, new_current: bytes) -> Keyring:
        """A keyring sealing with new_current and still opening the old current."""
        return Keyring(new_current, self._current)

    def sealing_aead(self) -> ChaCha20Poly1305:
        return self._aead_by_fingerprint[self._current_fingerprint]

    def opening_aead(self, fingerprint: bytes) -> ChaCha20Poly1305 | None:
        return self._aead_by_fingerprint.get(fingerprint)

    def __repr__(self) -> str:
        # Never print key material, only the fingerprints.
        held = ", ".join(fp.hex() for fp in self._aead_by_fingerprint)
        return f"Keyring(current={self._current_fingerprint.hex()}, opens=[{held}])"


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
        body = _body_of(message)
        try:
            _message_from_body(body)
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
        return _message_from_body(_unpack_body(plaintext))


def _unpack_body(plaintext: bytes) -> object:
    try:
        return msgpack.unpackb(
            plaintext, raw=False, use_list=False, strict_map_key=True, **_BODY_LIMITS)
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
    and the base (the view holding the sender, the base at most MAX_NODES). 1363
    bytes at 64 nodes, within one frame (``FRAME_PAYLOAD``); 18 bytes more for
    each node past that.
    """
    if type(members) is not int or not 1 <= members <= 2 * MAX_NODES:
        raise ValueError(f"members must be an int in 1..{2 * MAX_NODES}")
    if type(name_len) is not int or not 0 <= name_len <= MAX_NODE_ID_LEN:
        raise ValueError(f"name_len must be an int in 0..{MAX_NODE_ID_LEN}")
    if (type(params_len) is not int or not 0 < params_len <= MAX_FIELDS * DIGEST_LEN
            or params_len % DIGEST_LEN):
        raise ValueError(f"params_len must be 1..{MAX_FIELDS} digests of {DIGEST_LEN} bytes")
    wire_id_bytes = 1 + _WIRE_ID_BYTES
    fixed = (
        1  # the array header (fixarray of 14)
        + 1  # message type
        + _str_size(2 * _WIRE_ID_BYTES)  # sender: 8 hex digits
        + _uint_size(MAX_INCARNATION)
        + _uint_size(MAX_SEQ)
        + _uint_size(MAX_WEIGHT)
        + 1  # draining
        + 1  # agreed
        + _uint_size(MAX_HELD)
        + _uint_size(MAX_COUNTER)  # epoch
        + _bin_size(params_len)
        + _str_size(name_len)
    )
    worst = 0
    for in_view in range(1, min(members, MAX_NODES) + 1):
        # The base holds as many of the nodes as it may; more never makes it smaller.
        outside = min(members - in_view, MAX_NODES)
        variable = (
            _bin_size(in_view * (wire_id_bytes + _MEMBER_TAIL.size))
            + _bin_size(in_view * _ACK_BYTES)
            + _bin_size(-(-in_view // 8) + outside * wire_id_bytes)
        )
        worst = max(worst, variable)
    return HEADER_LEN + TAG_LEN + fixed + worst


def _uint_size(value: int) -> int:
    """Bytes of msgpack's shortest encoding of a non-negative int."""
    return 1 if value < 0x80 else 2 if value < 2**8 else 3 if value < 2**16 else (
        5 if value < 2**32 else 9)


def _str_size(length: int) -> int:
    return length + (1 if length < 32 else 2 if length < 2**8 else 3 if length < 2**16 else 5)


def _bin_size(length: int) -> int:
    return length + (2 if length < 2**8 else 3 if length < 2**16 else 5)


# --- encoding ----------------------------------------------------------------
# The encoder refuses (ValueError) whatever it could not send faithfully: the
# binary fields have no room for a wrong type or an out-of-range number, and a
# base's order and duplicates do not survive its bitmap. The rest is left to the
# receivers' validation, which seal() runs on the body as well.


def _refuse(problem: str) -> ValueError:
    return ValueError(f"refusing to seal an invalid message: {problem}")


def _body_of(message: Message) -> tuple[object, ...]:
    if isinstance(message, Heartbeat):
        view = _pack_view(message.view)
        return (
            MessageType.HEARTBEAT.value,
            message.sender,
            message.incarnation,
            message.seq,
            message.weight,
            message.draining,
            view,
            _pack_acks(message.acks),
            message.agreed,
            message.held,
            message.epoch,
            _pack_base(message.base, message.view),
            message.params,
            message.name,
        )
    if isinstance(message, Leave):
        return (MessageType.LEAVE.value, message.sender, message.incarnation, message.seq)
    raise ValueError(f"cannot seal {type(message).__name__}: not a Heartbeat or Leave")


def _pack_id(node_id: object, what: str) -> bytes:
    if type(node_id) is not str or not NODE_ID_PATTERN.fullmatch(node_id):
        raise _refuse(f"{what} is not a valid node id")
    if WIRE_ID_PATTERN.fullmatch(node_id):
        return bytes((_WIRE_ID_TAG,)) + bytes.fromhex(node_id)
    # The pattern admits ASCII only, at most MAX_NODE_ID_LEN characters.
    return bytes((len(node_id),)) + node_id.encode("ascii")


# A core sends one view object and one base object for as long as they hold: each
# is packed once, and recognised by identity (a tuple of frozen Members or of str
# cannot change; the memo's reference keeps the object, so its id is not reused).
# Bounded like the decoder's memo, for processes that run many cores.
_PACKED_VIEWS: dict[int, tuple[tuple[Member, ...], bytes]] = {}
_PACKED_BASES: dict[tuple[int, int], tuple[tuple[str, ...], tuple[Member, ...], bytes]] = {}


def _pack_view(view: tuple[Member, ...]) -> bytes:
    known = _PACKED_VIEWS.get(id(view))
    if known is not None and known[0] is view:
        return known[1]
    if type(view) is not tuple or len(view) > MAX_NODES:
        raise _refuse(f"view must be a tuple of at most {MAX_NODES} members")
    parts = []
    for member in view:
        if type(member) is not Member:
            raise _refuse("a view member is not a Member")
        incarnation, weight, draining = member.incarnation, member.weight, member.draining
        if type(incarnation) is not int or not 0 <= incarnation <= MAX_INCARNATION:
            raise _refuse("member incarnation must be an int in 0..2**48-1")
        if type(weight) is not int or not 0 <= weight <= MAX_WEIGHT:
            raise _refuse(f"member weight must be an int in 0..{MAX_WEIGHT}")
        if type(draining) is not bool:
            raise _refuse("member draining must be a bool")
        parts.append(_pack_id(member.node_id, "member id"))
        parts.append(_MEMBER_TAIL.pack(
            incarnation >> 32, incarnation & _INCARNATION_LOW,
            weight | (_DRAINING_BIT if draining else 0)))
    packed = b"".join(parts)
    _remember(_PACKED_VIEWS, id(view), (view, packed))
    return packed


_INTS_ONLY = {int}
_ACK_STRUCTS: dict[int, struct.Struct] = {}


def _acks_struct(count: int) -> struct.Struct:
    """``count`` big-endian 8-byte ints; at most MAX_NODES + 1 of these are made."""
    known = _ACK_STRUCTS.get(count)
    if known is None:
        known = _ACK_STRUCTS[count] = struct.Struct(f">{count}Q")
    return known


def _pack_acks(acks: tuple[int, ...]) -> bytes:
    if type(acks) is not tuple or len(acks) > MAX_NODES:
        raise _refuse(f"acks must be a tuple of at most {MAX_NODES} ints")
    if acks and (set(map(type, acks)) != _INTS_ONLY or min(acks) < 0 or max(acks) > MAX_SEQ):
        raise _refuse("ack must be an int in 0..2**40-1")
    wide = _acks_struct(len(acks)).pack(*acks)
    # The low 5 bytes of every 8: one slice assignment per byte column, not per ack.
    narrow = bytearray(_ACK_BYTES * len(acks))
    narrow[0::5], narrow[1::5], narrow[2::5], narrow[3::5], narrow[4::5] = (
        wide[3::8], wide[4::8], wide[5::8], wide[6::8], wide[7::8])
    return bytes(narrow)


def _pack_base(base: tuple[str, ...], view: tuple[Member, ...]) -> bytes:
    known = _PACKED_BASES.get((id(base), id(view)))
    if known is not None and known[0] is base and known[1] is view:
        return known[2]
    if type(base) is not tuple or len(base) > MAX_NODES:
        raise _refuse(f"base must be a tuple of at most {MAX_NODES} node ids")
    # The view passed _pack_view.
    places = {member.node_id: place for place, member in enumerate(view)}
    bitmap_bits = 8 * -(-len(places) // 8)
    bitmap, outside, previous = 0, [], ""
    for node_id in base:
        if type(node_id) is not str or node_id <= previous:
            raise _refuse("base must be strictly sorted node ids")
        previous = node_id
        place = places.get(node_id)
        if place is None:
            outside.append(_pack_id(node_id, "base member"))
        else:
            bitmap |= 1 << (bitmap_bits - 1 - place)
    packed = bitmap.to_bytes(bitmap_bits // 8, "big") + b"".join(outside)
    _remember(_PACKED_BASES, (id(base), id(view)), (base, view, packed))
    return packed


# --- decoding and validation ------------------------------------------------
# Exact type checks (``type(x) is int``) on purpose: bool is an int subclass and
# must not pass as a number, nor a number as a bool.


def _bounded(value: object, what: str, maximum: int, minimum: int = 0) -> int:
    if type(value) is not int or not minimum <= value <= maximum:
        raise DecodeError(f"{what} must be an int in {minimum}..{maximum}")
    return value


def _flag(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise DecodeError(f"{what} must be a bool")
    return value


def _node_id(value: object, what: str) -> str:
    if type(value) is not str:
        # Checked here so that the error never carries a big repr of junk.
        raise DecodeError(f"{what} must be a string")
    return validate_node_id(value)


def _bin(value: object, what: str) -> bytes:
    if type(value) is not bytes:
        raise DecodeError(f"{what} must be a bin")
    return value


def _message_from_body(body: object) -> Message:
    if type(body) is not tuple or not body:
        raise DecodeError("body must be a non-empty array")
    kind = body[0]
    if type(kind) is int and kind == MessageType.HEARTBEAT:
        return _heartbeat(body)
    if type(kind) is int and kind == MessageType.LEAVE:
        return _leave(body)
    raise DecodeError("unknown message type")


def _leave(body: tuple[object, ...]) -> Leave:
    if len(body) != _LEAVE_FIELDS:
        raise DecodeError(f"leave must have {_LEAVE_FIELDS} fields")
    return Leave(
        sender=_node_id(body[1], "sender"),
        incarnation=_bounded(body[2], "incarnation", MAX_INCARNATION),
        seq=_bounded(body[3], "seq", MAX_SEQ, minimum=1),
    )


def _heartbeat(body: tuple[object, ...]) -> Heartbeat:
    if len(body) != _HEARTBEAT_FIELDS:
        raise DecodeError(f"heartbeat must have {_HEARTBEAT_FIELDS} fields")
    sender = _node_id(body[1], "sender")
    name = _name(body[13], sender)
    packed_view = _bin(body[6], "view")
    view, ids = _view(packed_view)
    if sender not in ids:
        raise DecodeError("view must contain the sender")
    return Heartbeat(
        sender,
        _bounded(body[2], "incarnation", MAX_INCARNATION),
        _bounded(body[3], "seq", MAX_SEQ, minimum=1),
        _bounded(body[4], "weight", MAX_WEIGHT),
        _flag(body[5], "draining"),
        view,
        _acks(body[7], len(view)),
        _flag(body[8], "agreed"),
        _bounded(body[9], "held", MAX_HELD),
        _bounded(body[10], "epoch", MAX_COUNTER),
        _base(body[11], packed_view, view),
        _params(body[12]),
        name,
    )


def _name(value: object, sender: str) -> str:
    if type(value) is not str:
        raise DecodeError("name must be a string")
    if value:
        known = _NAMED.get(value)
        if known is None:
            known = _remember(_NAMED, validate_node_id(value), wire_id(value), MAX_NODES)
        if known != sender:
            raise DecodeError("sender must be the wire id of the name")
    return value


def _params(value: object) -> bytes:
    if type(value) is not bytes or not valid_params_blob(value):
        raise DecodeError("params must be a bin of whole parameter digests")
    return value


def _acks(value: object, count: int) -> tuple[int, ...]:
    packed = _bin(value, "acks")
    if len(packed) != _ACK_BYTES * count:
        raise DecodeError(f"acks must be {_ACK_BYTES} bytes for each view member")
    if count <= _FEW_ACKS:
        every = int.from_bytes(packed, "big")
        return tuple([(every >> shift) & MAX_SEQ for shift in _ACK_SHIFTS[count]])
    # Widen every ack to 8 bytes (one slice assignment per byte column), then
    # unpack them all at once: no Python loop over the acks.
    wide = bytearray(8 * count)
    wide[3::8], wide[4::8], wide[5::8], wide[6::8], wide[7::8] = (
        packed[0::5], packed[1::5], packed[2::5], packed[3::5], packed[4::5])
    acks: tuple[int, ...] = _acks_struct(count).unpack(wide)
    return acks


# A heartbeat's view and base travel as bins. In a settled cluster every heartbeat
# carries the same two, byte for byte: remembering the validated ones by their bytes
# spares opening a heartbeat most of its work at N = 32, and since every value has
# one spelling, equal bytes are the one thing that can stand for an equal value.
# The base's bitmap refers to the view, so a base is remembered by both. Pure
# memoization, bounded; the oldest entry goes first.
_MEMO_SIZE = 32
_VIEWS: dict[bytes, tuple[tuple[Member, ...], frozenset[str]]] = {}
_BASES: dict[tuple[bytes, bytes], tuple[str, ...]] = {}
# Valid names and their wire IDs: every sender's, so as many as a cluster has nodes.
_NAMED: dict[str, str] = {}


def _remember(memo: dict[_K, _T], key: _K, value: _T, size: int = _MEMO_SIZE) -> _T:
    if len(memo) >= size:
        del memo[next(iter(memo))]
    memo[key] = value
    return value


def _read_id(packed: bytes, at: int, what: str) -> tuple[str, int]:
    """The node ID whose encoding starts at ``packed[at]`` (which exists), and
    the offset after it."""
    tag = packed[at]
    if tag == _WIRE_ID_TAG:
        end = at + 1 + _WIRE_ID_BYTES
        if end > len(packed):
            raise DecodeError(f"{what} is cut short")
        return packed[at + 1:end].hex(), end
    end = at + 1 + tag
    if tag > MAX_NODE_ID_LEN or end > len(packed):
        raise DecodeError(f"{what} is cut short or too long")
    try:
        node_id = packed[at + 1:end].decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError(f"{what} is not ASCII") from None
    if not NODE_ID_PATTERN.fullmatch(node_id):
        raise DecodeError(f"{what} is not a valid node id")
    if WIRE_ID_PATTERN.fullmatch(node_id):
        raise DecodeError(f"{what}: an 8-hex id must be sent in 4 bytes (tag 0)")
    return node_id, end


def _view(packed: bytes) -> tuple[tuple[Member, ...], frozenset[str]]:
    known = _VIEWS.get(packed)
    if known is None:
        try:
            known = _remember(_VIEWS, packed, _decode_view(packed))
        except (IndexError, struct.error, UnicodeDecodeError) as exc:  # unreachable: a net
            raise DecodeError(f"malformed view: {type(exc).__name__}") from None
    return known


def _decode_view(packed: bytes) -> tuple[tuple[Member, ...], frozenset[str]]:
    members: list[Member] = []
    previous_id = ""  # sorts before every valid ID, which is non-empty
    at, size, tail = 0, len(packed), _MEMBER_TAIL.size
    while at < size:
        if len(members) == MAX_NODES:
            raise DecodeError(f"view must hold 1..{MAX_NODES} members")
        node_id, at = _read_id(packed, at, "member id")
        if node_id <= previous_id:
            # Ownership is a function of the view, so a view has one spelling only.
            raise DecodeError("view must be strictly sorted by node id")
        if at + tail > size:
            raise DecodeError("view member is cut short")
        high, low, weight = _MEMBER_TAIL.unpack_from(packed, at)
        at += tail
        draining = weight >= _DRAINING_BIT
        weight &= ~_DRAINING_BIT
        if weight > MAX_WEIGHT:
            raise DecodeError(f"member weight must be an int in 0..{MAX_WEIGHT}")
        members.append(Member(node_id, high << 32 | low, weight, draining))
        previous_id = node_id
    if not members:
        raise DecodeError(f"view must hold 1..{MAX_NODES} members")
    return tuple(members), frozenset(m.node_id for m in members)


def _base(value: object, packed_view: bytes, view: tuple[Member, ...]) -> tuple[str, ...]:
    packed = _bin(value, "base")
    key = (packed_view, packed)
    known = _BASES.get(key)
    if known is None:
        try:
            known = _remember(_BASES, key, _decode_base(packed, view))
        except (IndexError, struct.error, UnicodeDecodeError) as exc:  # unreachable: a net
            raise DecodeError(f"malformed base: {type(exc).__name__}") from None
    return known


def _decode_base(packed: bytes, view: tuple[Member, ...]) -> tuple[str, ...]:
    bitmap_len = -(-len(view) // 8)
    if len(packed) < bitmap_len:
        raise DecodeError("base bitmap is cut short")
    bitmap = int.from_bytes(packed[:bitmap_len], "big")
    padding = 8 * bitmap_len - len(view)
    if bitmap & ((1 << padding) - 1):
        raise DecodeError("base bitmap has a bit set past the view")
    in_view = [member.node_id for place, member in enumerate(view)
               if bitmap >> (8 * bitmap_len - 1 - place) & 1]
    view_ids = {member.node_id for member in view}
    outside: list[str] = []
    previous_id = ""
    at, size = bitmap_len, len(packed)
    while at < size:
        if len(in_view) + len(outside) == MAX_NODES:
            raise DecodeError(f"base must hold at most {MAX_NODES} members")
        node_id, at = _read_id(packed, at, "base member")
        if node_id <= previous_id:
            raise DecodeError("base must be strictly sorted by node id")
        if node_id in view_ids:
            raise DecodeError("base member in the view must be sent in the bitmap")
        outside.append(node_id)
        previous_id = node_id
    # Both lists are sorted and disjoint.
    return tuple(sorted(in_view + outside)) if outside else tuple(in_view)


# --- replay protection --------------------------------------------------------


class ReplayGuard:
    """Rejects datagrams older than the newest one accepted from each sender.

    Call ``check`` only with messages that ``Codec.open`` returned: it records
    what it accepts, so unauthenticated input could poison it. A sender's
    datagrams are ordered by (incarnation, seq); a higher incarnation (a
    restarted node) resets its sequence. The guard is only as good as its
    memory: a sender that was forgotten or evicted (the least recently updated
    goes once ``max_senders`` are tracked) can be replayed once more.
    """

    __slots__ = ("_latest", "_max_senders")

    def __init__(self, max_senders: int = 1024) -> None:
        if type(max_senders) is not int or max_senders < 1:
            raise ConfigError("max_senders must be a positive int")
        self._max_senders = max_senders
        # sender -> (incarnation, seq) last accepted; order = least recently updated first.
        self._latest: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def check(self, sender: str, incarnation: int, seq: int) -> None:
        """Record (incarnation, seq) for sender, or raise ReplayError if not newer."""
        latest = self._latest.get(sender)
        if latest is not None:
            latest_incarnation, latest_seq = latest
            if incarnation < latest_incarnation:
                raise ReplayError(f"stale incarnation {incarnation} from {sender}")
            if incarnation == latest_incarnation and seq <= latest_seq:
                raise ReplayError(f"replayed seq {seq} from {sender}")
            self._latest.move_to_end(sender)
        elif len(self._latest) >= self._max_senders:
            self._latest.popitem(last=False)
        self._latest[sender] = (incarnation, seq)

    def forget(self, sender: str) -> None:
        """Drop what is known of sender (a no-op for an unknown one).

        Its old datagrams are then accepted once more, so forget a sender only
        when it is gone for good (not merely because it sent a Leave).
        """
        self._latest.pop(sender, None)

    def __len__(self) -> int:
        return len(self._latest)

    def __contains__(self, sender: object) -> bool:
        return sender in self._latest
