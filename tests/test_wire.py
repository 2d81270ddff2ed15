"""Tests of the authenticated wire format (lbd.protocol.wire).

The central property is the fuzz invariant: whatever bytes arrive, Codec.open
returns a valid message or raises DecodeError, never anything else. Datagrams
with garbage bodies are sealed here by hand, straight from the documented
layout, so that the body validation is fuzzed past the AEAD and the layout
itself is checked independently of the codec.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbd.protocol import wire
from lbd.protocol.errors import AuthError, ConfigError, DecodeError, ReplayError
from lbd.protocol.messages import (
    MAX_NODES,
    MAX_WEIGHT,
    NODE_ID_PATTERN,
    Heartbeat,
    Leave,
    Member,
    Message,
)
from lbd.protocol.wire import (
    HEADER_LEN,
    MAX_COUNTER,
    MAX_DATAGRAM,
    MAX_HELD,
    MIN_DATAGRAM,
    Codec,
    Keyring,
    ReplayGuard,
    key_fingerprint,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
NEW_KEY = bytes(range(200, 232))
CLUSTER = "test-cluster"

# Reproducible in CI: the same examples every run, no example database.
FUZZ = settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ROUND_TRIP = settings(FUZZ, max_examples=300)


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


def seal_body(
    body: bytes, key: bytes = KEY, cluster: str = CLUSTER, nonce: bytes = b"n" * 12
) -> bytes:
    """Seal arbitrary body bytes exactly as the documented layout says."""
    header = b"LB" + bytes([1]) + hashlib.sha256(b"lbd-key-id" + key).digest()[:4] + nonce
    return header + ChaCha20Poly1305(key).encrypt(nonce, body, header + cluster.encode())


PACKED_FIELDS = (6, 11)
"""A heartbeat's view and base: each a msgpack array packed into a bin of its own."""


def body_as_lists(message: Message) -> list[Any]:
    """The body as nested lists, a heartbeat's view and base unpacked too."""
    return unpack_body(msgpack.packb(wire._body_of(message)))


def unpack_body(packed: bytes) -> list[Any]:
    body: list[Any] = msgpack.unpackb(packed)
    if len(body) == 13 and body[0] == 1:
        for index in PACKED_FIELDS:
            body[index] = msgpack.unpackb(body[index])
    return body


def pack_body(body: Any) -> bytes:
    """The inverse of body_as_lists, for any edited body: a list found where a
    heartbeat's view or base belongs is packed into a bin, anything else is left."""
    if isinstance(body, list) and len(body) > PACKED_FIELDS[0]:
        body = [msgpack.packb(item) if index in PACKED_FIELDS and isinstance(item, list)
                else item for index, item in enumerate(body)]
    packed: bytes = msgpack.packb(body)
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
counters = st.integers(0, MAX_COUNTER)
seqs = st.integers(1, MAX_COUNTER)
weights = st.integers(0, MAX_WEIGHT)


@st.composite
def heartbeats(draw: st.DrawFn, max_members: int = 12) -> Heartbeat:
    ids = sorted(draw(st.sets(node_ids, min_size=1, max_size=max_members)))
    view = tuple(
        Member(node_id, draw(counters), draw(weights), draw(st.booleans())) for node_id in ids
    )
    return Heartbeat(
        sender=draw(st.sampled_from(ids)),
        incarnation=draw(counters),
        seq=draw(seqs),
        weight=draw(weights),
        draining=draw(st.booleans()),
        view=view,
        acks=tuple(draw(counters) for _ in ids),
        agreed=draw(st.booleans()),
        held=draw(st.integers(0, MAX_HELD)),
        epoch=draw(counters),
        base=tuple(sorted(draw(st.sets(node_ids, max_size=max_members)))),
    )


leaves = st.builds(Leave, sender=node_ids, incarnation=counters, seq=seqs)

# Values at and just past every limit the validation enforces.
BOUNDARY_VALUES: list[Any] = [
    0, 1, 2, 3, -1, MAX_WEIGHT, MAX_WEIGHT + 1, MAX_HELD, MAX_HELD + 1, MAX_COUNTER,
    MAX_COUNTER + 1, 2**64 - 1, -(2**63), True, False, None, 1.0, float("nan"), "", "a",
    "node-000", "node-001", "-bad", "x" * 64, "x" * 65, "é", b"", b"node-000", [], {}, [[]],
    msgpack.ExtType(0, b""), msgpack.ExtType(5, b"x"),
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
    lambda children: st.lists(children, max_size=5)
    | st.lists(children, min_size=4, max_size=4)  # the shape of a view member
    | st.dictionaries(st.text(max_size=2) | st.integers(0, 9), children, max_size=2),
    max_leaves=5,
)


