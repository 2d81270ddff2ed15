"""Host and link setup for one lbd node: VIPs, optional shared MAC, sysctls; and undo.

Theory of operation
-------------------
``LinkSetup.apply()`` makes the interface fit for load sharing on a shared segment:

* VIPs. IPv4 as /32 by default; a shorter prefix is allowed only when a primary
  address of that subnet is already on the interface, so the VIP is always a secondary
  (the node's own address stays primary: deleting a primary deletes its secondaries,
  and the primary is the source of ARP and outgoing traffic). IPv6 with IFA_F_NODAD
  (every node holds it: DAD would fail) and preferred_lft 0 ("deprecated"), so the
  kernel never picks the VIP as a source address yet accepts traffic for it.
* Sysctls. ``send_redirects=0`` (all and IF): every node sees frames meant for its
  peers and must not redirect. ``arp_ignore=1``: answer ARP only for addresses on the
  asking interface. ``arp_announce=2``: ARP requests carry the node's own address, not
  the VIP. ``nf_conntrack_tcp_loose=0``: a new slice owner must not pick up mid-stream
  flows of another node (NOTES). With a shared MAC, IPv6 ``addr_gen_mode=1`` and
  ``accept_dad=0``: identical MACs make identical link-local addresses and failing DAD.
* Forwarding is never touched (lbd never enables it). With forwarding on, a node would
  forward the frames for its peers' own addresses that the hub delivers to it; apply()
  logs a warning in that case and leaves the value alone.
* Shared MAC (only when ``cluster_mac`` is given). Set live when the driver allows it
  (veth, virtio and most NICs do). Otherwise the link goes DOWN for a moment: IPv6
  addresses are kept by setting keep_addr_on_down for that moment, and the routes
  through the interface, which the kernel deletes on admin-down, are re-added.
  Traffic on the interface stops for that moment, so only ask for it at start-up.

Every previous value is recorded before anything changes (write-ahead, to the JSON
``state_file`` when given) and ``restore()`` puts back exactly those, for exactly the
things it set, unless someone changed them since (then they are left alone and logged).
``apply()`` is idempotent and converges over the leftovers of a crashed run: a recorded
original value is kept (so a restarted daemon restores the value from before lbd, not
its own), a VIP already on the interface is adopted (never an error; removed on restore
only if lbd added it), and recorded items no longer wanted are restored first.
``restore()`` with nothing recorded is a no-op. If ``apply()`` raises (LinkError), what
it changed so far is on record: call ``restore()``.

This runs inside the daemon's namespace: sysctls are files under /proc/sys, which
follow the namespace of the calling process; netlink work goes through pyroute2.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from lbd.netcfg.statefile import RecordError, load_record, save_record
from lbd.protocol.errors import LbdError

log = logging.getLogger("lbd.netcfg.link")

STATE_VERSION = 1
INFINITY_LFT = 0xFFFFFFFF
IFA_F_SECONDARY = 0x01
RTPROT_KERNEL = 2
RT_TABLE_LOCAL = 255
# Route attributes copied when re-adding routes after a link bounce (MAC change).
ROUTE_FIELDS = {
    "RTA_DST": "dst",
    "RTA_GATEWAY": "gateway",
    "RTA_PRIORITY": "priority",
    "RTA_PREFSRC": "prefsrc",
    "RTA_TABLE": "table",
}


class LinkError(LbdError):
    """The link could not be set up or restored; the message names the interface."""


@dataclass(frozen=True)
class Vip:
    """One virtual address and the prefix length it is configured with."""

    address: str
    prefixlen: int

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version

    @property
    def key(self) -> str:
        return f"{self.address}/{self.prefixlen}"

    @classmethod
    def parse(cls, text: str) -> Vip:
        """'192.0.2.100' (/32), '192.0.2.100/24', '2001:db8::1' (/128) or with a prefix."""
        try:
            iface = ipaddress.ip_interface(text)
        except ValueError as exc:
            raise LinkError(f"bad VIP {text!r}: {exc}") from None
        return cls(str(iface.ip), iface.network.prefixlen)


class LinkSetup:
    """Apply and undo the host/link settings of one lbd node on one interface."""

    def __init__(
        self,
        interface: str,
        vips: Sequence[str],
        *,
        cluster_mac: str | None = None,
        state_file: str | Path | None = None,
        ipv6_shared_mac: bool | None = None,
        tcp_loose_off: bool = True,
        live_mac_change: bool = True,
        proc_sys: str | Path = "/proc/sys",
    ) -> None:
        """``ipv6_shared_mac`` (default: whether ``cluster_mac`` is given) sets the IPv6
        sysctls a shared MAC needs, for a MAC set by someone else. ``live_mac_change=False``
        forces the link-down path (tests)."""
        self.interface = interface
        self.vips = [Vip.parse(v) for v in vips]
        self.cluster_mac = cluster_mac.lower() if cluster_mac else None
        self.state_file = Path(state_file) if state_file is not None else None
        self.ipv6_shared_mac = (
            ipv6_shared_mac if ipv6_shared_mac is not None else cluster_mac is not None
        )
        self.tcp_loose_off = tcp_loose_off
        self.live_mac_change = live_mac_change
        self.proc_sys = Path(proc_sys)
        self._state: dict[str, Any] | None = None

    # ----------------------------------------------------------------- public

    def apply(self) -> None:
        """Record previous values, then set VIPs, MAC and sysctls. Idempotent."""
        with IPRoute() as ipr:
            index = self._index(ipr)
            for vip in self.vips:  # refuse a bad VIP before changing anything
                self._check_vip(vip, self._addresses(ipr, index))
            state = self._load()
            self._drop_unwanted(ipr, state)
            wanted = self._wanted_sysctls()
            for key in wanted:
                if key not in state["sysctls"]:
                    old = self._read(key)
                    if old is None:
                        log.warning("sysctl %s does not exist here; not set", key)
                        continue
                    state["sysctls"][key] = {"old": old, "set": wanted[key]}
            if self.cluster_mac and state["mac"] is None:
                state["mac"] = {"interface": self.interface, "old": self._mac(ipr, index)}
            if self.cluster_mac:
                state["mac"]["set"] = self.cluster_mac  # the configured MAC may have changed
            present = self._addresses(ipr, index)
            for vip in self.vips:
                if vip.key not in state["addresses"]:
                    state["addresses"][vip.key] = {
                        "interface": self.interface,
                        "added": vip.address not in present,
                    }
            self._save(state)  # write-ahead: a crash from here on is restorable

            for key, entry in state["sysctls"].items():
                self._write(key, entry["set"])
            if self.cluster_mac:
                self._set_mac(ipr, index, self.interface, self.cluster_mac)
            for vip in self.vips:
                if vip.address in present:
                    log.info("%s: VIP %s already present, adopted", self.interface, vip.key)
                else:
                    self._add_vip(ipr, index, vip, present)
            self._warn_forwarding()

    def restore(self) -> None:
        """Put back what apply() changed, as it was before lbd; no-op if nothing is recorded."""
        state = self._load()
        if not (state["sysctls"] or state["addresses"] or state["mac"]):
            self._forget()
            return
        failures: list[str] = []
        with IPRoute() as ipr:
            for key in list(state["addresses"]):
                self._restore_address(ipr, state, key, failures)
            if state["mac"] is not None:
                self._restore_mac(ipr, state, failures)
        for key in reversed(list(state["sysctls"])):
            self._restore_sysctl(state, key, failures)
        if failures:
            self._save(state)  # what is left stays recorded for the next attempt
            raise LinkError(f"{self.interface}: restore incomplete: {'; '.join(failures)}")
        self._forget()

    def __enter__(self) -> LinkSetup:
        """``with LinkSetup(...):`` applies, and restores on exit (also if apply fails)."""
        try:
            self.apply()
        except BaseException:
            self.restore()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    @property
    def recorded(self) -> dict[str, Any]:
        """The record of previous values (a copy), as persisted in the state file."""
        copy: dict[str, Any] = json.loads(json.dumps(self._load()))
        return copy

    # ------------------------------------------------------------------ state

    def _empty(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "sysctls": {}, "addresses": {}, "mac": None}

    def _load(self) -> dict[str, Any]:
        if self._state is not None:
            return self._state
        state = self._empty()
        if self.state_file is not None:
            try:
                loaded = load_record(self.state_file, STATE_VERSION)
            except RecordError as exc:
                raise LinkError(f"{self.interface}: {exc}") from None
            if loaded is not None:
                state.update({k: loaded[k] for k in ("sysctls", "addresses", "mac") if k in loaded})
        self._state = state
        return state

    def _save(self, state: dict[str, Any]) -> None:
        self._state = state
        if self.state_file is None:
            return
        try:
            # Key order is the restore order (reversed): save_record keeps it.
            save_record(self.state_file, state)
        except OSError as exc:
            raise LinkError(f"{self.interface}: cannot write {self.state_file}: {exc}") from None

    def _forget(self) -> None:
        self._state = None
        if self.state_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()

    def _drop_unwanted(self, ipr: IPRoute, state: dict[str, Any]) -> None:
        """Restore recorded items this configuration no longer wants (config changed)."""
        failures: list[str] = []
        wanted_addrs = {v.key for v in self.vips}
        for key, entry in list(state["addresses"].items()):
            if key not in wanted_addrs or entry["interface"] != self.interface:
                self._restore_address(ipr, state, key, failures)
        mac = state["mac"]
        if mac is not None and (mac["interface"] != self.interface or not self.cluster_mac):
            self._restore_mac(ipr, state, failures)
        wanted = self._wanted_sysctls()
        for key in list(state["sysctls"]):
            if key not in wanted:
                self._restore_sysctl(state, key, failures)
            else:
                state["sysctls"][key]["set"] = wanted[key]
        if failures:
            self._save(state)
            raise LinkError(f"{self.interface}: cannot undo earlier settings: {failures}")

    # ---------------------------------------------------------------- sysctls

    def _wanted_sysctls(self) -> dict[str, str]:
        ifc = self.interface
        wanted = {
            "net/ipv4/conf/all/send_redirects": "0",
            f"net/ipv4/conf/{ifc}/send_redirects": "0",
            f"net/ipv4/conf/{ifc}/arp_ignore": "1",
            f"net/ipv4/conf/{ifc}/arp_announce": "2",
        }
        if self.tcp_loose_off:
            wanted["net/netfilter/nf_conntrack_tcp_loose"] = "0"
        if self.ipv6_shared_mac:
            wanted[f"net/ipv6/conf/{ifc}/addr_gen_mode"] = "1"
            wanted[f"net/ipv6/conf/{ifc}/accept_dad"] = "0"
        return wanted

    def _read(self, key: str) -> str | None:
        try:
            return (self.proc_sys / key).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LinkError(f"{self.interface}: cannot read sysctl {key}: {exc}") from None

    def _write(self, key: str, value: str) -> None:
        if self._read(key) == value:
            return  # rewriting some sysctls (addr_gen_mode) has side effects
        try:
            (self.proc_sys / key).write_text(value + "\n")
        except OSError as exc:
            raise LinkError(f"{self.interface}: cannot set {key}={value}: {exc}") from None

    def _restore_sysctl(self, state: dict[str, Any], key: str, failures: list[str]) -> None:
        entry = state["sysctls"][key]
        current = self._read(key)
        if current is None:
            log.info("sysctl %s is gone (interface removed?); nothing to restore", key)
        elif current != entry["set"]:
            log.warning("sysctl %s changed by someone else to %s; left alone", key, current)
        else:
            try:
                self._write(key, entry["old"])
            except LinkError as exc:
                failures.append(str(exc))
                return
        del state["sysctls"][key]

    def _warn_forwarding(self) -> None:
        for key in ("net/ipv4/conf/all/forwarding", "net/ipv6/conf/all/forwarding"):
            if self._read(key) == "1":
                log.warning(
                    "%s=1: this node will forward packets meant for its peers that reach "
                    "it through the shared MAC; lbd leaves forwarding as it is",
                    key,
                )

    # -------------------------------------------------------------- addresses

    def _index(self, ipr: IPRoute) -> int:
        found = ipr.link_lookup(ifname=self.interface)
        if not found:
            raise LinkError(f"interface {self.interface!r} does not exist")
        return int(found[0])

    # Netlink attributes are read with get_attr(): pyroute2 0.7.2 (Debian 12)
    # answers get("IFA_ADDRESS") with None, only 0.9 also looks up attributes there.
    def _addresses(self, ipr: IPRoute, index: int) -> dict[str, tuple[int, int]]:
        """{address: (prefixlen, flags)} on the interface."""
        out = {}
        for msg in ipr.get_addr(index=index):
            flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
            out[msg.get_attr("IFA_ADDRESS")] = (int(msg["prefixlen"]), int(flags))
        return out

    def _add_vip(
        self, ipr: IPRoute, index: int, vip: Vip, present: dict[str, tuple[int, int]]
    ) -> None:
        self._check_vip(vip, present)
        kwargs: dict[str, Any] = {
            "index": index,
            "address": vip.address,
            "prefixlen": vip.prefixlen,
        }
        if vip.version == 6:
            # Both spellings of the lifetimes: pyroute2 0.9 reads preferred_lft and
            # valid_lft, while 0.7.2 (Debian 12) drops them and takes its
            # IFA_CACHEINFO from cacheinfo={"preferred", "valid"} only (else the
            # address is added preferred for ever). Checked on both versions.
            kwargs.update(
                flags=IFA_F_NODAD,
                preferred_lft=0,
                valid_lft=INFINITY_LFT,
                cacheinfo={"preferred": 0, "valid": INFINITY_LFT},
            )
        try:
            ipr.addr("add", **kwargs)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # added meanwhile: already there is fine
                raise LinkError(f"{self.interface}: cannot add VIP {vip.key}: {exc}") from None

    def _check_vip(self, vip: Vip, present: dict[str, tuple[int, int]]) -> None:
        """A v4 VIP with a prefix must land as a secondary of the node's own address."""
        if (
            vip.version == 4
            and vip.prefixlen < 32
            and vip.address not in present
            and not self._has_primary_in(vip, present)
        ):
            raise LinkError(
                f"{self.interface}: VIP {vip.key} would become the primary address of "
                f"its subnet; configure the node's own address in it first, or use /32"
            )

    @staticmethod
    def _has_primary_in(vip: Vip, present: dict[str, tuple[int, int]]) -> bool:
        net = ipaddress.ip_interface(vip.key).network
        for addr, (plen, flags) in present.items():
            if ipaddress.ip_address(addr).version != 4 or flags & IFA_F_SECONDARY:
                continue
            if plen == vip.prefixlen and ipaddress.ip_interface(f"{addr}/{plen}").network == net:
                return True
        return False

    def _restore_address(
        self, ipr: IPRoute, state: dict[str, Any], key: str, failures: list[str]
    ) -> None:
        entry = state["addresses"][key]
        if entry["added"]:
            address, plen = key.split("/")
            found = ipr.link_lookup(ifname=entry["interface"])
            if found:
                try:
                    ipr.addr("del", index=found[0], address=address, prefixlen=int(plen))
                except NetlinkError as exc:
                    if exc.code != errno.EADDRNOTAVAIL:  # already gone is fine
                        failures.append(f"cannot remove {key} from {entry['interface']}: {exc}")
                        return
        del state["addresses"][key]

    # -------------------------------------------------------------------- MAC

    def _mac(self, ipr: IPRoute, index: int) -> str:
        return str(ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")).lower()

    def _set_mac(self, ipr: IPRoute, index: int, ifname: str, mac: str) -> None:
        if self._mac(ipr, index) == mac:
            return
        if self.live_mac_change:
            try:
                ipr.link("set", index=index, address=mac)
                return
            except NetlinkError as exc:
                if exc.code != errno.EBUSY:  # EBUSY: this driver wants the link down
                    raise LinkError(f"{ifname}: cannot set MAC {mac}: {exc}") from None
        log.warning("%s: setting MAC %s with the link down for a moment", ifname, mac)
        with self._link_bounce(ipr, index, ifname):
            ipr.link("set", index=index, address=mac)

    @contextlib.contextmanager
    def _link_bounce(self, ipr: IPRoute, index: int, ifname: str) -> Iterator[None]:
        """Take the link down and up again, keeping IPv6 addresses and the routes."""
        routes = self._own_routes(ipr, index)
        keep_key = f"net/ipv6/conf/{ifname}/keep_addr_on_down"
        keep_old = self._read(keep_key)
        was_up = bool(ipr.get_links(index)[0]["flags"] & 1)  # IFF_UP
        try:
            if keep_old is not None:
                self._write(keep_key, "1")
            ipr.link("set", index=index, state="down")
            yield
        except NetlinkError as exc:
            raise LinkError(f"{ifname}: cannot change MAC: {exc}") from None
        finally:
            if was_up:
                ipr.link("set", index=index, state="up")
            if keep_old is not None:
                self._write(keep_key, keep_old)
            for route in routes:
                try:
                    ipr.route("replace", **route)
                except NetlinkError as exc:
                    log.error("%s: could not re-add route %s: %s", ifname, route, exc)

    @staticmethod
    def _own_routes(ipr: IPRoute, index: int) -> list[dict[str, Any]]:
        """Routes through the interface that the kernel would not re-create itself."""
        routes = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_routes(family=family, oif=index):
                table = msg.get_attr("RTA_TABLE") or msg["table"]
                if msg["proto"] == RTPROT_KERNEL or table == RT_TABLE_LOCAL:
                    continue
                if msg.get_attr("RTA_MULTIPATH"):
                    continue  # multipath routes do not depend on this link alone
                route: dict[str, Any] = {
                    "family": family,
                    "dst_len": msg["dst_len"],
                    "oif": index,
                    "proto": msg["proto"],
                    "scope": msg["scope"],
                    "type": msg["type"],
                }
                for attr, name in ROUTE_FIELDS.items():
                    if msg.get_attr(attr) is not None:
                        route[name] = msg.get_attr(attr)
                routes.append(route)
        return routes

    def _restore_mac(self, ipr: IPRoute, state: dict[str, Any], failures: list[str]) -> None:
        entry = state["mac"]
        found = ipr.link_lookup(ifname=entry["interface"])
        if found:
            current = self._mac(ipr, found[0])
            if current != entry["set"]:
                log.warning(
                    "%s: MAC changed by someone else to %s; left alone", entry["interface"], current
                )
            else:
                try:
                    self._set_mac(ipr, found[0], entry["interface"], entry["old"])
                except (LinkError, NetlinkError) as exc:
                    failures.append(f"cannot restore MAC of {entry['interface']}: {exc}")
                    return
        state["mac"] = None
