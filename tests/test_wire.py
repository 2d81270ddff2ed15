"""Tests of the authenticated wire format (lbd.protocol.wire).

The central property is the fuzz invariant: whatever bytes arrive, Codec.open
returns a valid message or raises DecodeError, never anything else. Datagrams
with garbage bodies are sealed here by hand, straight from the documented
layout (``doc_*`` below re-encode it independently of the codec), so that the
body validation is fuzzed past the AEAD and the layout itself is checked.

The other promise is the frame budget (issue 12): a heartbeat whose view and
base hold at most 64 distinct nodes (8-hex wire IDs) seals to one UDP datagram
of at most 1472 bytes, one 1500-byte frame, whatever its values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import random
import re
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbd.protocol import keyring, wire, wirebins, wirebody
from lbd.protocol.errors import AuthError, ConfigError, DecodeError, ReplayError, VersionError
from lbd.protocol.messages import (
    HEALTH_AGENT,
    HEALTH_CHECK,
    HEALTH_MAX,
    MAX_NODES,
    MAX_WEIGHT,
    NODE_ID_PATTERN,
    WIRE_ID_PATTERN,
    Heartbeat,
    Leave,
    Member,
    Message,
    wire_id,
)
from lbd.protocol.params import FIELDS
from lbd.protocol.wire import (
    FRAME_PAYLOAD,
    HEADER_LEN,
    MAX_COUNTER,
    MAX_DATAGRAM,
    MAX_HELD,
    MAX_INCARNATION,
    MAX_SEQ,
    MIN_DATAGRAM,
    Codec,
    Keyring,
    ReplayGuard,
    heartbeat_size_bound,
    key_fingerprint,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
NEW_KEY = bytes(range(200, 232))
CLUSTER = "test-cluster"
ALL_PARAMS = bytes(range(4 * len(FIELDS)))  # every digest of today's parameters


def examples(full: int) -> int:
    """``full`` times LBD_FUZZ_SCALE (default 1; ``make check`` runs a tenth: the same
    derandomized examples, cut short)."""
    return max(20, round(full * float(os.environ.get("LBD_FUZZ_SCALE", "1"))))


# Reproducible in CI: the same examples every run, no example database.
FUZZ = settings(
    max_examples=examples(2000),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ROUND_TRIP = settings(FUZZ, max_examples=examples(300))


def counting_nonces() -> Callable[[int], bytes]:
    """A reproducible nonce source: 0, 1, 2, ... as big-endian bytes."""
    counter = itertools.count()
    return lambda size: next(counter).to_bytes(size, "big")


def make_codec(key: bytes = KEY, cluster: str = CLUSTER, previous: bytes | None = None) -> Codec:
    return Codec(cluster, Keyring(key, previous), nonce_source=counting_nonces())


def heartbeat(members: int = 3, sender_index: int = 0) -> Heartbeat:
    ids = sorted(f"node-{i:03d}" for i in range(members))
    return Heartbeat(
        sender=ids[sender_index],
        incarnation=1_700_000_000,
        seq=42,
        weight=100,
        draining=False,
        view=tuple(Member(node_id, 1_700_000_000 + i, 100, False) for i, node_id in enumerate(ids)),
        acks=tuple(range(members)),
        agreed=True,
        held=4096 // members,
    )


def mixed_heartbeat() -> Heartbeat:
    """8-hex wire IDs and short names together, a base partly in and partly outside
    the view (with both spellings outside it), a name, a draining member."""
    sender = wire_id("alpha.example")
    outside = wire_id("gone.example")
    view_ids = sorted([sender, wire_id("beta.example"), "b", "node-1", "DEADBEEF"])
    view = tuple(
        Member(node_id, 1_732_000_000_000 + i, 10 * i, i == 2) for i, node_id in enumerate(view_ids)
    )
    return Heartbeat(
        sender, 1_732_000_000_000, 7, 100, False, view, tuple(range(5, 10)), True, 12,
        epoch=9, base=tuple(sorted([sender, "b", outside, "old-node"])), params=ALL_PARAMS,
        name="alpha.example", health=HEALTH_CHECK | HEALTH_AGENT,
    )  # fmt: skip


# --- the documented layout, re-encoded independently of the codec ------------------


def doc_id(node_id: str) -> bytes:
    if re.fullmatch(r"[0-9a-f]{8}", node_id):
        return b"\x00" + bytes.fromhex(node_id)
    return bytes([len(node_id)]) + node_id.encode("ascii")


def doc_view(view: tuple[Member, ...]) -> bytes:
    return b"".join(
        doc_id(m.node_id)
        + m.incarnation.to_bytes(6, "big")
        + (m.weight | (0x8000 if m.draining else 0)).to_bytes(2, "big")
        for m in view
    )


def doc_acks(acks: tuple[int, ...]) -> bytes:
    return b"".join(ack.to_bytes(5, "big") for ack in acks)


def doc_base(base: tuple[str, ...], view: tuple[Member, ...]) -> bytes:
    ids = [m.node_id for m in view]
    bits = "".join("1" if node_id in base else "0" for node_id in ids)
    bits += "0" * (-len(bits) % 8)
    bitmap = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
    return bitmap + b"".join(doc_id(node_id) for node_id in base if node_id not in ids)


def doc_body(message: Message) -> list[Any]:
    if isinstance(message, Leave):
        return [2, message.sender, message.incarnation, message.seq]
    m = message
    return [
        1,
        m.sender,
        m.incarnation,
        m.seq,
        m.weight,
        m.draining,
        doc_view(m.view),
        doc_acks(m.acks),
        m.agreed,
        m.held,
        m.epoch,
        doc_base(m.base, m.view),
        m.params,
        m.name,
        m.health,
    ]


def seal_body(
    body: bytes, key: bytes = KEY, cluster: str = CLUSTER, nonce: bytes = b"n" * 12
) -> bytes:
    """Seal arbitrary body bytes exactly as the documented layout says."""
    header = b"LB" + bytes([3]) + hashlib.sha256(b"lbd-key-id" + key).digest()[:4] + nonce
    return header + ChaCha20Poly1305(key).encrypt(nonce, body, header + cluster.encode())


def decode(body: list[Any]) -> Message:
    """Validate a body given as a list, as a receiver would after decrypting it."""
    return wirebody.message_from_body(wire._unpack_body(msgpack.packb(body)))


def decode_heartbeat(body: list[Any]) -> Heartbeat:
    message = decode(body)
    assert isinstance(message, Heartbeat)
    return message


# A heartbeat's bins, split into their pieces for structural mutation: a Blob is a
# list of bytes and Blobs that packs as their concatenation, one bin.
VIEW, ACKS, BASE = 6, 7, 11


class Blob(list[Any]):
    """A bin split into pieces (bytes, or Blobs of their own)."""


def joined(blob: Blob) -> bytes:
    return b"".join(joined(piece) if isinstance(piece, Blob) else piece for piece in blob)


def split_id(node_id: str) -> Blob:
    encoded = doc_id(node_id)
    return Blob([encoded[:1], encoded[1:]])


def body_as_lists(message: Message) -> list[Any]:
    """The body as nested lists; a heartbeat's view, acks and base as Blobs of their
    members (each ID a Blob of tag and bytes), acks and bitmap."""
    body = doc_body(message)
    if isinstance(message, Heartbeat):
        view = message.view
        body[VIEW] = Blob(
            Blob([split_id(m.node_id), doc_view((m,))[-8:-2], doc_view((m,))[-2:]]) for m in view
        )
        body[ACKS] = Blob(ack.to_bytes(5, "big") for ack in message.acks)
        in_view = {m.node_id for m in view}
        bitmap = doc_base(message.base, view)[: -(-len(view) // 8)]
        body[BASE] = Blob(
            [bitmap, *(split_id(node_id) for node_id in message.base if node_id not in in_view)]
        )
    return body


def pack_body(body: Any) -> bytes:
    """The inverse of body_as_lists, for any edited body: every Blob becomes a bin."""

    def bins(value: Any) -> Any:
        if isinstance(value, Blob):
            return joined(value)
        if isinstance(value, list):
            return [bins(item) for item in value]
        return value

    packed: bytes = msgpack.packb(bins(body))
    return packed


def open_or_decode_error(codec: Codec, data: bytes) -> Message | None:
    """The invariant: a valid message, or DecodeError; anything else fails the test."""
    try:
        message = codec.open(data)
    except DecodeError:
        return None
    assert isinstance(message, Heartbeat | Leave)
    # seal() refuses anything the receivers' validation would refuse.
    assert codec.open(codec.seal(message)) == message
    return message


# --- strategies ----------------------------------------------------------------

node_ids = st.from_regex(NODE_ID_PATTERN, fullmatch=True)
wire_ids = st.from_regex(WIRE_ID_PATTERN, fullmatch=True)
any_ids = node_ids | wire_ids | st.sampled_from(["a", "b", "n0", "node-000", "DEADBEEF"])
incarnations = st.integers(0, MAX_INCARNATION)
seqs = st.integers(1, MAX_SEQ)
acks = st.integers(0, MAX_SEQ)
epochs = st.integers(0, MAX_COUNTER)
weights = st.integers(0, MAX_WEIGHT)
params_blobs = st.integers(1, 64).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))


@st.composite
def heartbeats(draw: st.DrawFn, max_members: int = 12) -> Heartbeat:
    name = draw(st.just("") | node_ids)
    ids = draw(st.sets(any_ids, min_size=1, max_size=max_members))
    if name:
        ids.add(wire_id(name))
    view_ids = sorted(ids)
    view = tuple(
        Member(node_id, draw(incarnations), draw(weights), draw(st.booleans()))
        for node_id in view_ids
    )
    others = draw(st.sets(any_ids, max_size=max_members))
    in_base = draw(st.sets(st.sampled_from(view_ids), max_size=len(view_ids)))
    return Heartbeat(
        sender=wire_id(name) if name else draw(st.sampled_from(view_ids)),
        incarnation=draw(incarnations),
        seq=draw(seqs),
        weight=draw(weights),
        draining=draw(st.booleans()),
        view=view,
        acks=tuple(draw(acks) for _ in view_ids),
        agreed=draw(st.booleans()),
        held=draw(st.integers(0, MAX_HELD)),
        epoch=draw(epochs),
        base=tuple(sorted(others | in_base))[:MAX_NODES],
        params=draw(params_blobs),
        name=name,
        health=draw(st.integers(0, HEALTH_MAX)),
    )


leaves = st.builds(Leave, sender=any_ids, incarnation=incarnations, seq=seqs)

# Values at and just past every limit the validation enforces.
BOUNDARY_VALUES: list[Any] = [
    0,
    1,
    2,
    3,
    -1,
    MAX_WEIGHT,
    MAX_WEIGHT + 1,
    MAX_HELD,
    MAX_HELD + 1,
    MAX_SEQ,
    MAX_SEQ + 1,
    MAX_INCARNATION,
    MAX_INCARNATION + 1,
    MAX_COUNTER,
    MAX_COUNTER + 1,
    2**64 - 1,
    -(2**63),
    True,
    False,
    None,
    1.0,
    float("nan"),
    "",
    "a",
    "node-000",
    "node-001",
    "-bad",
    "x" * 64,
    "x" * 65,
    "é",
    wire_id("a"),
    b"",
    b"node-000",
    bytes(4),
    bytes(44),
    [],
    {},
    [[]],
    msgpack.ExtType(0, b""),
    msgpack.ExtType(5, b"x"),
]
msgpack_scalars = (
    st.sampled_from(BOUNDARY_VALUES)
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=9))
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=2) | st.integers(0, 9), children, max_size=2)
    ),
    max_leaves=5,
)
# Pieces at and just past the limits of the binary fields.
BOUNDARY_PIECES: list[bytes] = [
    b"",
    b"\x00",
    b"\x01",
    b"\x04",
    b"\x08",
    b"\x40",
    b"\x41",
    b"\x80",
    b"\xff",
    bytes(4),
    b"\xff" * 4,
    bytes(5),
    b"\xff" * 5,
    b"\xff" * 6,
    MAX_INCARNATION.to_bytes(6, "big"),
    MAX_WEIGHT.to_bytes(2, "big"),
    (MAX_WEIGHT + 1).to_bytes(2, "big"),
    (0x8000 | MAX_WEIGHT).to_bytes(2, "big"),
    b"\x7f\xff",
    b"\x01a",
    b"\x01b",
    b"\x01-",
    b"\x01\xe9",
    b"\x08deadbeef",
    b"\x08DEADBEEF",
    b"\x00\xde\xad\xbe\xef",
    b"\x40" + b"x" * 64,
]
pieces = st.sampled_from(BOUNDARY_PIECES) | st.binary(max_size=9)


def paths(value: Any, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """Every position inside nested lists (Blobs too), the root excluded."""
    found = []
    if isinstance(value, list):
        for index, item in enumerate(value):
            found.append((*prefix, index))
            found.extend(paths(item, (*prefix, index)))
    return found


def extreme_heartbeat(members: int) -> Heartbeat:
    """Every field at its maximum, so that every encoding is at its widest."""
    ids = sorted(f"{i}" + "z" * 63 for i in range(members))
    return Heartbeat(
        ids[0], MAX_INCARNATION, MAX_SEQ, MAX_WEIGHT, True,
        tuple(Member(node_id, MAX_INCARNATION, MAX_WEIGHT, True) for node_id in ids),
        (MAX_SEQ,) * members, True, MAX_HELD, MAX_COUNTER, (*ids[1:], "z" * 64),
        bytes(256), "",
    )  # fmt: skip


def worst_case_heartbeat(nodes: int, in_view: int, base: str) -> Heartbeat:
    """The frame budget's worst case: ``nodes`` distinct machine-id-style nodes (8-hex
    wire IDs), ``in_view`` of them in the view; the base is the view ("view"), every
    node ("all") or the nodes outside the view ("outside"); every number at its
    widest, a 64-character name, every parameter digest."""
    names = {wire_id(name): name for name in (f"{i:04d}".rjust(64, "m") for i in range(nodes))}
    assert len(names) == nodes  # no two names share a wire ID
    ids = sorted(names)
    view_ids, outside = ids[:in_view], ids[in_view:]
    base_ids = {"view": view_ids, "all": ids, "outside": outside}[base]
    return Heartbeat(
        view_ids[-1], MAX_INCARNATION, MAX_SEQ, MAX_WEIGHT, True,
        tuple(Member(node_id, MAX_INCARNATION, MAX_WEIGHT, True) for node_id in view_ids),
        (MAX_SEQ,) * in_view, True, MAX_HELD, MAX_COUNTER, tuple(base_ids), ALL_PARAMS,
        names[view_ids[-1]],
    )  # fmt: skip


# Fixed, varied starting points for mutation: generating fresh valid messages for
# every example would spend the time budget in Hypothesis rather than in open().
BASE_MESSAGES: list[Message] = [
    heartbeat(1),
    heartbeat(3, sender_index=1),
    dataclasses.replace(heartbeat(9, sender_index=5), base=("node-000", "node-008", "old")),
    mixed_heartbeat(),
    extreme_heartbeat(3),
    worst_case_heartbeat(10, 6, "all"),
    Leave("node-000", 0, 1),
    Leave("z" * 64, MAX_INCARNATION, MAX_SEQ),
    Leave(wire_id("a"), 1, 1),
]


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """A valid body with one or a few structural edits (replace, delete, insert,
    duplicate, swap), inside the bins too: their members, IDs, numbers and bitmap."""
    body: Any = body_as_lists(draw(st.sampled_from(BASE_MESSAGES)))
    for _ in range(draw(st.integers(1, 3))):
        positions = paths(body)
        if not positions:  # an earlier edit emptied the body
            break
        path = draw(st.sampled_from(positions))
        parent = body
        for index in path[:-1]:
            parent = parent[index]
        index = path[-1]
        # Inside a bin only bytes make sense; elsewhere any msgpack value.
        values = pieces if isinstance(parent, Blob) else msgpack_values
        operation = draw(st.sampled_from(["replace", "delete", "insert", "duplicate", "swap"]))
        if operation == "replace":
            parent[index] = draw(values)
        elif operation == "delete":
            del parent[index]
        elif operation == "insert":
            parent.insert(index, draw(values))
        elif operation == "duplicate":
            parent.insert(index, parent[index])
        else:
            other = draw(st.integers(0, len(parent) - 1))
            parent[index], parent[other] = parent[other], parent[index]
    return pack_body(body)


# --- round trips and layout -------------------------------------------------------


@ROUND_TRIP
@given(heartbeats(max_members=16))
def test_heartbeat_round_trip(message: Heartbeat) -> None:
    codec = Codec(CLUSTER, Keyring(KEY))
    datagram = codec.seal(message)
    assert codec.open(datagram) == message
    # The documented layout, sealed by hand, opens to the same message.
    assert codec.open(seal_body(msgpack.packb(doc_body(message)))) == message


@ROUND_TRIP
@given(leaves)
def test_leave_round_trip(message: Leave) -> None:
    codec = Codec(CLUSTER, Keyring(KEY))
    assert codec.open(codec.seal(message)) == message


@pytest.mark.parametrize("message", BASE_MESSAGES, ids=lambda m: type(m).__name__)
def test_fixed_messages_round_trip_by_codec_and_by_hand(message: Message) -> None:
    codec = make_codec()
    assert codec.open(codec.seal(message)) == message
    assert codec.open(seal_body(msgpack.packb(doc_body(message)))) == message
    assert codec.open(seal_body(pack_body(body_as_lists(message)))) == message


def test_wire_ids_and_short_names_mix() -> None:
    codec = make_codec()
    message = mixed_heartbeat()
    assert codec.open(codec.seal(message)) == message
    view = wirebody.body_of(message)[VIEW]
    assert isinstance(view, bytes)
    # 8-hex IDs travel in 4 bytes behind tag 0, the rest as tagged ASCII; an 8-hex
    # spelling in capitals is not a wire ID, so it travels as 8 characters.
    assert b"\x00" + bytes.fromhex(message.sender) in view
    assert b"\x01b" in view and b"\x06node-1" in view and b"\x08DEADBEEF" in view
    # A node named after a wire ID is just a name: its own wire ID is another.
    named = wire_id(message.sender)
    own = Heartbeat(
        named, 1, 1, 1, False, (Member(named, 1, 1, False),), (0,), True, 0, name=message.sender
    )
    assert codec.open(codec.seal(own)) == own


def test_largest_possible_heartbeat_fits_in_a_datagram() -> None:
    """256 members with 64-character IDs, and a base of 256 others."""
    ids = sorted(f"{i:03d}" + "x" * 61 for i in range(MAX_NODES))
    others = tuple(sorted(f"{i:03d}" + "y" * 61 for i in range(MAX_NODES)))
    message = Heartbeat(
        sender=ids[-1],
        incarnation=MAX_INCARNATION,
        seq=MAX_SEQ,
        weight=MAX_WEIGHT,
        draining=True,
        view=tuple(Member(node_id, MAX_INCARNATION, MAX_WEIGHT, True) for node_id in ids),
        acks=(MAX_SEQ,) * MAX_NODES,
        agreed=True,
        held=MAX_HELD,
        epoch=MAX_COUNTER,
        base=others,
        params=bytes(256),
    )
    codec = make_codec()
    datagram = codec.seal(message)
    assert len(datagram) <= MAX_DATAGRAM
    assert codec.open(datagram) == message


def test_envelope_layout_matches_the_documentation() -> None:
    message = mixed_heartbeat()
    datagram = make_codec().seal(message)
    fingerprint = hashlib.sha256(b"lbd-key-id" + KEY).digest()[:4]
    assert datagram[:2] == b"LB"
    assert datagram[2] == 3
    assert datagram[3:7] == fingerprint == key_fingerprint(KEY)
    assert datagram[7:19] == bytes(12)  # the first nonce of counting_nonces()
    body = ChaCha20Poly1305(KEY).decrypt(
        datagram[7:19], datagram[19:], datagram[:19] + CLUSTER.encode()
    )
    fields = msgpack.unpackb(body)
    assert fields == doc_body(message)
    assert fields[0] == 1 and len(fields) == 15 and fields[14] == HEALTH_CHECK | HEALTH_AGENT
    assert all(isinstance(fields[index], bytes) for index in (VIEW, ACKS, BASE, 12))
    assert isinstance(fields[1], str) and isinstance(fields[13], str)
    leave = make_codec().seal(Leave("a", 1, 2))
    plain = ChaCha20Poly1305(KEY).decrypt(leave[7:19], leave[19:], leave[:19] + CLUSTER.encode())
    assert msgpack.unpackb(plain) == doc_body(Leave("a", 1, 2)) == [2, "a", 1, 2]


def test_binary_fields_byte_by_byte() -> None:
    """The docstring's layout spelt out in literal bytes."""
    hexid = wire_id("x")
    view = (Member("a", 1, 5, True), Member(hexid, 2**40 + 2, MAX_WEIGHT, False))
    if hexid < "a":
        view = view[::-1]
    message = Heartbeat(
        "a",
        3,
        4,
        5,
        False,
        view,
        (1, 2**32),
        True,
        6,
        epoch=7,
        base=tuple(sorted(("a", "b", hexid))),
        name="",
    )
    body = wirebody.body_of(message)
    a = b"\x01a" + b"\x00\x00\x00\x00\x00\x01" + b"\x80\x05"
    x = b"\x00" + bytes.fromhex(hexid) + b"\x01\x00\x00\x00\x00\x02" + b"\x03\xe8"
    assert body[VIEW] == (a + x if view[0].node_id == "a" else x + a)
    assert body[ACKS] == b"\x00\x00\x00\x00\x01" + b"\x01\x00\x00\x00\x00"
    assert body[BASE] == b"\xc0" + b"\x01b"  # both view members, then "b"
    # A bitmap of 9 members takes 2 bytes; bit 0 is the top bit of the first.
    nine = heartbeat(9)
    nine = dataclasses.replace(nine, base=(nine.view[0].node_id, nine.view[8].node_id))
    assert wirebody.body_of(nine)[BASE] == b"\x80\x80"
    assert wirebody.body_of(dataclasses.replace(nine, base=()))[BASE] == b"\x00\x00"


