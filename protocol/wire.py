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
epoch, base, params]`` for a Heartbeat, where ``view`` (an array of ``[id,
incarnation, weight, draining]``) and ``base`` (an array of IDs) are each packed
on their own into a bin, so that a receiver can recognise the ones it has
already validated by their bytes, and ``params`` is a bin of per-field digests
of the parameters every node must agree on (``params.py``). Version 2 added
``params``; a version-1 datagram is refused as an unknown version.

The associated data is the 19 header bytes followed by the UTF-8 cluster name,
so the header cannot be altered and a datagram for another cluster fails
authentication even when both clusters share a key.

``Codec.open`` works from the cheapest check to the dearest: size (before
anything is parsed or decrypted), magic, version, key lookup, AEAD tag, msgpack
decoding under tight limits, then strict field validation. Its one promise is
that *any* input either yields a valid Heartbeat/Leave or raises DecodeError
(AuthError and ReplayError are subclasses), never another exception.

Replays are not the codec's business: a sealed datagram is self-contained. The
caller passes every *opened* message through a ReplayGuard.

Nonces are random 96-bit values. The chance that two datagrams under one key
share a nonce after n datagrams (all senders together) is about n**2 / 2**97,
some 2**-33 after 2**32 datagrams: rotate the key long before that.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar, cast

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
    Heartbeat,
    Leave,
    Member,
    Message,
    MessageType,
    validate_node_id,
)
from lbd.protocol.params import valid_params_blob

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
MAX_DATAGRAM = 65000  # under UDP's 65507: a 256-member heartbeat with a full base fits
MAX_COUNTER = 2**63 - 1  # incarnation and seq: fit a signed 64-bit int everywhere
MAX_HELD = 65536  # buckets a node can hold at most (the largest bucket count)

_KEY_ID_DOMAIN = b"lbd-key-id"
_HEARTBEAT_FIELDS = 13
_LEAVE_FIELDS = 4
_MEMBER_FIELDS = 4

# Decoding limits: node IDs are the only strings, arrays never exceed a full view,
# maps and extension types never occur, and the only bins are a heartbeat's view
# and base, each packed on its own (see _heartbeat), which hold no bins. So a
# hostile body can make msgpack allocate no more than a valid one could.
_UNPACK_LIMITS: dict[str, int] = {
    "max_str_len": MAX_NODE_ID_LEN,
    "max_bin_len": 0,
    "max_array_len": MAX_NODES,
    "max_map_len": 0,
    "max_ext_len": 0,
}
_BODY_LIMITS: dict[str, int] = {**_UNPACK_LIMITS, "max_bin_len": MAX_DATAGRAM}

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

        Raises ValueError if message would not pass the receivers' validation:
        that is a bug in the caller, and better found here than by every peer.
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
    return _unpack(plaintext, "body", _BODY_LIMITS)


def _unpack(packed: bytes, what: str, limits: dict[str, int]) -> object:
    try:
        return msgpack.unpackb(packed, raw=False, use_list=False, strict_map_key=True, **limits)
    # ValueError covers ExtraData, FormatError, StackError and UnicodeDecodeError;
    # UnpackException covers OutOfData, which is not a ValueError.
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        # msgpack's messages are short ("3 exceeds max_array_len(2)"); cap them anyway.
        raise DecodeError(f"malformed {what}: {type(exc).__name__}: {str(exc)[:80]}") from None


# --- encoding ----------------------------------------------------------------


def _body_of(message: Message) -> tuple[object, ...]:
    if isinstance(message, Heartbeat):
        return (
            MessageType.HEARTBEAT.value,
            message.sender,
            message.incarnation,
            message.seq,
            message.weight,
            message.draining,
            _pack_view(message.view),
            tuple(message.acks),
            message.agreed,
            message.held,
            message.epoch,
            _pack_base(message.base),
            message.params,
        )
    if isinstance(message, Leave):
        return (MessageType.LEAVE.value, message.sender, message.incarnation, message.seq)
    raise ValueError(f"cannot seal {type(message).__name__}: not a Heartbeat or Leave")


def _pack_view(view: tuple[Member, ...]) -> bytes:
    packed: bytes = msgpack.packb(
        tuple((m.node_id, m.incarnation, m.weight, m.draining) for m in view))
    return packed


def _pack_base(base: tuple[str, ...]) -> bytes:
    packed: bytes = msgpack.packb(tuple(base))
    return packed


# --- decoding and validation ------------------------------------------------
# Exact type checks (``type(x) is int``) on purpose: bool is an int subclass and
# must not pass as a number, nor a number as a bool.


def _counter(value: object, what: str, minimum: int = 0) -> int:
    if type(value) is not int or not minimum <= value <= MAX_COUNTER:
        raise DecodeError(f"{what} must be an int in {minimum}..2**63-1")
    return value


def _bounded(value: object, what: str, maximum: int) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise DecodeError(f"{what} must be an int in 0..{maximum}")
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


