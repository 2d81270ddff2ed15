"""Watched kernel state (S5): what lbd set up stays as lbd set it, or the node lets go.

Theory of operation
-------------------
The core believes the node holds its VIPs on an interface that is up, with the shared
MAC (shared mode) or with the cluster MAC on its filter and the ``lbd_mac`` rules
(multicast, flood),
with lbd's sysctls and nft tables. ``ip addr del``, ``ifdown``/``ifup`` (IPv6
addresses go with ``keep_addr_on_down=0``), a network manager, ``nft flush ruleset``
or a sysctl reset can change that under the daemon. :class:`KernelWatch` notices:
rtnetlink events (addresses, links, MACs) on a non-blocking socket read by the loop;
nf_tables events, only while a table of ours is not persistent (kernel < 6.9, see
netcfg/nft.py); an audit every ``AUDIT_PERIOD`` in a worker thread (addresses and link
by request, lbd's sysctls, the cluster-MAC group), also run at once when a full
socket lost events (ENOBUFS). Then:

* **The node cannot serve** (a VIP missing, the link down or gone, the wrong shared
  MAC): it drains at once under a drain reason of its own (``Service.drain_reasons``:
  ``lbd-cli undrain`` never ends it, it never ends an operator's drain), so its
  slices go to the peers through the safe handoff, never into a black hole; a missing
  VIP is put back over netlink in milliseconds (``netlink.add_vip``, off the loop: the
  VIP's established connections stall while it is gone), a MAC by the link helper
  child (``LinkProcess.apply``, ``RESTORE_TIMEOUT``; a Python start, which takes
  seconds on a loaded host); once the kernel is right the reason goes and the node
  takes slices back. A fault back ``FLAP_LIMIT`` times in ``FLAP_WINDOW`` holds the drain
  until ``FLAP_HOLD`` has passed without it.
* **Fixed in place**, on the loop within milliseconds: our tables deleted or changed by
  another process (written again), the cluster MAC gone from the interface's filter
  (added again), a new
  own MAC in multicast or flood mode (ND rules rewritten); sysctls by the link helper.
* **A fix that fails** drains the node, is a line in ``lbd-cli status`` and STATUS=,
  and is retried every ``RETRY_PERIOD``.
* **One journal entry per fault** with its MESSAGE_ID (VipRemoved, LinkDown,
  MacChanged, TablesChanged, SysctlChanged, ClusterMacLeft) saying what changed and
  what lbd does; then KernelStateRestored or KernelRestoreFailed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lbd.daemon.config import CLUSTER_MAC_MODES
from lbd.daemon.notify import ERR, NOTICE, WARNING
from lbd.netcfg import netlink as nl
from lbd.protocol.errors import LbdError

if TYPE_CHECKING:
    import socket

    from lbd.daemon.service import Service

AUDIT_PERIOD = 1.0
RESTORE_TIMEOUT = 5.0
RETRY_PERIOD = 5.0
FLAP_LIMIT, FLAP_WINDOW, FLAP_HOLD = 3, 60.0, 30.0
REASSERT_LIMIT = 20  # table re-writes per second before lbd stops fighting (and drains)
READ_BATCH = 64


@dataclass
class Fault:
    """One way the kernel differs from what lbd set, while it lasts."""

    kind: str  # the MESSAGE_IDS key of its journal entry
    text: str  # "VIP 192.0.2.100 missing on eth0"
    drain: bool  # the node cannot serve while it lasts
    fix: str | None  # "link" (the helper child), or None: nothing lbd can do
    since: float
    failed: str | None = None  # why the last fix failed (the node then drains)
    retry_at: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """The audit's view of the kernel (None where it could not be read)."""

    addresses: set[str] | None
    link: nl.LinkEvent | None  # new=False: the interface is gone
    sysctls: dict[str, tuple[str | None, str]]  # path: (value now, value lbd sets)
    group_joined: bool | None


