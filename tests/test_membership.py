"""Unit tests of the core's edges: quorum rule, timer validation, hostile input."""

from __future__ import annotations

import pytest

from lbd.protocol import events as ev
from lbd.protocol.config import DEFAULT_TIMERS, FAST_TIMERS, CoreConfig, Timers
from lbd.protocol.errors import ConfigError
from lbd.protocol.membership import Node
from lbd.protocol.messages import (
    HEALTH_AGENT,
    HEALTH_CHECK,
    HEALTH_INTERFACE,
    HEALTH_MAX,
    Heartbeat,
    Member,
    wire_id,
)
from lbd.protocol.params import digest_params
from lbd.protocol.quorum import has_quorum
from lbd.protocol.wire import Codec, Keyring
from lbd.testbed import clustersim

KEY = bytes(32)
OTHER_KEY = bytes([1] * 32)


def make_node(node_id: str = "a", incarnation: int = 1, key: bytes = KEY) -> Node:
    return Node(CoreConfig(buckets=64), Codec("lbd", Keyring(key)), node_id, incarnation, 0.0)


PARAMS = digest_params(CoreConfig(buckets=64).agreed_values())


def heartbeat(sender: str, seq: int, incarnation: int = 1) -> Heartbeat:
    me = Member(sender, incarnation, 100, False)
    return Heartbeat(sender, incarnation, seq, 100, False, (me,), (0,), False, 0, params=PARAMS)


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
    node.receive_datagram(b"LB\x03" + bytes(100), "x", 0.01)  # unknown key id: forged
    node.receive_datagram(b"LB\x02" + bytes(100), "x", 0.01)  # another wire version
    node.receive_datagram(forger.seal(heartbeat("b", 1)), "x", 0.01)
    node.receive_datagram(other_cluster.seal(heartbeat("b", 1)), "x", 0.01)
    good = sender.seal(heartbeat("b", 5))
    node.receive_datagram(good, "x", 0.02)
    node.receive_datagram(good, "x", 0.03)
    node.receive_datagram(sender.seal(heartbeat("b", 4)), "x", 0.04)
    c = node.counters
    # The newest heartbeat twice is a copy (multicast plus unicast peers), not a replay.
    assert (c.malformed, c.forged, c.replayed, c.copies, c.accepted) == (1, 3, 1, 1, 1)
    assert c.foreign_version == 1


def test_same_node_id_from_another_process_is_reported() -> None:
    node = make_node("a", incarnation=1)
    node.receive_datagram(
        Codec("lbd", Keyring(KEY)).seal(heartbeat("a", 1, incarnation=7)), "x", 0.01
    )
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


def test_a_peer_with_other_parameters_is_never_admitted_and_named() -> None:
    node = make_node("a")
    other = Node(CoreConfig(buckets=128), Codec("lbd", Keyring(KEY)), "b", 1, 0.0)
    for step in range(40):
        t = 0.05 * step
        for action in other.actions():
            if isinstance(action, ev.Transmit):
                node.receive_datagram(action.data, "192.0.2.12", t)
        other.handle_timer(t)
        node.handle_timer(t)
    events = node.events()
    assert ev.ParameterMismatch("b", "192.0.2.12", ("buckets",)) in events
    assert [m.node_id for m in node.view] == ["a"]
    assert node.counters.mismatched > 0 and node.counters.accepted == 0
    rows = {r.node_id: r for r in node.members(2.0)}
    assert rows["b"].state == "mismatch" and rows["b"].mismatch == ("buckets",)
    assert any("disagrees on buckets" in line for line in node.problems(2.0))
    # The mistaken node heard someone it could not admit: it never forms a view alone.
    assert node.held == frozenset() and not node.agreed


def test_a_first_start_waits_for_bootstrap_expect_members() -> None:
    config = CoreConfig(buckets=64, bootstrap_expect=2)
    node = Node(config, Codec("lbd", Keyring(KEY)), "a", 1, 0.0)
    late = config.timers.startup_wait * 3
    node.handle_timer(late)
    assert node.held == frozenset() and not node.agreed
    assert any("bootstrap_expect = 2" in line for line in node.problems(late))


