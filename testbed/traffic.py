"""Traffic helpers of the test bed: echo servers on the nodes, probes from the client.

Mixed into :class:`lbd.testbed.bed.Bed`; the programs themselves are echo_server.py
(runs in each node namespace) and client_probe.py (runs in the client namespace, or
any namespace for ICMP).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from lbd.testbed.nsutil import BedError, wait_for

ECHO_SERVER = "lbd.testbed.echo_server"  # python -m
CLIENT_PROBE = "lbd.testbed.client_probe"
TCP_PORT = 80
UDP_PORT = 53

if TYPE_CHECKING:
    from lbd.testbed.bed import NodeNs


def sources4(count: int, start: int = 1) -> list[str]:
    """Client source addresses 198.51.100.<start>.. (AnyIP on the client's lo)."""
    if start < 0 or count < 0 or start + count > 256:
        raise ValueError(f"198.51.100.0/24 holds 256 sources, asked {start}+{count}")
    return [f"198.51.100.{start + i}" for i in range(count)]


def sources6(count: int, start: int = 1) -> list[str]:
    """Client source addresses 2001:db8:2::<start>.. (AnyIP on the client's lo)."""
    base = int(ipaddress.IPv6Address("2001:db8:2::"))
    return [str(ipaddress.IPv6Address(base + start + i)) for i in range(count)]


class TrafficMixin:
    """Echo servers and probes; needs the Bed attributes declared below."""

    if TYPE_CHECKING:
        vip4: str
        vip6: str
        client: str
        nodes: list[NodeNs]

        def node(self, which: int | str | NodeNs) -> NodeNs: ...
        def output(self, proc: subprocess.Popen[Any]) -> str: ...
        def python(self, ns: str, *args: str, **kw: Any) -> subprocess.Popen[Any]: ...
        def run(
            self, ns: str, *argv: str, check: bool = True, timeout: float = 10.0
        ) -> subprocess.CompletedProcess[str]: ...

    def start_echo(
        self,
        nodes: Iterable[int | str | NodeNs] | None = None,
        addrs: Sequence[str] | None = None,
        tcp_port: int = TCP_PORT,
        udp_port: int = UDP_PORT,
        timeout: float = 5.0,
    ) -> list[subprocess.Popen[Any]]:
        """Start lbd.testbed.echo_server on nodes (default all); wait until ready.

        By default each server binds both VIPs and the node's own two addresses.
        """
        chosen = [self.node(n) for n in nodes] if nodes is not None else list(self.nodes)
        procs = []
        for node in chosen:
            bind = (
                list(addrs) if addrs is not None else [self.vip4, self.vip6, node.addr4, node.addr6]
            )
            args = ["-m", ECHO_SERVER, "--name", node.name, "--tcp-port", str(tcp_port)]
            args += ["--udp-port", str(udp_port)]
            for addr in bind:
                args += ["--addr", addr]
            procs.append(self.python(node.name, *args))
        for proc in procs:

            def ready(p: subprocess.Popen[Any] = proc) -> bool:
                return "READY" in self.output(p) or p.poll() is not None

            wait_for(ready, timeout, what="echo server to start")
            if proc.poll() is not None:
                raise BedError(f"echo server died: {self.output(proc)}")
        return procs

    def _probe(self, ns: str, args: list[str], timeout: float) -> Any:
        out = self.run(ns, sys.executable, "-m", CLIENT_PROBE, *args, timeout=timeout)
        return json.loads(out.stdout)

    def probe(
        self,
        sources: Sequence[str] | int,
        proto: str = "tcp",
        *,
        dst4: str | None = None,
        dst6: str | None = None,
        port: int | None = None,
        timeout: float = 1.0,
        parallel: int = 128,
        ns: str | None = None,
    ) -> dict[str, str | None]:
        """From the client, one TCP connection / UDP query / ICMP echo per source.

        ``sources`` is a list of addresses or a count of 198.51.100.x sources. The
        destination is the VIP of the source's family unless given. Returns
        {source: name of the answering node (TCP/UDP) or "ok" (ICMP), or None}.
        """
        srcs = sources4(sources) if isinstance(sources, int) else list(sources)
        args = self._probe_args(
            srcs, proto=proto, dst4=dst4, dst6=dst6, port=port, timeout=timeout, parallel=parallel
        )
        budget = 10.0 + timeout * (len(srcs) / max(1, parallel) + 2)
        result: dict[str, str | None] = self._probe(ns or self.client, args, budget)
        return result

    def probe_udp_all(
        self,
        sources: Sequence[str] | int,
        *,
        dst4: str | None = None,
        dst6: str | None = None,
        port: int = UDP_PORT,
        window: float = 0.5,
        parallel: int = 128,
    ) -> dict[str, list[str]]:
        """Like :meth:`probe` over UDP, but collect EVERY reply within ``window``.

        Shows how many nodes answered each source (S1: exactly one).
        """
        srcs = sources4(sources) if isinstance(sources, int) else list(sources)
        args = self._probe_args(
            srcs, proto="udp", dst4=dst4, dst6=dst6, port=port, timeout=window, parallel=parallel
        )
        budget = 10.0 + window * (len(srcs) / max(1, parallel) + 2)
        result: dict[str, list[str]] = self._probe(self.client, [*args, "--all"], budget)
        return result

    def _probe_args(
        self,
        srcs: list[str],
        *,
        proto: str,
        dst4: str | None,
        dst6: str | None,
        port: int | None,
        timeout: float,
        parallel: int,
    ) -> list[str]:
        if port is None:
            port = UDP_PORT if proto == "udp" else TCP_PORT
        return [
            "--proto", proto,
            "--dst4", dst4 or self.vip4,
            "--dst6", dst6 or self.vip6,
            "--port", str(port),
            "--timeout", str(timeout),
            "--parallel", str(parallel),
            "--sources", ",".join(srcs),
        ]  # fmt: skip

    def ping(self, ns: str, dst: str, src: str | None = None, timeout: float = 1.0) -> bool:
        """One ICMP echo from ``ns`` to ``dst`` (optionally from ``src``); True if answered.

        (iputils ping is not installed here; client_probe.py speaks ICMP itself.)
        """
        args = ["--proto", "icmp", "--timeout", str(timeout), "--sources", src or ""]
        args += ["--dst4", dst, "--dst6", dst]
        result = self._probe(ns, args, 10.0 + timeout)
        return next(iter(result.values())) is not None