def test_unsorted_or_duplicate_base_is_refused() -> None:
    codec = make_codec()
    good = Heartbeat(
        "a",
        1,
        1,
        1,
        False,
        (Member("a", 1, 1, False),),
        (0,),
        True,
        0,
        epoch=3,
        base=("a", "b", "c"),
    )
    assert codec.open(codec.seal(good)) == good
    body = doc_body(good)
    assert body[BASE] == b"\x80\x01b\x01c"
    for base in (b"\x80\x01c\x01b", b"\x80\x01b\x01b"):
        body[BASE] = base
        with pytest.raises(DecodeError, match="base must be strictly sorted"):
            decode(body)
    # Neither can be sealed: the bitmap would hide the disorder or the duplicate.
    for bad in (("b", "a"), ("a", "a"), ("c", "b"), ("b", "b")):
        with pytest.raises(ValueError, match="invalid message"):
            codec.seal(dataclasses.replace(good, base=bad))


def test_a_base_member_in_the_view_must_be_in_the_bitmap() -> None:
    good = Heartbeat(
        "a",
        1,
        1,
        1,
        False,
        (Member("a", 1, 1, False), Member("b", 1, 1, False)),
        (0, 0),
        True,
        0,
        base=("a", "b"),
    )
    body = doc_body(good)
    assert body[BASE] == b"\xc0"
    body[BASE] = b"\x80\x01b"  # "b" listed as if it were not in the view
    with pytest.raises(DecodeError, match="bitmap"):
        decode(body)