def _sequence(value: object, what: str, min_len: int, max_len: int) -> tuple[object, ...]:
    if type(value) is not tuple or not min_len <= len(value) <= max_len:
        raise DecodeError(f"{what} must be an array of {min_len}..{max_len} items")
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
        incarnation=_counter(body[2], "incarnation"),
        seq=_counter(body[3], "seq", minimum=1),
    )


def _heartbeat(body: tuple[object, ...]) -> Heartbeat:
    if len(body) != _HEARTBEAT_FIELDS:
        raise DecodeError(f"heartbeat must have {_HEARTBEAT_FIELDS} fields")
    sender = _node_id(body[1], "sender")
    view = _view(body[6], sender)
    acks = _sequence(body[7], "acks", len(view), len(view))
    # The types first (min() and max() of mixed types would raise); a view is never
    # empty, so neither are the acks.
    if set(map(type, acks)) != _INTS_ONLY:
        raise DecodeError("ack must be an int in 0..2**63-1")
    ints = cast("tuple[int, ...]", acks)
    if min(ints) < 0 or max(ints) > MAX_COUNTER:
        raise DecodeError("ack must be an int in 0..2**63-1")
    return Heartbeat(
        sender,
        _counter(body[2], "incarnation"),
        _counter(body[3], "seq", minimum=1),
        _bounded(body[4], "weight", MAX_WEIGHT),
        _flag(body[5], "draining"),
        view,
        ints,
        _flag(body[8], "agreed"),
        _bounded(body[9], "held", MAX_HELD),
        _counter(body[10], "epoch"),
        _base(body[11]),
        _params(body[12]),
    )


_INTS_ONLY = {int}

# A heartbeat's view and base travel as bins, each a msgpack array packed on its
# own. In a settled cluster every heartbeat carries the same two, byte for byte:
# remembering the validated ones by their bytes spares opening a heartbeat most
# of its work at N = 32, and bytes cannot compare equal to another spelling
# (1 == 1.0 == True). Pure memoization, bounded; the oldest entry goes first.
_MEMO_SIZE = 32
_VIEWS: dict[bytes, tuple[tuple[Member, ...], frozenset[str]]] = {}
_BASES: dict[bytes, tuple[str, ...]] = {}


def _remember(memo: dict[bytes, _T], key: bytes, value: _T) -> _T:
    if len(memo) >= _MEMO_SIZE:
        del memo[next(iter(memo))]
    memo[key] = value
    return value


def _packed(value: object, what: str) -> bytes:
    if type(value) is not bytes:
        raise DecodeError(f"{what} must be a bin holding a msgpack array")
    return value


def _view(value: object, sender: str) -> tuple[Member, ...]:
    packed = _packed(value, "view")
    known = _VIEWS.get(packed)
    if known is None:
        known = _remember(_VIEWS, packed, _decode_view(packed))
    members, ids = known
    if sender not in ids:
        raise DecodeError("view must contain the sender")
    return members


def _decode_view(packed: bytes) -> tuple[tuple[Member, ...], frozenset[str]]:
    entries = _sequence(_unpack(packed, "view", _UNPACK_LIMITS), "view", 1, MAX_NODES)
    members: list[Member] = []
    previous_id = ""  # sorts before every valid ID, which is non-empty
    for entry in entries:
        if type(entry) is not tuple or len(entry) != _MEMBER_FIELDS:
            raise DecodeError(f"view member must be an array of {_MEMBER_FIELDS} items")
        node_id, incarnation, weight, draining = entry
        node_id = _node_id(node_id, "member id")
        if node_id <= previous_id:
            # Ownership is a function of the view, so a view has one spelling only.
            raise DecodeError("view must be strictly sorted by node id")
        if type(incarnation) is not int or not 0 <= incarnation <= MAX_COUNTER:
            raise DecodeError("member incarnation must be an int in 0..2**63-1")
        if type(weight) is not int or not 0 <= weight <= MAX_WEIGHT:
            raise DecodeError(f"member weight must be an int in 0..{MAX_WEIGHT}")
        if type(draining) is not bool:
            raise DecodeError("member draining must be a bool")
        members.append(Member(node_id, incarnation, weight, draining))
        previous_id = node_id
    return tuple(members), frozenset(m.node_id for m in members)


def _params(value: object) -> bytes:
    if type(value) is not bytes or not valid_params_blob(value):
        raise DecodeError("params must be a bin of whole parameter digests")
    return value


def _base(value: object) -> tuple[str, ...]:
    packed = _packed(value, "base")
    known = _BASES.get(packed)
    if known is not None:
        return known
    entries = _sequence(_unpack(packed, "base", _UNPACK_LIMITS), "base", 0, MAX_NODES)
    previous_id = ""
    for entry in entries:
        node_id = _node_id(entry, "base member")
        if node_id <= previous_id:
            raise DecodeError("base must be strictly sorted by node id")
        previous_id = node_id
    # Every item was just checked to be a str.
    return _remember(_BASES, packed, cast("tuple[str, ...]", entries))


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
