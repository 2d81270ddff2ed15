"""Metrics of real daemons through a failover: they agree with lbd-cli status and with
what happened.

Three daemons (default timers: the fast ones see a suspect now and then on a loaded
2-core host; 512 buckets) with ``metrics_listen = "127.0.0.1:9477"``
in their namespaces. A scraper in node0's namespace GETs /metrics every 20 ms for the
whole run while node1 is SIGKILLed (by PID). Checked: every scrape parses (strict
parser) and answers 200; before and after, ``lbd-cli metrics`` and HTTP agree with
``lbd-cli status`` (slices, members, counters); the survivors' gained slices add up to
exactly node1's slices, they released none, each counts one member lost, their view
changes went up, and the members gauges say node1 is dead.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from test_metrics_parse import Family, parse

from lbd.testbed.bed import Bed, wait_for
from lbd.testbed.cluster import LbdCluster

LISTEN = "127.0.0.1:9477"
URL = f"http://{LISTEN}/metrics"
SCRAPE_EVERY = 0.02
SCRAPE_FOR = 8.0

# Runs in node0's namespace: scrape for SCRAPE_FOR seconds, then print what it saw.
SCRAPER = """
import json, sys, time, urllib.request
url, every, until = sys.argv[1], float(sys.argv[2]), time.monotonic() + float(sys.argv[3])
seen = {"ok": 0, "failed": [], "ms": [], "owned": []}
while time.monotonic() < until:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            body = answer.read().decode()
            assert answer.status == 200
        seen["ms"].append((time.perf_counter() - t0) * 1000)
        seen["ok"] += 1
        line = [l for l in body.splitlines() if l.startswith("lbd_slices_owned ")]
        seen["owned"].append(int(line[0].split()[1]))
        if seen["ok"] % 50 == 1:
            seen.setdefault("bodies", []).append(body)
    except Exception as exc:
        seen["failed"].append(repr(exc))
    time.sleep(every)
print(json.dumps(seen))
"""

GET = """
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as answer:
        sys.stdout.write(answer.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code)
