"""Unit tests of the kernel watch: netlink packing/parsing, and the restore policy.

The parsers get datagrams built here byte by byte (the layouts of rtnetlink.h,
if_addr.h, if_link.h, nfnetlink.h and nf_tables.h), every truncation of them, and
random bytes: they return what is complete and never raise. The policy runs against
a stand-in for the service (the real ``Service.set_draining`` and ``problems``),
with no sockets: drain reasons, status lines, journal kinds, the flap hold and the
table re-writes it asks for.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbd.daemon import kernelwatch as kw
from lbd.daemon.service import Service
from lbd.netcfg import netlink as nl
from lbd.protocol.errors import LbdError

VIP4, VIP6, INDEX = "192.0.2.100", "2001:db8:1::100", 3


def attr(atype: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, atype) + value + b"\0" * (-length % 4)


def message(mtype: int, body: bytes, portid: int = 0, flags: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, 7, portid) + body


def addr_msg(new: bool, family: int, address: str, index: int = INDEX) -> bytes:
    packed = socket.inet_pton(family, address)
    body = struct.pack("=BBBBI", family, 32 if family == socket.AF_INET else 128, 0, 0, index)
    if family == socket.AF_INET:  # IPv4: IFA_ADDRESS is the peer, IFA_LOCAL the address
        body += attr(nl.IFA_ADDRESS, socket.inet_pton(family, "192.0.2.1")) + attr(
            nl.IFA_LOCAL, packed
        )
    else:
        body += attr(nl.IFA_ADDRESS, packed)
    return message(nl.RTM_NEWADDR if new else nl.RTM_DELADDR, body)


def link_msg(
    new: bool, flags: int, mac: bytes = bytes.fromhex("02005e000164"), index: int = INDEX
) -> bytes:
    body = struct.pack("=BBHiII", 0, 0, 1, index, flags, 0)
    body += attr(nl.IFLA_IFNAME, b"eth0\0") + attr(nl.IFLA_ADDRESS, mac)
    return message(nl.RTM_NEWLINK if new else nl.RTM_DELLINK, body)


def nft_msg(kind: int, table: str, family: int = 1, portid: int = 4242) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + attr(1, table.encode() + b"\0")
    return message((nl.NFNL_SUBSYS_NFTABLES << 8) | kind, body, portid)


def gen_msg(pid: int, name: str) -> bytes:
    body = struct.pack("=BBH", 0, 0, 0) + attr(1, struct.pack("!I", 99))
    body += attr(nl.NFTA_GEN_PROC_PID, struct.pack("!I", pid))
    body += attr(nl.NFTA_GEN_PROC_NAME, name.encode() + b"\0")
    return message((nl.NFNL_SUBSYS_NFTABLES << 8) | nl.NFT_MSG_NEWGEN, body)


UP = nl.IFF_UP | nl.IFF_LOWER_UP | 0x40


# ---------------------------------------------------------------- parsing


def test_address_and_link_events() -> None:
    data = (
        addr_msg(False, socket.AF_INET, VIP4)
        + addr_msg(True, socket.AF_INET6, VIP6)
        + link_msg(True, UP)
        + link_msg(True, nl.IFF_UP)
        + link_msg(False, 0)
        + message(24, b"\0" * 12)
    )  # RTM_NEWROUTE: skipped
    events = nl.parse_route(data)
    assert events[:2] == [
        nl.AddrEvent(False, INDEX, VIP4, 32),
        nl.AddrEvent(True, INDEX, VIP6, 128),
    ]
    up, no_carrier, deleted = events[2:]
    assert isinstance(up, nl.LinkEvent) and up.up and up.name == "eth0"
    assert up.mac == "02:00:5e:00:01:64"
    assert isinstance(no_carrier, nl.LinkEvent) and not no_carrier.up and no_carrier.new
    assert isinstance(deleted, nl.LinkEvent) and not deleted.new
    assert len(events) == 5


def test_nft_events_name_table_family_port_and_the_committing_process() -> None:
    data = (
        nft_msg(2, "lbd_guard")
        + nft_msg(8, "lbd_mac", family=3, portid=9)
        + nft_msg(nl.NFT_MSG_NEWGEN, "")
        + gen_msg(1415, "nft")
        + message((11 << 8) | 0, b"\0" * 8)
    )  # another nfnetlink subsystem: skipped
    events = nl.parse_nft(data)
    assert events[0] == nl.NftEvent("DELTABLE", "inet", "lbd_guard", 4242)
    assert events[1] == nl.NftEvent("DELRULE", "arp", "lbd_mac", 9)
    assert events[-1] == nl.NftGeneration(1415, "nft")


@pytest.mark.parametrize("parse", [nl.parse_route, nl.parse_nft])
def test_every_truncation_parses_what_is_complete(parse: Any) -> None:
    data = (
        addr_msg(False, socket.AF_INET, VIP4)
        + link_msg(True, UP)
        + nft_msg(2, "lbd_guard")
        + gen_msg(1, "nft")
    )
    whole = parse(data)
    for cut in range(len(data)):
        part = parse(data[:cut])
        assert part == whole[: len(part)]


@given(st.binary(max_size=600))
def test_garbage_never_raises(data: bytes) -> None:
    nl.parse_route(data)
    nl.parse_nft(data)
    nl.attributes(data)


def test_attributes_keep_the_first_of_a_type_and_mask_flags() -> None:
    data = attr(1, b"a") + attr(1, b"b") + attr(2 | 0x8000, b"nested")
    assert nl.attributes(data) == {1: b"a", 2: b"nested"}


def test_table_batch_layout() -> None:
    flags = nl.NFT_TABLE_F_OWNER | nl.NFT_TABLE_F_PERSIST
    parts = [
        nl.table_message(nl.NFT_MSG_DELTABLE, "inet", "lbd_guard", seq=11),
        nl.table_message(nl.NFT_MSG_NEWTABLE, "inet", "lbd_guard", flags, seq=12),
    ]
    batch = nl.table_batch(parts, 10)
    msgs = list(nl.messages(batch))
    assert [m[0] for m in msgs] == [
        nl.NFNL_MSG_BATCH_BEGIN,
        (10 << 8) | 2,
        (10 << 8) | 0,
        nl.NFNL_MSG_BATCH_END,
    ]
    assert msgs[0][3] == struct.pack("=BBH", 0, 0, socket.htons(10))  # res_id: nf_tables
    new = msgs[2]
    assert new[1] == nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_CREATE
    assert new[3][0] == nl.NFPROTO["inet"]
    assert nl.attributes(new[3], 4) == {1: b"lbd_guard\0", 2: struct.pack("!I", 6)}
    assert msgs[1][1] == nl.NLM_F_REQUEST | nl.NLM_F_ACK


def test_exchange_reads_one_answer_per_message_without_touching_blocking() -> None:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, kernel:
        acks = message(nl.NLMSG_ERROR, struct.pack("=i", 0)) + message(
            nl.NLMSG_ERROR, struct.pack("=i", -95)
        )
        kernel.send(acks)
        assert nl.exchange(ours, b"request", 2) == [0, 95]
        assert kernel.recv(100) == b"request"
        assert ours.getblocking()
        with pytest.raises(nl.NetlinkError, match="no answer"):
            nl.exchange(ours, b"again", 1, timeout=0.05)


# ---------------------------------------------------------------- policy


@dataclass
class FakeCore:
    draining: bool = False

    def set_draining(self, draining: bool, now: float) -> None:
        self.draining = draining

    def problems(self, now: float) -> list[str]:
        return []


@dataclass
class FakeConfig:
    interface: str = "eth0"
    vips: tuple[str, ...] = (VIP4, VIP6)
    mac_mode: str = "shared"
    cluster_mac: str | None = None

    def effective_cluster_mac(self) -> str | None:
        return self.cluster_mac


@dataclass
class FakeNft:
    persistent: bool = False
    portid: int = 777
    reasserts: int = 0

    class spec:  # stands in for RulesetSpec
        guard_table = "lbd_guard"

    def reassert_guard(self) -> None:
        self.reasserts += 1


@dataclass
class FakeSink:
    entries: list[tuple[int, str, str | None]] = field(default_factory=list)

    def emit(
        self, priority: int, message: str, kind: str | None = None, fields: Any = None
    ) -> None:
        self.entries.append((priority, message, kind))

    def kinds(self) -> list[str | None]:
        return [e[2] for e in self.entries]


@dataclass
class FakeService:
    """What KernelWatch uses of a Service; draining and problems are Service's own code."""

    config: FakeConfig = field(default_factory=FakeConfig)
    ifindex: int = INDEX
    core: FakeCore = field(default_factory=FakeCore)
    sink: FakeSink = field(default_factory=FakeSink)
    drain_reasons: set[str] = field(default_factory=set)
    shell_problems: dict[str, str] = field(default_factory=dict)
    _nft: FakeNft = field(default_factory=FakeNft)
    _macmode: None = None
    _link: None = None
    healthlink: None = None
    processed: int = 0

    set_draining = Service.set_draining
    problems = Service.problems

    def _process(self) -> None:
        self.processed += 1


