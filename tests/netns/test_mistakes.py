"""S4, issue 12: one mistaken node must never break the cluster.

Real daemons in a hub bed under client load (ClientLoad: 64 sources, a new TCP
connection and a UDP query every 4 ms, long-lived connections) with a packet capture
in the client namespace, fast timers unless a scenario needs the default ones.

Scenarios 1-6: two (or three) good nodes form the cluster first, then one more
process starts with ONE mistake. In every case:

* zero duplicate answers (capture: SYN|ACKs; client: UDP answers);
* the good nodes keep serving: under ``MAX_FAILED`` (2 %) of the new connections
  started from the moment the mistaken process starts fail;
* the mistaken process serves 0 slices (its status, sampled while load runs, and no
  client answer from its namespace), never becomes ready (no READY=1), and explains
  itself in one line in its log and in ``lbd-cli --json status`` "problems";
* the good nodes never admit it: their view stays theirs (no view change) and they
  name it in their own problems (and, for a parameter, in ``members`` as "mismatch").

1. wrong key file, 2. a typo in ``cluster`` (both: authentication fails);
3. ``buckets``, 4. ``seed``, 5. a "fast" timer profile among "default" nodes
   (all three: "disagrees on <parameter>");
6. a cloned node ID (node0's ID started in another namespace), beside 2 and beside
   3 good nodes: node0 and the clone both serve nothing and say so, the others
   absorb node0's slices through the normal safe handoff; once the clone leaves
   (SIGTERM), node0 serves again within a bounded time.

7. Key rotation under load in a 3-node cluster, the three documented steps (``lbd
   keygen --add``, ``--promote``, ``--retire``), each followed by SIGHUP to every node
   and a wait until every node shows its effect: zero failed new connections, zero
   duplicates, zero view changes and zero forged datagrams across the rotation.

8. A rolling change of a shared parameter (buckets 512 -> 1024), one node at a time
   (SIGTERM, wait, start with the new value). Expected, and asserted:

   * after node0's restart, node1+node2 (the quorum side, old value) serve
     everything; node0 serves nothing and says "disagrees on buckets";
   * after node1's restart, the two new nodes (node0, node1) fail closed: they agree
     with each other but hold no quorum of the views they last agreed (node1's was
     {node1, node2}: they are only half of it); node2, the last old node, alone in its
     view after node1's graceful leave, serves everything;
   * restarting node2 ends in one outage of a few seconds (node2's leave takes the last
     server away; measured here: 1.1-1.4 s) until the three form the cluster again on
     the new bucket count.

   Zero duplicate answers throughout; under 2 % failed new connections while the
   quorum side serves (steps 1 and 2) and after the cluster formed again.

Expectations are collected (``Checks``) and asserted together at the end of each
scenario, after its figures are printed (``FIGURES <scenario>: {json}``; run with
``-rP`` to see them): one run shows everything a daemon got wrong.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lbd.daemon.config import write_key
from lbd.testbed import metrics
from lbd.testbed.bed import Bed, wait_for
from lbd.testbed.cluster import Capture, ClientLoad, LbdCluster, Run, holds_slices
from lbd.testbed.pcap import DuplicateReport

BUCKETS = 512
SETTLE = 1.0
"""Seconds of load observed after each change has shown its effect."""
EXPLAIN_TIMEOUT = 10.0
"""Bound for a mistaken node to explain itself (fast timers: well under a second)."""
CONVERGE_TIMEOUT = 20.0
REJOIN_TIMEOUT = 10.0
"""Bound for node0 to serve again once its clone has left (fast timers: ~1 s)."""
MAX_FAILED = 0.02
"""Largest fraction of failed new connections while one node is mistaken."""
HANDOFF_GRACE = 0.3
"""A connection accepted just before a release may complete (name line read) this late:
ClientLoad's connect timeout is 0.25 s."""

AUTH = "that fail authentication: wrong key file or cluster name?"
FIRST_START = "first start: waiting for bootstrap_expect = 2 members"
CLONE = "node ID node0 is also used by the process at {address}"


# ----------------------------------------------------------------- harness


