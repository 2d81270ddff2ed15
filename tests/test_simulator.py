"""The protocol core proved in the deterministic cluster simulator.

Named scenarios check S1 (every kernel change), L1 (failover within the bound)
and L2 (only the buckets that must move do) for each fault kind; the random
schedules then mix faults freely. A failure prints its seed: rerun it with
``run_random_schedule(seed, FAST_TIMERS)`` from tests/simschedules.py (operators'
mistakes, ``mistakes=True``, are proved in test_sim_mistakes.py). S1 is checked per
bucket between nodes that map clients alike and per sampled client otherwise.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import pytest
from simschedules import run_random_schedule

from lbd.protocol import events as ev
from lbd.protocol import nodestate, ownership
from lbd.protocol.config import DEFAULT_TIMERS, FAST_TIMERS, CoreConfig, QuorumMode, Timers
from lbd.protocol.driver import Driver
from lbd.protocol.jhash import bucket_of
from lbd.protocol.ownership import MemberWeights, Owners
from lbd.protocol.pacing import QUIET_SLACK
from lbd.testbed import clustersim
from lbd.testbed.clustersim import (
    CLIENTS,
    Cluster,
    SimNode,
    Violation,
    accepted_clients,
    client_buckets,
    settle,
)

FAST = FAST_TIMERS
SCHEDULES = int(os.environ.get("LBD_SIM_SCHEDULES", "2000"))


def start(
    n: int,
    seed: int = 1,
    timers: Timers = FAST,
    buckets: int = 256,
    config: CoreConfig | None = None,
) -> Cluster:
    return clustersim.start(n, seed, timers, buckets=buckets, config=config)


def owners_now(cluster: Cluster) -> dict[int, str]:
    served = cluster.served()
    assert all(len(nodes) <= 1 for nodes in served.values())
    return {b: nodes[0] for b, nodes in served.items() if nodes}


def view_changes(node: SimNode) -> int:
    return sum(isinstance(e, ev.ViewChanged) for _, e in node.events)


def time_to_serve_all(cluster: Cluster, limit: float) -> float | None:
    """Virtual seconds until every bucket is accepted by exactly one node."""
    start_time = cluster.now
    step = cluster.timers.interval / 20
    while cluster.now < start_time + limit:
        cluster.run_until(cluster.now + step)
        served = cluster.served()
        if all(len(nodes) == 1 for nodes in served.values()):
            return cluster.now - start_time
    return None


# ---------------------------------------------------------------- scenarios


def test_three_nodes_converge_and_split_all_buckets() -> None:
    cluster = start(3)
    owners = owners_now(cluster)
    assert len(owners) == 256
    assert set(owners.values()) == {"n0", "n1", "n2"}


def test_heartbeats_travel_as_one_wave_per_interval() -> None:
    """Followers answer the pacer's (smallest ID's) heartbeat, so each node's peers
    arrive in one burst per interval; nobody sends faster than one per interval; and
    a settled node reads its socket once per interval, not on every arrival."""
    cluster = start(5, timers=DEFAULT_TIMERS)
    sends: list[tuple[float, str]] = []
    multicast = cluster._multicast

    def logged(sender: SimNode, data: bytes) -> None:
        sends.append((cluster.now, sender.name))
        multicast(sender, data)

    cluster._multicast = logged  # type: ignore[method-assign]
    window = 3.0
    woken = {name: node.wakeups for name, node in cluster.nodes.items()}
    cluster.run_until(cluster.now + window)
    expected = window / DEFAULT_TIMERS.interval
    per_node = {name: sum(1 for _, n in sends if n == name) for name in cluster.nodes}
    assert all(0.9 * expected <= c <= 1.05 * expected for c in per_node.values()), per_node
    wakeups = {name: node.wakeups - woken[name] for name, node in cluster.nodes.items()}
    assert all(c <= 1.05 * expected for c in wakeups.values()), wakeups
    pacer_times = [t for t, n in sends if n == "n0"]
    # A settled follower reads just after the pacer's heartbeat is due.
    late = cluster.delay[1] + (QUIET_SLACK + cluster.skew) * DEFAULT_TIMERS.interval
    followers = [(t, n) for t, n in sends if n != "n0"]
    in_wave = sum(1 for t, _ in followers if any(0 <= t - p <= late for p in pacer_times))
    assert in_wave >= 0.95 * len(followers), (in_wave, len(followers))


@pytest.mark.parametrize(
    ("timers", "every"), [(DEFAULT_TIMERS, 3), (FAST_TIMERS, 2)], ids=["default", "fast"]
)
def test_settled_nodes_renew_the_kernel_lease_every_few_heartbeats(
    timers: Timers, every: int
) -> None:
    """A kernel transaction is the dearest thing a settled node does: the lease is
    renewed every few heartbeats, never lapses, and keeps a quarter lease in hand."""
    cluster = start(4, seed=5, timers=timers)
    applies = dict.fromkeys(cluster.nodes, 0)
    lowest = dict.fromkeys(cluster.nodes, float("inf"))
    seen: dict[str, float | None] = {name: None for name in cluster.nodes}

    def count(node: SimNode) -> None:
        applies[node.name] += 1
        before = seen[node.name]
        if before is not None:
            lowest[node.name] = min(lowest[node.name], before - node.local(cluster.now))
        seen[node.name] = node.lease_until_local

    cluster.on_kernel_change = count
    window = 200 * timers.interval
    cluster.run_until(cluster.now + window)
    steps = window / timers.interval
    for name, node in cluster.nodes.items():
        # A few more: a follower that wakes before a late pacer heartbeat renews on
        # an older anchor, and so once more a step later.
        assert steps / every * 0.95 <= applies[name] <= steps / every * 1.1 + 1, (name, applies)
        assert lowest[name] >= timers.lease / 4, (name, lowest[name])
        assert not any(isinstance(e, ev.LeaseLapsed) for _, e in node.events), name


def test_settled_nodes_read_late_but_time_silence_from_arrival() -> None:
    """A settled node leaves datagrams queued until its next wake-up, yet a dead
    peer is declared dead_after its last heartbeat *arrived*, not after it was
    read; once something changes, everyone reads each datagram as it comes."""
    timers = DEFAULT_TIMERS
    cluster = start(4, seed=7, timers=timers)
    assert all(
        n.core is not None and n.core.quiet_until() is not None for n in cluster.nodes.values()
    )
    sent: list[float] = []
    multicast = cluster._multicast

    def logged(sender: SimNode, data: bytes) -> None:
        if sender.name == "n2":
            sent.append(cluster.now)
        multicast(sender, data)

    cluster._multicast = logged  # type: ignore[method-assign]
    quiet: list[tuple[float, str, float | None]] = []
    schedule = cluster._schedule_timer

    def sampled(node: SimNode) -> None:
        schedule(node)
        quiet.append((cluster.now, node.name, node.quiet_until_local))

    cluster._schedule_timer = sampled  # type: ignore[method-assign]
    cluster.run_until(cluster.now + 0.537)  # an arbitrary phase of the cycle
    cluster.crash("n2")
    crashed_at = cluster.now
    cluster.run_until(crashed_at + timers.dead_after + 3 * timers.interval)
    slack = cluster.delay[1] + cluster.skew * timers.dead_after + 1e-3
    for name in ("n0", "n1", "n3"):
        node = cluster.nodes[name]
        deaths = [
            t
            for t, e in node.events
            if t > crashed_at and isinstance(e, ev.MemberDead) and e.node_id == "n2"
        ]
        assert deaths, name
        # Read a whole interval late, the verdict would come up to an interval later.
        assert deaths[0] - sent[-1] <= timers.dead_after + slack, (name, deaths[0] - sent[-1])
        agreed = min(t for t, e in node.events if t >= deaths[0] and isinstance(e, ev.ViewAgreed))
        changing = [q for t, n, q in quiet if n == name and deaths[0] <= t < agreed]
        assert changing and all(q is None for q in changing), name
    settle(cluster)
    assert all(n.core is not None and n.core.quiet_until() is not None for n in cluster.live())


@pytest.mark.parametrize("timers", [DEFAULT_TIMERS, FAST_TIMERS], ids=["default", "fast"])
def test_crash_moves_only_dead_nodes_buckets_within_bound(timers: Timers) -> None:
    for seed in range(5):
        cluster = start(4, seed=seed, timers=timers)
        before = owners_now(cluster)
        # crash at a random phase of the heartbeat cycle
        cluster.run_until(cluster.now + random.Random(seed).uniform(0, timers.interval))
        cluster.crash("n2")
        took = time_to_serve_all(cluster, limit=3 * timers.dead_after)
        assert took is not None
        assert took <= timers.dead_after + 2 * timers.interval, took
        settle(cluster)
        after = owners_now(cluster)
        moved = {b for b in before if before[b] != after[b]}
        assert moved == {b for b, owner in before.items() if owner == "n2"}


def test_hang_expires_lease_and_resumed_node_never_reclaims_blindly() -> None:
    cluster = start(3, seed=3)
    hung = cluster.nodes["n1"]
    held_before = hung.kernel_set
    assert held_before
    cluster.hang("n1")
    cluster.run_until(cluster.now + 3 * FAST.dead_after)
    assert hung.kernel_set == held_before  # the daemon is stopped: nothing changed...
    assert hung.accepting(cluster.now) == frozenset()  # ...but its lease expired
    assert len(owners_now(cluster)) == 256  # and the others serve its slices
    cluster.resume("n1")
    # S1 is checked on every kernel change; after resuming it first drops everything.
    lapsed = [e for _, e in hung.events if isinstance(e, ev.LeaseLapsed)]
    assert lapsed and lapsed[-1].dropped == len(held_before)
    settle(cluster)
    assert hung.accepting(cluster.now) == held_before


@pytest.mark.parametrize("minority", [["n0"], ["n4"], ["n0", "n1"]])
def test_symmetric_partition_only_majority_serves(minority: list[str]) -> None:
    cluster = start(5, seed=4)
    names = list(cluster.nodes)
    cluster.blocked |= {(a, b) for a in names for b in names if (a in minority) != (b in minority)}
    cluster.run_until(cluster.now + 4 * FAST.dead_after)
    for name in minority:
        assert cluster.nodes[name].accepting(cluster.now) == frozenset()
    assert len(owners_now(cluster)) == 256  # majority absorbed the minority's slices
    cluster.blocked.clear()
    settle(cluster)


def test_one_way_partition_isolated_sender_fails_closed() -> None:
    cluster = start(3, seed=5)
    # n0's heartbeats no longer reach anyone, but n0 still hears everybody
    cluster.blocked |= {("n0", "n1"), ("n0", "n2")}
    cluster.run_until(cluster.now + 4 * FAST.dead_after)
    assert cluster.nodes["n0"].accepting(cluster.now) == frozenset()
    assert len(owners_now(cluster)) == 256
    cluster.blocked.clear()
    settle(cluster)


def test_one_way_partition_deaf_node_fails_closed() -> None:
    cluster = start(3, seed=6)
    cluster.blocked |= {("n1", "n0"), ("n2", "n0")}  # n0 hears nobody
    cluster.run_until(cluster.now + 4 * FAST.dead_after)
    assert cluster.nodes["n0"].accepting(cluster.now) == frozenset()
    assert len(owners_now(cluster)) == 256
    cluster.blocked.clear()
    settle(cluster)


def test_twenty_percent_heartbeat_loss_does_not_flap() -> None:
    cluster = start(3, seed=7, timers=DEFAULT_TIMERS)
    before = {n.name: view_changes(n) for n in cluster.nodes.values()}
    cluster.loss = 0.20
    cluster.run_until(cluster.now + 60.0)  # 600 heartbeat rounds
    after = {n.name: view_changes(n) for n in cluster.nodes.values()}
    assert after == before
    assert len(owners_now(cluster)) == 256


def test_join_moves_buckets_only_to_newcomer() -> None:
    cluster = start(3, seed=8)
    before = owners_now(cluster)
    cluster.add_node("n9")
    settle(cluster)
    after = owners_now(cluster)
    moved = {b for b in before if before[b] != after[b]}
    assert moved and all(after[b] == "n9" for b in moved)


@pytest.mark.parametrize("timers", [DEFAULT_TIMERS, FAST_TIMERS], ids=["default", "fast"])
def test_a_rejoining_node_claims_as_soon_as_the_others_released(timers: Timers) -> None:
    """A join is break before make: the slices a newcomer gains go unserved from the
    others' release to its claim. It claims once the others have agreed a view with
    it, not at the end of its own start-up wait (that was ~1 s of dropped SYNs on
    every rejoin)."""
    cluster = start(3, seed=21, timers=timers)
    before = owners_now(cluster)
    cluster.crash("n2")
    settle(cluster)
    cluster.add_node("n2")
    restarted = cluster.now
    unserved_since: dict[int, float] = {}
    longest = 0.0
    claimed: float | None = None
    while cluster.now < restarted + 2 * timers.startup_wait:
        cluster.run_until(cluster.now + timers.interval / 10)
        if claimed is None and cluster.nodes["n2"].kernel_set:
            claimed = cluster.now
        for bucket, nodes in cluster.served().items():
            if not nodes:
                unserved_since.setdefault(bucket, cluster.now)
            elif bucket in unserved_since:
                longest = max(longest, cluster.now - unserved_since.pop(bucket))
    assert not unserved_since and owners_now(cluster) == before
    assert claimed is not None and claimed - restarted < timers.startup_wait, claimed
    assert longest <= 3 * timers.interval, longest


def test_graceful_leave_hands_over_without_gap_growth() -> None:
    cluster = start(3, seed=9)
    before = owners_now(cluster)
    cluster.act("n1", lambda core, now: core.leave(now))
    cluster.run_until(cluster.now + FAST.leave_timeout)
    leaver = cluster.nodes["n1"]
    assert leaver.core is not None and leaver.core.has_left
    assert leaver.accepting(cluster.now) == frozenset()
    leaver.state = "left"
    settle(cluster)
    after = owners_now(cluster)
    assert {b for b in before if before[b] != after[b]} == {
        b for b, o in before.items() if o == "n1"
    }
    # the leave was acknowledged by absorption, not by timeout
    assert any(isinstance(e, ev.LeftCluster) for _, e in leaver.events)
    assert not any(
        isinstance(e, ev.MemberDead) for n in cluster.nodes.values() for _, e in n.events
    )


def test_two_node_cluster_survives_graceful_leave_of_either() -> None:
    for leaver in ("n0", "n1"):
        cluster = start(2, seed=10)
        cluster.act(leaver, lambda core, now: core.leave(now))
        cluster.run_until(cluster.now + FAST.leave_timeout)
        cluster.nodes[leaver].state = "left"
        settle(cluster)
        assert len(owners_now(cluster)) == 256


def test_drain_and_undrain() -> None:
    cluster = start(3, seed=11)
    before = owners_now(cluster)
    cluster.act("n2", lambda core, now: core.set_draining(True, now))
    settle(cluster)
    drained = owners_now(cluster)
    assert "n2" not in drained.values() and len(drained) == 256
    cluster.act("n2", lambda core, now: core.set_draining(False, now))
    settle(cluster)
    assert owners_now(cluster) == before


def test_weight_change_moves_only_that_nodes_buckets() -> None:
    cluster = start(4, seed=12)
    before = owners_now(cluster)
    cluster.act("n1", lambda core, now: core.set_weight(300, now))
    settle(cluster)
    after = owners_now(cluster)
    moved = {b for b in before if before[b] != after[b]}
    assert moved and all(after[b] == "n1" for b in moved)


def test_restart_keeps_ownership() -> None:
    cluster = start(3, seed=13)
    before = owners_now(cluster)
    cluster.crash("n0")
    cluster.add_node("n0")  # new incarnation, same ID, straight away
    settle(cluster)
    assert owners_now(cluster) == before


def test_rolling_restart_and_restart_all() -> None:
    cluster = start(4, seed=14)
    before = owners_now(cluster)
    for name in list(cluster.nodes):
        cluster.crash(name)
        cluster.run_until(cluster.now + FAST.interval)
        cluster.add_node(name)
        settle(cluster)
    assert owners_now(cluster) == before
    for name in list(cluster.nodes):
        cluster.crash(name)
    for name in list(cluster.nodes):
        cluster.add_node(name)
    settle(cluster)
    assert owners_now(cluster) == before


def test_quorum_none_keeps_serving_alone_and_documents_the_trade() -> None:
    config = CoreConfig(buckets=256, quorum=QuorumMode.NONE)
    cluster = start(3, seed=15, config=config)
    cluster.blocked |= {
        (a, b) for a in cluster.nodes for b in cluster.nodes if a != b and "n0" in (a, b)
    }
    with pytest.raises(Violation):
        # both sides of the partition serve n0's... and then each other's slices
        cluster.run_until(cluster.now + 4 * FAST.dead_after)


def test_clock_skew_is_modelled() -> None:
    cluster = start(3, seed=16)
    rates = {round(n.rate, 6) for n in cluster.nodes.values()}
    assert len(rates) == 3 and all(0.99 <= r <= 1.01 for r in rates)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sixty_four_nodes_converge_and_survive_a_crash() -> None:
    cluster = start(64, seed=17, buckets=1024)
    cluster.crash("n33")
    took = time_to_serve_all(cluster, limit=3 * FAST.dead_after)
    assert took is not None and took <= FAST.dead_after + 2 * FAST.interval


# ---------------------------------------------------------- the S1 checker


def _accept(cluster: Cluster, node: SimNode, buckets: set[int]) -> None:
    """Make ``node``'s kernel accept ``buckets`` now (as an ApplyKernel would)."""
    node.kernel_set = frozenset(buckets)
    node.lease_until_local = node.local(cluster.now) + 1.0
    cluster._check_s1(node)


