"""CI smoke run of the soak (bench/soak.py): random faults on real daemons, ~50 s.

A fixed seed, the fast timers, short gaps between faults. Asserts what the soak
promises: zero duplicate answers (capture and client), zero long-lived connections
broken (or reset) on nodes that stayed up, every fault healed and the cluster
agreeing again within the bound, faults of several kinds injected, no daemon
traceback or unexpected exit, the report's shape, and nothing of the bed left behind.
The full-length soak (``--duration 600`` and more) is run by hand; see the README.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lbd.testbed import soak
from lbd.testbed.bed import list_netns
from lbd.testbed.soak_faults import KINDS
from lbd.testbed.soak_report import render

SEED = 20260611
DURATION = 50


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_soak_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "soak.json"
    code = soak.main(
        [
            "--duration",
            str(DURATION),
            "--seed",
            str(SEED),
            "--gap",
            "0.3,1.2",
            "--segment",
            "30",
            "--json",
            "--out",
            str(out),
            "--logs",
            str(tmp_path / "logs"),
        ]
    )
    printed = capsys.readouterr()
    report = json.loads(out.read_text())
    assert json.loads(printed.out) == report
    print(render(report))
    assert code == 0, (report["violations"], report["stuck"], report["daemon_errors"])

    # The report's shape.
    for key in (
        "bed",
        "nodes",
        "profile",
        "seed",
        "duration_s",
        "elapsed_s",
        "segments",
        "faults",
        "faults_total",
        "per_kind",
        "duplicates",
        "broken",
        "resets_to_long_lived",
        "new_connections",
        "captured",
        "flap_holds",
        "stuck",
        "events",
        "violations",
        "ok",
        "daemon_errors",
        "daemons_started",
    ):
        assert key in report, key
    assert report["seed"] == SEED and report["nodes"] == 3 and report["profile"] == "fast"
    assert set(report["faults"]) == set(KINDS) == set(report["per_kind"])
    for row in report["per_kind"].values():
        assert set(row) >= {
            "count",
            "worst_outage_ms",
            "median_outage_ms",
            "failed",
            "unserved_sources",
            "worst_agreed_ms",
        }, row
    assert report["segments"] >= 2  # the load and capture were restarted (segments)
    assert DURATION <= report["elapsed_s"] < DURATION + 30

    # Faults of several kinds, each healed and agreed on again.
    injected = {kind for kind, count in report["faults"].items() if count}
    assert len(injected) >= 6, report["faults"]
    assert injected & {"crash", "hang", "link_flap"}, report["faults"]
    assert injected & {"partition_both", "partition_out", "partition_in"}, report["faults"]
    assert injected & {"vip_removed", "nft_flush"}, report["faults"]
    assert report["faults_total"] == len(report["events"]) == sum(report["faults"].values())
    assert all(e["agreed_ms"] is not None for e in report["events"]), report["events"]
    assert not report["stuck"]
    # vip_removed: the daemon put the VIP back; nft_flush: lbd's tables survived.
    assert not [e for e in report["events"] if [n for n in e["notes"] if "flap hold" not in n]], (
        report["events"]
    )

    # Nothing lost.
    assert report["ok"] and not report["violations"]
    assert report["duplicates"]["total"] == 0, report["duplicates"]
    assert report["broken"]["on_survivors"] == 0, report["broken"]
    assert report["resets_to_long_lived"]["on_survivors"] == 0
    assert report["broken"]["long_lived"] >= 3
    assert report["captured"]["synacks"] > 1000 and report["captured"]["udp_answers"] > 1000
    n = report["new_connections"]
    assert n["tcp_ok"] > 0.9 * n["tcp_attempts"], n
    assert not report["daemon_errors"]
    # No slice stayed a black hole after a fault.
    assert sum(row["unserved_sources"] for row in report["per_kind"].values()) == 0

    # Every daemon's log kept; nothing of the bed left behind.
    assert len(list((tmp_path / "logs").glob("node*.log"))) == report["daemons_started"]
    assert report["bed"].startswith("lbdt-soak")
    assert not any(name.startswith(report["bed"]) for name in list_netns())