def test_datagrams_that_fail_authentication_are_named_by_source() -> None:
    node = make_node("a")
    forged = Codec("lbd", Keyring(OTHER_KEY)).seal(heartbeat("b", 1))
    for i in range(3):
        node.receive_datagram(forged, "192.0.2.13", 0.01 * (i + 1))
    assert node.counters.forged == 3
    assert (
        ev.StrangerHeard("192.0.2.13", "authentication: wrong key file or cluster name?")
        in node.events()
    )
    assert node.problems(0.1) == [
        "hearing 3 datagrams from 192.0.2.13 that fail "
        "authentication: wrong key file or cluster name?"
    ]
    # Heard a cluster it cannot read: even with bootstrap_expect = 1 it never starts alone.
    node.handle_timer(CoreConfig().timers.startup_wait * 2)
    assert node.held == frozenset()


def test_a_clone_of_our_node_id_makes_us_drain_until_it_is_gone() -> None:
    node = make_node("a", incarnation=1)
    node.handle_timer(CoreConfig().timers.startup_wait + 0.01)
    assert len(node.held) == 64  # a lone node with bootstrap_expect = 1
    t = CoreConfig().timers.startup_wait + 0.02
    clone = Codec("lbd", Keyring(KEY)).seal(heartbeat("a", 1, incarnation=7))
    node.receive_datagram(clone, "192.0.2.99", t)
    assert node.advertised_draining and node.held == frozenset()
    assert any("also used by the process at 192.0.2.99" in p for p in node.problems(t))
    assert {r.state for r in node.members(t) if r.is_self} == {"duplicate-id"}
    # Silent for dead_after: the node serves again.
    later = t + CoreConfig().timers.dead_after + 0.01
    node.handle_timer(later)
    node.handle_timer(later + 0.2)
    assert not node.advertised_draining and len(node.held) == 64


def test_a_peer_listing_our_id_with_a_newer_incarnation_is_a_clash() -> None:
    node = make_node("a", incarnation=1)
    view = (Member("a", 9, 100, False), Member("b", 1, 100, False))
    hb = Heartbeat("b", 1, 1, 100, False, view, (3, 0), False, 0, params=PARAMS)
    node.receive_datagram(Codec("lbd", Keyring(KEY)).seal(hb), "192.0.2.12", 0.01)
    assert node.advertised_draining
    assert any(isinstance(e, ev.DuplicateNodeId) and e.incarnation == 9 for e in node.events())


def test_the_view_never_exceeds_the_member_limit() -> None:
    node = make_node("a")
    codec = Codec("lbd", Keyring(KEY))
    me = Member("a", 1, 100, False)
    for i in range(300):  # each lists us (a newcomer must), acking nothing yet
        them = Member(f"p{i:03d}", 1, 100, False)
        hb = Heartbeat(them.node_id, 1, 1, 100, False, (me, them), (0, 0), False, 0, params=PARAMS)
        node.receive_datagram(codec.seal(hb), "192.0.2.12", 0.01)
    node.handle_timer(0.01 + CoreConfig().timers.join_holddown + 0.001)
    assert len(node.view) == 256
    refused = [e for e in node.events() if isinstance(e, ev.MemberRefused)]
    assert len(refused) == 300 - 255 and node.counters.refused == len(refused)


def test_events_of_the_admission_gate_survive_an_earlier_drain() -> None:
    node = make_node("a")
    node.events()  # the daemon drains events after every step
    forged = Codec("lbd", Keyring(OTHER_KEY)).seal(heartbeat("b", 1))
    node.receive_datagram(forged, "192.0.2.13", 0.01)
    assert any(isinstance(e, ev.StrangerHeard) for e in node.events())


def test_after_a_clone_is_gone_the_node_takes_an_incarnation_above_it() -> None:
    node = make_node("a", incarnation=1)
    t = 0.01
    view = (Member("a", 9, 100, False), Member("b", 1, 100, False))
    hb = Heartbeat("b", 1, 1, 100, False, view, (3, 0), False, 0, params=PARAMS)
    node.receive_datagram(Codec("lbd", Keyring(KEY)).seal(hb), "192.0.2.12", t)
    problems = node.problems(t)
    assert any("another process (peer 192.0.2.12 lists it)" in p for p in problems), problems
    later = t + CoreConfig().timers.dead_after + 0.01
    node.handle_timer(later)
    assert node.incarnation == 10 and not node.advertised_draining
    assert ev.MemberRestarted("a", 10) in node.events()


def _colliding_names() -> tuple[str, str]:
    """Two node names with one wire ID (a birthday search over 32 bits: ~80k names)."""
    seen: dict[str, str] = {}
    for i in range(400_000):
        name = f"web{i}"
        other = seen.setdefault(wire_id(name), name)
        if other != name:
            return other, name
    raise AssertionError("no collision found")