@contextmanager
def mistakes_run(
    bed: Callable[..., Bed], tmp_path: Path, *, nodes: int = 3, good: int = 2, profile: str = "fast"
) -> Iterator[Run]:
    """A bed of ``nodes`` namespaces; daemons 0..good-1 form the cluster, then load runs.

    Everything started here (daemons, load, capture) is stopped on the way out, also
    when the test fails; the ``bed`` fixture deletes the namespaces."""
    the_bed = bed(nodes=nodes, add_vip=False)
    cluster = LbdCluster(the_bed, tmp_path / "cluster", profile=profile, buckets=BUCKETS)
    run = Run(the_bed, cluster)
    try:
        cluster.start_all(list(range(good)))
        cluster.wait_converged(
            list(range(good)), timeout=CONVERGE_TIMEOUT, what="the good nodes to form the cluster"
        )
        the_bed.start_echo(addrs=[the_bed.vip4])
        run.capture = Capture(the_bed, tmp_path)
        run.load = ClientLoad(the_bed, tmp_path, long_lived=good)
        time.sleep(SETTLE)
        yield run
    finally:
        run.close()


def diagnose(cluster: LbdCluster, indexes: list[int]) -> str:
    """What each daemon says (members table, problems, log tail), for failure messages."""
    parts = []
    for index in indexes:
        status = cluster.query(index, "status") or {}
        parts.append(
            f"--- daemon {index}: slices {status.get('slices')} problems "
            f"{status.get('problems')}\n{cluster.cli(index, 'members').stdout}"
            f"log tail:\n{cluster.log(index)[-2500:]}"
        )
    return "\n".join(parts)


def wait_status(
    cluster: LbdCluster,
    index: int,
    check: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = EXPLAIN_TIMEOUT,
) -> dict[str, Any]:
    """Poll ``lbd-cli --json status`` of daemon ``index`` until ``check`` holds (bounded)."""

    def ok() -> dict[str, Any] | None:
        status = cluster.query(index, "status")
        return status if status and check(status) else None

    try:
        found = wait_for(ok, timeout, 0.1, what)
    except TimeoutError:
        raise AssertionError(f"timed out: {what}\n{diagnose(cluster, [index])}") from None
    assert found is not None
    return found


def error_lines(cluster: LbdCluster, index: int, needles: list[str]) -> dict[str, str]:
    """Daemon ``index``'s error log line holding each needle ("" if none does).

    Read once the problem has lasted a while (an event is logged as it happens), so
    that a missing line costs no waiting; asserted last, after the other figures."""
    errors = [x for x in cluster.log(index).splitlines() if x.startswith("lbd: error:")]
    return {needle: next((x for x in errors if needle in x), "") for needle in needles}


