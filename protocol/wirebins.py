"""The compact binary fields of a heartbeat: node IDs, the view, the acks, the base.

A heartbeat's body (``wirebody.py``) carries these four as msgpack bins, all
numbers in them big-endian and unsigned. This module packs and unpacks them.

*ID encoding*, for every node ID inside a bin: a tag byte, then

* tag 0: 4 bytes, an ID of 8 lowercase hex digits (``messages.wire_id``);
* tag 1..64: that many ASCII bytes, a valid node ID *not* of that form.

One spelling per ID: an 8-hex ID sent with tag 1..64 is refused, as are tags
65..255.

``view``: the members, strictly sorted by node ID (as str), 1..MAX_NODES of
them; each is its ID encoding, the incarnation in 6 bytes (``MAX_INCARNATION``),
then 2 bytes holding the weight (0..MAX_WEIGHT) in bits 0..14 and draining in
bit 15 (``0x8000``).

``acks``: exactly len(view) 5-byte numbers (``MAX_SEQ``), ``acks[i]`` being
view[i]'s.

``base``: a bitmap over the view, ceil(len(view) / 8) bytes, bit i (counted
from the most significant bit of the first byte) set when view[i] is in the
base, the bits past len(view) zero; then the base members that are not in the
view, strictly sorted, each in the ID encoding. The decoded base is the sorted
tuple of all of them, at most MAX_NODES.

Every bin has one spelling per value, so equal bytes mean an equal value and
nothing else does: that lets a receiver recognise a view (and a base, by the
view and base bytes together, since the bitmap refers to the view) that it
already validated by its bytes alone.

Packing refuses (ValueError) whatever it could not send faithfully; unpacking
raises DecodeError on anything but the one spelling of a valid value.
"""

from __future__ import annotations

import struct
from typing import TypeVar

from lbd.protocol.errors import DecodeError
from lbd.protocol.messages import (
    MAX_NODE_ID_LEN,
    MAX_NODES,
    MAX_WEIGHT,
    NODE_ID_PATTERN,
    WIRE_ID_PATTERN,
    Member,
)

_K = TypeVar("_K")
_T = TypeVar("_T")

MAX_INCARNATION = 2**48 - 1  # 6 bytes on the wire
MAX_SEQ = 2**40 - 1  # seq and acks: 5 bytes on the wire

_WIRE_ID_TAG = 0  # then the 4 bytes of an 8-hex ID
_WIRE_ID_BYTES = 4
_MEMBER_TAIL = struct.Struct(">HIH")  # incarnation (16 high + 32 low bits), weight|draining
_DRAINING_BIT = 0x8000
_ACK_BYTES = 5
_FEW_ACKS = 8  # up to this many, shifting the acks out of one int beats widening them
_ACK_SHIFTS = tuple(
    tuple(range(8 * _ACK_BYTES * (n - 1), -1, -8 * _ACK_BYTES)) for n in range(_FEW_ACKS + 1)
)
_INCARNATION_LOW = 0xFFFFFFFF