@pytest.mark.parametrize("padding", [0x01, 0x20, 0x3F])
def test_a_bitmap_bit_past_the_view_is_refused(padding: int) -> None:
    good = Heartbeat(
        "a",
        1,
        1,
        1,
        False,
        (Member("a", 1, 1, False), Member("b", 1, 1, False)),
        (0, 0),
        True,
        0,
        base=("a",),
    )
    body = doc_body(good)
    assert body[BASE] == b"\x80"
    body[BASE] = bytes([0x80 | padding])
    with pytest.raises(DecodeError, match="bit set past the view"):
        decode(body)
    body[BASE] = b""  # no bitmap at all
    with pytest.raises(DecodeError, match="bitmap"):
        decode(body)


@pytest.mark.parametrize("field", [VIEW, BASE])
def test_an_8_hex_id_must_travel_in_4_bytes(field: int) -> None:
    hexid = wire_id("a")
    good = Heartbeat(
        hexid, 1, 1, 1, False, (Member(hexid, 1, 1, False),), (0,), True, 0, base=(wire_id("b"),)
    )
    body = doc_body(good)
    node_id = hexid if field == VIEW else wire_id("b")
    assert body[VIEW] == b"\x00" + bytes.fromhex(hexid) + bytes(5) + b"\x01" + b"\x00\x01"
    assert body[BASE] == b"\x00" + b"\x00" + bytes.fromhex(wire_id("b"))
    respelt = b"\x08" + node_id.encode()
    body[field] = respelt + body[field][5:] if field == VIEW else b"\x00" + respelt
    with pytest.raises(DecodeError, match="8-hex id must be sent in 4 bytes"):
        decode(body)