class Checks:
    """A scenario's expectations, checked once its run is over: one failure lists every
    one not met (so a single run shows all that went wrong, beside the figures)."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: object, what: str, detail: object = "") -> None:
        if not ok:
            self.failed.append(f"{what}: {detail}"[:3000])

    def done(self) -> None:
        assert not self.failed, "\n".join(["expectations not met:", *self.failed])


def check_logged(check: Checks, found: dict[int, dict[str, str]], cluster: LbdCluster) -> None:
    missing = {i: [n for n, line in lines.items() if not line] for i, lines in found.items()}
    missing = {i: needles for i, needles in missing.items() if needles}
    check(
        not missing,
        "error lines missing from the log",
        f"{missing}\n{diagnose(cluster, sorted(missing))}",
    )


def problems_with(status: dict[str, Any], *patterns: str) -> bool:
    """Whether every regex in ``patterns`` matches one of the status problems."""
    return all(any(re.search(p, line) for line in status["problems"]) for p in patterns)


def sample(cluster: LbdCluster, indexes: list[int], seconds: float) -> dict[int, dict[str, Any]]:
    """Watch the daemons' status while load runs (every ~0.1 s for ``seconds``): the
    most slices, whether any sample was ready, and every problem line seen, per daemon."""
    seen: dict[int, dict[str, Any]] = {
        i: {"max_slices": 0, "ready": False, "samples": 0, "problems": []} for i in indexes
    }
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for index in indexes:
            status = cluster.query(index, "status")
            if status is not None:
                seen[index]["max_slices"] = max(seen[index]["max_slices"], status["slices"])
                seen[index]["ready"] |= bool(status["ready"])
                seen[index]["samples"] += 1
                seen[index]["problems"] += [
                    p for p in status["problems"] if p not in seen[index]["problems"]
                ]
        time.sleep(0.1)
    return seen


def new_connections(
    record: dict[str, Any], since: float, until: float = float("inf")
) -> dict[str, Any]:
    """New TCP connections started in [since, until): attempts, failed, failed share."""
    rows = [r for r in record["tcp"] if since <= r[metrics.START] < until]
    failed = sum(1 for r in rows if not r[metrics.NAME])
    bursts = [
        round(b * 1000) for b in metrics.failure_bursts({"tcp": rows, "sources": record["sources"]})
    ]
    return {
        "attempts": len(rows),
        "failed": failed,
        "failed_pct": round(100.0 * failed / max(1, len(rows)), 2),
        "longest_burst_ms": max(bursts, default=0),
    }


def check_no_duplicates(check: Checks, record: dict[str, Any], report: DuplicateReport) -> None:
    """S1: no SYN answered twice (capture), no UDP query answered twice (client)."""
    check(report.syns > 100 and report.udp_queries > 100, "too little load captured", report)
    check(report.duplicates == 0, "duplicate answers in the capture", report)
    check(
        metrics.udp_duplicates(record) == 0,
        "UDP queries answered twice (client)",
        metrics.udp_duplicates(record),
    )


def check_served(check: Checks, figures: dict[str, Any], what: str) -> None:
    """Under MAX_FAILED of the new connections failed (and there was load to judge)."""
    check(
        figures["attempts"] > 200 and figures["failed"] < MAX_FAILED * figures["attempts"],
        f"{what}: too many failed new connections",
        figures,
    )


def show(scenario: str, figures: dict[str, Any]) -> None:
    print(f"FIGURES {scenario}: {json.dumps(figures, sort_keys=True)}")


def status_of(cluster: LbdCluster, index: int) -> dict[str, Any]:
    status: dict[str, Any] | None = cluster.query(index, "status")
    assert status is not None, diagnose(cluster, [index])
    return status


def members_of(cluster: LbdCluster, index: int) -> dict[str, dict[str, Any]]:
    rows = cluster.query(index, "members")
    assert rows is not None, diagnose(cluster, [index])
    return {r["node_id"]: r for r in rows}


# ------------------------------------------------------ 1-5: one wrong setting


@dataclass(frozen=True)
class Mistake:
    """One wrong setting of the third node."""

    extra: dict[str, str] = field(default_factory=dict)
    """Config keys of the mistaken node (the wrong key file is made in the test)."""
    field: str | None = None
    """The agreed parameter it differs in; None: its datagrams fail authentication."""
    profile: str = "fast"
    """Its timer profile."""
    good_profile: str = "fast"
    """The good nodes' timer profile."""


