"""S4 in the simulator: one mistaken node serves nothing, and S1 holds through mistakes.

Each operator's mistake of README "Mistakes" is played against real cores on the
simulator's virtual clock and network: a node with another parameter, a node
with another key or cluster name, first starts under ``bootstrap_expect``, key
rotations (right and botched) and a cloned node ID. S1 is checked on every
kernel change, client by client wherever two nodes map clients to buckets
differently (lbd.testbed.clustersim). The random schedules (tests/simschedules.py)
then mix the mistakes with the ordinary faults
(``run_random_schedule(seed, timers, mistakes=True)`` replays a failing seed;
``LBD_SIM_MISTAKES`` sets how many run here).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial

import pytest
from simschedules import SHARED, run_random_schedule

from lbd.protocol import events as ev
from lbd.protocol.config import DEFAULT_TIMERS, FAST_TIMERS, CoreConfig, Timers
from lbd.protocol.wire import Keyring, key_fingerprint
from lbd.testbed import clustersim
from lbd.testbed.clustersim import (
    KEY,
    WRONG_KEY,
    Cluster,
    SimNode,
    Violation,
    kernel_mapping,
    settle,
)

FAST = FAST_TIMERS
BUCKETS = 128
CONFIG = CoreConfig(buckets=BUCKETS, shared=SHARED)
NEW_KEY = bytes(range(50, 82))
MISTAKE_SCHEDULES = int(os.environ.get("LBD_SIM_MISTAKES", "300"))


def start(n: int, seed: int, timers: Timers = FAST, config: CoreConfig = CONFIG) -> Cluster:
    return clustersim.start(n, seed, timers, config=config)


def unserved(cluster: Cluster) -> int:
    """Buckets (of the cluster's mapping) no node accepts now; S1 checks the rest."""
    return sum(1 for nodes in cluster.served().values() if not nodes)


def watch(
    cluster: Cluster,
    duration: float,
    *,
    steps_per_interval: int = 4,
    each: Callable[[], None] | None = None,
) -> None:
    """Run for ``duration`` virtual seconds, calling ``each`` a few times per interval."""
    end = cluster.now + duration
    step = cluster.timers.interval / steps_per_interval
    for _ in range(int(duration / step) + 2):
        if cluster.now >= end:
            return
        cluster.run_until(min(end, cluster.now + step))
        if each is not None:
            each()


class Gaps:
    """The longest time any bucket (of the cluster's mapping) went unserved, sampled."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.since: dict[int, float] = {}
        self.longest = 0.0

    def __call__(self) -> None:
        now = self.cluster.now
        for bucket, nodes in self.cluster.served().items():
            if not nodes:
                self.since.setdefault(bucket, now)
            elif bucket in self.since:
                self.longest = max(self.longest, now - self.since.pop(bucket))

    def worst(self) -> float:
        """The longest gap, counting the ones still open."""
        now = self.cluster.now
        return max([self.longest, *(now - t for t in self.since.values())])


def never_accepts(cluster: Cluster, name: str) -> list[float]:
    """Record every instant a kernel change leaves ``name`` accepting anything."""
    seen: list[float] = []
    previous = cluster.on_kernel_change

    def check(node: SimNode) -> None:
        if previous is not None:
            previous(node)
        watched = cluster.nodes.get(name)
        if watched is not None and watched.accepting(cluster.now):
            seen.append(cluster.now)

    cluster.on_kernel_change = check
    return seen


def events_of(node: SimNode, kind: type, since: float = 0.0) -> list[ev.Event]:
    return [e for t, e in node.events if t >= since and isinstance(e, kind)]


def local_now(cluster: Cluster, name: str) -> float:
    return cluster.nodes[name].local(cluster.now)


# ------------------------------------------------------------------ parameters


def wrong(config: CoreConfig, what: str) -> CoreConfig:
    if what == "buckets":
        return replace(config, buckets=256)
    if what == "seed":
        return replace(config, seed=config.seed ^ 0x5EED)
    if what == "timers":
        return config.with_timers(DEFAULT_TIMERS)
    if what == "vips":
        return replace(config, shared=(("vips", "192.0.2.101/32"),))
    assert what == "prefix4"
    return replace(config, shared=(*config.shared, ("prefix4", "24")))


@pytest.mark.parametrize("how", ["joins", "restarts"])
@pytest.mark.parametrize("what", ["buckets", "seed", "timers", "vips", "prefix4"])
def test_a_node_with_another_parameter_is_never_admitted_and_serves_nothing(
    what: str, how: str
) -> None:
    cluster = start(4, seed=31)
    bad = wrong(cluster.config, what)
    assert kernel_mapping(bad) != kernel_mapping(cluster.config) or what in ("timers", "vips")
    accepted = never_accepts(cluster, "n2" if how == "restarts" else "n9")
    began = cluster.now
    if how == "restarts":
        cluster.crash("n2")
        cluster.add_node("n2", config=bad)
        mistaken, good = "n2", ["n0", "n1", "n3"]
    else:
        cluster.add_node("n9", config=bad)
        mistaken, good = "n9", ["n0", "n1", "n2", "n3"]
    # A restarted member's slices move once its old incarnation is declared dead
    # (the L1 bound); a newcomer's mistake must not cost one slice at any instant.
    served_from = began + (FAST.dead_after + 2 * FAST.interval if how == "restarts" else 0.0)
    gaps: list[float] = []

    def sample() -> None:
        if cluster.now >= served_from and unserved(cluster):
            gaps.append(cluster.now)

    watch(cluster, 4 * DEFAULT_TIMERS.startup_wait, each=sample)
    assert not accepted, f"{mistaken} accepted clients at {accepted[:3]}"
    assert not gaps, f"unserved buckets at {gaps[:3]}"
    incarnation = cluster.nodes[mistaken].incarnation
    for name in good:
        core = cluster.nodes[name].core
        assert core is not None
        assert all(m.node_id != mistaken for m in core.view), (name, core.view)
        assert core.counters.mismatched > 0
        problems = core.problems(local_now(cluster, name))
        assert (
            f"node {mistaken} at {mistaken} disagrees on {what}: not admitted (every "
            "node must have the same value)" in problems
        ), problems
        if how == "joins":  # a restarted member: see the next test
            rows = {r.node_id: r for r in core.members(local_now(cluster, name))}
            assert rows[mistaken].state == "mismatch" and rows[mistaken].mismatch == (what,)
            assert rows[mistaken].incarnation == incarnation
    core = cluster.nodes[mistaken].core
    assert core is not None and not core.agreed and core.held == frozenset()
    problems = core.problems(local_now(cluster, mistaken))
    assert any(f"disagrees on {what}: not admitted" in line for line in problems), problems
    # Fixed and restarted, it joins and takes its share.
    cluster.crash(mistaken)
    cluster.add_node(mistaken, config=cluster.config)
    settle(cluster)
    assert cluster.nodes[mistaken].accepting(cluster.now)


def test_a_member_restarted_with_another_parameter_is_listed_as_mismatch() -> None:
    cluster = start(3, seed=30)
    cluster.crash("n2")
    cluster.add_node("n2", config=wrong(cluster.config, "buckets"))
    watch(cluster, FAST.startup_wait)
    core = cluster.nodes["n0"].core
    assert core is not None
    rows = {r.node_id: r for r in core.members(local_now(cluster, "n0"))}
    assert rows["n2"].state == "mismatch" and rows["n2"].mismatch == ("buckets",)


def test_two_first_starts_with_one_same_wrong_parameter_never_serve() -> None:
    cluster = start(4, seed=39, config=replace(CONFIG, bootstrap_expect=2))
    bad = wrong(cluster.config, "seed")
    cluster.add_node("m1", config=bad)
    cluster.add_node("m2", config=bad)
    watch(cluster, 3 * FAST.startup_wait)
    assert not cluster.nodes["m1"].accepting(cluster.now)
    assert not cluster.nodes["m2"].accepting(cluster.now)


def test_two_nodes_with_other_seeds_that_both_serve_violate_s1_per_client() -> None:
    """The per-client check is what catches a mismatch that slips through: two first
    starts that never hear each other (bootstrap_expect = 1) with other seeds."""
    cluster = Cluster(32, FAST, config=CoreConfig(buckets=BUCKETS, seed=1))
    cluster.blocked |= {("a", "b"), ("b", "a")}
    cluster.add_node("a")
    cluster.add_node("b", config=replace(cluster.config, seed=2))
    with pytest.raises(Violation, match=r"both accept \d+ of the 640 sampled clients"):
        cluster.run_until(3 * FAST.startup_wait)


@pytest.mark.parametrize("mistake", ["seed", "key"])
@pytest.mark.parametrize(("nodes", "restarted"), [(2, "n0"), (2, "n1"), (3, "n0")])
def test_a_mistaken_restart_never_serves_and_the_others_keep_what_they_can(
    mistake: str, nodes: int, restarted: str
) -> None:
    """A member crashes and comes back with one mistake. It never serves: not even the
    smallest ID of a 2-node base, which would otherwise win an exact half alone (its
    base was agreed under other parameters, or it hears its cluster but cannot read
    it). The correctly configured nodes serve everything when they hold a quorum
    without it: a majority, or the exact half with the smallest ID (n0 of two, which
    keeps its tie-break: its key and parameters are still the ones its base was
    agreed under). The larger ID of two cannot serve alone after its partner crashed
    (the majority rule), mistake or not."""
    cluster = start(nodes, seed=33)
    accepted = never_accepts(cluster, restarted)
    cluster.crash(restarted)
    if mistake == "key":
        cluster.add_node(restarted, keyring=Keyring(WRONG_KEY))
    else:
        cluster.add_node(restarted, config=wrong(cluster.config, mistake))
    watch(cluster, 3 * FAST.startup_wait)
    assert not accepted, f"mistaken {restarted} accepted clients from t={accepted[0]:.3f}"
    if (nodes, restarted) == (2, "n0"):
        assert unserved(cluster) == BUCKETS  # n1 alone is no quorum of {n0, n1}
    else:
        assert unserved(cluster) == 0


@pytest.mark.parametrize("mistake", ["parameter", "key", "clone"])
def test_each_mistake_is_logged_as_an_event(mistake: str) -> None:
    """S4: the node "says why, in one line, in its log ... and the journal": the
    daemon logs what ``events()`` hands it."""
    cluster = start(3, seed=38)
    began = cluster.now
    if mistake == "parameter":
        cluster.add_node("n7", config=wrong(cluster.config, "seed"))
        wanted: ev.Event = ev.ParameterMismatch("n7", "n7", ("seed",))
    elif mistake == "key":
        cluster.add_node("n7", keyring=Keyring(WRONG_KEY))
        wanted = ev.StrangerHeard("n7", "authentication: wrong key file or cluster name?")
    else:
        cluster.add_node("n7", node_id="n1")
    watch(cluster, FAST.startup_wait)
    if mistake == "clone":
        seen = events_of(cluster.nodes["n1"], ev.DuplicateNodeId, began)
        assert any(isinstance(e, ev.DuplicateNodeId) and e.address == "n7" for e in seen)
    else:
        assert wanted in events_of(cluster.nodes["n0"], type(wanted), began)


# ------------------------------------------------------------- keys and names


def test_first_starts_that_hear_only_forged_datagrams_never_claim() -> None:
    """Two fresh nodes with different keys, each allowed to bootstrap alone: each hears
    a cluster it cannot read, so neither forms one (the pre-S4 double answer)."""
    config = replace(CONFIG, bootstrap_expect=1)
    cluster = Cluster(34, FAST, config=config)
    cluster.add_node("a")
    cluster.add_node("b", keyring=Keyring(WRONG_KEY))
    claimed = (never_accepts(cluster, "a"), never_accepts(cluster, "b"))
    watch(cluster, 10 * FAST.startup_wait)
    assert claimed == ([], [])
    for name, other in (("a", "b"), ("b", "a")):
        core = cluster.nodes[name].core
        assert core is not None and core.held == frozenset() and not core.agreed
        assert core.counters.forged > 0 and core.counters.accepted == 0
        assert any(
            f"from {other} that fail authentication" in line
            for line in core.problems(local_now(cluster, name))
        )
    # The same key on both: they form the cluster.
    cluster.crash("b")
    cluster.add_node("b", keyring=Keyring(KEY))
    settle(cluster)


@pytest.mark.parametrize("mistake", ["key", "cluster name"])
def test_a_newcomer_with_a_wrong_key_or_cluster_name_never_claims_nor_disturbs(
    mistake: str,
) -> None:
    cluster = start(3, seed=35)
    changes = {name: len(events_of(node, ev.ViewChanged)) for name, node in cluster.nodes.items()}
    accepted = never_accepts(cluster, "n7")
    if mistake == "key":
        cluster.add_node("n7", keyring=Keyring(WRONG_KEY))
    else:
        cluster.add_node("n7", config=replace(cluster.config, cluster="lbd-typo"))
    gaps: list[float] = []
    watch(
        cluster,
        6 * FAST.startup_wait,
        each=lambda: gaps.append(cluster.now) if unserved(cluster) else None,
    )
    assert not accepted and not gaps
    assert {
        name: len(events_of(cluster.nodes[name], ev.ViewChanged)) for name in changes
    } == changes
    for name in ("n0", "n1", "n2"):  # the good nodes say the same about it
        core = cluster.nodes[name].core
        assert core is not None and core.counters.forged > 0
        assert any(
            "from n7 that fail authentication" in line
            for line in core.problems(local_now(cluster, name))
        )
    core = cluster.nodes["n7"].core
    assert core is not None and core.counters.forged > 0 and core.counters.accepted == 0
    # Fixed, it joins.
    cluster.crash("n7")
    cluster.add_node("n7", config=cluster.config, keyring=Keyring(KEY))
    settle(cluster)


# ------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("timers", [FAST_TIMERS, DEFAULT_TIMERS], ids=["fast", "default"])
def test_bootstrap_expect_three_waits_for_the_third_node(timers: Timers) -> None:
    config = replace(CONFIG, bootstrap_expect=3)
    cluster = Cluster(36, timers, config=config)
    cluster.add_node("n0")
    cluster.run_until(0.37 * timers.startup_wait)
    cluster.add_node("n1")
    claimed = (never_accepts(cluster, "n0"), never_accepts(cluster, "n1"))
    watch(cluster, 5 * timers.startup_wait)
    assert claimed == ([], [])
    for name in ("n0", "n1"):
        core = cluster.nodes[name].core
        assert core is not None and len(core.view) == 2 and not core.agreed
        assert any(
            "waiting for bootstrap_expect = 3 members" in line
            for line in core.problems(local_now(cluster, name))
        )
        assert cluster.nodes[name].persisted_base[0] == ()
    cluster.add_node("n2")
    settle(cluster, limit=timers.startup_wait + 20 * timers.interval)
    assert unserved(cluster) == 0
    assert all(node.persisted_base[0] == ("n0", "n1", "n2") for node in cluster.nodes.values())


@pytest.mark.parametrize("seed", range(6))
def test_a_bootstrap_race_under_partition_forms_one_cluster(seed: int) -> None:
    """bootstrap_expect = N, staggered first starts, a random partition until after
    the last start: nobody serves before all N meet, then all of them do."""
    rng = random.Random(seed)
    n = rng.choice((3, 4, 5))
    cluster = Cluster(seed, FAST, config=replace(CONFIG, bootstrap_expect=n))
    names = [f"n{i}" for i in range(n)]
    side = set(rng.sample(names, rng.randint(1, n - 1)))
    cluster.blocked |= {(a, b) for a in names for b in names if (a in side) != (b in side)}
    for name in names:
        cluster.at(rng.uniform(0, 2 * FAST.startup_wait), partial(cluster.add_node, name))
    claimed: list[float] = []
    cluster.on_kernel_change = lambda node: (
        claimed.append(cluster.now) if node.accepting(cluster.now) else None
    )
    cluster.run_until(4 * FAST.startup_wait)
    assert not claimed
    cluster.blocked.clear()
    settle(cluster)
    assert unserved(cluster) == 0


def test_bootstrap_expect_below_a_majority_can_split_at_first_start() -> None:
    """The documented trade (README "Bootstrap": set it to the initial cluster size):
    with bootstrap_expect = 2, four first starts split 2/2 form two clusters."""
    cluster = Cluster(37, FAST, config=replace(CONFIG, bootstrap_expect=2))
    names = ["n0", "n1", "n2", "n3"]
    cluster.blocked |= {
        (a, b) for a in names for b in names if (a in ("n0", "n1")) != (b in ("n0", "n1"))
    }
    for name in names:
        cluster.add_node(name)
    with pytest.raises(Violation, match="S1 violated"):
        cluster.run_until(3 * FAST.startup_wait)


# ----------------------------------------------------------------- key rotation


def rotate(
    cluster: Cluster,
    rng: random.Random,
    rings: list[Keyring],
    check: Callable[[], None] | None = None,
) -> None:
    """Each step copied to every node one by one (random order, random delays), the
    next step only once all have it."""
    interval = cluster.timers.interval
    for ring in rings:
        order = list(cluster.nodes)
        rng.shuffle(order)
        for name in order:
            watch(cluster, rng.uniform(0, 6) * interval, each=check)
            cluster.rekey(name, ring)
        watch(cluster, rng.uniform(1, 6) * interval, each=check)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("timers", [FAST_TIMERS, DEFAULT_TIMERS], ids=["fast", "default"])
def test_a_three_step_key_rotation_loses_nobody(timers: Timers, seed: int) -> None:
    cluster = start(4, seed=40 + seed, timers=timers)
    began = cluster.now
    gaps: list[float] = []

    def check() -> None:
        if unserved(cluster):
            gaps.append(cluster.now)

    rng = random.Random(seed)
    rotate(cluster, rng, [Keyring(KEY, NEW_KEY), Keyring(NEW_KEY, KEY)], check)
    new = key_fingerprint(NEW_KEY).hex()
    for name in cluster.nodes:
        core = cluster.nodes[name].core
        assert core is not None
        assert {r.key for r in core.members(local_now(cluster, name))} == {new}, name
    rotate(cluster, rng, [Keyring(NEW_KEY)], check)
    watch(cluster, 10 * timers.interval, each=check)
    assert not gaps
    for node in cluster.nodes.values():
        assert not events_of(node, ev.MemberDead, began), node.name
        assert not events_of(node, ev.ViewChanged, began), node.name
        assert node.core is not None and node.core.counters.forged == 0
    # The old key is gone for good: a node still holding only it is a stranger.
    cluster.crash("n1")
    cluster.add_node("n1", keyring=Keyring(KEY))
    watch(cluster, 3 * timers.startup_wait)
    assert not cluster.nodes["n1"].accepting(cluster.now)
    assert unserved(cluster) == 0


@pytest.mark.parametrize("skipped", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_a_rotation_that_skips_a_step_may_lose_members_but_never_s1(
    seed: int, skipped: int
) -> None:
    """Skipping step 1 (seal with a key peers do not accept yet) or step 2 (drop the
    old key while peers still seal with it) makes nodes deaf to each other for a
    while: views change, S1 (checked on every kernel change) holds, the strangers are
    reported, and once the last step is everywhere the cluster is whole again."""
    cluster = start(4, seed=50 + seed)
    rings = [Keyring(KEY, NEW_KEY), Keyring(NEW_KEY, KEY), Keyring(NEW_KEY)]
    del rings[skipped - 1]
    rotate(cluster, random.Random(seed), rings)
    assert any(
        node.core is not None and node.core.counters.forged > 0 for node in cluster.nodes.values()
    )
    settle(cluster)
    assert unserved(cluster) == 0


# ------------------------------------------------------------------ cloned IDs


@pytest.mark.parametrize("copy_state", [False, True], ids=["fresh", "copied-state"])
@pytest.mark.parametrize(("n", "cloned"), [(4, "n2"), (4, "n0"), (3, "n0"), (2, "n0"), (2, "n1")])
def test_a_cloned_node_id_serves_nothing_while_both_speak(
    n: int, cloned: str, copy_state: bool
) -> None:
    """The clone (the newer process) hears the live original: it stops speaking and
    stays out until restarted, so one ID never has two votes. The original drains
    while it hears the clone, then takes an incarnation above the clone's and its
    slices back (a hold-down and a barrier), unless it is the smaller of two: then
    the other node had no quorum without it meanwhile, as on its death."""
    cluster = start(n, seed=60 + n)
    original = cluster.nodes[cloned]
    twin = f"{cloned}~clone"
    cluster.add_node(
        twin, node_id=cloned, base=original.persisted_base if copy_state else ((), 0, None)
    )
    held: list[tuple[float, str]] = []

    def check() -> None:
        if cluster.nodes[twin].accepting(cluster.now):
            held.append((cluster.now, twin))

    watch(cluster, 3 * FAST.startup_wait, each=check)
    assert not held, held[:3]
    clone = cluster.nodes[twin].core
    assert clone is not None and clone.advertised_draining
    assert any(
        r.is_self and r.state == "duplicate-id" for r in clone.members(local_now(cluster, twin))
    )
    assert any(
        f"node ID {cloned} is also used by the process at" in line and "until restarted" in line
        for line in clone.problems(local_now(cluster, twin))
    )
    core = original.core
    assert core is not None and core.incarnation > clone.incarnation  # it took a new one
    if (n, cloned) != (2, "n0"):
        assert original.accepting(cluster.now) and core.agreed  # back while the clone runs
    cluster.remove(twin)
    settle(cluster)
    assert original.accepting(cluster.now)


@pytest.mark.parametrize("how", ["deaf", "stopped"])
def test_a_clone_beside_an_original_that_cannot_hear_never_overlaps_it(how: str) -> None:
    """A clone starts while the original cannot hear anyone (a one-way partition into
    it) or is stopped (SIGSTOP): the original learns of the clone too late to drain,
    so the ID's slices may move only once its kernel lease has surely run out."""
    cluster = start(3, seed=0, timers=DEFAULT_TIMERS, config=CoreConfig(buckets=BUCKETS))
    cluster.run_until(cluster.now + DEFAULT_TIMERS.interval / 2)
    if how == "deaf":
        cluster.blocked |= {("n0", "n1"), ("n2", "n1"), ("n1~c", "n1")}
    else:
        cluster.hang("n1")
    cluster.add_node("n1~c", node_id="n1")
    watch(cluster, 2 * DEFAULT_TIMERS.startup_wait)


# -------------------------------------------------------------- random mixes


ONCE_FAILING: list[tuple[int, str]] = [
    (46, "fast"),
    (50, "fast"),
    (115, "fast"),
    (160, "fast"),
    (246, "fast"),
    (272, "fast"),
    (415, "fast"),
    (493, "fast"),
    (620, "fast"),
    (630, "fast"),
    (754, "fast"),
    (759, "fast"),
    (833, "fast"),
    (1093, "fast"),
    (1119, "fast"),
    (1160, "fast"),
    (1316, "fast"),
    (25, "default"),
    (46, "default"),
    (50, "default"),
    (107, "default"),
    (160, "default"),
    (246, "default"),
    (272, "default"),
    (300, "default"),
    (325, "default"),
    (389, "default"),
    (415, "default"),
    (493, "default"),
    (506, "default"),
]
"""Seeds that broke S1 through a clone before the core refused a second process
with a member's ID (a newer incarnation from another address while the known one
still speaks) and took exact-half quorums away from a base agreed under other
parameters: each must hold now."""


def _run_batch(seeds: list[tuple[int, str]]) -> list[str]:
    failures = []
    for seed, profile in seeds:
        timers = FAST_TIMERS if profile == "fast" else DEFAULT_TIMERS
        try:
            run_random_schedule(seed, timers, mistakes=True)
        except Violation as violation:
            failures.append(f"[{profile}] {violation}")
    return failures


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_random_schedules_with_mistakes() -> None:
    """Mistakes mixed with faults over seeds 0..LBD_SIM_MISTAKES (fast timers) and a
    quarter as many with the default ones; S1 on every kernel change, then healing
    (mistakes undone, faults over) must converge and serve as computed."""
    seeds = [(s, "fast") for s in range(MISTAKE_SCHEDULES)]
    seeds += [(s, "default") for s in range(MISTAKE_SCHEDULES // 4)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        batches = pool.map(_run_batch, [seeds[0::2], seeds[1::2]])
        failures = [f for batch in batches for f in batch]
    assert not failures, "\n".join(failures[:10])


@pytest.mark.parametrize(("seed", "profile"), ONCE_FAILING)
def test_once_failing_seeds_now_hold(seed: int, profile: str) -> None:
    run_random_schedule(seed, FAST_TIMERS if profile == "fast" else DEFAULT_TIMERS, mistakes=True)