def test_s1_is_checked_client_by_client_between_nodes_that_map_clients_differently() -> None:
    """Nodes with other buckets or seed share no bucket numbering: the check maps each
    sampled client with each node's own jhash and fails on a client both accept."""
    cluster = Cluster(19, FAST, buckets=128)
    a = cluster.add_node("a")
    b = cluster.add_node("b", config=replace(cluster.config, buckets=200, seed=7))
    c = cluster.add_node("c")
    assert a.mapping == c.mapping != b.mapping
    assert len(CLIENTS) == 640
    assert client_buckets(b.mapping)[0] == bucket_of("198.51.100.0", 200, 7)
    _accept(cluster, a, set(range(64)))
    taken = accepted_clients(a.mapping, a.kernel_set)
    assert 0 < taken.sum() < len(CLIENTS)
    of_b = client_buckets(b.mapping)
    clash = {int(x) for x in of_b[taken]}
    free = {int(x) for x in of_b[~taken]} - clash
    assert len(free) > 20
    _accept(cluster, b, free)  # no client in common: fine
    extra = min(clash)
    both = int(((of_b == extra) & taken).sum())
    with pytest.raises(Violation, match=f"b and a both accept {both} of the 640 sampled "):
        _accept(cluster, b, free | {extra})
    _accept(cluster, b, set())
    _accept(cluster, c, set(range(64, 128)))  # alike: bucket by bucket, disjoint
    with pytest.raises(Violation, match=r"c and a both accept 1 buckets \(e.g. 63\)"):
        _accept(cluster, c, set(range(63, 128)))


