"""Unit tests of the core's edges: quorum rule, timer validation, hostile input."""

from __future__ import annotations

import pytest

from lbd.protocol import events as ev
from lbd.protocol.config import DEFAULT_TIMERS, FAST_TIMERS, CoreConfig, Timers
from lbd.protocol.errors import ConfigError
from lbd.protocol.membership import Node
from lbd.protocol.messages import Heartbeat, Member
from lbd.protocol.quorum import has_quorum
from lbd.protocol.wire import Codec, Keyring

KEY = bytes(32)
OTHER_KEY = bytes([1] * 32)


def make_node(node_id: str = "a", incarnation: int = 1, key: bytes = KEY) -> Node:
    return Node(CoreConfig(buckets=64), Codec("lbd", Keyring(key)), node_id, incarnation, 0.0)


def heartbeat(sender: str, seq: int, incarnation: int = 1) -> Heartbeat:
    me = Member(sender, incarnation, 100, False)
    return Heartbeat(sender, incarnation, seq, 100, False, (me,), (0,), False, 0)


def test_quorum_is_a_strict_majority_or_a_half_with_the_smallest_id() -> None:
    base = frozenset({"a", "b", "c", "d"})
    assert has_quorum({"a", "b", "c"}, base)
    assert has_quorum({"a", "b"}, base)
    assert not has_quorum({"c", "d"}, base)
    assert not has_quorum({"a"}, base)
    assert has_quorum({"x"}, frozenset())


def test_profiles_are_valid_and_unsafe_lease_is_refused() -> None:
    DEFAULT_TIMERS.validate()
    FAST_TIMERS.validate()
    with pytest.raises(ConfigError, match="lease is too long"):
        Timers(lease=0.69).validate()
    with pytest.raises(ConfigError, match="dead_after"):
        Timers(dead_after=0.2).validate()


def test_first_heartbeat_leaves_at_once_after_a_kernel_state() -> None:
    node = make_node()
    actions = node.actions()
    assert isinstance(actions[0], ev.ApplyKernel) and actions[0].owned == frozenset()
    assert isinstance(actions[-1], ev.Transmit)


def test_garbage_forgery_and_replay_are_counted_not_raised() -> None:
    node = make_node("a")
    sender = Codec("lbd", Keyring(KEY))
    forger = Codec("lbd", Keyring(OTHER_KEY))
    other_cluster = Codec("other", Keyring(KEY))
    node.receive_datagram(b"\x00" * 5, "x", 0.01)
    node.receive_datagram(b"LB\x01" + bytes(100), "x", 0.01)  # unknown key id: forged
    node.receive_datagram(forger.seal(heartbeat("b", 1)), "x", 0.01)
    node.receive_datagram(other_cluster.seal(heartbeat("b", 1)), "x", 0.01)
    good = sender.seal(heartbeat("b", 5))
    node.receive_datagram(good, "x", 0.02)
    node.receive_datagram(good, "x", 0.03)
    node.receive_datagram(sender.seal(heartbeat("b", 4)), "x", 0.04)
    c = node.counters
    assert (c.malformed, c.forged, c.replayed, c.accepted) == (1, 3, 2, 1)


def test_same_node_id_from_another_process_is_reported() -> None:
    node = make_node("a", incarnation=1)
    node.receive_datagram(Codec("lbd", Keyring(KEY)).seal(heartbeat("a", 1, incarnation=7)),
                          "x", 0.01)
    assert any(isinstance(e, ev.DuplicateNodeId) and e.incarnation == 7 for e in node.events())


def test_lone_node_claims_everything_only_after_startup_wait() -> None:
    node = make_node()
    node.handle_timer(CoreConfig().timers.startup_wait / 2)
    assert node.held == frozenset()
    t = CoreConfig().timers.startup_wait + 0.001
    node.handle_timer(t)
    assert node.held == frozenset(range(64))
    assert node.lease_until is not None and node.lease_until > t
    assert node.get_timer() is not None