@pytest.mark.parametrize(
    ("encoded", "problem"),
    [
        (b"\x41" + b"x" * 65, "too long"),  # tag 65
        (b"\xff" + b"x" * 255, "too long"),
        (b"\x05abc", "cut short"),
        (b"\x00\xde\xad", "cut short"),
        (b"\x01-", "not a valid node id"),
        (b"\x02a b"[:3], "not a valid node id"),
        (b"\x02\xc3\xa9", "not ASCII"),
        (b"\x01\x00", "not a valid node id"),
    ],
)
def test_bad_id_encodings_are_refused(encoded: bytes, problem: str) -> None:
    good = Heartbeat("a", 1, 1, 1, False, (Member("a", 1, 1, False),), (0,), True, 0)
    body = doc_body(good)
    body[BASE] = b"\x00" + encoded  # an empty bitmap bit, then the ID
    with pytest.raises(DecodeError, match=problem):
        decode(body)
    body = doc_body(good)
    body[VIEW] = body[VIEW] + encoded
    with pytest.raises(DecodeError, match=problem):
        decode(body)


def test_the_name_must_be_what_the_sender_id_is_made_of() -> None:
    codec = make_codec()
    sender = wire_id("web-1")
    good = Heartbeat(
        sender, 1, 1, 1, False, (Member(sender, 1, 1, False),), (0,), True, 0, name="web-1"
    )
    assert codec.open(codec.seal(good)) == good
    for name, problem in (
        ("web-2", "wire id of the name"),
        ("-web", "invalid node id"),
        ("w" * 65, "malformed"),
        (b"web-1", "name must be a string"),
        (None, "name must be a string"),
    ):
        body = doc_body(good)
        body[13] = name
        with pytest.raises(DecodeError, match=problem):
            decode(body)
    with pytest.raises(ValueError, match="invalid message"):
        codec.seal(dataclasses.replace(good, name="web-2"))
    # No name: the sender's ID is its name, whatever its form.
    unnamed = dataclasses.replace(good, name="")
    assert codec.open(codec.seal(unnamed)) == unnamed


def test_a_body_of_an_old_layout_is_refused() -> None:
    """Version 2 was never released with its first layout, and version 3 added the
    health field: a body of either older layout is not read."""
    old = [
        1,
        "a",
        1,
        1,
        1,
        False,
        msgpack.packb([["a", 1, 1, False]]),
        [0],
        True,
        0,
        0,
        msgpack.packb([]),
        bytes(4),
    ]
    with pytest.raises(DecodeError, match="15 fields"):
        decode(old)
    with pytest.raises(DecodeError):
        decode([*old, ""])
    version2 = doc_body(limit_heartbeat())[:-1]
    with pytest.raises(DecodeError, match="15 fields"):
        decode(version2)
    assert decode([*version2, 0]) == limit_heartbeat()


# --- limits ------------------------------------------------------------------------


def limit_heartbeat(**changes: Any) -> Heartbeat:
    member = changes.pop("member", Member("a", 1, 1, False))
    message = Heartbeat("a", 1, 1, 1, False, (member,), (0,), True, 0)
    return dataclasses.replace(message, **changes)


@pytest.mark.parametrize(
    ("make", "smallest", "largest"),
    [
        (lambda v: limit_heartbeat(incarnation=v), 0, MAX_INCARNATION),
        (lambda v: limit_heartbeat(member=Member("a", v, 1, False)), 0, MAX_INCARNATION),
        (lambda v: Leave("a", v, 1), 0, MAX_INCARNATION),
        (lambda v: limit_heartbeat(seq=v), 1, MAX_SEQ),
        (lambda v: Leave("a", 1, v), 1, MAX_SEQ),
        (lambda v: limit_heartbeat(acks=(v,)), 0, MAX_SEQ),
        (lambda v: limit_heartbeat(epoch=v), 0, MAX_COUNTER),
        (lambda v: limit_heartbeat(held=v), 0, MAX_HELD),
        (lambda v: limit_heartbeat(weight=v), 0, MAX_WEIGHT),
        (lambda v: limit_heartbeat(member=Member("a", 1, v, True)), 0, MAX_WEIGHT),
    ],
    ids=[
        "incarnation",
        "member-incarnation",
        "leave-incarnation",
        "seq",
        "leave-seq",
        "ack",
        "epoch",
        "held",
        "weight",
        "member-weight",
    ],
)
def test_limits_are_accepted_and_one_past_them_refused(
    make: Callable[[int], Message], smallest: int, largest: int
) -> None:
    assert (MAX_INCARNATION, MAX_SEQ) == (2**48 - 1, 2**40 - 1)
    codec = make_codec()
    for value in (smallest, largest):
        message = make(value)
        assert codec.open(codec.seal(message)) == message
    for value in (largest + 1, smallest - 1):
        with pytest.raises(ValueError, match="invalid message"):
            codec.seal(make(value))


@pytest.mark.parametrize(
    ("index", "largest"), [(2, MAX_INCARNATION), (3, MAX_SEQ), (10, MAX_COUNTER)]
)
def test_receivers_refuse_numbers_past_the_limits(index: int, largest: int) -> None:
    body = doc_body(limit_heartbeat())
    body[index] = largest
    assert decode(body)
    body[index] = largest + 1
    with pytest.raises(DecodeError, match=f"0..{largest}|1..{largest}"):
        decode(body)
    assert decode([2, "a", MAX_INCARNATION, MAX_SEQ]) == Leave("a", MAX_INCARNATION, MAX_SEQ)
    for too_big in ([2, "a", MAX_INCARNATION + 1, 1], [2, "a", 1, MAX_SEQ + 1]):
        with pytest.raises(DecodeError):
            decode(too_big)