def watch(clock: Any = None, **config: Any) -> tuple[kw.KernelWatch, Any]:
    svc: Any = FakeService(FakeConfig(**config))
    return kw.KernelWatch(svc, *([clock] if clock else [])), svc


def test_a_removed_vip_drains_until_it_is_back_and_never_undoes_the_operator() -> None:
    w, svc = watch()
    w._on_address(nl.AddrEvent(False, INDEX, VIP4, 32))
    w._on_address(nl.AddrEvent(False, INDEX + 1, VIP6, 128))  # another interface
    w._on_address(nl.AddrEvent(False, INDEX, "192.0.2.11", 24))  # not a VIP
    w._settle()
    assert svc.core.draining and svc.drain_reasons == {f"kernel: vip {VIP4}"}
    assert svc.problems(0.0) == [f"VIP {VIP4} missing on eth0; being put back; draining"]
    assert svc.sink.kinds() == ["VipRemoved"]
    assert "draining (its slices go to the peers" in svc.sink.entries[0][1]
    svc.set_draining(False, "lbd-cli")  # an operator's undrain: the fault still holds
    assert svc.core.draining
    svc.set_draining(True, "lbd-cli")  # ... and the operator's own drain
    w._on_address(nl.AddrEvent(True, INDEX, VIP4, 32))
    assert svc.core.draining and svc.drain_reasons == {"operator"}
    assert svc.problems(0.0) == [] and svc.sink.kinds()[-1] == "KernelStateRestored"
    assert "still draining (operator)" in svc.sink.entries[-1][1]
    svc.set_draining(False, "lbd-cli")
    assert not svc.core.draining


