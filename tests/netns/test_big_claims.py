"""Big bucket counts on real daemons: claims in parts, leases on time, no lapses.

A claim of every bucket a node gains at B = 65536 is tens of thousands of set
elements. In one transaction that is 100-430 ms with the event loop held and a
relative lease timeout that starts that late. The daemon adds at most
``CLAIM_CHUNK`` buckets per transaction, each in its own turn of the loop, and
gives every lease its absolute deadline (test_nft_lease.py shows that bound at
B = 65536 under both profiles' leases). The config refuses bucket counts a node
cannot claim within half a lease (fast timers: at most 20000), so the fast
profile runs here at 16384 and the default one at 65536. Under client load with a
capture: formation, a crash absorbed, a rejoin, with zero duplicate answers and
no transaction anywhere near a whole share's claim.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lbd.daemon.service import CLAIM_CHUNK
from lbd.testbed.bed import Bed
from lbd.testbed.cluster import holds_slices

from .test_e2e import (
    DEFAULT_OUTAGE_LIMIT_MS,
    FAST_OUTAGE_LIMIT_MS,
    SETTLE,
    assert_clean,
    assert_failover,
    cluster_run,
)

# A part of 4096 buckets costs 6-16 ms here; one transaction for a node's whole
# share at B = 65536 (~22000 buckets) costs 85-160 ms.
MAX_APPLY_MS = 60.0


@pytest.mark.parametrize(("profile", "buckets"), [("fast", 16384), ("default", 65536)])
def test_big_claims_come_in_parts_and_fail_over_cleanly(
    bed: Callable[..., Bed],
    tmp_path: Path,
    profile: str,
    buckets: int,
    record_property: Callable[[str, object], None],
) -> None:
    with cluster_run(bed, tmp_path, profile=profile, buckets=buckets) as run:
        cluster = run.cluster
        before = [cluster.view_changes(i) for i in range(3)]
        fault = cluster.crash(1)
        cluster.wait_converged([0, 2], what="survivors to absorb node1")
        time.sleep(SETTLE)
        cluster.start(1)
        cluster.wait_converged([0, 1, 2], check=holds_slices(1), what="node1 to rejoin")
        time.sleep(SETTLE)
        record, report = run.finish()
        kernels = {}
        for index in range(3):
            status = cluster.query(index, "status")
            assert status is not None
            kernels[index] = status["kernel"]
        print(f"{profile}, B={buckets}: kernel figures per node: {kernels}")
        limit = FAST_OUTAGE_LIMIT_MS if profile == "fast" else DEFAULT_OUTAGE_LIMIT_MS
        assert_failover(record, fault, run.name(1), limit)
        assert_clean(record, report)
        # No lapse-and-reclaim cycles: the survivors changed views for the crash
        # and the rejoin only (a few changes each), not dozens of times.
        after = [cluster.view_changes(i) for i in (0, 2)]
        assert all(
            a is not None and b is not None and a - b <= 6
            for a, b in zip(after, [before[0], before[2]], strict=True)
        ), (before, after)
        worst = max(k["max_apply_ms"] for k in kernels.values())
        record_property("max_apply_ms", worst)
        for kernel in kernels.values():
            assert kernel["deadline_checked"], kernels
            assert kernel["claim_pending"] == 0, kernels
        # Every node claimed its share (over one part) at formation or at its rejoin;
        # no single transaction came near that claim's duration.
        assert buckets // 3 > CLAIM_CHUNK
        assert worst <= MAX_APPLY_MS, kernels