def test_a_member_weight_past_the_limit_is_refused() -> None:
    body = doc_body(limit_heartbeat())
    for weight, draining in ((MAX_WEIGHT, False), (MAX_WEIGHT, True)):
        body[VIEW] = doc_view((Member("a", 1, weight, draining),))
        assert decode_heartbeat(body).view == (Member("a", 1, weight, draining),)
    for raw in (MAX_WEIGHT + 1, 0x7FFF, 0x8000 | (MAX_WEIGHT + 1), 0xFFFF):
        body[VIEW] = doc_id("a") + (1).to_bytes(6, "big") + raw.to_bytes(2, "big")
        with pytest.raises(DecodeError, match="member weight"):
            decode(body)


@pytest.mark.parametrize("count", [1, 2, 7, 8, 9, 31, MAX_NODES])
def test_acks_of_any_count_round_trip(count: int) -> None:
    """Few acks and many are decoded two ways (see wirebins.unpack_acks): both as documented."""
    values = (0, MAX_SEQ, 1, 2**32, 2**39, 255, 2**40 - 256)
    acks = tuple(
        values[i % len(values)] ^ (i if values[i % len(values)] < 2**39 else 0)
        for i in range(count)
    )
    packed = wirebins.pack_acks(acks)
    assert packed == doc_acks(acks) and wirebins.unpack_acks(packed, count) == acks


@pytest.mark.parametrize("count", [0, 2])
def test_acks_must_be_one_per_view_member(count: int) -> None:
    body = doc_body(limit_heartbeat())
    body[ACKS] = bytes(5 * count)
    with pytest.raises(DecodeError, match="acks"):
        decode(body)
    body[ACKS] = bytes(4)
    with pytest.raises(DecodeError, match="acks"):
        decode(body)


