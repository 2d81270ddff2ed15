"""Random fault schedules for the cluster simulator (``clustersim.py``).

``run_random_schedule(seed, timers)`` starts a cluster of a seeded random size,
schedules a few random faults (``FAULTS``: crash, hang, restart, partitions, loss,
join, leave, drain, weight) at random moments, then heals everything and checks
that the cluster converges within a bound derived from the timers and serves
every bucket from its computed owner (L1/L2); S1 is checked by the simulator at
every kernel change throughout. With ``mistakes=True`` operators' mistakes
(``MISTAKES``: a mismatched parameter, a wrong key or cluster name, key
rotations, clones) join the faults and a third of the schedules start as a
bootstrap race. A seed always runs the same schedule: a failure names its seed,
and ``run_random_schedule`` with it replays it.
"""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass, replace

from lbd.protocol.config import DEFAULT_TIMERS, FAST_TIMERS, CoreConfig, Timers
from lbd.protocol.wire import Keyring
from lbd.testbed.clustersim import WRONG_KEY, Cluster, Violation

FAULTS = (
    "crash",
    "hang",
    "restart",
    "partition",
    "oneway",
    "loss",
    "join",
    "leave",
    "drain",
    "weight",
)
MISTAKES = ("mismatch", "wrong-key", "rotation", "botched-rotation", "clone")
"""Operators' mistakes (``mistakes=True``): a node (re)started with a parameter the
others do not share, or with a wrong key or cluster name, and later restarted with
the right one; a key rotation node by node in random order (three steps, or a
botched one that skips a step); a clone of a live node's ID, later removed."""
SHARED = (("vips", "192.0.2.100/32"),)
"""The daemon-level agreed values of the mistake schedules' clusters."""


@dataclass
class ScheduleResult:
    seed: int
    nodes: int
    faults: list[str]
    kernel_changes: int
    settle_time: float


def run_random_schedule(
    seed: int,
    timers: Timers,
    nodes: int | None = None,
    faults: int | None = None,
    buckets: int = 128,
    *,
    mistakes: bool = False,
    persist_delay: tuple[float, float] = (0.0, 0.0),
    table_delay: tuple[float, float] = (0.0, 0.0),
) -> ScheduleResult:
    """One seeded random fault schedule; raises Violation on any S1/L1/L2 failure.

    ``mistakes``: operators' mistakes join the faults (``MISTAKES``) and a third of
    the schedules start as a bootstrap race (see ``_start_race``); without it a
    seed runs exactly the schedule it always did. ``persist_delay``: a slow disk;
    ``table_delay``: ownership tables built away from the step (see ``Cluster``)."""
    rng = random.Random(seed)
    n = nodes or rng.choice((2, 3, 3, 3, 4, 5, 7))
    if mistakes:
        cluster, t, applied = _mistaken_schedule(
            seed,
            timers,
            n,
            faults,
            buckets=buckets,
            rng=rng,
            persist_delay=persist_delay,
            table_delay=table_delay,
        )
    else:
        cluster = Cluster(
            seed, timers, buckets=buckets, persist_delay=persist_delay, table_delay=table_delay
        )
        interval = timers.interval
        names = [f"n{i:02d}" for i in range(n)]
        for name in names:
            cluster.at(rng.uniform(0, 3 * interval), functools.partial(cluster.add_node, name))
        t = timers.startup_wait + 10 * interval
        cluster.run_until(t)
        extra = itertools.count(n)
        applied = []
        for _ in range(faults if faults is not None else rng.randint(1, 4)):
            t += rng.uniform(0.5, 12) * interval
            kind = rng.choice(FAULTS)
            applied.append(kind)
            _schedule_fault(cluster, rng, kind, t, extra)
        t += 30 * interval
    return _heal_and_converge(cluster, rng, n, applied, t, mistakes=mistakes)