def test_nodes_with_disjoint_vips_never_share_a_client() -> None:
    config = CoreConfig(buckets=64, shared=(("vips", "192.0.2.100/32"),))
    cluster = Cluster(20, FAST, config=config)
    a = cluster.add_node("a")
    b = cluster.add_node("b", config=replace(cluster.config, shared=(("vips", "192.0.2.101/32"),)))
    c = cluster.add_node(
        "c",
        config=replace(cluster.config, seed=9, shared=(("vips", "192.0.2.101/32,192.0.2.100/32"),)),
    )
    _accept(cluster, a, set(range(64)))
    _accept(cluster, b, set(range(64)))
    with pytest.raises(Violation, match="c and a both accept"):
        _accept(cluster, c, set(range(64)))


# ------------------------------------------------------------ random faults


def _run_batch(seeds: range) -> list[str]:
    failures = []
    for seed in seeds:
        try:
            run_random_schedule(seed, FAST_TIMERS)
        except Violation as violation:
            failures.append(str(violation))
    return failures


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_random_fault_schedules() -> None:
    """Thousands of seeded schedules (LBD_SIM_SCHEDULES), on both cores."""
    half = SCHEDULES // 2
    with ProcessPoolExecutor(max_workers=2) as pool:
        batches = pool.map(_run_batch, [range(0, half), range(half, SCHEDULES)])
        failures = [f for batch in batches for f in batch]
    assert not failures, "\n".join(failures[:10])


