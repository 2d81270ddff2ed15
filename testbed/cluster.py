"""A running lbd cluster in a Bed, for the e2e suite, ``lbd lab`` and the failover bench.

``LbdCluster(bed, workdir, profile="fast")`` writes one key and a config per node, starts
real daemons (``python -m lbd.daemon.cli run``) in the node namespaces, asks them through
``lbd-cli --json`` whether they agree (``wait_converged``: bounded), and injects faults:

    crash (SIGKILL)   hang / resume (SIGSTOP / SIGCONT)   terminate (SIGTERM, graceful)
    link_down / link_up (host death)   partition(i, "both"|"out"|"in") / heal(i)
    loss(percent) on every node's heartbeat port   restart(i)

Faults on heartbeats are nft rules in a table of our own (``FAULT_TABLE``) inside the
node namespace, matching the cluster's UDP port. Processes are signalled by PID only.

``ClientLoad`` runs lbd.testbed.load in the client namespace (≥ 64 sources, new TCP
connections and UDP queries every few ms, one long-lived connection per node);
``Capture`` runs tcpdump --immediate-mode in the client namespace and counts duplicate
answers with lbd.testbed.pcap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lbd.daemon.config import write_key
from lbd.protocol.config import PROFILES
from lbd.testbed.bed import TCP_PORT, UDP_PORT, Bed, BedError, sources4, wait_for
from lbd.testbed.nsutil import TIME_SCALE
from lbd.testbed.pcap import DuplicateReport, count_duplicates, read_pcap

HEARTBEAT_PORT = 7946
FAULT_TABLE = "lbdfault"
CONVERGE_TIMEOUT = 20.0
LOAD_SOURCES = 64
STICKY_FIRST = 101  # long-lived connection candidates: 198.51.100.101..


class LbdCluster:
    """Configs, daemons, lbd-cli queries and fault injection for one bed."""

    def __init__(
        self, bed: Bed, workdir: Path, *, profile: str = "fast", buckets: int = 512
    ) -> None:
        self.bed = bed
        self.workdir = workdir
        self.profile = profile
        self.buckets = buckets
        workdir.mkdir(parents=True, exist_ok=True)
        self.key = workdir / "cluster.key"
        if not self.key.exists():
            write_key(self.key)
        self.procs: dict[int, subprocess.Popen[Any]] = {}
        self.node_profiles: dict[int, str] = {}
        """Timer profile per node index, when ``start(profile=...)`` chose one."""

    # ------------------------------------------------------------ daemons

    def node_id(self, index: int) -> str:
        return f"node{index}"

    def sock(self, index: int) -> Path:
        return self.workdir / f"n{index}.sock"

    def config(self, index: int, **extra: str) -> Path:
        """Write node ``index``'s config: config keys ``extra`` override the defaults; the
        timer profile is the one ``start(index, profile=...)`` chose, else the cluster's."""
        node = self.bed.nodes[index]
        lines = {
            "cluster": '"lbd-lab"',
            "interface": f'"{self.bed.lan_iface}"',
            "vips": f'["{self.bed.vip4}"]',
            "key_file": f'"{self.key}"',
            "node_id": f'"{self.node_id(index)}"',
            "buckets": str(self.buckets),
            "port": str(HEARTBEAT_PORT),
            "control_socket": f'"{self.sock(index)}"',
            "state_dir": f'"{self.workdir / node.name}"',
            **extra,
        }
        path = self.workdir / f"{node.name}.toml"
        text = "".join(f"{k} = {v}\n" for k, v in lines.items())
        profile = self.node_profiles.get(index, self.profile)
        timers = f'\n[timers]\nprofile = "{profile}"\n'
        if TIME_SCALE > 1:
            # An emulated guest stalls for hundreds of ms under load: stretch every
            # timer by half the time scale, or the stalls read as deaths (all in seconds).
            stretched = {k: v * TIME_SCALE / 2 for k, v in asdict(PROFILES[profile]).items()}
            timers += "".join(f"{k} = {v:.3f}\n" for k, v in stretched.items())
        path.write_text(text + timers)
        return path

    def start(
        self,
        index: int,
        *,
        env: dict[str, str] | None = None,
        profile: str | None = None,
        **extra: str,
    ) -> subprocess.Popen[Any]:
        """Daemon ``index`` with config keys ``extra``; ``env`` is added to its environment;
        ``profile``: its own timer profile (default: the cluster's)."""
        if index in self.procs and self.procs[index].poll() is None:
            raise BedError(f"daemon {index} is already running")
        kw: dict[str, Any] = {}
        if env is not None:
            kw["env"] = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        # Kept per node (not a config() argument: subclasses override config()).
        self.node_profiles[index] = profile or self.profile
        proc = self.bed.python(
            self.bed.nodes[index].name,
            "-m",
            "lbd.daemon.cli",
            "run",
            "--config",
            str(self.config(index, **extra)),
            **kw,
        )
        self.procs[index] = proc
        return proc

    def start_all(self, indexes: list[int] | None = None) -> None:
        for index in indexes if indexes is not None else range(len(self.bed.nodes)):
            self.start(index)

    def running(self) -> list[int]:
        return sorted(i for i, p in self.procs.items() if p.poll() is None)

    def log(self, index: int) -> str:
        return self.bed.output(self.procs[index]) if index in self.procs else ""

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGCONT (a hung one cannot leave otherwise) then SIGTERM every daemon; bounded."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout * TIME_SCALE
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    # ------------------------------------------------------------ lbd-cli

    def cli(self, index: int, *args: str, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lbd.daemon.ctl", "--socket", str(self.sock(index)), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout * TIME_SCALE,
        )

    def query(self, index: int, cmd: str, *args: str) -> Any:
        """lbd-cli --json CMD: the parsed answer, or None if the daemon did not answer."""
        try:
            out = self.cli(index, "--json", cmd, *args)
        except subprocess.TimeoutExpired:
            return None
        return json.loads(out.stdout) if out.returncode in (0, 4) and out.stdout else None

    def converged(self, indexes: list[int]) -> dict[str, int] | None:
        """{node_id: slices} if every listed daemon agrees on one view of exactly them."""
        views = set()
        slices: dict[str, int] | None = None
        for index in indexes:
            status = self.query(index, "status")
            rows = self.query(index, "members")
            if not status or not rows or not status["converged"] or not status["quorum"]:
                return None
            views.add(status["view"])
            live = {r["node_id"]: r["slices"] for r in rows if r["state"] in ("active", "draining")}
            if slices is None:
                slices = live
            elif live != slices:
                return None
        if len(views) != 1 or slices is None or sum(slices.values()) != self.buckets:
            return None
        if set(slices) != {self.node_id(i) for i in indexes}:
            return None
        return slices

    def wait_converged(
        self,
        indexes: list[int] | None = None,
        check: Callable[[dict[str, int]], bool] = lambda s: True,
        timeout: float = CONVERGE_TIMEOUT,
        what: str = "",
    ) -> dict[str, int]:
        """Wait until ``indexes`` (default: the running daemons) agree and ``check`` holds."""
        chosen = self.running() if indexes is None else indexes

        def ok() -> dict[str, int] | None:
            slices = self.converged(chosen)
            return slices if slices is not None and check(slices) else None

        try:
            found = wait_for(ok, timeout, 0.1, what or f"{chosen} to converge")
        except TimeoutError:
            states = {i: self.cli(i, "members").stdout for i in chosen}
            logs = {i: self.log(i)[-2000:] for i in chosen}
            raise AssertionError(f"{what or 'convergence'}: {states}\n{logs}") from None
        assert found is not None
        return found

    def view_changes(self, index: int) -> int | None:
        status = self.query(index, "status")
        return None if status is None else int(status["counters"]["view_changes"])

    # ------------------------------------------------------------ faults

    def signal(self, index: int, sig: int) -> None:
        proc = self.procs[index]
        if proc.poll() is None:
            proc.send_signal(sig)

    def crash(self, index: int) -> float:
        """SIGKILL the daemon (it never spawns children); returns the fault time."""
        when = time.monotonic()
        self.signal(index, signal.SIGKILL)
        self.procs[index].wait(timeout=5 * TIME_SCALE)
        return when

    def hang(self, index: int) -> float:
        when = time.monotonic()
        self.signal(index, signal.SIGSTOP)
        return when

    def resume(self, index: int) -> None:
        self.signal(index, signal.SIGCONT)

    def terminate(self, index: int, timeout: float = 15.0) -> int:
        """SIGTERM (graceful leave) and wait for the exit code."""
        self.signal(index, signal.SIGTERM)
        return self.procs[index].wait(timeout=timeout * TIME_SCALE)

    def restart(
        self, index: int, *, profile: str | None = None, **extra: str
    ) -> subprocess.Popen[Any]:
        """SIGTERM, wait, start again (with ``profile`` and config keys ``extra``)."""
        if self.procs[index].poll() is None:
            self.terminate(index)
        keys: dict[str, Any] = dict(extra)  # config keys, never ``env``
        return self.start(index, profile=profile, **keys)

    def link_down(self, index: int) -> float:
        when = time.monotonic()
        self.bed.link_down(index)
        return when

    def link_up(self, index: int) -> None:
        self.bed.link_up(index)

    def _nft(self, index: int, script: str) -> None:
        self.bed.run(self.bed.nodes[index].name, "nft", "-f", "-", input=script)

    def partition(self, index: int, direction: str = "both") -> float:
        """Drop node ``index``'s heartbeats: "out" (peers stop hearing it), "in", or both."""
        if direction not in ("both", "out", "in"):
            raise ValueError(f"direction must be both, out or in, not {direction!r}")
        rules = []
        if direction in ("both", "in"):
            rules.append(
                f"chain in {{\n type filter hook input priority -300\n"
                f" udp dport {HEARTBEAT_PORT} drop\n}}"
            )
        if direction in ("both", "out"):
            rules.append(
                f"chain out {{\n type filter hook output priority -300\n"
                f" udp dport {HEARTBEAT_PORT} drop\n}}"
            )
        when = time.monotonic()
        self._nft(index, f"table inet {FAULT_TABLE} {{\n" + "\n".join(rules) + "\n}\n")
        return when

    def loss(self, percent: int, indexes: list[int] | None = None) -> None:
        """Drop ``percent`` % of received heartbeats at random on the given nodes."""
        for index in indexes if indexes is not None else range(len(self.bed.nodes)):
            self._nft(
                index,
                f"table inet {FAULT_TABLE} {{\nchain in {{\n type filter hook "
                f"input priority -300\n udp dport {HEARTBEAT_PORT} numgen random "
                f"mod 100 < {percent} drop\n}}\n}}\n",
            )

    def heal(self, index: int) -> None:
        self.bed.run(
            self.bed.nodes[index].name, "nft", "delete", "table", "inet", FAULT_TABLE, check=False
        )


