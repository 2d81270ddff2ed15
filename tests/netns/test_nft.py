"""NftDataplane in real namespaces: rules, idempotency, exactly one owner, atomic moves.

One 3-node bed for the module (building it is the slow part); each test starts its
own agents (lbd.testbed.nft_agent, one per node namespace, each owning that
node's tables) and stops them at the end. Lease and crash tests: test_nft_lease.py.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lbd.protocol.jhash import bucket_of
from lbd.testbed.bed import Bed, sources4, sources6
from lbd.testbed.nft_agent import AgentClient, AgentError

from .conftest import bed_prefix
from .nft_helpers import (
    client_counters,
    install_client_counters,
    owner_of,
    split,
    start_streams,
    stop_streams,
)

BUCKETS = 4096
SEED = 0x1BD
SRC4 = sources4(254)
SRC6 = sources6(300)


@pytest.fixture(scope="module")
def nbed() -> Iterator[Bed]:
    with Bed(bed_prefix("nft"), nodes=3) as bed:
        bed.start_echo()
        install_client_counters(bed)
        yield bed


@pytest.fixture
def agents(nbed: Bed) -> Iterator[dict[str, AgentClient]]:
    started: dict[str, AgentClient] = {}
    try:
        for node in nbed.nodes:
            started[node.name] = AgentClient(
                nbed, node.name, [nbed.vip4, nbed.vip6], buckets=BUCKETS, seed=SEED
            )
        yield started
    finally:
        for agent in started.values():
            agent.stop()


def _normalise(ruleset: dict[str, list[dict[str, Any]]]) -> str:
    """Listing without rule handles (the guard is re-asserted every apply) and
    without the lease's remaining time or absolute deadline."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict) and obj.get("left") == {"meta": {"key": "time"}}:
            return {**obj, "right": "deadline"}
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in ("handle", "expires")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return json.dumps(strip(ruleset), sort_keys=True)


def _rules(listing: list[dict[str, Any]], chain: str) -> list[dict[str, Any]]:
    return [o["rule"] for o in listing if "rule" in o and o["rule"]["chain"] == chain]


def test_rules_load_list_idempotent_incremental(nbed: Bed, agents: dict[str, AgentClient]) -> None:
    agent = agents[nbed.nodes[0].name]
    rs = agent.ruleset()
    names = {(k, o[k]["name"]) for o in rs["owner"] for k in ("set", "chain") if k in o}
    assert names == {
        ("set", "owned"), ("set", "lease"), ("chain", "pre"), ("chain", "vip"),
        ("chain", "claim"), ("chain", "live"),
    }  # fmt: skip
    assert _rules(rs["owner"], "live") == []  # no lease: nothing is live
    assert {o["chain"]["name"] for o in rs["guard"] if "chain" in o} == {"pre", "vip"}
    text = agent.call("text")["text"]
    assert "flags owner" in text
    assert f"jhash ip saddr mod {BUCKETS} seed {SEED:#x} @owned" in text
    assert "tcp flags syn / fin,syn,rst,ack drop" in text  # the guard's SYN-only rule

    first = set(range(0, BUCKETS, 2))
    stats = agent.apply(first, 5000)
    assert (stats["added"], stats["removed"]) == (len(first), 0)
    # The absolute deadline: nft lists it as a local date, in whole seconds.
    deadline = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stats["until_ns"] // 10**9))
    live = _rules(agent.ruleset()["owner"], "live")
    assert (
        len(live) == 1
        and {"match": {"op": "<", "left": {"meta": {"key": "time"}}, "right": deadline}}
        in live[0]["expr"]
    )
    listing = _normalise(agent.ruleset())
    stats = agent.apply(first, 5000)
    assert (stats["added"], stats["removed"]) == (0, 0)
    assert _normalise(agent.ruleset()) == listing, "same state twice must change nothing"

    # Incremental: only the changed buckets travel.
    second = (first - {0, 2, 4}) | {1, 3}
    stats = agent.apply(second, 5000)
    assert (stats["added"], stats["removed"]) == (2, 3)
    assert set(agent.call("kernel_owned")["owned"]) == second

    # Dropping most buckets flushes the set and re-adds the rest: fewer elements sent.
    stats = agent.apply({5, 7}, 5000)
    assert (stats["added"], stats["removed"]) == (2, len(second))
    assert stats["elements_sent"] == 2
    assert set(agent.call("kernel_owned")["owned"]) == {5, 7}
    stats = agent.apply(second, 5000)
    assert stats["elements_sent"] == len(second) + 2

    # An admin's stray rule in the guard is gone after one apply; no duplicates ever.
    nbed.run(nbed.nodes[0].name, "nft", "add", "rule", "inet", "lbd_guard", "vip", "accept")
    guard_rules = len(_rules(agent.ruleset()["guard"], "vip"))
    agent.apply(second, 5000)
    assert len(_rules(agent.ruleset()["guard"], "vip")) == guard_rules - 1
    agent.apply(second, 5000)
    assert len(_rules(agent.ruleset()["guard"], "vip")) == guard_rules - 1

    # Out-of-range buckets are refused before anything reaches the kernel.
    with pytest.raises(AgentError, match="out of range"):
        agent.apply({BUCKETS}, 5000)
    assert set(agent.call("kernel_owned")["owned"]) == second