def test_link_down_drains_and_up_clears() -> None:
    w, svc = watch()
    w._on_link(nl.LinkEvent(True, INDEX, nl.IFF_UP, "eth0", None))  # no carrier
    w._settle()
    assert svc.core.draining and svc.problems(0.0) == ["eth0 is down; draining"]
    w._on_link(nl.LinkEvent(True, INDEX, UP, "eth0", None))
    assert not svc.core.draining and svc.sink.kinds() == ["LinkDown", "KernelStateRestored"]
    assert "taking new connections" in svc.sink.entries[-1][1]


def test_shared_mac_changed_drains_until_set_back() -> None:
    w, svc = watch(cluster_mac="02:00:5E:00:01:64")
    w._on_link(nl.LinkEvent(True, INDEX, UP, "eth0", "02:00:5e:00:01:99"))
    w._settle()
    assert svc.core.draining and svc.sink.kinds() == ["MacChanged"]
    assert "not the cluster MAC 02:00:5e:00:01:64" in svc.problems(0.0)[0]
    w._on_link(nl.LinkEvent(True, INDEX, UP, "eth0", "02:00:5e:00:01:64"))
    assert not svc.core.draining and svc.problems(0.0) == []


def test_a_fault_that_keeps_coming_back_holds_the_drain() -> None:
    now = [1000.0]
    w, svc = watch(clock=lambda: now[0])
    for _ in range(kw.FLAP_LIMIT):
        w._on_address(nl.AddrEvent(False, INDEX, VIP4, 32))
        w._settle()
        now[0] += 1.0
        w._on_address(nl.AddrEvent(True, INDEX, VIP4, 32))
    assert svc.core.draining  # the third time: held
    assert f"{kw.FLAP_LIMIT} times in 60 s" in svc.problems(now[0])[0]
    now[0] += kw.FLAP_HOLD + 0.1
    w._settle()
    assert not svc.core.draining and svc.problems(now[0]) == []