def test_view_and_base_sizes_are_limited() -> None:
    ids = sorted(f"n{i:03d}" for i in range(MAX_NODES + 1))
    members = tuple(Member(node_id, 1, 1, False) for node_id in ids)
    body = doc_body(limit_heartbeat())
    body[1] = "n000"
    body[VIEW], body[ACKS] = doc_view(members), bytes(5 * len(members))
    body[BASE] = bytes(-(-len(members) // 8))
    with pytest.raises(DecodeError, match="view must hold"):
        decode(body)
    body[VIEW], body[ACKS] = doc_view(members[:MAX_NODES]), bytes(5 * MAX_NODES)
    body[BASE] = bytes(MAX_NODES // 8)
    assert len(decode_heartbeat(body).view) == MAX_NODES
    body[BASE] = b"\xff" * (MAX_NODES // 8) + doc_id("zz")
    with pytest.raises(DecodeError, match="base must hold"):
        decode(body)
    body[VIEW] = b""
    with pytest.raises(DecodeError, match="view must hold"):
        decode(body)


# --- the frame budget (issue 12) ---------------------------------------------------


@pytest.mark.parametrize(
    ("in_view", "base"),
    [
        (64, "view"),
        (64, "all"),
        (1, "outside"),
        (1, "all"),
        (1, "view"),
        (32, "all"),
        (32, "outside"),
        (32, "view"),
        (48, "all"),
        (17, "outside"),
        (63, "all"),
    ],
)
def test_a_heartbeat_of_64_nodes_fits_one_frame(in_view: int, base: str) -> None:
    """Every field at its widest, 64 distinct nodes however split between the view
    and the base: at most 1472 bytes, one 1500-byte frame over IPv4."""
    message = worst_case_heartbeat(64, in_view, base)
    codec = make_codec()
    datagram = codec.seal(message)
    assert codec.open(datagram) == message
    assert len(datagram) <= heartbeat_size_bound(64) <= FRAME_PAYLOAD == 1472
    if (in_view, base) in ((64, "view"), (64, "all")):
        assert len(datagram) == heartbeat_size_bound(64)  # the bound is reached


@settings(FUZZ, max_examples=examples(200))
@given(st.integers(1, 64), st.data())
def test_any_split_of_64_nodes_fits_one_frame(nodes: int, data: st.DataObject) -> None:
    message = worst_case_heartbeat(nodes, data.draw(st.integers(1, nodes)), "all")
    view_ids = [m.node_id for m in message.view]
    ids = sorted(set(view_ids) | set(message.base))
    base = data.draw(st.sets(st.sampled_from(ids)))
    message = dataclasses.replace(message, base=tuple(sorted(base)))
    codec = make_codec()
    datagram = codec.seal(message)
    assert codec.open(datagram) == message
    assert len(datagram) <= heartbeat_size_bound(nodes) <= heartbeat_size_bound(64)


def test_the_size_bound_grows_past_one_frame_beyond_64_nodes() -> None:
    """Beyond the goal a heartbeat may take several frames (IP fragments): 18 bytes
    per node with wire IDs, so one frame holds up to 69 nodes, 256 take ~4.8 kB."""
    bounds = {n: heartbeat_size_bound(n) for n in (1, 3, 32, 64, 65, 69, 70, 71, 256)}
    assert bounds[64] == 1364 and bounds[69] <= FRAME_PAYLOAD < bounds[70]
    assert bounds[65] - bounds[64] in (18, 19)  # 19 when the bitmap grows by a byte
    assert bounds[256] < 5000
    assert len(make_codec().seal(worst_case_heartbeat(71, 71, "all"))) == bounds[71]
    assert len(make_codec().seal(worst_case_heartbeat(256, 256, "all"))) == bounds[256]
    assert heartbeat_size_bound(64, name_len=0) == bounds[64] - 65
    assert heartbeat_size_bound(64, params_len=4) == bounds[64] - 40
    for bad in (
        {"members": 0},
        {"members": 2 * MAX_NODES + 1},
        {"members": 64, "name_len": 65},
        {"members": 64, "params_len": 3},
        {"members": 64, "params_len": 4 * 65},
    ):
        with pytest.raises(ValueError):
            heartbeat_size_bound(**bad)


# --- the decoder's memo ---------------------------------------------------------------


def test_a_view_seen_before_is_still_checked_exactly() -> None:
    """The decoder remembers validated views and bases by their bytes; a spelling
    that only decodes to an equal value is still refused, and a remembered view
    that lacks the sender too."""
    codec = make_codec()
    hexid = wire_id("a")
    view = tuple(
        sorted((Member(hexid, 1, 1, False), Member("b", 1, 1, True)), key=lambda m: m.node_id)
    )
    good = Heartbeat(
        hexid, 1, 1, 1, False, view, (0, 0), True, 0, epoch=3, base=(hexid, "b"), name="a"
    )
    assert codec.open(codec.seal(good)) == good
    opened, again = codec.open(codec.seal(good)), codec.open(codec.seal(good))
    assert isinstance(opened, Heartbeat) and isinstance(again, Heartbeat)
    assert opened.view is again.view and opened.base is again.base  # one object each
    body = doc_body(good)
    body[VIEW] = body[VIEW].replace(doc_id(hexid), b"\x08" + hexid.encode())
    assert body[VIEW] != doc_body(good)[VIEW]
    with pytest.raises(DecodeError, match="8-hex"):
        decode(body)
    stranger = doc_body(good)
    stranger[1], stranger[13] = "c", ""
    with pytest.raises(DecodeError, match="sender"):
        decode(stranger)


def test_a_base_is_remembered_with_its_view() -> None:
    """The same base bytes mean another base under another view, or nothing."""

    def body_with(view_ids: tuple[str, ...], base: bytes) -> list[Any]:
        members = tuple(Member(node_id, 1, 1, False) for node_id in view_ids)
        body = doc_body(Heartbeat("a", 1, 1, 1, False, members, (0,) * len(members), True, 0))
        body[BASE] = base
        return body

    for _ in range(2):  # the second time from the memo
        assert decode_heartbeat(body_with(("a", "b"), b"\xc0")).base == ("a", "b")
        assert decode_heartbeat(body_with(("a", "c"), b"\xc0")).base == ("a", "c")
        assert decode_heartbeat(body_with(("a", "b"), b"\x80\x01c")).base == ("a", "c")
        with pytest.raises(DecodeError, match="past the view"):
            decode(body_with(("a",), b"\xc0"))
        with pytest.raises(DecodeError, match="bitmap"):
            decode(body_with(("a", "c"), b"\x80\x01c"))


def test_remembered_views_and_bases_are_bounded() -> None:
    codec = make_codec()
    memos = (wirebins._VIEWS, wirebins._BASES, wirebins._PACKED_VIEWS, wirebins._PACKED_BASES)
    for i in range(3 * wirebins.MEMO_SIZE):
        view = (Member("a", i, 1, False),)
        message = Heartbeat("a", 1, 1, 1, False, view, (0,), True, 0, epoch=i, base=(f"b{i}",))
        assert codec.open(codec.seal(message)) == message
        assert all(len(memo) <= wirebins.MEMO_SIZE for memo in memos)
    for i in range(MAX_NODES + 10):  # names: as many as a cluster has nodes
        name = f"web-{i}"
        sender = wire_id(name)
        view = (Member(sender, 1, 1, False),)
        message = Heartbeat(sender, 1, 1, 1, False, view, (0,), True, 0, name=name)
        assert codec.open(codec.seal(message)) == message
        assert len(wirebody._NAMED) <= MAX_NODES
    assert wirebody._NAMED[name] == sender


def test_the_sealing_memo_goes_by_identity_not_equality() -> None:
    """A core seals one view object and one base object many times: each is packed
    once. Equal objects, or the same base under another view, are packed anew."""
    codec = make_codec()
    view = (Member("a", 1, 1, False), Member("b", 1, 1, False))
    base = ("a", "c")
    first = Heartbeat("a", 1, 1, 1, False, view, (0, 0), True, 0, base=base)
    assert codec.open(codec.seal(first)) == first
    assert wirebins._PACKED_VIEWS[id(view)][0] is view
    assert wirebins._PACKED_BASES[id(base), id(view)][:2] == (base, view)
    # 1 == True: an equal view of other types is refused, not served from the memo.
    lookalike = (Member("a", True, 1, False), view[1])
    assert lookalike == view
    with pytest.raises(ValueError, match="invalid message"):
        codec.seal(dataclasses.replace(first, view=lookalike))
    other_view = (Member("a", 1, 1, False), Member("c", 1, 1, False))
    moved = Heartbeat("a", 1, 1, 1, False, other_view, (0, 0), True, 0, base=base)
    assert codec.open(codec.seal(moved)) == moved
    assert wirebody.body_of(moved)[BASE] == b"\xc0" != wirebody.body_of(first)[BASE]
    assert codec.open(codec.seal(first)) == first


# --- exact types ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (1, b"a"),
        (2, True),
        (2, 1.0),
        (3, True),
        (3, 1.0),
        (4, True),
        (4, 1.0),
        (5, 0),
        (5, None),
        (6, "a"),
        (6, [["a", 1, 1, False]]),
        (7, [0]),
        (7, "\x00" * 5),
        (8, 1),
        (9, False),
        (9, 0.0),
        (10, True),
        (11, []),
        (11, "\x80"),
        (12, "\x00" * 4),
        (12, [0]),
        (13, None),
        (13, b""),
    ],
)
def test_fields_of_an_equal_value_but_another_type_are_refused(index: int, value: Any) -> None:
    body = doc_body(limit_heartbeat(draining=False, agreed=True, base=("a",), held=0))
    assert decode(body)
    body[index] = value
    with pytest.raises(DecodeError):
        decode(body)


def test_nonce_source_makes_sealing_reproducible() -> None:
    message = heartbeat()
    assert make_codec().seal(message) == make_codec().seal(message)
    codec = make_codec()
    assert codec.seal(message) != codec.seal(message)  # a fresh nonce each time


def test_bad_nonce_source_is_refused() -> None:
    codec = Codec(CLUSTER, Keyring(KEY), nonce_source=lambda size: b"short")
    with pytest.raises(ConfigError):
        codec.seal(heartbeat())


VIEW3 = heartbeat().view
WIRE_SENDER = wire_id("web-1")


@pytest.mark.parametrize(
    "bad",
    [
        Heartbeat("node-000", 1, 1, MAX_WEIGHT + 1, False, VIEW3, (0, 1, 2), True, 0),
        Heartbeat("node-000", 1, 0, 1, False, VIEW3, (0, 1, 2), True, 0),
        Heartbeat("node-000", 1, 1, 1, 1, VIEW3, (0, 1, 2), True, 0),  # type: ignore[arg-type]
        Heartbeat("node-000", 1, 1, True, False, VIEW3, (0, 1, 2), True, 0),
        Heartbeat("node-000", 1, 1, 1, False, VIEW3, (0, 1), True, 0),
        Heartbeat("node-000", 1, 1, 1, False, VIEW3, [0, 1, 2], True, 0),  # type: ignore[arg-type]
        Heartbeat("node-000", 1, 1, 1, False, VIEW3, (0, 1, True), True, 0),
        Heartbeat("node-000", 1, 1, 1, False, VIEW3, (0, 1, MAX_SEQ + 1), True, 0),
        Heartbeat("node-000", 1, 1, 1, False, VIEW3[::-1], (0, 1, 2), True, 0),
        Heartbeat("node-000", 1, 1, 1, False, list(VIEW3), (0, 1, 2), True, 0),  # type: ignore[arg-type]
        Heartbeat("node-000", 1, 1, 1, False, (*VIEW3[:2], VIEW3[1]), (0, 1, 2), True, 0),
        Heartbeat("node-999", 1, 1, 1, False, VIEW3, (0, 1, 2), True, 0),
        Heartbeat("node-000", 1, 1, 1, False, (), (), True, 0),
        Heartbeat("node-000", 1, 1, 1, False, VIEW3, (0, 1, 2), True, MAX_HELD + 1),
        Heartbeat("node-000", MAX_INCARNATION + 1, 1, 1, False, VIEW3, (0, 1, 2), True, 0),
        Heartbeat("node-000", 1, MAX_SEQ + 1, 1, False, VIEW3, (0, 1, 2), True, 0),
        Heartbeat(
            "node-000",
            1,
            1,
            1,
            False,
            (Member("node-000", 1, 1, 1),),  # type: ignore[arg-type]
            (0,),
            True,
            0,
        ),
        Heartbeat("node-000", 1, 1, 1, False, (Member("node-000", 1, True, False),), (0,), True, 0),
        Heartbeat(
            "node-000", 1, 1, 1, False, (Member("node-000", 2**48, 1, False),), (0,), True, 0
        ),
        Heartbeat("node-000", 1, 1, 1, False, (Member("node 0", 1, 1, False),), (0,), True, 0),
        Heartbeat(
            "node-000",
            1,
            1,
            1,
            False,
            (("node-000", 1, 1, False),),  # type: ignore[arg-type]
            (0,),
            True,
            0,
        ),
        Heartbeat("node-000", 1, 1, 1, False, VIEW3, (0, 1, 2), True, 0, base=("b", "a")),
        Heartbeat(
            "node-000", 1, 1, 1, False, VIEW3, (0, 1, 2), True, 0, base=("node-000", "node-000")
        ),
        Heartbeat("node-000", 1, 1, 1, False, VIEW3, (0, 1, 2), True, 0, base=("x" * 65,)),
        Heartbeat("node-000", 1, 1, 1, False, VIEW3, (0, 1, 2), True, 0, base=["a"]),  # type: ignore[arg-type]
        Heartbeat("node-000", 1, 1, 1, False, VIEW3, (0, 1, 2), True, 0, params=b"123"),
        Heartbeat("node-000", 1, 1, 1, False, VIEW3, (0, 1, 2), True, 0, name="web-1"),
        Heartbeat(
            WIRE_SENDER,
            1,
            1,
            1,
            False,
            (Member(WIRE_SENDER, 1, 1, False),),
            (0,),
            True,
            0,
            name="web-2",
        ),
        Leave("bad id", 1, 1),
        Leave("node-000", -1, 1),
        Leave("node-000", MAX_INCARNATION + 1, 1),
        Leave("node-000", 1, MAX_SEQ + 1),
    ],
)
def test_seal_refuses_what_receivers_would_refuse(bad: Message) -> None:
    with pytest.raises(ValueError, match="invalid message"):
        make_codec().seal(bad)


SWAPS: list[tuple[str, Any]] = [
    ("acks", [0]),
    ("acks", (True,)),
    ("acks", (MAX_SEQ + 1,)),
    ("base", ("b", "a")),
    ("base", ("a", "a")),
    ("base", ["a"]),
    ("base", (1,)),
    ("view", [Member("a", 1, 1, False)]),
    ("view", (Member("a", 1, 1, 1),)),  # type: ignore[arg-type]
    ("view", (Member("a", 1, True, False),)),
    ("view", (Member("a", 1.0, 1, False),)),  # type: ignore[arg-type]
    ("view", (Member("a", 2**48, 1, False),)),
    ("view", (Member("A", 1, 1, False),)),
    ("name", "x"),
    ("name", wire_id("a")),
    ("health", 8),
    ("health", -1),
    ("health", True),
    ("health", 5),
]


@settings(FUZZ, max_examples=examples(500))
@given(heartbeats(max_members=6), st.lists(st.sampled_from(SWAPS), max_size=2))
def test_seal_never_sends_something_else(message: Heartbeat, swaps: list[tuple[str, Any]]) -> None:
    """Whatever the message, seal() refuses it or sends exactly it: no value is
    silently cut to fit its bytes, no base reordered or deduplicated."""
    for field, value in swaps:
        message = dataclasses.replace(message, **{field: value})
    codec = make_codec()
    try:
        datagram = codec.seal(message)
    except ValueError:
        return
    assert codec.open(datagram) == message


# --- keys, rotation, cluster names -----------------------------------------------------


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33), "x" * 32, bytearray(32), None])
def test_keys_must_be_32_bytes(key: Any) -> None:
    with pytest.raises(ConfigError):
        Keyring(key)
    with pytest.raises(ConfigError):
        Keyring(KEY, key if key is not None else b"")