"""


def http(bed: Bed, index: int, url: str = URL) -> str:
    return bed.run_python(bed.nodes[index].name, GET, url, timeout=10).stdout


def scrape(cluster: LbdCluster, index: int) -> dict[str, Family]:
    out = cluster.cli(index, "metrics")
    assert out.returncode == 0, out.stderr
    return parse(out.stdout)


def agree(families: dict[str, Family], status: dict[str, Any]) -> None:
    """The figures of one scrape against a status taken just before it."""
    assert families["lbd_up"].value() == 1
    assert families["lbd_slices_owned"].value() == status["slices"]
    assert families["lbd_quorum"].value() == int(status["quorum"])
    assert families["lbd_view_members"].value() == len(status["view_members"])
    assert families["lbd_buckets"].value() == status["buckets"]
    for row in status["members"]:
        assert families["lbd_member_slices"].value(node=row["node_id"]) == row["slices"]
    for state in ("active", "dead"):
        assert families["lbd_members"].value(state=state) == sum(
            r["state"] == state for r in status["members"]
        )
    e, c = status["events"], status["counters"]
    assert families["lbd_slices_gained_total"].value() == e["slices_gained"]
    assert families["lbd_slices_released_total"].value() == e["slices_released"]
    assert families["lbd_members_lost_total"].value() == e["members_lost"]
    assert families["lbd_view_changes_total"].value() == c["view_changes"]
    # Heartbeats keep flowing between the two questions: never fewer.
    assert families["lbd_heartbeats_sent_total"].value() >= c["sent"] > 0
    assert families["lbd_heartbeats_received_total"].value() >= c["accepted"] > 0
    hist = families["lbd_kernel_apply_duration_seconds"]
    assert hist.value(le="+Inf") >= status["kernel"]["applies"] > 0


def settled(cluster: LbdCluster, index: int) -> tuple[dict[str, Any], dict[str, Family]]:
    """A status and a scrape that agree (bounded: a step may fall between the two)."""
    last: list[Exception] = []

    def pair() -> tuple[dict[str, Any], dict[str, Family]] | None:
        status = cluster.query(index, "status")
        families = scrape(cluster, index)
        try:
            agree(families, status)
        except AssertionError as exc:
            last[:] = [exc]
            return None
        return status, families

    try:
        found = wait_for(pair, 10.0, 0.2, f"node{index}'s metrics to agree with its status")
    except TimeoutError:
        raise AssertionError(f"node{index}: {last}") from None
    assert found is not None
    return found


def test_metrics_through_a_failover(bed: Callable[..., Bed], tmp_path: Path) -> None:
    the_bed = bed(nodes=3, add_vip=False)
    cluster = LbdCluster(the_bed, tmp_path / "cluster", profile="default", buckets=512)
    try:
        for index in range(3):
            cluster.start(index, metrics_listen=f'"{LISTEN}"')
        slices = cluster.wait_converged(what="the cluster to form")
        before = {i: settled(cluster, i)[0] for i in range(3)}
        for i in range(3):
            over_http = parse(http(the_bed, i))
            live = over_http["lbd_members"]  # a late heartbeat may make a peer suspect
            assert live.value(state="active") + live.value(state="suspect") == 3
            assert live.value(state="dead") == 0
            assert over_http["lbd_slices_owned"].value() == slices[f"node{i}"]
        assert http(the_bed, 0, "http://127.0.0.1:9477/other").strip() == "404"

        scraper = the_bed.python(
            the_bed.nodes[0].name, "-c", SCRAPER, URL, str(SCRAPE_EVERY), str(SCRAPE_FOR)
        )
        time.sleep(1.0)  # scraping before the fault too
        cluster.crash(1)  # SIGKILL, by PID
        cluster.wait_converged([0, 2], what="node0 and node2 to absorb node1")
        after = {i: settled(cluster, i) for i in (0, 2)}
        scraper.wait(timeout=SCRAPE_FOR + 10)
        seen = json.loads(the_bed.output(scraper).strip().splitlines()[-1])

        gained = 0
        for i, (status, families) in after.items():
            old = before[i]
            delta = status["events"]["slices_gained"] - old["events"]["slices_gained"]
            assert delta == status["slices"] - old["slices"] > 0, (i, status, old)
            gained += delta
            assert families["lbd_slices_released_total"].value() == old["events"]["slices_released"]
            assert families["lbd_members_lost_total"].value() == 1
            assert families["lbd_view_changes_total"].value() > old["counters"]["view_changes"]
            live = families["lbd_members"]
            assert live.value(state="active") + live.value(state="suspect") == 2
            assert live.value(state="dead") == 1
            dead = [
                labels
                for _, labels, _ in families["lbd_member"].samples
                if labels["node"] == "node1"
            ]
            assert [d["state"] for d in dead] == ["dead"], dead
        assert gained == slices["node1"] > 0

        assert not seen["failed"], seen["failed"][:5]
        assert seen["ok"] >= SCRAPE_FOR / (SCRAPE_EVERY + 0.05), seen["ok"]
        for body in seen["bodies"]:
            parse(body)
        # node0's share as its scrapes saw it: before the fault, then node1's part added.
        assert seen["owned"][0] == slices["node0"]
        assert seen["owned"][-1] == after[0][0]["slices"]
        ms = sorted(seen["ms"])
        print(
            f"\nHTTP scrapes during the failover: {seen['ok']}, median "
            f"{statistics.median(ms):.2f} ms, p99 {ms[int(len(ms) * 0.99)]:.2f} ms, "
            f"max {ms[-1]:.2f} ms"
        )
    finally:
        cluster.stop_all()


HOLD_PORT = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 9477))
s.listen()
print("listening", flush=True)
time.sleep(float(sys.argv[1]))
"""


def test_a_taken_port_costs_the_metrics_not_the_node(
    bed: Callable[..., Bed], tmp_path: Path
) -> None:
    """Another program holds 127.0.0.1:9477 in node0's namespace: node0 serves its
    slices all the same, and says why it has no metrics."""
    the_bed = bed(nodes=2, add_vip=False)
    cluster = LbdCluster(the_bed, tmp_path / "cluster", profile="default", buckets=512)
    holder = the_bed.python(the_bed.nodes[0].name, "-c", HOLD_PORT, "60")
    try:
        wait_for(
            lambda: "listening" in the_bed.output(holder), 10.0, 0.05, "the port holder to listen"
        )
        for index in range(2):
            cluster.start(index, metrics_listen=f'"{LISTEN}"')
        slices = cluster.wait_converged(what="both nodes to serve")
        assert slices["node0"] > 0
        status = cluster.query(0, "status")
        assert any(p.startswith(f"metrics_listen {LISTEN}: ") for p in status["problems"]), status[
            "problems"
        ]
        assert "serving no metrics" in cluster.log(0)
        assert scrape(cluster, 0)["lbd_problems"].value() == len(status["problems"])
        assert parse(http(the_bed, 1))["lbd_up"].value() == 1  # node1's own port is free
    finally:
        cluster.stop_all()
        the_bed.stop(holder)