def test_foreign_changes_to_our_tables_are_written_again_our_own_are_not() -> None:
    w, svc = watch()
    w._tables, w._ports = {("inet", "lbd_guard")}, {777}
    ours = nft_msg(8, "lbd_guard", portid=777) + gen_msg(12, "python3")
    others = nft_msg(0, "filter", portid=31) + gen_msg(31, "nft")  # not ours: ignored
    w._nftmon = FakeSocket([ours, others])
    w._on_nft()
    assert svc._nft.reasserts == 0 and svc.sink.entries == []
    flush = nft_msg(8, "lbd_guard", portid=31) + nft_msg(2, "lbd_guard", portid=31)
    w._nftmon = FakeSocket([flush, gen_msg(31, "nft")])
    w._on_nft()
    assert svc._nft.reasserts == 1
    assert svc.sink.kinds() == ["TablesChanged"]
    assert (
        "delrule in inet lbd_guard, deltable in inet lbd_guard by nft (pid 31): tables "
        "written again in" in svc.sink.entries[0][1]
    )
    assert not svc.core.draining


def test_table_rewrites_stop_and_drain_when_someone_fights_back() -> None:
    w, svc = watch()
    w._tables, w._ports = {("inet", "lbd_guard")}, {777}
    for _ in range(kw.REASSERT_LIMIT + 1):
        w._nftmon = FakeSocket([nft_msg(2, "lbd_guard", portid=5) + gen_msg(5, "fw")])
        w._on_nft()
    assert svc._nft.reasserts == kw.REASSERT_LIMIT
    assert svc.core.draining and svc.sink.kinds()[-2:] == ["TablesChanged", "KernelRestoreFailed"]


class FakeSocket(socket.socket):
    """recv() hands out the given datagrams, then would block."""

    def __init__(self, datagrams: list[bytes]) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.datagrams = list(datagrams)

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not self.datagrams:
            raise BlockingIOError
        return self.datagrams.pop(0)


class FakeLink:
    """LinkProcess.apply that fails ``failures`` times, then 'puts the VIP back'."""

    def __init__(self, failures: int, present: set[str]) -> None:
        self.failures, self.present, self.calls = failures, present, 0

    def add_vip(self, index: int, address: str) -> bool:
        """The quick path fails here: the helper's apply is what these tests watch."""
        raise LbdError(f"cannot add {address} to interface {index} (test)")

    def apply(self, timeout: float) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise LbdError("link helper (apply) did not finish within 5 s")
        self.present.add(VIP4)

    def sysctls_now(self) -> dict[str, tuple[str | None, str]]:
        return {}


async def settled(w: kw.KernelWatch) -> None:
    """Until the watch's audit task (and any it chains) is done."""
    while w._task is not None:
        await w._task


def test_a_vip_that_cannot_be_put_back_keeps_the_node_drained_and_is_retried() -> None:
    now = [50.0]
    present = {VIP6}
    w, svc = watch(clock=lambda: now[0])
    svc._link = FakeLink(1, present)
    up = nl.LinkEvent(True, INDEX, UP, "eth0", None)
    w._snapshot = lambda: kw.Snapshot(set(present), up, {}, None)  # type: ignore[method-assign]

    async def scenario() -> None:
        w._rtnl = FakeSocket([])  # "started": audits run as tasks
        w._on_address(nl.AddrEvent(False, INDEX, VIP4, 32))
        w._settle()
        await settled(w)
        assert svc.core.draining and svc._link.calls == 1
        assert "cannot fix it: link helper (apply) did not finish" in svc.problems(now[0])[0]
        assert svc.sink.kinds() == ["VipRemoved", "KernelRestoreFailed"]
        w._audit_soon()  # an audit before the retry is due: no second helper run
        await settled(w)
        assert svc._link.calls == 1 and svc.core.draining
        now[0] += kw.RETRY_PERIOD
        w._audit_soon()
        await settled(w)
        assert svc._link.calls == 2 and not svc.core.draining and svc.problems(now[0]) == []
        assert svc.sink.kinds()[-1] == "KernelStateRestored"
        w._rtnl = None
        if w._timer is not None:
            w._timer.cancel()

    asyncio.run(scenario())