@pytest.mark.parametrize("nodes", [9, 16])
def test_random_schedules_larger_clusters(nodes: int) -> None:
    run_random_schedule(10_000 + nodes, FAST_TIMERS, nodes=nodes, faults=3)


SLOW_DISK = (0.0, FAST.interval)
"""A base write that takes up to a heartbeat interval (an fsync on a busy disk)."""


def test_a_slow_base_write_holds_every_later_action_of_its_node() -> None:
    """The daemon's order, in the simulator: while a node's base write is in
    progress, it applies nothing to its kernel and sends nothing (the driver)."""
    cluster = Cluster(41, FAST, buckets=128, persist_delay=SLOW_DISK)
    held: list[str] = []
    apply, multicast = cluster._apply, cluster._multicast

    def checked_apply(node: SimNode, action: ev.ApplyKernel) -> None:
        assert node.driver is not None and not node.driver.persisting, node.name
        apply(node, action)

    def checked_multicast(sender: SimNode, data: bytes) -> None:
        assert sender.driver is not None and not sender.driver.persisting, sender.name
        multicast(sender, data)

    def sampled() -> None:
        held.extend(
            n.name for n in cluster.nodes.values() if n.driver is not None and n.driver.persisting
        )
        cluster.at(cluster.now + FAST.interval / 7, sampled)

    cluster._apply = checked_apply  # type: ignore[method-assign]
    cluster._multicast = checked_multicast  # type: ignore[method-assign]
    cluster.at(0.0, sampled)
    for i in range(3):
        cluster.add_node(f"n{i}")
    settle(cluster)
    cluster.add_node("n3")  # a join: a new base, written by every node
    settle(cluster)
    cluster.crash("n1")
    settle(cluster)
    assert {"n0", "n2", "n3"} <= set(held)  # writes were in progress, and waited for