def _heal_and_converge(
    cluster: Cluster, rng: random.Random, n: int, applied: list[str], t: float, *, mistakes: bool
) -> ScheduleResult:
    seed, timers = cluster.seed, cluster.timers
    interval = timers.interval
    cluster.run_until(t)
    if mistakes:
        _heal_mistakes(cluster)
    _heal(cluster, rng, keep_one_down=not mistakes or _formed(cluster))
    start = cluster.now
    bound = timers.startup_wait + 4 * timers.dead_after + 20 * interval
    step = interval
    while cluster.now < start + bound:
        cluster.run_until(cluster.now + step)
        if cluster.converged():
            break
    else:
        live = [n for n in cluster.live() if n.core is not None and not n.core.has_left]
        if live and all(n.core is not None and not n.core.quorum_ok for n in live):
            # Too many nodes gone (crashed for good, or left while a peer was hung and
            # missed the agreement): the survivors cannot know they may serve. That
            # is unavailability by design (README, "Quorum"), never a safety issue.
            return ScheduleResult(seed, n, applied, cluster.kernel_changes, -1.0)
        if (
            live
            and len(live) < cluster.config.bootstrap_expect
            and not any(n.persisted_base[0] for n in cluster.nodes.values())
        ):
            # A node left before the first view formed: fewer remain than the first
            # start waits for (bootstrap_expect), by design.
            return ScheduleResult(seed, n, applied, cluster.kernel_changes, -1.0)
        states = {
            n.name: (n.state, n.core.agreed if n.core else None, len(n.core.view) if n.core else 0)
            for n in cluster.nodes.values()
        }
        raise Violation(
            f"seed {seed}: no convergence within {bound:.2f}s after healing "
            f"(faults {applied}): {states}"
        )
    # Converged views claim at once; give the last barrier its round trip (each
    # of its three legs may wait for a base write).
    slowest = cluster.persist_delay[1] + cluster.table_delay[1]
    cluster.run_until(cluster.now + 3 * (interval + slowest))
    cluster.check_served_as_expected()
    return ScheduleResult(seed, n, applied, cluster.kernel_changes, cluster.now - start)


def _pick(cluster: Cluster, rng: random.Random) -> str | None:
    up = [n.name for n in cluster.nodes.values() if n.state == "up"]
    return rng.choice(up) if up else None


def _schedule_fault(
    cluster: Cluster, rng: random.Random, kind: str, t: float, extra: itertools.count[int]
) -> None:
    interval = cluster.timers.interval
    later = t + rng.uniform(1, 15) * interval

    def fault() -> None:
        name = _pick(cluster, rng)
        if name is None:
            return
        if kind == "crash":
            cluster.crash(name)
        elif kind == "hang":
            cluster.hang(name)
            cluster.at(later, lambda: cluster.resume(name))
        elif kind == "restart":
            cluster.crash(name)
            cluster.at(later, lambda: _restart(cluster, name))
        elif kind in ("partition", "oneway"):
            names = list(cluster.nodes)
            side = set(rng.sample(names, rng.randint(1, max(1, len(names) - 1))))
            pairs = {(a, b) for a in names for b in names if a != b and (a in side) != (b in side)}
            if kind == "oneway":
                pairs = {(a, b) for a, b in pairs if a in side}
            cluster.blocked |= pairs
            cluster.log.append((cluster.now, f"net: {kind} {sorted(side)} until {later:.4f}"))
            cluster.at(later, lambda: cluster.blocked.difference_update(pairs))
        elif kind == "loss":
            cluster.loss = rng.uniform(0.0, 0.3)
            cluster.at(later, lambda: setattr(cluster, "loss", 0.0))
        elif kind == "join":
            cluster.add_node(f"n{next(extra):02d}")
        elif kind == "leave":
            cluster.act(name, lambda core, now: core.leave(now))
            cluster.at(later + cluster.timers.leave_timeout, lambda: _mark_left(cluster, name))
        elif kind == "drain":
            cluster.act(name, lambda core, now: core.set_draining(True, now))
            cluster.at(
                later, lambda: cluster.act(name, lambda core, now: core.set_draining(False, now))
            )
        elif kind == "weight":
            weight = rng.choice((50, 100, 200))
            cluster.act(name, lambda core, now: core.set_weight(weight, now))

    cluster.at(t, fault)


def _restart(cluster: Cluster, name: str) -> None:
    if cluster.nodes[name].state != "removed":  # a removed clone stays off
        cluster.add_node(name)


def _mark_left(cluster: Cluster, name: str) -> None:
    node = cluster.nodes[name]
    if node.core is not None and node.core.has_left and node.state == "up":
        node.state = "left"


