"""Service health on real daemons: a node serves only while its service does.

Three daemons (fast timers) with one ``[[check]]`` each, a TCP check of the node's
own echo service on 127.0.0.1, under client load with a capture:

* the cluster forms only once every node's check has risen (a node starts unhealthy);
* node1's service is killed: node1 drains through the handoff, its clients are
  served by the others within the bound, ``lbd-cli members`` on node0 names node1
  unhealthy, ``lbd-cli undrain`` on node1 does not override the failing check, and
  the journal has CheckFailed with the reason;
* the service comes back: node1 takes its slices back (CheckRecovered);
* every service is killed: rather than refusing the whole VIP, every node keeps its
  slices (``all_unhealthy = "serve"``) and says so (EveryNodeUnhealthy).

Zero duplicate answers throughout; established connections break only on node1,
whose service was killed under them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lbd.daemon import lab_metrics as metrics

from .bed import Bed
from .cluster import Capture, ClientLoad, LbdCluster, Run, holds_slices
from .nsutil import wait_for
from .test_e2e import SETTLE, assert_failover
from .traffic import TCP_PORT

CHECK = (f'\n[[check]]\nname = "echo"\ntcp = "127.0.0.1:{TCP_PORT}"\ninterval = 0.2\n'
         "timeout = 0.1\nrise = 2\nfall = 2\n")
# fall 2 x 0.2 s, a run's timeout, then the handoff (fast timers, ~0.15 s).
DRAIN_LIMIT_MS = 1200.0


class CheckedCluster(LbdCluster):
    """Every node's config gets the check of its echo service."""

    def config(self, index: int, **extra: str) -> Path:
        path = super().config(index, **extra)
        path.write_text(path.read_text() + CHECK)
        return path


def start_services(bed: Bed, nodes: list[int]) -> dict[int, Any]:
    """The echo service on the VIP (for clients) and on 127.0.0.1 (for the check)."""
    procs = bed.start_echo(nodes=nodes, addrs=[bed.vip4, "127.0.0.1"])
    return dict(zip(nodes, procs, strict=True))


def kill_service(proc: Any) -> None:
    proc.kill()  # by PID: a Popen this test started
    proc.wait(timeout=5)


def test_a_node_serves_only_while_its_service_does(
    bed: Callable[..., Bed], tmp_path: Path
) -> None:
    the_bed = bed(nodes=3, add_vip=False)
    cluster = CheckedCluster(the_bed, tmp_path / "cluster", profile="fast")
    run = Run(the_bed, cluster)
    try:
        cluster.start_all()

        def vips_added() -> bool:
            return all(the_bed.vip4 in the_bed.run(n.name, "ip", "-4", "addr").stdout
                       for n in the_bed.nodes)

        wait_for(vips_added, 10.0, what="the daemons to add the VIP")
        # No service yet: every node is unhealthy, so nobody claims anything.
        time.sleep(1.0)
        assert all((cluster.query(i, "status") or {}).get("slices") == 0 for i in range(3))
        services = start_services(the_bed, [0, 1, 2])
        cluster.wait_converged(check=lambda s: all(v > 0 for v in s.values()),
                               what="the cluster to serve once the checks rose")
        run.capture = Capture(the_bed, tmp_path)
        run.load = ClientLoad(the_bed, tmp_path)
        time.sleep(SETTLE)

        # node1's service dies: node1 drains; the others serve its clients.
        fault = time.monotonic()
        kill_service(services[1])
        cluster.wait_converged(check=lambda s: s["node1"] == 0,
                               what="node1 to drain on its failing check")
        rows = {r["node_id"]: r for r in cluster.query(0, "members")}
        assert rows["node1"]["health"] == "unhealthy: check", rows
        assert rows["node0"]["health"] == "ok"
        assert cluster.cli(1, "undrain").returncode == 0
        time.sleep(SETTLE)
        status = cluster.query(1, "status")
        assert status["slices"] == 0 and "health" in status["drain_reasons"], status
        assert status["health"]["checks"][0]["state"] == "unhealthy", status
        assert any("unhealthy, not serving: check echo" in p for p in status["problems"])
        assert "check echo failed: connection refused" in cluster.log(1)

        # The service comes back: node1 takes its slices back.
        services.update(start_services(the_bed, [1]))
        cluster.wait_converged(check=holds_slices(1), what="node1 to serve again")
        assert "check echo recovered" in cluster.log(1)
        time.sleep(SETTLE)
        record, report = run.finish()
        figures = assert_failover(record, fault, the_bed.nodes[1].name, DRAIN_LIMIT_MS)
        assert set(figures["absorbed_by"]) >= {the_bed.nodes[0].name, the_bed.nodes[2].name}
        # Clean but for node1, whose service was killed under its connections (RSTs).
        node1 = the_bed.nodes[1].name
        assert report.duplicates == 0 and metrics.udp_duplicates(record) == 0, report
        elsewhere = {c["source"] for c in record["conns"] if c["node"] != node1}
        assert elsewhere and not [r for r in report.resets if r[0] in elsewhere]
        assert not metrics.broken(record, {node1})
        assert metrics.shares(record, since=time.monotonic() - SETTLE)[
            the_bed.nodes[1].name] > 0

        # Every service dies: every node keeps its slices rather than refuse the VIP.
        for index in (0, 1, 2):
            kill_service(services[index])

        def everyone_says_so() -> bool:
            return all("every node of the view is unhealthy" in cluster.log(i)
                       for i in range(3))

        wait_for(everyone_says_so, 10.0, what="every node to report EveryNodeUnhealthy")
        time.sleep(SETTLE)
        slices = cluster.converged([0, 1, 2])
        assert slices is not None and all(v > 0 for v in slices.values()), slices
    finally:
        run.close()