@dataclass
class Run:
    """A cluster under client load with a capture: what the fault suites drive."""

    bed: Bed
    cluster: LbdCluster
    load: ClientLoad | None = None
    capture: Capture | None = None

    def name(self, index: int) -> str:
        return self.bed.nodes[index].name

    def addr(self, index: int) -> str:
        return self.bed.nodes[index].addr4

    def close(self) -> None:
        """Stop whatever still runs (load, capture, daemons), also after a failure."""
        for part in (self.load, self.capture):
            if part is not None:
                part.stop()
        self.cluster.stop_all()

    def finish(self) -> tuple[dict[str, Any], DuplicateReport]:
        """Stop the load and the capture: the load's record and the duplicates seen."""
        assert self.load is not None and self.capture is not None
        record = self.load.stop()
        report = self.capture.stop()
        self.load = self.capture = None
        return record, report


def holds_slices(index: int) -> Callable[[dict[str, int]], bool]:
    """A ``wait_converged`` check: node ``index`` holds at least one slice."""
    return lambda slices: slices.get(f"node{index}", 0) > 0


class ClientLoad:
    """lbd.testbed.load in the client namespace; ``stop()`` returns its record."""

    def __init__(
        self,
        bed: Bed,
        workdir: Path,
        *,
        sources: int = LOAD_SOURCES,
        interval: float = 0.004,
        long_lived: int | None = None,
    ) -> None:
        self.bed = bed
        self.out = workdir / f"load-{time.monotonic_ns()}.json"
        self.sources = sources4(sources)
        sticky = sources4(60, STICKY_FIRST)
        self.proc = bed.python(
            bed.client,
            "-m",
            "lbd.testbed.load",
            "--vip",
            bed.vip4,
            "--tcp-port",
            str(TCP_PORT),
            "--udp-port",
            str(UDP_PORT),
            "--sources",
            ",".join(self.sources),
            "--sticky",
            ",".join(sticky),
            "--nodes",
            str(long_lived if long_lived is not None else len(bed.nodes)),
            "--interval",
            str(interval),
            "--out",
            str(self.out),
        )
        wait_for(
            lambda: "READY" in bed.output(self.proc) or self.proc.poll() is not None,
            15.0,
            0.05,
            "client load to start",
        )
        if self.proc.poll() is not None:
            raise BedError(f"client load died: {bed.output(self.proc)}")
        line = next(x for x in bed.output(self.proc).splitlines() if x.startswith("READY"))
        self.long_lived: list[dict[str, Any]] = json.loads(line.split(" ", 1)[1])

    def progress(self) -> list[dict[str, Any]]:
        """Progress lines so far (each: answers per node in the last 0.25 s, failures...)."""
        return [
            json.loads(x[2:]) for x in self.bed.output(self.proc).splitlines() if x.startswith("P ")
        ]

    def stop(self) -> dict[str, Any]:
        self.bed.stop(self.proc, signal.SIGTERM)
        if not self.out.exists():
            raise BedError(f"client load wrote no record: {self.bed.output(self.proc)[-2000:]}")
        record: dict[str, Any] = json.loads(self.out.read_text())
        return record


class Capture:
    """tcpdump --immediate-mode on the client's eth0; ``stop()`` counts duplicates."""

    def __init__(self, bed: Bed, workdir: Path) -> None:
        self.bed = bed
        self.path = workdir / f"client-{time.monotonic_ns()}.pcap"
        self.proc = bed.popen(
            bed.client,
            "tcpdump",
            "-i",
            "eth0",
            "--immediate-mode",
            "-U",
            "-n",
            "-s",
            "128",
            "-w",
            str(self.path),
            "host",
            bed.vip4,
        )
        wait_for(
            lambda: "listening on" in bed.output(self.proc) or self.proc.poll() is not None,
            10.0,
            0.05,
            "tcpdump to start",
        )
        if self.proc.poll() is not None:
            raise BedError(f"tcpdump died: {bed.output(self.proc)}")

    def stop(self) -> DuplicateReport:
        self.bed.stop(self.proc, signal.SIGTERM)
        return count_duplicates(read_pcap(self.path), {self.bed.vip4}, TCP_PORT, UDP_PORT)