def _heal(cluster: Cluster, rng: random.Random, *, keep_one_down: bool = True) -> None:
    """End of faults: network healed, hung nodes resumed, crashed nodes restarted
    (one of them may stay down when ``keep_one_down``)."""
    cluster.blocked.clear()
    cluster.loss = 0.0
    for node in list(cluster.nodes.values()):
        if node.state == "hung":
            cluster.resume(node.name)
        elif node.core is not None and node.core.has_left:
            node.state = "left"
    crashed = [n.name for n in cluster.nodes.values() if n.state == "crashed"]
    keep_down = (
        crashed[0]
        if keep_one_down and len(crashed) == 1 and len(cluster.nodes) >= 3 and rng.random() < 0.5
        else None
    )
    for name in crashed:
        if name != keep_down:
            cluster.add_node(name)
    for node in cluster.nodes.values():
        if (
            node.state == "up"
            and node.core is not None
            and node.core.draining
            and not node.core.has_left
            and rng.random() < 0.5
        ):
            cluster.act(node.name, lambda core, now: core.set_draining(False, now))


# ---------------------------------------------------------- mistake schedules


@dataclass
class _Plan:
    extra: itertools.count[int]
    rotation_end: float = 0.0


def _mistaken_schedule(
    seed: int,
    timers: Timers,
    n: int,
    faults: int | None,
    *,
    buckets: int,
    rng: random.Random,
    persist_delay: tuple[float, float],
    table_delay: tuple[float, float],
) -> tuple[Cluster, float, list[str]]:
    """Start (a third of the time as a bootstrap race), then faults and mistakes mixed;
    returns the cluster, when to heal, and what was applied."""
    interval = timers.interval
    race = rng.random() < 1 / 3
    expect = rng.choice((2, n)) if race else 1
    config = CoreConfig(buckets=buckets, shared=SHARED, bootstrap_expect=expect)
    cluster = Cluster(
        seed, timers, config=config, persist_delay=persist_delay, table_delay=table_delay
    )
    names = [f"n{i:02d}" for i in range(n)]
    applied: list[str] = []
    if race:
        applied.append(f"race(expect={expect})")
        t = _start_race(cluster, rng, names, expect, applied)
    else:
        for name in names:
            cluster.at(rng.uniform(0, 3 * interval), functools.partial(cluster.add_node, name))
        t = timers.startup_wait + 10 * interval
    plan = _Plan(itertools.count(n))
    end = t
    for _ in range(faults if faults is not None else rng.randint(1, 4)):
        t += rng.uniform(0.5, 12) * interval
        if rng.random() < 0.6:
            kind = rng.choice(MISTAKES)
            end = max(end, _schedule_mistake(cluster, rng, kind, t, plan))
        else:
            kind = rng.choice(FAULTS)
            _schedule_fault(cluster, rng, kind, t, plan.extra)
            end = max(
                end, t + 16 * interval + (cluster.timers.leave_timeout if kind == "leave" else 0.0)
            )
        applied.append(kind)
    return cluster, max(t, end) + 30 * interval, applied


def _start_race(
    cluster: Cluster, rng: random.Random, names: list[str], expect: int, applied: list[str]
) -> float:
    """A fresh cluster (no persisted bases) started over three start-up waits, maybe
    with a partition among the first starters; returns when faults may begin.

    With ``bootstrap_expect`` at most half the nodes, two sides of a partition could
    each reach it and each form a first view: no first start can tell (the README
    asks for the initial cluster size; test_sim_mistakes shows the split). Such
    races are partitioned only so that one side can reach it, and their faults wait
    until the cluster has formed; the others' faults hit the race itself."""
    timers = cluster.timers
    n = len(names)
    starts = [rng.uniform(0, 3 * timers.startup_wait) for _ in names]
    for name, at in zip(names, starts, strict=True):
        cluster.at(at, functools.partial(cluster.add_node, name))
    ready = max(starts)
    safe = 2 * expect > n
    if rng.random() < 0.5:
        sizes = [k for k in range(1, n) if safe or min(k, n - k) < expect]
        side = set(rng.sample(names, rng.choice(sizes)))
        pairs = {(a, b) for a in names for b in names if a != b and (a in side) != (b in side)}
        if rng.random() < 0.3:
            pairs = {(a, b) for a, b in pairs if a in side}
        cluster.blocked |= pairs
        healed = rng.uniform(0.5, 4) * timers.startup_wait
        cluster.at(healed, lambda: cluster.blocked.difference_update(pairs))
        cluster.log.append((0.0, f"net: partition {sorted(side)} until {healed:.3f}"))
        applied.append(f"split{len(side)}/{n}")
        ready = max(ready, healed)
    if safe:
        return rng.uniform(0.2, 1.0) * ready + 5 * timers.interval
    return ready + timers.startup_wait + 10 * timers.interval