def test_keyring_repr_shows_fingerprints_not_keys() -> None:
    text = repr(Keyring(KEY, OTHER_KEY))
    assert KEY.hex() not in text
    assert key_fingerprint(KEY).hex() in text
    assert key_fingerprint(OTHER_KEY).hex() in text


@pytest.mark.parametrize("name", ["", None, "\udc80"])
def test_cluster_name_is_checked(name: Any) -> None:
    with pytest.raises(ConfigError):
        Codec(name, Keyring(KEY))


def test_rotation_accepts_the_previous_key_until_it_is_dropped() -> None:
    old_node = Codec(CLUSTER, Keyring(KEY))
    migrating = old_node.keyring.rotated(NEW_KEY)
    assert migrating.current == NEW_KEY
    assert migrating.previous == KEY
    new_node = Codec(CLUSTER, migrating)

    message = heartbeat()
    # While migrating, a rotated node opens datagrams of not-yet-rotated ones...
    assert new_node.open(old_node.seal(message)) == message
    # ...and its own are sealed with the new key, which only rotated nodes know.
    sealed_new = new_node.seal(message)
    assert sealed_new[3:7] == key_fingerprint(NEW_KEY)
    with pytest.raises(AuthError):
        old_node.open(sealed_new)
    # Once the old key is dropped, datagrams sealed with it are refused.
    finished = Codec(CLUSTER, Keyring(NEW_KEY))
    assert finished.open(sealed_new) == message
    with pytest.raises(AuthError):
        finished.open(old_node.seal(message))


def test_wrong_key_is_an_auth_error() -> None:
    with pytest.raises(AuthError):
        make_codec(OTHER_KEY).open(make_codec(KEY).seal(heartbeat()))


def test_same_fingerprint_but_wrong_key_is_an_auth_error() -> None:
    forged = bytearray(make_codec(OTHER_KEY).seal(heartbeat()))
    forged[3:7] = key_fingerprint(KEY)
    with pytest.raises(AuthError):
        make_codec(KEY).open(bytes(forged))


def test_wrong_cluster_name_is_an_auth_error() -> None:
    with pytest.raises(AuthError):
        make_codec(cluster="staging").open(make_codec(cluster="production").seal(heartbeat()))


@pytest.mark.parametrize(
    ("offset", "flip", "error"),
    [(0, 0x20, DecodeError), (2, 3, DecodeError), (2, 1, DecodeError), (4, 0xFF, AuthError)],
)
def test_header_errors(offset: int, flip: int, error: type[DecodeError]) -> None:
    """Bad magic or version (here 2 and 0) is malformed; a changed fingerprint is unauthentic."""
    datagram = bytearray(make_codec().seal(heartbeat()))
    datagram[offset] ^= flip
    with pytest.raises(error) as raised:
        make_codec().open(bytes(datagram))
    if error is DecodeError:
        assert not isinstance(raised.value, AuthError)


@pytest.mark.parametrize("data", [bytearray(200), memoryview(bytes(200)), "LB", None, 7])
def test_non_bytes_input_is_a_decode_error(data: Any) -> None:
    with pytest.raises(DecodeError):
        make_codec().open(data)


# --- size is checked before anything is parsed ---------------------------------------------


class SpyAead:
    """Stands in for ChaCha20Poly1305 and counts calls to decrypt."""

    decrypt_calls = 0

    def __init__(self, key: bytes) -> None:
        self._real = ChaCha20Poly1305(key)

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        return self._real.encrypt(nonce, data, associated_data)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        SpyAead.decrypt_calls += 1
        return self._real.decrypt(nonce, data, associated_data)


def test_size_is_checked_before_decrypting_or_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyring, "ChaCha20Poly1305", SpyAead)
    monkeypatch.setattr(SpyAead, "decrypt_calls", 0)
    unpack_calls: list[bytes] = []
    real_unpackb = msgpack.unpackb

    def spy_unpackb(packed: bytes, **options: Any) -> Any:
        unpack_calls.append(packed)
        return real_unpackb(packed, **options)

    monkeypatch.setattr(msgpack, "unpackb", spy_unpackb)  # wire.py looks it up at each call
    codec = make_codec()
    valid = codec.seal(heartbeat())
    assert codec.open(valid) == heartbeat()
    assert (SpyAead.decrypt_calls, len(unpack_calls)) == (1, 1)

    for size in (0, 1, MIN_DATAGRAM - 1, MAX_DATAGRAM + 1, 10 * MAX_DATAGRAM):
        oversized_or_short = (valid + bytes(size))[:size]
        with pytest.raises(DecodeError, match=r"too (long|short)"):
            codec.open(oversized_or_short)
    assert (SpyAead.decrypt_calls, len(unpack_calls)) == (1, 1)

    # Exactly at the limits the datagram does reach the AEAD (and fails it).
    for size in (MIN_DATAGRAM, MAX_DATAGRAM):
        with pytest.raises(AuthError):
            codec.open((valid + bytes(MAX_DATAGRAM))[:size])
    assert (SpyAead.decrypt_calls, len(unpack_calls)) == (3, 1)