def test_install_converges_and_refuses_a_second_owner(
    nbed: Bed, agents: dict[str, AgentClient]
) -> None:
    node = nbed.nodes[1].name
    agent = agents[node]
    agent.apply(range(BUCKETS), 5000)
    guard_before = _normalise({"g": agent.ruleset()["guard"]})
    # A second process cannot take the owner table of a live one.
    with pytest.raises(AgentError) as err:
        AgentClient(nbed, node, [nbed.vip4, nbed.vip6], buckets=BUCKETS, seed=SEED)
    assert "Operation not permitted" in str(err.value) or "exists" in str(err.value)
    # Crash: the owner table goes with the process; the guard stays (fail closed).
    agent.signal(signal.SIGKILL)
    agent.proc.wait(timeout=5)
    nbed.wait_for(lambda: "table inet lbd " not in _tables(nbed, node), 5.0)
    assert "table inet lbd_guard" in _tables(nbed, node)
    # A new run installs over the leftovers: same guard, nothing duplicated, closed.
    agents[node] = AgentClient(nbed, node, [nbed.vip4, nbed.vip6], buckets=BUCKETS, seed=SEED)
    assert _normalise({"g": agents[node].ruleset()["guard"]}) == guard_before
    assert agents[node].call("kernel_owned")["owned"] == []
    # install() again in the same process replaces its own owner table atomically.
    agents[node].apply({1, 2, 3}, 5000)
    agents[node].call("install")
    assert agents[node].call("kernel_owned")["owned"] == []


def _tables(bed: Bed, ns: str) -> str:
    return bed.run(ns, "nft", "list", "tables").stdout + "\n"


def _expected(shares: dict[str, frozenset[int]], sources: list[str]) -> dict[str, str]:
    return {s: owner_of(shares, bucket_of(s, BUCKETS, SEED)) for s in sources}


def test_exactly_one_owner_tcp_udp_icmp(nbed: Bed, agents: dict[str, AgentClient]) -> None:
    shares = split(list(agents), BUCKETS, SEED)
    for name, agent in agents.items():
        agent.apply(shares[name], 10_000)
    sources = SRC4 + SRC6
    expected = _expected(shares, sources)
    assert len(set(expected.values())) == 3, "the sources must cover every node"

    client_counters(nbed, reset=True)
    answered = nbed.probe(sources, "tcp", timeout=2.0)
    assert answered == expected
    counts = client_counters(nbed, reset=True)
    # One SYN|ACK per connection: a second server answering would show here. (RSTs
    # are not counted against us: the bed reorders packets now and then, and a
    # server that has already closed answers the client's duplicate ACK with a RST,
    # rules or not. Resets that matter break the streams of the move test.)
    assert counts["synack"] == len(sources), counts

    replies = nbed.probe_udp_all(sources, window=0.5)
    assert replies == {s: [expected[s]] for s in sources}
    assert client_counters(nbed, reset=True)["udpin"] == len(sources)

    pings = SRC4[:40] + SRC6[:40]
    assert nbed.probe(pings, "icmp", timeout=1.0) == dict.fromkeys(pings, "ok")
    assert client_counters(nbed, reset=True)["echoreply"] == len(pings)

    # Traffic to a node's own address is untouched by the rules.
    own = nbed.probe(["198.51.100.9"], "tcp", dst4=nbed.nodes[2].addr4)
    assert own == {"198.51.100.9": nbed.nodes[2].name}
    # No owner at all (every lease dropped): nobody answers, silently.
    for agent in agents.values():
        agent.apply(set(), None)
    client_counters(nbed, reset=True)
    silent = nbed.probe(SRC4[:20] + SRC6[:20], "tcp", timeout=0.5)
    assert set(silent.values()) == {None}
    assert client_counters(nbed)["synack"] == 0


def test_atomic_moves_keep_streams_and_send_no_rst(
    nbed: Bed, agents: dict[str, AgentClient]
) -> None:
    names = sorted(agents)
    assert nbed.read_sysctl(nbed.nodes[0].name, "net.netfilter.nf_conntrack_tcp_loose") == "1"
    shares = split(names, BUCKETS, SEED)
    for name in names:
        agents[name].apply(shares[name], 10_000)
    # Two long-lived connections per node (one per family) from predicted sources.
    streams: list[str] = []
    for name in names:
        streams += [s for s in SRC4 if _expected(shares, [s])[s] == name][:1]
        streams += [s for s in SRC6 if _expected(shares, [s])[s] == name][:1]
    proc = start_streams(nbed, streams)
    try:
        # Rotate every bucket to the next node, three times (each bucket visits every
        # node): release on all old owners first, then claim on the new ones.
        for rnd in range(1, 4):
            new = {names[(i + rnd) % 3]: shares[names[i]] for i in range(3)}
            for name in names:
                agents[name].apply(shares[name] & new[name], 10_000)
            for name in names:
                agents[name].apply(new[name], 10_000)
            # New connections already go to the new owner, exactly once.
            probe = [*streams, "198.51.100.250", "2001:db8:2::4000"]
            client_counters(nbed, reset=True)
            assert nbed.probe(probe, "tcp", timeout=2.0) == _expected(new, probe)
            assert client_counters(nbed)["synack"] == len(probe)
            shares = new
        result = stop_streams(nbed, proc)
    finally:
        if proc.poll() is None:
            nbed.stop(proc, signal.SIGKILL)
    for src, stats in result.items():
        assert stats["errors"] == [], (src, stats)
        assert stats["rounds"] > 20, (src, stats)
    # Each stream stayed on its first node although its bucket moved away 3 times.
    assert sorted(s["node"] for s in result.values()) == sorted(names * 2)