def _wrong_config(config: CoreConfig, rng: random.Random) -> tuple[CoreConfig, str]:
    """``config`` with one agreed parameter changed, and which."""
    what = rng.choice(("buckets", "seed", "timers", "vips", "prefix4"))
    if what == "buckets":
        wrong = replace(
            config, buckets=rng.choice([b for b in (64, 100, 256) if b != config.buckets])
        )
    elif what == "seed":
        wrong = replace(config, seed=config.seed ^ rng.randrange(1, 2**32))
    elif what == "timers":
        wrong = config.with_timers(DEFAULT_TIMERS if config.timers == FAST_TIMERS else FAST_TIMERS)
    elif what == "vips":
        wrong = replace(config, shared=(("vips", "192.0.2.101/32"),))
    else:
        wrong = replace(config, shared=(*config.shared, ("prefix4", "24")))
    return wrong, what


def _schedule_mistake(
    cluster: Cluster, rng: random.Random, kind: str, t: float, plan: _Plan
) -> float:
    """Schedule one mistake at ``t``; returns when its last step is done."""
    interval = cluster.timers.interval
    undo_at = t + rng.uniform(5, 40) * interval
    if kind == "mismatch":
        config, what = _wrong_config(cluster.config, rng)
        return _mistaken_restart(
            cluster, rng, t, undo_at=undo_at, plan=plan, what=what, config=config
        )
    if kind == "wrong-key":
        if rng.random() < 0.75:
            return _mistaken_restart(
                cluster, rng, t, undo_at=undo_at, plan=plan, what="key", keyring=Keyring(WRONG_KEY)
            )
        typo = replace(cluster.config, cluster=cluster.config.cluster + "-typo")
        return _mistaken_restart(
            cluster, rng, t, undo_at=undo_at, plan=plan, what="cluster", config=typo
        )
    if kind in ("rotation", "botched-rotation"):
        return _schedule_rotation(cluster, rng, t, plan, botched=kind == "botched-rotation")
    assert kind == "clone"
    copy_state = rng.random() < 0.5
    # A quarter of the clones start while the original cannot hear them: stopped
    # (SIGSTOP) or deaf (a one-way partition into it), for a while.
    blind = rng.choice(("stopped", "deaf", "", "", "", "", "", ""))
    blind_until = t + rng.uniform(0.5, 10) * interval

    def clone() -> None:
        name = _pick(cluster, rng)
        if name is None:
            return
        original = cluster.nodes[name]
        twin = f"{original.node_id}~{next(plan.extra)}"
        if blind == "stopped":
            cluster.hang(name)
            cluster.at(blind_until, lambda: cluster.resume(name))
        elif blind == "deaf":
            pairs = {(other, name) for other in [*cluster.nodes, twin] if other != name}
            cluster.blocked |= pairs
            cluster.log.append((cluster.now, f"net: {name} deaf until {blind_until:.4f}"))
            cluster.at(blind_until, lambda: cluster.blocked.difference_update(pairs))
        cluster.add_node(
            twin,
            node_id=original.node_id,
            config=original.config,
            keyring=original.keyring,
            base=original.persisted_base if copy_state else ((), 0, None),
        )
        cluster.at(undo_at, lambda: cluster.remove(twin))

    cluster.at(t, clone)
    return max(undo_at, blind_until)


def _mistaken_restart(
    cluster: Cluster,
    rng: random.Random,
    t: float,
    *,
    undo_at: float,
    plan: _Plan,
    what: str,
    config: CoreConfig | None = None,
    keyring: Keyring | None = None,
) -> float:
    """A live node restarted (or, a third of the time, a new node started) with a
    wrong config or key file; at ``undo_at`` restarted with the right ones."""
    fresh = rng.random() < 1 / 3
    gap = rng.uniform(0, 3) * cluster.timers.interval

    def start_mistaken(name: str) -> None:
        node = cluster.nodes.get(name)
        if node is not None and node.state == "removed":
            return
        if _twin_mistake(cluster, name, config, keyring):
            # Two first starts with one same mistake admit each other and form a
            # cluster of their own (bootstrap_expect = 2): two mistakes, past S4's
            # "one mistaken node" (test_sim_mistakes shows it). One at a time here.
            cluster.log.append((cluster.now, f"{name}: {what} mistake skipped (a twin)"))
            return
        if node is not None:
            cluster.crash(name)
        node = cluster.add_node(name, config=config, keyring=keyring)
        node.mistaken = what
        cluster.at(undo_at, lambda: _undo_mistake(cluster, name))

    def mistake() -> None:
        if fresh:
            start_mistaken(f"n{next(plan.extra):02d}")
            return
        name = _pick(cluster, rng)
        if name is not None:
            cluster.crash(name)
            cluster.at(cluster.now + gap, lambda: start_mistaken(name))

    cluster.at(t, mistake)
    return undo_at + gap