def test_two_names_sharing_a_wire_id_are_refused_with_both_names() -> None:
    first, second = _colliding_names()
    shared = wire_id(first)
    node = Node(CoreConfig(buckets=64), Codec("lbd", Keyring(KEY)), shared, 1, 0.0, name=first)
    me = Member(shared, 5, 100, False)
    hb = Heartbeat(shared, 5, 1, 100, False, (me,), (0,), False, 0, params=PARAMS, name=second)
    node.receive_datagram(Codec("lbd", Keyring(KEY)).seal(hb), "192.0.2.77", 0.01)
    assert node.advertised_draining
    problems = node.problems(0.01)
    assert any(
        f"node names {first} and {second} (at 192.0.2.77) share the wire ID {shared}" in p
        for p in problems
    ), problems
    # A collision is not a restart: no new incarnation when it ends.
    node.handle_timer(0.01 + CoreConfig().timers.dead_after + 0.01)
    assert node.incarnation == 1 and not node.advertised_draining


def test_replayed_heartbeats_of_a_dead_node_never_make_it_a_member_again() -> None:
    """A receiver that restarted (new incarnation, empty replay memory) is sent a dead
    node's captured heartbeats: they list the receiver's old incarnation only."""
    node = make_node("a", incarnation=2)
    codec = Codec("lbd", Keyring(KEY))
    captured = [
        codec.seal(
            Heartbeat(
                "b",
                1,
                seq,
                100,
                False,
                (Member("a", 1, 100, False), Member("b", 1, 100, False)),
                (seq, 0),
                True,
                0,
                params=PARAMS,
            )
        )
        for seq in range(1, 20)
    ]
    t = 0.0
    for datagram in captured:
        t += 0.1
        node.receive_datagram(datagram, "192.0.2.12", t)
        node.handle_timer(t)
    assert [m.node_id for m in node.view] == ["a"]
    assert not any(isinstance(e, ev.MemberJoined) for e in node.events())


def test_a_lapse_goes_to_the_kernel_before_the_base_is_written() -> None:
    """Giving up must never wait for a disk: a kernel state that accepts nothing comes
    before the PersistBase of the same step (the claim and heartbeat come after it)."""
    node = make_node("a")
    node.actions()  # the first step's
    node.handle_timer(CoreConfig().timers.startup_wait + 0.01)  # alone: claims, base {a}
    actions = node.actions()
    kinds = [type(a).__name__ for a in actions]
    assert "PersistBase" in kinds and "ApplyKernel" in kinds
    assert kinds.index("PersistBase") < kinds.index("ApplyKernel")  # a claim waits for it
    # A lapse in a step that also changes the base: the release is first.
    node._actions = [ev.ApplyKernel(frozenset(), None)]
    node._reported_base = (-1, frozenset(), None)
    node._step(CoreConfig().timers.startup_wait + 0.02)
    kinds = [type(a).__name__ for a in node.actions()]
    assert kinds[0] == "ApplyKernel" and kinds[1] == "PersistBase", kinds


def test_health_travels_in_heartbeats_and_every_member_unhealthy_is_known() -> None:
    cluster = clustersim.start(3)

    def cores() -> dict[str, Node]:
        return {name: node.core for name, node in cluster.nodes.items() if node.core}

    def settle_health() -> None:
        cluster.run_until(cluster.now + 0.3)

    cluster.act("n0", lambda core, now: core.set_health(HEALTH_CHECK, now))
    settle_health()
    seen_by_n1 = {row.name: row.health for row in cores()["n1"].members(cluster.now)}
    assert seen_by_n1 == {"n0": "unhealthy: check", "n1": "ok", "n2": "ok"}
    assert not any(core.every_member_unhealthy() for core in cores().values())
    cluster.act("n1", lambda core, now: core.set_health(HEALTH_INTERFACE, now))
    cluster.act("n2", lambda core, now: core.set_health(HEALTH_AGENT | HEALTH_CHECK, now))
    settle_health()
    assert all(core.every_member_unhealthy() for core in cores().values())
    seen_by_n0 = {row.name: row.health for row in cores()["n0"].members(cluster.now)}
    assert seen_by_n0["n2"] == "unhealthy: check, agent"
    cluster.act("n2", lambda core, now: core.set_health(0, now))
    settle_health()
    assert not any(core.every_member_unhealthy() for core in cores().values())
    with pytest.raises(ValueError, match="health"):
        cores()["n0"].set_health(HEALTH_MAX + 1, cluster.now)