def test_a_base_write_in_progress_when_its_node_crashes_is_lost() -> None:
    """The old base stays on disk; nothing that waited for the write was done."""
    cluster = Cluster(42, FAST, buckets=128, persist_delay=(0.015, 0.015))
    for i in range(3):
        cluster.add_node(f"n{i}")
    settle(cluster)
    node = cluster.nodes["n0"]
    stored = node.persisted_base
    cluster.add_node("n3")
    deadline = cluster.now + 2.0
    while not (node.driver is not None and node.driver.persisting):
        assert cluster.now < deadline, "n0 never wrote the new base"
        cluster.run_until(cluster.now + FAST.interval / 10)
    cluster.crash("n0")
    cluster.run_until(cluster.now + 0.1)  # past the write's landing
    assert node.persisted_base == stored
    cluster.add_node("n0")
    settle(cluster)
    assert node.persisted_base[0] == ("n0", "n1", "n2", "n3")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_schedules_with_a_slow_disk() -> None:
    """Random fault (and mistake) schedules with base writes that take up to an
    interval: no S1 violation, and the cluster still converges."""
    failures = []
    for seed in range(SCHEDULES // 20):
        try:
            run_random_schedule(
                20_000 + seed, FAST, persist_delay=SLOW_DISK, mistakes=seed % 4 == 0
            )
        except Violation as violation:
            failures.append(str(violation))
    assert not failures, "\n".join(failures[:10])


SLOW_TABLES = (0.0, FAST.interval)
"""Ownership builds that take up to an interval (the daemon's thread, on a busy host)."""


def test_a_view_waits_for_its_table_and_failover_still_completes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With tables built away from the step, a node takes a new view only once its
    table is back (no core builds one of several members itself): the survivors of
    a crash take the dead node's slices anyway, later by at most the build."""
    builds: list[int] = []
    build = ownership.compute_owners

    def in_step(weights: MemberWeights, buckets: int, seed: int) -> Owners:
        assert len(weights) == 1, f"a core built the table of {weights} in its step"
        return build(weights, buckets, seed)

    monkeypatch.setattr(nodestate, "compute_owners", in_step)
    cluster = Cluster(43, FAST, buckets=256, table_delay=(0.02, 0.02))
    hand = cluster._hand_table

    def counted(node: SimNode, driver: Driver, action: ev.BuildTable) -> None:
        builds.append(len(action.weights))
        hand(node, driver, action)

    cluster._hand_table = counted  # type: ignore[method-assign]
    for i in range(3):
        cluster.add_node(f"n{i}")
    settle(cluster)
    assert builds and max(builds) == 3
    before = len(builds)
    cluster.crash("n1")
    limit = FAST.dead_after + 0.02 + 20 * FAST.interval
    took = time_to_serve_all(cluster, limit)
    assert took is not None, "the survivors never served every bucket"
    assert set(owners_now(cluster).values()) == {"n0", "n2"}
    # A survivor may still hold the two-member table from the start-up's joins.
    assert set(builds[before:]) <= {2} and len(builds[before:]) <= 2


def test_a_node_waiting_for_a_table_stops_supporting_a_peer_it_declared_dead() -> None:
    """Seed 30012: a peer hangs; a node declares it dead but waits for the table of
    the view without it. Acking the resumed peer on the old view meanwhile let it
    renew its lease while the third node took its slices (S1 broken)."""
    run_random_schedule(30012, FAST, table_delay=SLOW_TABLES, mistakes=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_schedules_with_tables_built_elsewhere() -> None:
    """Random fault (and mistake) schedules with ownership tables that come back up
    to an interval after they are asked for: no S1 violation, and convergence."""
    failures = []
    for seed in range(SCHEDULES // 20):
        try:
            run_random_schedule(
                21_000 + seed,
                FAST,
                table_delay=SLOW_TABLES,
                persist_delay=SLOW_DISK if seed % 2 else (0.0, 0.0),
                mistakes=seed % 4 == 0,
            )
        except Violation as violation:
            failures.append(str(violation))
    assert not failures, "\n".join(failures[:10])


def test_restarted_node_remembers_its_quorum_base() -> None:
    """Found by the random schedules (seed 3108): with its peer hung, a restarted node
    that forgot its quorum base started a cluster of one while the peer still held
    a lease-backed claim on everything. The base survives restarts (state dir)."""
    cluster = start(3, seed=18)
    cluster.act("n2", lambda core, now: core.leave(now))
    cluster.run_until(cluster.now + FAST.leave_timeout)
    cluster.nodes["n2"].state = "left"
    settle(cluster)
    cluster.crash("n1")
    cluster.run_until(cluster.now + 3 * FAST.dead_after)
    assert len(owners_now(cluster)) == 256  # n0 alone: the smaller ID keeps quorum
    cluster.hang("n0")
    cluster.add_node("n1")
    cluster.run_until(cluster.now + FAST.startup_wait + 3 * FAST.dead_after)
    assert cluster.nodes["n1"].accepting(cluster.now) == frozenset()
    cluster.resume("n0")
    settle(cluster)
    assert set(owners_now(cluster).values()) == {"n0", "n1"}


def test_a_quiet_wake_up_lands_past_the_heartbeat_it_is_for() -> None:
    """Found by the random schedules (seeds 5489, fast, and 6176, default): a settled
    pacer's quiet deadline was its send time exactly. Woken a hair early (clock
    rounding), it sent nothing and asked for the same deadline again: forever on
    a virtual clock, a spin until the clock moved on in the daemon."""
    cluster = start(3, seed=22)
    settle(cluster)
    cluster.run_until(cluster.now + 2.5 * FAST.interval)
    pacer = cluster.nodes["n0"].core
    assert pacer is not None
    until = pacer.quiet_until()
    assert until is not None and until > pacer._next_heartbeat
    pacer.handle_timer(pacer._next_heartbeat - 1e-12)
    assert not any(isinstance(a, ev.Transmit) for a in pacer.actions())
    again = pacer.quiet_until()
    assert again is not None and again > pacer._last_step  # not due at once: no spin
    for seed, timers in ((5489, FAST_TIMERS), (6176, DEFAULT_TIMERS)):
        run_random_schedule(seed, timers)