def _reraise(task: asyncio.Task[None]) -> None:
    """A bug in the audit task goes to the loop's exception handler now (the service
    then stops, fail closed), not whenever the task is garbage-collected."""
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


class KernelWatch:
    """Watch and restore one daemon's kernel state; see the module doc."""

    def __init__(self, service: Service, clock: Callable[[], float] = time.monotonic) -> None:
        cfg = service.config
        self.svc = service
        self._clock = clock
        self.interface = cfg.interface
        self.index = service.ifindex
        self.vips = sorted({str(ipaddress.ip_address(v)) for v in cfg.vips})
        self.shared_mac = (
            None
            if cfg.mac_mode in CLUSTER_MAC_MODES
            else (cfg.effective_cluster_mac() or "").lower() or None
        )
        self.faults: dict[str, Fault] = {}
        self._history: dict[str, list[float]] = {}
        self._hold: dict[str, tuple[float, str]] = {}
        self._rtnl: socket.socket | None = None
        self._nftmon: socket.socket | None = None
        self._tables: set[tuple[str, str]] = set()
        self._ports: set[int] = set()
        self._pending: list[nl.NftEvent] = []
        self._reasserts: list[float] = []
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._audit_wanted = False

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._rtnl = nl.open_socket(
            nl.NETLINK_ROUTE, nl.RTMGRP_LINK | nl.RTMGRP_IPV4_IFADDR | nl.RTMGRP_IPV6_IFADDR
        )
        loop.add_reader(self._rtnl.fileno(), self._on_route)
        nft, mac = self.svc._nft, self.svc._macmode
        if nft is not None and not nft.persistent:
            self._tables.add(("inet", nft.spec.guard_table))
        if mac is not None and not mac.persistent:
            self._tables.update(mac.tables)
        self._ports = {p for p in (nft and nft.portid, mac and mac.portid) if p}
        if self._tables:
            self._nftmon = nl.open_socket(nl.NETLINK_NETFILTER, 1 << (nl.NFNLGRP_NFTABLES - 1))
            loop.add_reader(self._nftmon.fileno(), self._on_nft)
        self._audit_soon()

    async def stop(self) -> None:
        """Stop watching; waits for a running fix (bounded) so the link helper never
        runs apply and restore at once."""
        loop = asyncio.get_running_loop()
        for sock in (self._rtnl, self._nftmon):
            if sock is not None:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(sock.fileno())
                sock.close()
        self._rtnl = self._nftmon = None
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._task), RESTORE_TIMEOUT + 1)

    # ------------------------------------------------------------ events

    def _on_route(self) -> None:
        for data in self._drain(self._rtnl):
            for event in nl.parse_route(data):
                if isinstance(event, nl.AddrEvent):
                    self._on_address(event)
                elif event.index == self.index:
                    self._on_link(event)
        self._settle()

    def _drain(self, sock: socket.socket | None) -> list[bytes]:
        """Up to READ_BATCH queued datagrams (the loop calls again for more); an overflow
        (ENOBUFS: events lost) is an empty datagram in the list and asks for an audit."""
        out: list[bytes] = []
        while sock is not None and len(out) < READ_BATCH:
            try:
                out.append(sock.recv(nl.RECV_SIZE))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                out.append(b"")
                self._audit_soon()
        return out

    def _on_address(self, event: nl.AddrEvent) -> None:
        if event.index != self.index or event.address not in self.vips:
            return
        if event.new:
            self._clear(f"vip {event.address}")
        else:
            self._raise(
                f"vip {event.address}",
                "VipRemoved",
                f"VIP {event.address} missing on {self.interface}",
                drain=True,
                fix="link",
            )

    def _on_link(self, event: nl.LinkEvent) -> None:
        if not event.new:
            self._raise(
                "link",
                "LinkDown",
                f"{self.interface} was deleted (restart lbd once it is back)",
                drain=True,
                fix=None,
            )
        elif not event.up:
            self._raise("link", "LinkDown", f"{self.interface} is down", drain=True, fix=None)
        elif self._clear("link"):
            self._audit_soon()  # addresses may have gone with the link
        if not event.new or event.mac is None:
            return
        macmode = self.svc._macmode
        if self.shared_mac is not None and event.mac != self.shared_mac:
            self._raise(
                "mac",
                "MacChanged",
                f"{self.interface} has MAC {event.mac}, not the cluster MAC {self.shared_mac}",
                drain=True,
                fix="link",
            )
        elif self.shared_mac is not None:
            self._clear("mac")
        elif macmode is not None and macmode.spec is not None and event.mac != macmode.spec.own_mac:
            self._fix_now(
                "mac",
                "MacChanged",
                f"{self.interface} MAC changed to {event.mac}",
                "lbd_mac rules rewritten for it",
                "macmode",
            )

    def _on_nft(self) -> None:
        """Changes to our non-persistent tables by another process: write them again."""
        lost = False
        for data in self._drain(self._nftmon):
            lost = lost or not data
            for event in nl.parse_nft(data):
                if isinstance(event, nl.NftEvent):
                    if (event.family, event.table) in self._tables:
                        self._pending.append(event)
                    continue
                # The end of a transaction: was it ours? (By netlink port; by process
                # ID only if our ports are unknown, which a PID namespace would break.)
                foreign = (
                    [e for e in self._pending if e.portid not in self._ports]
                    if self._ports
                    else []
                    if event.pid == os.getpid()
                    else self._pending
                )
                self._pending = []
                if foreign:
                    self._reassert(foreign, f"{event.process} (pid {event.pid})")
        if lost:
            self._reassert([], "an unknown process (nft events were lost)")
        self._settle()

    def _reassert(self, events: list[nl.NftEvent], who: str) -> None:
        now = self._clock()
        self._reasserts = [t for t in self._reasserts if now - t < 1.0] + [now]
        what = ", ".join(sorted({f"{e.what.lower()} in {e.family} {e.table}" for e in events}))
        what = f"{what or 'changes to lbd tables'} by {who}"
        if len(self._reasserts) > REASSERT_LIMIT:
            self._raise(
                "tables", "TablesChanged", f"{what}, over and over", drain=True, fix="tables"
            )
            self._failed(self.faults["tables"], "not fighting: retrying later")
        else:
            self._fix_now("tables", "TablesChanged", what, "tables written again", "tables")

    # ------------------------------------------------------------ fixes on the loop

    def _run_fix(self, name: str) -> str | None:
        """Fix "tables" or "macmode" now, on the loop (a millisecond or two): the nft
        contexts are the loop's. The error text, or None."""
        nft, macmode = self.svc._nft, self.svc._macmode
        try:
            if name == "tables":
                if nft is not None and ("inet", nft.spec.guard_table) in self._tables:
                    nft.reassert_guard()
                if macmode is not None and set(macmode.tables) & self._tables:
                    macmode.reassert()
            elif name == "macmode" and macmode is not None:
                macmode.repair()
        except (LbdError, OSError) as exc:
            return str(exc)
        return None

    def _fix_now(self, key: str, kind: str, what: str, action: str, name: str) -> None:
        """A fault fixed at once, one journal entry; it drains only if the fix fails."""
        start = time.perf_counter()
        error = self._run_fix(name)
        if error is None:
            self.svc.sink.emit(
                WARNING,
                f"{what}: {action} in {(time.perf_counter() - start) * 1000:.1f} ms",
                kind,
                {"KERNEL_FAULT": key},
            )
        elif key not in self.faults:
            self._raise(key, kind, what, drain=True, fix=name)
            self._failed(self.faults[key], error)

    # ------------------------------------------------------------ faults

    def _raise(self, key: str, kind: str, text: str, *, drain: bool, fix: str | None) -> None:
        if key in self.faults:
            return
        now = self._clock()
        self.faults[key] = Fault(kind, text, drain, fix, now)
        self._history[key] = [t for t in self._history.get(key, []) if now - t < FLAP_WINDOW]
        self._history[key].append(now)
        does = "draining (its slices go to the peers through the handoff)" if drain else ""
        if fix == "link":
            does += "; putting it back" if drain else "putting it back"
        elif fix is None:
            does += " until it is fixed"
        self.svc.sink.emit(
            ERR if drain else WARNING, f"{text}: {does}", kind, {"KERNEL_FAULT": key}
        )
        if fix == "link":
            self._audit_soon()

    def _clear(self, key: str) -> bool:
        fault = self.faults.pop(key, None)
        if fault is None:
            return False
        now = self._clock()
        if fault.drain and len(self._history.get(key, [])) >= FLAP_LIMIT:
            self._hold[key] = (now + FLAP_HOLD, fault.text)
            self._arm(FLAP_HOLD)
        self._settle()
        state = (
            "; still draining (" + ", ".join(sorted(self.svc.drain_reasons)) + ")"
            if self.svc.core.draining
            else "; taking new connections"
            if fault.drain
            else ""
        )
        self.svc.sink.emit(
            NOTICE,
            f"{fault.text}: fixed after {(now - fault.since) * 1000:.0f} ms{state}",
            "KernelStateRestored",
            {"KERNEL_FAULT": key},
        )
        return True

    def _failed(self, fault: Fault, error: str) -> None:
        """A fix failed: drain, retry every RETRY_PERIOD; logged once per fault."""
        if fault.failed is None:
            self.svc.sink.emit(
                ERR,
                f"{fault.text}: cannot fix it: {error}; draining, "
                f"retrying every {RETRY_PERIOD:.0f} s",
                "KernelRestoreFailed",
            )
        fault.failed, fault.retry_at = error, self._clock() + RETRY_PERIOD

    def _settle(self) -> None:
        """Drain reasons and status lines from the faults (and flap holds) now."""
        now = self._clock()
        self._hold = {k: v for k, v in self._hold.items() if v[0] > now}
        reasons, problems = {}, {}
        for key, f in self.faults.items():
            state = (
                f"; cannot fix it: {f.failed}" if f.failed else "; being put back" if f.fix else ""
            )
            problems[f"kernel: {key}"] = f"{f.text}{state}" + ("; draining" if f.drain else "")
            if f.drain or f.failed:
                reasons[f"kernel: {key}"] = f.text
        for key, (until, text) in self._hold.items():
            if key not in self.faults:
                n = len(self._history.get(key, []))
                problems[f"kernel: {key}"] = (
                    f"{text} {n} times in {FLAP_WINDOW:.0f} s: draining {until - now:.0f} s more"
                )
                reasons[f"kernel: {key}"] = text
        svc = self.svc
        for reason in [r for r in svc.drain_reasons if r.startswith("kernel: ")]:
            if reason not in reasons:
                svc.set_draining(False, "kernel state restored", reason=reason, log=False)
        for reason, text in reasons.items():
            if reason not in svc.drain_reasons:
                svc.set_draining(True, text, reason=reason, log=False)
        old = {k: v for k, v in svc.shell_problems.items() if k.startswith("kernel: ")}
        if old != problems:
            for key in old:
                del svc.shell_problems[key]
            svc.shell_problems.update(problems)
            svc._process()  # the STATUS line

    # ------------------------------------------------------------ audit and slow fixes

    def _arm(self, delay: float) -> None:
        if self._rtnl is None:
            return  # stopped
        when = asyncio.get_running_loop().time() + delay
        if self._timer is None or self._timer.when() > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(when, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._audit_soon()
        self._settle()  # a flap hold may be over

    def _audit_soon(self) -> None:
        self._audit_wanted = True
        if self._task is None and self._rtnl is not None:
            self._task = asyncio.get_running_loop().create_task(self._work())
            self._task.add_done_callback(_reraise)

    async def _work(self) -> None:
        """Audits, and the fixes that are due, one at a time (never two helpers)."""
        try:
            while self._audit_wanted and self._rtnl is not None:
                self._audit_wanted = False
                now = self._clock()
                due = {k: f for k, f in self.faults.items() if f.fix and f.retry_at <= now}
                for key, fault in due.items():
                    if fault.fix != "link":  # on the loop, a millisecond or two
                        error = self._run_fix(fault.fix or "")
                        if error is None:
                            self._clear(key)
                        else:
                            self._failed(fault, error)
                error = await self._put_vips_back([k for k in due if k.startswith("vip ")])
                rest = [k for k, f in due.items() if f.fix == "link" and not k.startswith("vip ")]
                if (rest or error) and self.svc._link is not None:
                    try:
                        await asyncio.to_thread(self.svc._link.apply, RESTORE_TIMEOUT)
                        error = None
                    except LbdError as exc:
                        error = str(exc)
                snap = await asyncio.to_thread(self._snapshot)
                if self._rtnl is None:
                    return  # stopped meanwhile
                self._check(snap)
                for key, fault in due.items():
                    if fault.fix == "link" and self.faults.get(key) is fault:
                        self._failed(fault, error or "it is still not as lbd set it")
                self._settle()
        finally:
            self._task = None
            self._arm(
                min(
                    [AUDIT_PERIOD]
                    + [
                        max(0.05, f.retry_at - self._clock())
                        for f in self.faults.values()
                        if f.failed
                    ]
                )
            )

    async def _put_vips_back(self, keys: list[str]) -> str | None:
        """Re-add missing VIPs ("vip ADDRESS" faults) over netlink in milliseconds: the
        helper child (a Python start, seconds on a loaded host) would leave the VIP's
        established connections stalled that long. The error text, or None."""
        link = self.svc._link
        for key in keys:
            if link is None:
                return "no link helper"
            try:
                await asyncio.to_thread(link.add_vip, self.index, key.split(" ", 1)[1])
            except (LbdError, OSError, ValueError) as exc:
                return str(exc)
        return None

    def _snapshot(self) -> Snapshot:
        """The kernel now (worker thread: blocking netlink requests and /proc reads)."""
        try:
            addresses: set[str] | None = nl.dump_addresses(self.index)
        except (nl.NetlinkError, OSError):
            addresses = None
        try:
            link = nl.get_link(self.index) or nl.LinkEvent(False, self.index, 0, None, None)
        except (nl.NetlinkError, OSError):
            link = None
        sysctls = self.svc._link.sysctls_now() if self.svc._link is not None else {}
        macmode = self.svc._macmode
        try:
            joined = macmode.joined() if macmode is not None else None
        except LbdError:
            joined = None
        return Snapshot(addresses, link, sysctls, joined)

    def _check(self, snap: Snapshot) -> None:
        """Raise or clear faults from an audit (on the loop)."""
        if snap.link is not None:
            self._on_link(snap.link)
        if snap.addresses is not None:
            for vip in self.vips:
                self._on_address(nl.AddrEvent(vip in snap.addresses, self.index, vip, 0))
        for key, (value, want) in snap.sysctls.items():
            name = key.replace("/", ".")
            if value is not None and value != want:
                self._raise(
                    f"sysctl {name}",
                    "SysctlChanged",
                    f"sysctl {name} is {value}, lbd sets {want}",
                    drain=False,
                    fix="link",
                )
            else:
                self._clear(f"sysctl {name}")
        macmode = self.svc._macmode
        if snap.group_joined is False and macmode is not None:
            self._fix_now(
                "group",
                "ClusterMacLeft",
                f"{self.interface}'s filter lost the cluster MAC {macmode.cluster_mac}",
                "added again",
                "macmode",
            )