MISTAKES = {
    "wrong_key_file": Mistake(),
    "cluster_name_typo": Mistake({"cluster": '"lbd-lba"'}),
    "buckets": Mistake({"buckets": "8192"}, field="buckets"),
    "seed": Mistake({"seed": str(0x4C4244 + 1)}, field="seed"),
    "fast_among_default": Mistake(field="timers", profile="fast", good_profile="default"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_one_mistaken_node_fails_closed(
    bed: Callable[..., Bed], tmp_path: Path, mistake: str
) -> None:
    spec = MISTAKES[mistake]
    good, bad = [0, 1], 2
    with mistakes_run(bed, tmp_path, good=len(good), profile=spec.good_profile) as run:
        cluster = run.cluster
        extra: dict[str, Any] = dict(spec.extra)  # config keys
        if mistake == "wrong_key_file":
            other = tmp_path / "other.key"
            write_key(other)
            extra["key_file"] = f'"{other}"'
        before = {i: cluster.view_changes(i) for i in good}

        started = time.monotonic()
        cluster.start(bad, profile=spec.profile, **extra)

        # The mistaken node explains itself, naming each good node it hears.
        if spec.field is None:
            patterns = [
                rf"^hearing \d+ datagrams from {re.escape(run.addr(i))} "
                rf"{re.escape(AUTH)}$"
                for i in good
            ]
            logged = [f"hearing datagrams from {run.addr(i)} {AUTH}" for i in good]
            theirs = [
                rf"^hearing \d+ datagrams from {re.escape(run.addr(bad))} "
                rf"{re.escape(AUTH)}$"
            ]
        else:
            patterns = [
                rf"^node node{i} at {re.escape(run.addr(i))} disagrees on "
                rf"{spec.field}: not admitted \(every node must have the same value\)"
                for i in good
            ]
            logged = [
                f"node node{i} at {run.addr(i)} disagrees on {spec.field}: not admitted"
                for i in good
            ]
            theirs = [
                rf"^node node{bad} at {re.escape(run.addr(bad))} disagrees on "
                rf"{spec.field}: not admitted"
            ]
        patterns.append(re.escape(FIRST_START))
        explained = wait_status(
            cluster,
            bad,
            lambda s: problems_with(s, *patterns) and s["slices"] == 0,
            f"the mistaken node to explain itself ({mistake})",
        )
        # The good nodes name it too (and never admit it).
        for index in good:
            wait_status(
                cluster,
                index,
                lambda s: problems_with(s, *theirs),
                f"good node {index} to report the mistaken node",
            )

        # Load runs on while the mistaken node keeps talking to the cluster.
        seen = sample(cluster, [bad], SETTLE)
        log_lines = {bad: error_lines(cluster, bad, logged)}
        good_logs = {
            i: error_lines(
                cluster,
                i,
                [
                    f"hearing datagrams from {run.addr(bad)} {AUTH}"
                    if spec.field is None
                    else f"node node{bad} at {run.addr(bad)} disagrees on {spec.field}: "
                    "not admitted"
                ],
            )
            for i in good
        }
        final = status_of(cluster, bad)
        members_bad = members_of(cluster, bad)
        members_good = {i: members_of(cluster, i) for i in good}
        good_status = {i: status_of(cluster, i) for i in good}
        after = {i: cluster.view_changes(i) for i in good}
        record, report = run.finish()

    figures = new_connections(record, started)
    show(
        mistake,
        {
            **figures,
            "duplicate_synacks": report.duplicate_synacks,
            "duplicate_udp": metrics.udp_duplicates(record),
            "mistaken_slices_max": seen[bad]["max_slices"],
            "mistaken_problems": final["problems"],
            "mistaken_log": log_lines[bad],
            "good_problems": {i: s["problems"] for i, s in good_status.items()},
            "good_log": good_logs,
            "view_changes": [before, after],
        },
    )
    check = Checks()
    check_no_duplicates(check, record, report)
    check(not metrics.broken(record), "broken long-lived connections", metrics.broken(record))
    check_served(check, figures, "the good nodes")
    # It serves nothing, never says READY=1, and never entered the good nodes' view.
    check(
        seen[bad]["samples"] >= 2 and seen[bad]["max_slices"] == 0,
        "the mistaken node held slices",
        seen,
    )
    check(
        not seen[bad]["ready"] and not final["ready"] and final["slices"] == 0,
        "the mistaken node became ready or holds slices",
        final,
    )
    check(
        explained["slices"] == 0 and problems_with(final, *patterns),
        "the mistaken node stopped explaining itself",
        final["problems"],
    )
    shares = metrics.shares(record, since=started)
    check(set(shares) == {run.name(i) for i in good}, "answers not from the good nodes", shares)
    check(
        None not in before.values() and before == after, "good nodes changed view", (before, after)
    )
    for index, status in good_status.items():
        check(
            status["view_members"] == ["node0", "node1"],
            f"node{index}'s view",
            status["view_members"],
        )
        check(
            status["slices"] > 0 and problems_with(status, *theirs),
            f"node{index} does not name the mistaken node",
            status["problems"],
        )
    if spec.field is not None:
        for index in good:
            row = members_good[index].get(f"node{bad}", {})
            check(
                row.get("state") == "mismatch"
                and row.get("mismatch") == [spec.field]
                and row.get("slices") == 0,
                f"node{index}'s members row of node{bad}",
                row,
            )
            row = members_bad.get(f"node{index}", {})
            check(
                row.get("state") == "mismatch" and row.get("mismatch") == [spec.field],
                f"node{bad}'s members row of node{index}",
                row,
            )
    else:
        check(set(members_bad) == {"node2"}, "the mistaken node lists peers", members_bad)
        for index in good:
            check(
                f"node{bad}" not in members_good[index],
                f"node{index} lists node{bad}",
                members_good[index],
            )
    check_logged(check, log_lines, cluster)
    check.done()


# ---------------------------------------------------------- 6: a cloned node ID


@pytest.mark.parametrize("good", [2, 3], ids=["2_good", "3_good"])
def test_cloned_node_id(bed: Callable[..., Bed], tmp_path: Path, good: int) -> None:
    """node0's ID started again in another namespace. The clone (the newer process)
    hears the live original: it stops speaking and serves nothing until restarted,
    so the ID never has two votes. node0 drains while it hears the clone, then takes
    an incarnation above the clone's and serves again beside its silent clone."""
    clone = good  # the clone runs in the namespace after the good nodes
    others = list(range(1, good))
    with mistakes_run(bed, tmp_path, nodes=good + 1, good=good) as run:
        cluster = run.cluster
        started = time.monotonic()
        cluster.start(clone, node_id='"node0"')
        forever = "^" + re.escape(CLONE.format(address=run.addr(0))) + r".*until restarted"
        copy = wait_status(
            cluster,
            clone,
            lambda s: s["slices"] == 0 and problems_with(s, forever),
            "the clone to stand down for good and say why",
        )
        back: float | None = None
        stuck = ""
        try:  # asserted after the figures of the whole run are out
            cluster.wait_converged(
                list(range(good)),
                check=holds_slices(0),
                timeout=REJOIN_TIMEOUT,
                what="node0 to serve again beside its silent clone",
            )
            back = time.monotonic()
        except AssertionError as exc:
            stuck = str(exc)
        seen = sample(cluster, [0, *others, clone], SETTLE)
        log_lines = {
            0: error_lines(cluster, 0, [CLONE.format(address=run.addr(clone))]),
            clone: error_lines(cluster, clone, [CLONE.format(address=run.addr(0))]),
        }
        clone_row = members_of(cluster, clone)["node0"]
        final = status_of(cluster, clone)
        stopped = time.monotonic()
        assert cluster.terminate(clone) == 0, cluster.log(clone)
        time.sleep(SETTLE)
        record, report = run.finish()

    figures = new_connections(record, started)
    show(
        f"clone_{good}_good",
        {
            **figures,
            "duplicate_synacks": report.duplicate_synacks,
            "duplicate_udp": metrics.udp_duplicates(record),
            "node0_back_s": None if back is None else round(back - started, 2),
            "max_slices": {i: s["max_slices"] for i, s in seen.items()},
            "clone_problems": copy["problems"],
            "logs": log_lines,
            "failed_after_clone_left": new_connections(record, stopped),
        },
    )
    check = Checks()
    check_no_duplicates(check, record, report)
    check_served(check, figures, "the cluster while node0 was cloned")
    # Drained, not killed: node0's established connections live on; the clone had none.
    check(not metrics.broken(record), "broken long-lived connections", metrics.broken(record))
    check(
        seen[clone]["max_slices"] == 0 and final["slices"] == 0,
        "the clone held slices",
        seen[clone],
    )
    check(clone_row["state"] == "duplicate-id", "the clone's own members row", clone_row)
    check(metrics.shares(record, since=started)[run.name(clone)] == 0, "the clone answered")
    check_logged(check, log_lines, cluster)
    check(back is not None, f"node0 did not serve again within {REJOIN_TIMEOUT} s", stuck)
    if back is not None:
        check(
            metrics.shares(record, since=back + HANDOFF_GRACE)[run.name(0)] > 0,
            "no answers from node0 after it came back",
        )
        check(seen[0]["max_slices"] > 0, "node0 served nothing beside its silent clone", seen[0])
    check.done()


# ------------------------------------------------------ 7: key rotation, 3 steps


def keygen(path: Path, step: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "lbd.daemon.cli", "keygen", str(path), f"--{step}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert out.returncode == 0, out
    return out.stdout.strip()


def test_key_rotation_under_load(bed: Callable[..., Bed], tmp_path: Path) -> None:
    everyone = [0, 1, 2]
    with mistakes_run(bed, tmp_path, good=3) as run:
        cluster = run.cluster
        old = status_of(cluster, 0)["keys"]["seals"]
        before = {i: status_of(cluster, i)["counters"] for i in everyone}
        steps: dict[str, float] = {}

        def reload_all(step: str) -> None:
            steps[step] = time.monotonic()
            print(keygen(cluster.key, step))  # the shared key file of every node
            for index in everyone:
                cluster.signal(index, signal.SIGHUP)

        reload_all("add")
        added = {
            i: wait_status(
                cluster,
                i,
                lambda s: len(s["keys"]["accepts"]) == 2 and s["keys"]["seals"] == old,
                f"node{i} to accept the new key",
            )
            for i in everyone
        }
        new = next(fp for fp in added[0]["keys"]["accepts"] if fp != old)
        sample(cluster, everyone, 0.5)

        reload_all("promote")
        for index in everyone:
            wait_status(
                cluster,
                index,
                lambda s: s["keys"]["seals"] == new,
                f"node{index} to seal with the new key",
            )

        def rows_show_new() -> bool:
            for index in everyone:
                rows = cluster.query(index, "members")
                if not rows or {r["key"] for r in rows} != {new} or len(rows) != 3:
                    return False
            return True

        try:
            wait_for(rows_show_new, EXPLAIN_TIMEOUT, 0.1, "every members row to show the new key")
        except TimeoutError:
            raise AssertionError(
                f"not every row seals with {new}\n{diagnose(cluster, everyone)}"
            ) from None
        sample(cluster, everyone, 0.5)

        reload_all("retire")
        for index in everyone:
            wait_status(
                cluster,
                index,
                lambda s: s["keys"] == {"seals": new, "accepts": [new]},
                f"node{index} to drop the old key",
            )
        sample(cluster, everyone, SETTLE)
        after = {i: status_of(cluster, i)["counters"] for i in everyone}
        logs = {
            i: [x for x in cluster.log(i).splitlines() if "keys reloaded" in x] for i in everyone
        }
        converged = cluster.converged(everyone)
        record, report = run.finish()

    figures = new_connections(record, steps["add"])
    delta = {
        i: {
            k: after[i][k] - before[i][k]
            for k in ("view_changes", "forged", "replayed", "malformed")
        }
        for i in everyone
    }
    show(
        "key_rotation",
        {
            **figures,
            "duplicate_synacks": report.duplicate_synacks,
            "duplicate_udp": metrics.udp_duplicates(record),
            "counter_deltas": delta,
            "old": old,
            "new": new,
            "reload_log": logs,
        },
    )
    check = Checks()
    check_no_duplicates(check, record, report)
    check(not metrics.broken(record), "broken long-lived connections", metrics.broken(record))
    check(
        figures["attempts"] > 200 and figures["failed"] == 0,
        "failed new connections during the rotation",
        figures,
    )
    check(all(d["view_changes"] == 0 for d in delta.values()), "view changes", delta)
    check(all(d["forged"] == 0 for d in delta.values()), "datagrams failed authentication", delta)
    check(all(len(lines) == 3 for lines in logs.values()), "a reload not logged", logs)
    check(converged is not None, "not converged after the rotation")
    check.done()


# ------------------------------------------ 8: rolling change of a shared parameter


def test_rolling_bucket_change(bed: Callable[..., Bed], tmp_path: Path) -> None:
    """buckets 512 -> 1024, one node at a time; see the module doc for what happens."""
    new_buckets = 2 * BUCKETS
    disagrees = "disagrees on buckets: not admitted"

    def says(*peers: int) -> Callable[[dict[str, Any]], bool]:
        """A status check: serves nothing, names each of ``peers`` as disagreeing."""
        return lambda s: (
            s["slices"] == 0
            and problems_with(
                s, *(rf"^node node{i} at 192\.0\.2\.{11 + i} {disagrees}" for i in peers)
            )
        )

    with mistakes_run(bed, tmp_path, good=3) as run:
        cluster = run.cluster
        marks: dict[str, float] = {}
        seen: dict[str, dict[int, dict[str, Any]]] = {}
        problems: dict[str, dict[int, list[str]]] = {}

        # Step 1: node0 gets the new value; node1+node2 hold the quorum and serve.
        marks["step1"] = time.monotonic()
        cluster.restart(0, buckets=str(new_buckets))
        wait_status(cluster, 0, says(1, 2), "node0 (new) to fail closed and say why")
        cluster.wait_converged(
            [1, 2], timeout=CONVERGE_TIMEOUT, what="node1+node2 (old) to serve everything"
        )
        for index in (1, 2):
            wait_status(
                cluster,
                index,
                lambda s: problems_with(s, f"^node node0 .*{disagrees}"),
                f"node{index} to name node0",
            )
        marks["step1_served"] = time.monotonic()
        seen["step1"] = sample(cluster, [0, 1, 2], SETTLE)
        problems["step1"] = {i: status_of(cluster, i)["problems"] for i in range(3)}

        # Step 2: node1 too; the two new nodes fail closed, node2 serves everything.
        marks["step2"] = time.monotonic()
        cluster.restart(1, buckets=str(new_buckets))
        cluster.wait_converged(
            [2], timeout=CONVERGE_TIMEOUT, what="node2 (the last old one) to serve everything"
        )
        wait_status(cluster, 0, says(2), "node0 to name node2")
        wait_status(cluster, 1, says(2), "node1 (new) to fail closed and say why")
        marks["step2_served"] = time.monotonic()
        seen["step2"] = sample(cluster, [0, 1, 2], SETTLE)
        problems["step2"] = {i: status_of(cluster, i)["problems"] for i in range(3)}

        # Step 3: node2 too; one outage while the three form the cluster again.
        marks["step3"] = time.monotonic()
        cluster.buckets = new_buckets  # converged() compares against it
        cluster.restart(2, buckets=str(new_buckets))
        cluster.wait_converged(
            [0, 1, 2],
            timeout=CONVERGE_TIMEOUT,
            what="all three to converge on the new bucket count",
        )
        marks["formed"] = time.monotonic()
        time.sleep(SETTLE)
        final = {i: status_of(cluster, i) for i in range(3)}
        marks["end"] = time.monotonic()
        record, report = run.finish()

    windows = {
        "step1": new_connections(record, marks["step1"], marks["step1_served"]),
        "step1_served": new_connections(record, marks["step1_served"], marks["step2"]),
        "step2": new_connections(record, marks["step2"], marks["step2_served"]),
        "step2_served": new_connections(record, marks["step2_served"], marks["step3"]),
        "step3_outage": new_connections(record, marks["step3"], marks["formed"]),
        "after": new_connections(record, marks["formed"], marks["end"]),
    }
    shares = {
        "step1_served": dict(
            metrics.shares(record, marks["step1_served"] + HANDOFF_GRACE, marks["step2"])
        ),
        "step2_served": dict(
            metrics.shares(record, marks["step2_served"] + HANDOFF_GRACE, marks["step3"])
        ),
        "after": dict(metrics.shares(record, marks["formed"] + HANDOFF_GRACE)),
    }
    show(
        "rolling_buckets",
        {
            "windows": windows,
            "shares": shares,
            "duplicate_synacks": report.duplicate_synacks,
            "duplicate_udp": metrics.udp_duplicates(record),
            "problems": problems,
            "step_s": {k: round(v - marks["step1"], 2) for k, v in marks.items()},
        },
    )
    check = Checks()
    check_no_duplicates(check, record, report)
    # The side holding the quorum serves; the other side serves nothing.
    check(set(shares["step1_served"]) == {run.name(1), run.name(2)}, "step 1 answers", shares)
    check(seen["step1"][0]["max_slices"] == 0, "step 1: node0 (new) held slices", seen)
    check(set(shares["step2_served"]) == {run.name(2)}, "step 2 answers", shares)
    check(
        seen["step2"][0]["max_slices"] == 0 and seen["step2"][1]["max_slices"] == 0,
        "step 2: a new node held slices",
        seen,
    )
    for window in ("step1_served", "step2_served", "after"):
        check_served(check, windows[window], window)
    check(set(shares["after"]) == {run.name(i) for i in range(3)}, "answers at the end", shares)
    check(
        all(s["buckets"] == new_buckets and not s["problems"] for s in final.values()),
        "not converged on the new value",
        final,
    )
    # A node's own long-lived connections may end when it leaves (VIP removed), not before.
    for conn in metrics.broken(record):
        index = int(conn["node"][-1])
        check(conn["broken_at"] >= marks[f"step{index + 1}"], "a connection broke early", conn)
    check.done()