def paths(value: Any, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """Every position inside nested lists, the root excluded."""
    found = []
    if isinstance(value, list):
        for index, item in enumerate(value):
            found.append((*prefix, index))
            found.extend(paths(item, (*prefix, index)))
    return found


def extreme_heartbeat(members: int) -> Heartbeat:
    """Every field at its maximum, so that msgpack uses its widest encodings."""
    ids = sorted(f"{i}" + "z" * 63 for i in range(members))
    return Heartbeat(
        ids[0], MAX_COUNTER, MAX_COUNTER, MAX_WEIGHT, True,
        tuple(Member(node_id, MAX_COUNTER, MAX_WEIGHT, True) for node_id in ids),
        (MAX_COUNTER,) * members, True, MAX_HELD,
    )  # fmt: skip


# Fixed, varied starting points for mutation: generating fresh valid messages for
# every example would spend the time budget in Hypothesis rather than in open().
BASE_MESSAGES: list[Message] = [
    heartbeat(1),
    heartbeat(3, sender_index=1),
    heartbeat(6, sender_index=5),
    extreme_heartbeat(3),
    Leave("node-000", 0, 1),
    Leave("z" * 64, MAX_COUNTER, MAX_COUNTER),
]


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """A valid body with one or a few structural edits: replace, delete, insert, duplicate."""
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
        operation = draw(st.sampled_from(["replace", "delete", "insert", "duplicate", "swap"]))
        if operation == "replace":
            parent[index] = draw(msgpack_values)
        elif operation == "delete":
            del parent[index]
        elif operation == "insert":
            parent.insert(index, draw(msgpack_values))
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
    assert codec.open(codec.seal(message)) == message


@ROUND_TRIP
@given(leaves)
def test_leave_round_trip(message: Leave) -> None:
    codec = Codec(CLUSTER, Keyring(KEY))
    assert codec.open(codec.seal(message)) == message


def test_largest_possible_heartbeat_fits_in_a_datagram() -> None:
    ids = sorted(f"{i:03d}" + "x" * 61 for i in range(MAX_NODES))
    message = Heartbeat(
        sender=ids[-1],
        incarnation=MAX_COUNTER,
        seq=MAX_COUNTER,
        weight=MAX_WEIGHT,
        draining=True,
        view=tuple(Member(node_id, MAX_COUNTER, MAX_WEIGHT, True) for node_id in ids),
        acks=(MAX_COUNTER,) * MAX_NODES,
        agreed=True,
        held=MAX_HELD,
        epoch=MAX_COUNTER,
        base=tuple(ids),
    )
    codec = make_codec()
    datagram = codec.seal(message)
    assert len(datagram) <= MAX_DATAGRAM
    assert codec.open(datagram) == message


def test_unsorted_or_duplicate_base_is_refused() -> None:
    codec = make_codec()
    good = Heartbeat("a", 1, 1, 1, False, (Member("a", 1, 1, False),), (0,), True, 0,
                     epoch=3, base=("a", "b"))
    assert codec.open(codec.seal(good)) == good
    for base in (("b", "a"), ("a", "a")):
        body = list(wire._body_of(good))
        body[11] = msgpack.packb(base)
        with pytest.raises(DecodeError, match="base"):
            wire._message_from_body(tuple(body))


def test_a_view_seen_before_is_still_checked_exactly() -> None:
    """The decoder remembers validated views and bases; what only compares equal to
    one (1 == True == 1.0) or lacks the sender is still refused."""
    codec = make_codec()
    view = (Member("a", 1, 1, False), Member("b", 1, 1, True))
    good = Heartbeat("a", 1, 1, 1, False, view, (0, 0), True, 0, epoch=3, base=("a", "b"))
    assert codec.open(codec.seal(good)) == good
    opened = codec.open(codec.seal(good))
    assert isinstance(opened, Heartbeat)
    assert opened.view is codec.open(codec.seal(good)).view  # one object per view
    remembered = wire._body_of(good)[6]
    for column, value in ((1, True), (2, 1.0), (3, 1)):
        body = body_as_lists(good)
        body[6][0 if column != 3 else 1][column] = value
        packed = pack_body(body)
        view = msgpack.unpackb(packed)[6]
        # Equal in value to the remembered view, but not of its types.
        assert view != remembered and msgpack.unpackb(view) == msgpack.unpackb(remembered)
        with pytest.raises(DecodeError, match="member"):
            wire._message_from_body(wire._unpack_body(packed))
    stranger = list(wire._body_of(good))
    stranger[1] = "c"
    with pytest.raises(DecodeError, match="sender"):
        wire._message_from_body(tuple(stranger))


def test_remembered_views_and_bases_are_bounded() -> None:
    codec = make_codec()
    for i in range(3 * wire._MEMO_SIZE):
        view = (Member("a", i, 1, False),)
        message = Heartbeat("a", 1, 1, 1, False, view, (0,), True, 0, epoch=i, base=(f"b{i}",))
        assert codec.open(codec.seal(message)) == message
        assert len(wire._VIEWS) <= wire._MEMO_SIZE and len(wire._BASES) <= wire._MEMO_SIZE


def test_envelope_layout_matches_the_documentation() -> None:
    message = heartbeat()
    datagram = make_codec().seal(message)
    fingerprint = hashlib.sha256(b"lbd-key-id" + KEY).digest()[:4]
    assert datagram[:2] == b"LB"
    assert datagram[2] == 2
    assert datagram[3:7] == fingerprint == key_fingerprint(KEY)
    assert datagram[7:19] == bytes(12)  # the first nonce of counting_nonces()
    body = ChaCha20Poly1305(KEY).decrypt(
        datagram[7:19], datagram[19:], datagram[:19] + CLUSTER.encode()
    )
    assert unpack_body(body) == body_as_lists(message)
    fields = msgpack.unpackb(body)
    assert fields[0] == 1 and len(fields) == 13
    assert all(isinstance(fields[index], bytes) for index in PACKED_FIELDS)
    assert fields[6] == msgpack.packb([[m.node_id, m.incarnation, m.weight, m.draining]
                                       for m in message.view])
    assert fields[11] == msgpack.packb(list(message.base))
    assert body_as_lists(Leave("a", 1, 2)) == [2, "a", 1, 2]


def test_nonce_source_makes_sealing_reproducible() -> None:
    message = heartbeat()
    assert make_codec().seal(message) == make_codec().seal(message)
    codec = make_codec()
    assert codec.seal(message) != codec.seal(message)  # a fresh nonce each time


def test_bad_nonce_source_is_refused() -> None:
    codec = Codec(CLUSTER, Keyring(KEY), nonce_source=lambda size: b"short")
    with pytest.raises(ConfigError):
        codec.seal(heartbeat())


@pytest.mark.parametrize(
    "bad",
    [
        Heartbeat("node-000", 1, 1, MAX_WEIGHT + 1, False, heartbeat().view, (0, 1, 2), True, 0),
        Heartbeat("node-000", 1, 0, 1, False, heartbeat().view, (0, 1, 2), True, 0),
        Heartbeat("node-000", 1, 1, 1, 1, heartbeat().view, (0, 1, 2), True, 0),  # type: ignore[arg-type]
        Heartbeat("node-000", 1, 1, True, False, heartbeat().view, (0, 1, 2), True, 0),
        Heartbeat("node-000", 1, 1, 1, False, heartbeat().view, (0, 1), True, 0),
        Heartbeat("node-000", 1, 1, 1, False, heartbeat().view[::-1], (0, 1, 2), True, 0),
        Heartbeat("node-999", 1, 1, 1, False, heartbeat().view, (0, 1, 2), True, 0),
        Heartbeat("node-000", 1, 1, 1, False, (), (), True, 0),
        Heartbeat("node-000", 1, 1, 1, False, heartbeat().view, (0, 1, 2), True, MAX_HELD + 1),
        Leave("bad id", 1, 1),
        Leave("node-000", -1, 1),
        Leave("node-000", 1, MAX_COUNTER + 1),
    ],
)
def test_seal_refuses_what_receivers_would_refuse(bad: Message) -> None:
    with pytest.raises(ValueError, match="invalid message"):
        make_codec().seal(bad)


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
    monkeypatch.setattr(wire, "ChaCha20Poly1305", SpyAead)
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
    make_codec().seal(Leave("node-000", 7, 9)),
]