def _twin_mistake(
    cluster: Cluster, name: str, config: CoreConfig | None, keyring: Keyring | None
) -> bool:
    """Whether starting ``name`` with these files would make it a second first start
    (no quorum base) sharing one mistake with a running first start."""
    node = cluster.nodes.get(name)
    if node is not None and node.persisted_base[0]:
        return False
    config = config or (node.config if node is not None else None) or cluster.config
    keyring = keyring or (node.keyring if node is not None else None) or cluster.keyring
    return any(
        other.name != name
        and other.mistaken
        and other.state in ("up", "hung")
        and not other.persisted_base[0]
        and other.config == config
        and other.keyring is not None
        and other.keyring.current == keyring.current
        for other in cluster.nodes.values()
    )


def _undo_mistake(cluster: Cluster, name: str) -> None:
    """The operator fixes the node's files (all its mistakes: they may have piled up)
    and restarts it if it runs."""
    node = cluster.nodes[name]
    if not node.mistaken or node.state == "removed":
        return
    assert node.keyring is not None
    if WRONG_KEY in (node.keyring.current, node.keyring.previous):
        node.keyring = cluster.keyring
    node.mistaken = ""
    node.config = cluster.config
    cluster.log.append((cluster.now, f"{name}: files fixed"))
    if node.state in ("up", "hung"):
        cluster.crash(name)
        cluster.add_node(name)


def _schedule_rotation(
    cluster: Cluster, rng: random.Random, t: float, plan: _Plan, *, botched: bool
) -> float:
    """A key rotation: each step copied to the nodes one by one, in random order and
    at random moments within the step's window, the next step only once every node
    has the previous one. ``botched``: one step skipped (mostly the first: sealing
    with a key the peers do not accept yet). Never two rotations at once."""
    interval = cluster.timers.interval
    skip = (0 if rng.random() < 0.7 else 1) if botched else None
    steps = 2 if botched else 3
    windows = [rng.uniform(1, 12) * interval for _ in range(steps)]
    gaps = [rng.uniform(0, 5) * interval for _ in range(steps)]
    new = rng.randbytes(32)
    at = max(t, plan.rotation_end + interval)
    starts = []
    for window, gap in zip(windows, gaps, strict=True):
        starts.append(at)
        at += window + gap
    plan.rotation_end = at

    def begin() -> None:
        old = cluster.keyring.current
        rings = [Keyring(old, new), Keyring(new, old), Keyring(new)]
        if skip is not None:
            del rings[skip]
        for start, window, ring in zip(starts, windows, rings, strict=True):
            cluster.at(start, functools.partial(step, ring, window))

    def step(ring: Keyring, window: float) -> None:
        cluster.keyring = ring  # what a node installed from now on gets
        names = [n.name for n in cluster.nodes.values() if n.state != "removed"]
        rng.shuffle(names)
        for name in names:
            cluster.at(
                cluster.now + rng.uniform(0, window),
                functools.partial(_rekey_file, cluster, name, ring),
            )

    cluster.at(starts[0], begin)
    return at


def _rekey_file(cluster: Cluster, name: str, ring: Keyring) -> None:
    node = cluster.nodes[name]
    if node.state == "removed":
        return
    cluster.rekey(name, ring)  # a wrong key file is replaced too; a wrong config stays


def _formed(cluster: Cluster) -> bool:
    """Whether every node has a quorum base (the first view was agreed)."""
    return all(n.persisted_base[0] for n in cluster.nodes.values() if n.state != "removed")


def _heal_mistakes(cluster: Cluster) -> None:
    """End of mistakes: every node's files fixed, mistaken nodes restarted. (The
    original of a removed clone is left alone: it must come back by itself.)"""
    for node in list(cluster.nodes.values()):
        if node.mistaken:
            _undo_mistake(cluster, node.name)