# --- replay protection ----------------------------------------------------------------


def test_replay_guard_orders_by_incarnation_then_seq() -> None:
    guard = ReplayGuard()
    guard.check("a", 5, 10)
    with pytest.raises(ReplayError):
        guard.check("a", 5, 10)  # repeated
    with pytest.raises(ReplayError):
        guard.check("a", 5, 9)  # older seq
    with pytest.raises(ReplayError):
        guard.check("a", 4, 1000)  # older incarnation
    guard.check("a", 5, 11)
    guard.check("a", 6, 1)  # a restart resets the sequence
    with pytest.raises(ReplayError):
        guard.check("a", 5, 12)
    guard.check("b", 0, 1)  # senders are independent
    assert issubclass(ReplayError, DecodeError)


def test_replay_guard_forget_and_eviction() -> None:
    guard = ReplayGuard(max_senders=2)
    guard.check("a", 1, 1)
    guard.check("b", 1, 1)
    guard.check("a", 1, 2)  # a is now the most recently updated
    guard.check("c", 1, 1)  # full: evicts b
    assert "b" not in guard and "a" in guard and "c" in guard and len(guard) == 2
    guard.check("b", 1, 1)  # forgotten, so accepted again (and evicts a)
    assert "a" not in guard
    with pytest.raises(ReplayError):
        guard.check("c", 1, 1)
    guard.forget("c")
    guard.forget("never-seen")
    guard.check("c", 1, 1)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_replay_guard_size_is_checked(size: Any) -> None:
    with pytest.raises(ConfigError):
        ReplayGuard(max_senders=size)


def test_replayed_datagram_is_refused_after_opening() -> None:
    codec, guard = make_codec(), ReplayGuard()
    datagram = codec.seal(heartbeat())
    message = codec.open(datagram)
    guard.check(message.sender, message.incarnation, message.seq)
    replayed = codec.open(datagram)
    with pytest.raises(ReplayError):
        guard.check(replayed.sender, replayed.incarnation, replayed.seq)


# --- the fuzz invariant ------------------------------------------------------------------

VALID_DATAGRAMS = [
    make_codec().seal(heartbeat(3)),
    make_codec().seal(heartbeat(32, sender_index=31)),
    make_codec().seal(mixed_heartbeat()),
    make_codec().seal(Leave("node-000", 7, 9)),
]
DATAGRAM_IDS = ["hb3", "hb32", "mixed", "leave"]


def test_hand_sealed_bodies_reach_the_validation() -> None:
    """The fuzz tests below seal bodies by hand: each must get past the envelope to
    the body's validation, or they would test nothing (a header of another version
    stops a datagram at the version check)."""
    codec = make_codec()
    assert codec.open(seal_body(msgpack.packb(doc_body(heartbeat())))) == heartbeat()
    with pytest.raises(DecodeError, match="heartbeat must have"):
        codec.open(seal_body(msgpack.packb([1, "a"])))
    stale = bytearray(seal_body(msgpack.packb(doc_body(heartbeat()))))
    stale[2] = 1
    with pytest.raises(VersionError):
        codec.open(bytes(stale))


@pytest.mark.parametrize("datagram", VALID_DATAGRAMS, ids=DATAGRAM_IDS)
def test_every_truncation_and_extension_fails(datagram: bytes) -> None:
    codec = make_codec()
    assert open_or_decode_error(codec, datagram) is not None
    for length in range(len(datagram)):
        with pytest.raises(DecodeError):
            codec.open(datagram[:length])
    for extra in (b"\x00", b"\xc0", datagram):
        with pytest.raises(DecodeError):
            codec.open(datagram + extra)


@pytest.mark.parametrize("datagram", VALID_DATAGRAMS, ids=DATAGRAM_IDS)
def test_every_single_bit_flip_fails(datagram: bytes) -> None:
    codec = make_codec()
    for bit in range(len(datagram) * 8):
        flipped = bytearray(datagram)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecodeError):
            codec.open(bytes(flipped))


@pytest.mark.parametrize("datagram", VALID_DATAGRAMS, ids=DATAGRAM_IDS)
def test_multi_bit_flips_fail(datagram: bytes) -> None:
    # A seeded loop rather than Hypothesis: cheap enough for many thousand cases.
    codec, rng = make_codec(), random.Random(len(datagram))
    for _ in range(3000):
        flipped = bytearray(datagram)
        for bit in rng.sample(range(len(datagram) * 8), rng.randint(2, 16)):
            flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecodeError):
            codec.open(bytes(flipped))


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    open_or_decode_error(make_codec(), data)


@FUZZ
@given(st.binary(max_size=1024))
def test_random_bytes_behind_a_valid_header_cannot_authenticate(tail: bytes) -> None:
    header = b"LB\x03" + key_fingerprint(KEY) + bytes(12)
    with pytest.raises(DecodeError):
        make_codec().open(header + tail)


@FUZZ
@given(st.binary(max_size=512))
def test_sealed_random_body(body: bytes) -> None:
    open_or_decode_error(make_codec(), seal_body(body))


@FUZZ
@given(
    msgpack_values
    | st.builds(
        lambda kind, fields: [kind, *fields],
        st.sampled_from([1, 2, 3, 0, True, 1.0, "1"]),
        # Scalars only: nested junk is the structural mutation test's job.
        st.lists(msgpack_scalars, min_size=3, max_size=3)  # the length of a Leave
        | st.lists(msgpack_scalars, min_size=13, max_size=13),  # the length of a Heartbeat
    )
)
def test_sealed_arbitrary_msgpack_body(value: Any) -> None:
    open_or_decode_error(make_codec(), seal_body(msgpack.packb(value)))


@FUZZ
@given(mutated_bodies())
def test_sealed_structurally_mutated_body(body: bytes) -> None:
    open_or_decode_error(make_codec(), seal_body(body))


@FUZZ
@given(st.sampled_from(BASE_MESSAGES), st.data())
def test_sealed_byte_mutated_body(message: Message, data: st.DataObject) -> None:
    body = bytearray(msgpack.packb(wirebody.body_of(message)))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(body) - 1))
        body[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del body[data.draw(st.integers(1, len(body))) :]
    open_or_decode_error(make_codec(), seal_body(bytes(body)))


def test_hostile_bodies_are_refused_cheaply() -> None:
    """Declared sizes and nesting beyond the limits fail inside msgpack, fast."""
    codec = make_codec()
    hostile = [
        b"\xdd\xff\xff\xff\xff",  # array32 declaring 4 billion items
        b"\xdf\xff\xff\xff\xff",  # map32 declaring 4 billion pairs
        b"\xdb\xff\xff\xff\xff",  # str32 declaring 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin32 declaring 4 GiB
        b"\x91" * (MAX_DATAGRAM - HEADER_LEN - 16),  # nesting as deep as a datagram allows
        b"\xdc\x01\x01" + b"\xc0" * 257,  # as many items as a full view of the old layout
        b"\x9f" + b"\xc0" * 15,  # one field more than a heartbeat
        b"\x94\x02\xa1a\x01\x01\xc4" + bytes(1),  # a Leave with data after it
        msgpack.packb([1, "a", 1, 1, 1, False, [["a", 1, 1, False]], [0], True, 0]),
        b"\xc7\x00\xff",  # empty timestamp extension, which msgpack cannot decode
        b"\xd6\xff" + bytes(4),  # a valid timestamp: extensions are refused all the same
        msgpack.packb(doc_body(limit_heartbeat())) + b"\xc0",  # a valid body, then more
    ]
    for body in hostile:
        with pytest.raises(DecodeError):
            codec.open(seal_body(body))