def widest_bins(in_view: int, outside: int) -> tuple[int, int, int]:
    """Bytes of the packed view, acks and base when the view holds ``in_view``
    members and the base ``outside`` more, every ID an 8-hex one."""
    wire_id_bytes = 1 + _WIRE_ID_BYTES
    return (
        in_view * (wire_id_bytes + _MEMBER_TAIL.size),
        in_view * _ACK_BYTES,
        -(-in_view // 8) + outside * wire_id_bytes,
    )


# A heartbeat's view and base travel as bins. In a settled cluster every heartbeat
# carries the same two, byte for byte: remembering the validated ones by their bytes
# spares opening a heartbeat most of its work at N = 32, and since every value has
# one spelling, equal bytes are the one thing that can stand for an equal value.
# The base's bitmap refers to the view, so a base is remembered by both. Pure
# memoization, bounded; the oldest entry goes first.
MEMO_SIZE = 32
_VIEWS: dict[bytes, tuple[tuple[Member, ...], frozenset[str]]] = {}
_BASES: dict[tuple[bytes, bytes], tuple[str, ...]] = {}

# A core sends one view object and one base object for as long as they hold: each
# is packed once, and recognised by identity (a tuple of frozen Members or of str
# cannot change; the memo's reference keeps the object, so its id is not reused).
# Bounded like the decoder's memo, for processes that run many cores.
_PACKED_VIEWS: dict[int, tuple[tuple[Member, ...], bytes]] = {}
_PACKED_BASES: dict[tuple[int, int], tuple[tuple[str, ...], tuple[Member, ...], bytes]] = {}


def remember(memo: dict[_K, _T], key: _K, value: _T, size: int = MEMO_SIZE) -> _T:
    """Store value in a bounded memo (the oldest entry goes first) and return it."""
    if len(memo) >= size:
        del memo[next(iter(memo))]
    memo[key] = value
    return value


# --- packing -------------------------------------------------------------------
# The bins have no room for a wrong type or an out-of-range number, and a base's
# order and duplicates do not survive its bitmap: all that is refused here.


def _refuse(problem: str) -> ValueError:
    return ValueError(f"refusing to seal an invalid message: {problem}")


def _pack_id(node_id: object, what: str) -> bytes:
    if type(node_id) is not str or not NODE_ID_PATTERN.fullmatch(node_id):
        raise _refuse(f"{what} is not a valid node id")
    if WIRE_ID_PATTERN.fullmatch(node_id):
        return bytes((_WIRE_ID_TAG,)) + bytes.fromhex(node_id)
    # The pattern admits ASCII only, at most MAX_NODE_ID_LEN characters.
    return bytes((len(node_id),)) + node_id.encode("ascii")


def pack_view(view: tuple[Member, ...]) -> bytes:
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
        parts.append(
            _MEMBER_TAIL.pack(
                incarnation >> 32,
                incarnation & _INCARNATION_LOW,
                weight | (_DRAINING_BIT if draining else 0),
            )
        )
    packed = b"".join(parts)
    remember(_PACKED_VIEWS, id(view), (view, packed))
    return packed


_INTS_ONLY = {int}
_ACK_STRUCTS: dict[int, struct.Struct] = {}


def _acks_struct(count: int) -> struct.Struct:
    """``count`` big-endian 8-byte ints; at most MAX_NODES + 1 of these are made."""
    known = _ACK_STRUCTS.get(count)
    if known is None:
        known = _ACK_STRUCTS[count] = struct.Struct(f">{count}Q")
    return known


def pack_acks(acks: tuple[int, ...]) -> bytes:
    if type(acks) is not tuple or len(acks) > MAX_NODES:
        raise _refuse(f"acks must be a tuple of at most {MAX_NODES} ints")
    if acks and (set(map(type, acks)) != _INTS_ONLY or min(acks) < 0 or max(acks) > MAX_SEQ):
        raise _refuse("ack must be an int in 0..2**40-1")
    wide = _acks_struct(len(acks)).pack(*acks)
    # The low 5 bytes of every 8: one slice assignment per byte column, not per ack.
    narrow = bytearray(_ACK_BYTES * len(acks))
    narrow[0::5], narrow[1::5], narrow[2::5], narrow[3::5], narrow[4::5] = (
        wide[3::8],
        wide[4::8],
        wide[5::8],
        wide[6::8],
        wide[7::8],
    )
    return bytes(narrow)


def pack_base(base: tuple[str, ...], view: tuple[Member, ...]) -> bytes:
    known = _PACKED_BASES.get((id(base), id(view)))
    if known is not None and known[0] is base and known[1] is view:
        return known[2]
    if type(base) is not tuple or len(base) > MAX_NODES:
        raise _refuse(f"base must be a tuple of at most {MAX_NODES} node ids")
    # The view passed pack_view.
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
    remember(_PACKED_BASES, (id(base), id(view)), (base, view, packed))
    return packed


# --- unpacking -----------------------------------------------------------------


def _read_id(packed: bytes, at: int, what: str) -> tuple[str, int]:
    """The node ID whose encoding starts at ``packed[at]`` (which exists), and
    the offset after it."""
    tag = packed[at]
    if tag == _WIRE_ID_TAG:
        end = at + 1 + _WIRE_ID_BYTES
        if end > len(packed):
            raise DecodeError(f"{what} is cut short")
        return packed[at + 1 : end].hex(), end
    end = at + 1 + tag
    if tag > MAX_NODE_ID_LEN or end > len(packed):
        raise DecodeError(f"{what} is cut short or too long")
    try:
        node_id = packed[at + 1 : end].decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError(f"{what} is not ASCII") from None
    if not NODE_ID_PATTERN.fullmatch(node_id):
        raise DecodeError(f"{what} is not a valid node id")
    if WIRE_ID_PATTERN.fullmatch(node_id):
        raise DecodeError(f"{what}: an 8-hex id must be sent in 4 bytes (tag 0)")
    return node_id, end


def unpack_view(packed: bytes) -> tuple[tuple[Member, ...], frozenset[str]]:
    """The view's members and their IDs."""
    known = _VIEWS.get(packed)
    if known is None:
        try:
            known = remember(_VIEWS, packed, _decode_view(packed))
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


def unpack_base(packed: bytes, packed_view: bytes, view: tuple[Member, ...]) -> tuple[str, ...]:
    """The base, given the view it travelled with (unpacked and packed)."""
    key = (packed_view, packed)
    known = _BASES.get(key)
    if known is None:
        try:
            known = remember(_BASES, key, _decode_base(packed, view))
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
    in_view = [
        member.node_id
        for place, member in enumerate(view)
        if bitmap >> (8 * bitmap_len - 1 - place) & 1
    ]
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


def unpack_acks(packed: bytes, count: int) -> tuple[int, ...]:
    """The acks of a view of ``count`` members."""
    if len(packed) != _ACK_BYTES * count:
        raise DecodeError(f"acks must be {_ACK_BYTES} bytes for each view member")
    if count <= _FEW_ACKS:
        every = int.from_bytes(packed, "big")
        return tuple([(every >> shift) & MAX_SEQ for shift in _ACK_SHIFTS[count]])
    # Widen every ack to 8 bytes (one slice assignment per byte column), then
    # unpack them all at once: no Python loop over the acks.
    wide = bytearray(8 * count)
    wide[3::8], wide[4::8], wide[5::8], wide[6::8], wide[7::8] = (
        packed[0::5],
        packed[1::5],
        packed[2::5],
        packed[3::5],
        packed[4::5],
    )
    acks: tuple[int, ...] = _acks_struct(count).unpack(wide)
    return acks