@pytest.mark.parametrize("datagram", VALID_DATAGRAMS, ids=["hb3", "hb32", "leave"])
def test_every_truncation_and_extension_fails(datagram: bytes) -> None:
    codec = make_codec()
    assert open_or_decode_error(codec, datagram) is not None
    for length in range(len(datagram)):
        with pytest.raises(DecodeError):
            codec.open(datagram[:length])
    for extra in (b"\x00", b"\xc0", datagram):
        with pytest.raises(DecodeError):
            codec.open(datagram + extra)


@pytest.mark.parametrize("datagram", VALID_DATAGRAMS, ids=["hb3", "hb32", "leave"])
def test_every_single_bit_flip_fails(datagram: bytes) -> None:
    codec = make_codec()
    for bit in range(len(datagram) * 8):
        flipped = bytearray(datagram)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecodeError):
            codec.open(bytes(flipped))


@pytest.mark.parametrize("datagram", VALID_DATAGRAMS, ids=["hb3", "hb32", "leave"])
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
    header = b"LB\x01" + key_fingerprint(KEY) + bytes(12)
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
        | st.lists(msgpack_scalars, min_size=11, max_size=11),  # the length of a Heartbeat
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
    body = bytearray(msgpack.packb(wire._body_of(message)))
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
        b"\xdc\x01\x01" + b"\xc0" * 257,  # one item more than a full view
        b"\xc7\x00\xff",  # empty timestamp extension, which msgpack cannot decode
        b"\xd6\xff" + bytes(4),  # a valid timestamp: extensions are refused all the same
        msgpack.packb([1, "a", 1, 1, 1, False, [["a", 1, 1, False]], [0], True, 0]) + b"\xc0",
    ]
    for body in hostile:
        with pytest.raises(DecodeError):
            codec.open(seal_body(body))
