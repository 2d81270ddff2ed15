"""Unit tests of the nft rule builder and of NftDataplane's transactions (fake context).

The kernel behaviour is tested in tests/netns/test_nft*.py; here: what text is sent,
in how many transactions, and the argument checks.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from lbd.netcfg import nft as nft_mod
from lbd.netcfg.nft import NftDataplane, NftError
from lbd.netcfg.ruleset import (
    Balance,
    RulesetSpec,
    claim_rules,
    element_commands,
    guard_commands,
    lease_commands,
    nft_time_literal,
    owner_table_commands,
    owner_vip_rules,
)
from lbd.protocol.errors import LbdError

VIPS = ["192.0.2.100", "2001:db8:1::100"]


def spec(**kw: Any) -> RulesetSpec:
    return RulesetSpec.build(kw.pop("vips", VIPS), **{"buckets": 4096, "seed": 0x1BD, **kw})


def test_balance_parse() -> None:
    assert Balance.parse("all") == Balance()
    b = Balance.parse(["tcp/80", "tcp/443", "udp/53", "tcp/8000-8010"])
    assert b == Balance(True, ("80", "443", "8000-8010"), True, ("53",), False)
    assert Balance.parse(["tcp", "tcp/80"]).tcp_ports is None
    assert Balance.parse(["icmp"]) == Balance(False, (), False, (), True)
    for bad in (["sctp"], ["tcp/0"], ["tcp/90-80"], ["udp/x"], [], ["icmp/3"]):
        with pytest.raises(ValueError):
            Balance.parse(bad)


def test_spec_validation() -> None:
    s = spec()
    assert (s.vips4, s.vips6) == (("192.0.2.100",), ("2001:db8:1::100",))
    assert s.families == ("ipv4", "ipv6")
    kw: dict[str, Any]
    for kw in (
        {"vips": []},
        {"vips": ["nonsense"]},
        {"buckets": 0},
        {"seed": -1},
        {"prefix4": 33},
        {"mark": 0},
        {"mark": 0x1, "mark_mask": 0xFFFF0000},
        {"owner_priority": -170, "guard_priority": -180},
        {"owner_priority": -200},
        {"table": "lbd; flush ruleset"},
    ):
        with pytest.raises(ValueError):
            spec(**kw)


def test_owner_rules_claim_only_true_syn_udp_and_echo() -> None:
    rules = owner_vip_rules(spec(balance=Balance.parse(["tcp/80", "udp/53", "icmp"])))
    assert "tcp dport 80 tcp flags & (fin|syn|rst|ack) == syn jump claim" in rules
    assert "udp dport 53 jump claim" in rules
    assert "icmp type echo-request jump claim" in rules
    assert rules[-1] == "counter drop"
    # No UDP shortcut through conntrack: every datagram is claimed again.
    assert not any("udp" in r and "established" in r for r in rules)
    only_tcp = owner_vip_rules(spec(vips=["192.0.2.100"], balance=Balance.parse(["tcp"])))
    assert not any("udp" in r or "icmp" in r for r in only_tcp)


def test_claim_rules_hash_prefix_and_lease() -> None:
    rules = claim_rules(spec(prefix4=24, prefix6=56))
    assert rules[0].startswith("meta nfproto @lease jhash ip saddr & 255.255.255.0 mod 4096 ")
    assert "jhash ip6 saddr & ffff:ffff:ffff:ff00:: mod 4096 seed 0x000001bd @owned" in rules[1]
    assert all("@lease" in r for r in rules[:-1])
    only4 = claim_rules(spec(vips=["192.0.2.100"]))
    assert len(only4) == 2 and "ip6" not in only4[0]


def test_owner_table_repeats_flags_owner_and_many_vips_use_a_set() -> None:
    many = [f"192.0.2.{i}" for i in range(100, 110)]
    cmds = owner_table_commands(spec(vips=many), replace=True)
    tables = [c for c in cmds if " table " in f" {c}"]
    assert tables[0] == "add table inet lbd { flags owner; }"
    assert "delete table inet lbd" in cmds
    assert all("flags owner" in c for c in tables if c.startswith("add table"))
    assert any("ip daddr { 192.0.2.100, " in c for c in cmds)


def test_guard_commands_are_exact_and_idempotent() -> None:
    cmds = guard_commands(spec())
    assert cmds[:5] == [
        "add table inet lbd_guard",
        "add chain inet lbd_guard pre { type filter hook prerouting priority -170; "
        "policy accept; }",
        "add chain inet lbd_guard vip",
        "flush chain inet lbd_guard pre",
        "flush chain inet lbd_guard vip",
    ]
    assert "add rule inet lbd_guard vip meta mark & 0xffff0000 == 0x4c420000 accept" in cmds
    assert cmds[-1] == "add rule inet lbd_guard vip drop"


def test_element_commands_incremental_or_flush() -> None:
    s = spec()
    cmds, sent = element_commands(s, {5}, {1, 2}, frozenset({5, 9}))
    assert cmds == ["delete element inet lbd owned { 1, 2 }", "add element inet lbd owned { 5 }"]
    assert sent == 3
    cmds, sent = element_commands(s, set(), set(range(100)), frozenset({200}))
    assert cmds == ["flush set inet lbd owned", "add element inet lbd owned { 200 }"]
    assert sent == 1
    flushed = element_commands(s, set(), set(range(10)), frozenset())
    assert flushed == (["flush set inet lbd owned"], 0)
    assert element_commands(s, set(), set(), frozenset({1})) == ([], 0)


def test_lease_commands() -> None:
    s = spec()
    mark = "meta mark set meta mark & 0x0000ffff | 0x4c420000 accept"
    assert lease_commands(s, 750, 1_000_000_000) == [
        "add element inet lbd lease { ipv4, ipv6 }",
        "delete element inet lbd lease { ipv4, ipv6 }",
        "add element inet lbd lease { ipv4 timeout 750ms, ipv6 timeout 750ms }",
        "flush chain inet lbd live",
        f"add rule inet lbd live meta time < 1 {mark}",
    ]
    # No lease: nothing is live, whatever the deadline.
    assert lease_commands(s, None, 1_000_000_000) == [
        *lease_commands(s, 750)[:2],
        "flush chain inet lbd live",
    ]
    # An nft that cannot express the deadline: the relative timeout alone.
    assert lease_commands(s, 750)[-1] == f"add rule inet lbd live {mark}"


@pytest.mark.parametrize(
    "deadline_ns", [0, 511, 512, 1_000_000_000, 1_764_410_000_123_456_789, (1 << 63) - 1]
)
def test_nft_time_literal_is_what_nft_multiplies_back(deadline_ns: int) -> None:
    """nft computes literal * 10**9 in wrapping 64-bit arithmetic: that must give the
    deadline rounded DOWN to 512 ns, and whole seconds must stay plain seconds."""
    literal = nft_time_literal(deadline_ns)
    assert 0 <= literal < 1 << 55
    assert literal * 10**9 % (1 << 64) == deadline_ns - deadline_ns % 512
    if deadline_ns % 10**9 == 0:
        assert literal == deadline_ns // 10**9
    with pytest.raises(ValueError):
        nft_time_literal(-1)


class FakeNft:
    """Records each cmd() call: one call is one transaction."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: str | None = None

    def set_json_output(self, _: bool) -> None: ...
    def set_handle_output(self, _: bool) -> None: ...

    def cmd(self, text: str) -> tuple[int, str, str]:
        self.calls.append(text)
        if self.fail and self.fail in text:
            return 1, "", "Error: Could not process rule: Operation not permitted\n"
        if text.startswith("list chain"):  # install()'s probe, read back as nft 1.0.6 does
            epoch = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(0))
            match = {"match": {"op": "<", "left": {"meta": {"key": "time"}}, "right": epoch}}
            return 0, json.dumps({"nftables": [{"rule": {"expr": [match]}}]}), ""
        return 0, "", ""


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNft:
    fake = FakeNft()
    monkeypatch.setattr(nft_mod.NftDataplane, "_context", lambda self: fake)
    return fake


def test_apply_is_one_incremental_transaction(fake: FakeNft) -> None:
    dp = NftDataplane(VIPS, 4096, 0x1BD)
    with pytest.raises(NftError, match="before install"):
        dp.apply({1}, 500)
    dp.install()
    assert "flags owner" in fake.calls[0] and dp.deadline_checked
    fake.calls.clear()
    before = time.time_ns()
    dp.apply({1, 2, 3}, 500)
    assert len(fake.calls) == 1
    text = fake.calls[-1]
    assert "flush chain inet lbd_guard vip" in text
    assert "add element inet lbd owned { 1, 2, 3 }" in text
    assert "ipv6 timeout 500ms }" in text
    # Without a caller's deadline: 500 ms from the call, on the wall clock.
    assert dp.last_apply_stats is not None and dp.last_apply_stats.until_ns is not None
    assert 0 <= dp.last_apply_stats.until_ns - before - 500_000_000 <= time.time_ns() - before
    assert f"meta time < {nft_time_literal(dp.last_apply_stats.until_ns)} " in text
    dp.apply({1, 2, 3}, 500, until_ns=7 * 10**18)
    assert f"meta time < {7 * 10**9} " in fake.calls[-1]
    dp.apply({2, 3, 4}, 500)
    assert "delete element inet lbd owned { 1 }" in fake.calls[-1]
    assert "add element inet lbd owned { 4 }" in fake.calls[-1]
    assert dp.last_apply_stats is not None
    assert (dp.last_apply_stats.added, dp.last_apply_stats.removed) == (1, 1)
    dp.apply({2, 3, 4}, None)
    assert "owned" not in fake.calls[-1] and "timeout" not in fake.calls[-1]
    assert fake.calls[-1].endswith("flush chain inet lbd live")
    assert dp.owned == {2, 3, 4}


def test_a_big_claim_comes_in_chunks_but_a_release_at_once(fake: FakeNft) -> None:
    dp = NftDataplane(VIPS, 4096, 0x1BD, claim_chunk=1000)
    dp.install()
    dp.apply(frozenset(range(2500)), 500)
    assert dp.owned == set(range(1000)) and dp.pending == set(range(1000, 2500))
    assert dp.last_apply_stats is not None and dp.last_apply_stats.pending == 1500
    # The next apply (the same target, or a newer one) carries on from the kernel's state.
    dp.apply(frozenset(range(2500)), 500)
    assert dp.owned == set(range(2000)) and len(dp.pending) == 500
    # A release goes whole in the first transaction, whatever the claim still waiting.
    dp.apply(frozenset(range(3000, 4096)), 500)
    assert dp.owned == set(range(3000, 4000)) and dp.pending == set(range(4000, 4096))
    assert "flush set inet lbd owned" in fake.calls[-1]
    dp.apply(frozenset(range(3000, 4096)), 500)
    assert dp.owned == set(range(3000, 4096)) and dp.pending == set()
    with pytest.raises(ValueError, match="claim_chunk"):
        NftDataplane(VIPS, 16, 1, claim_chunk=0)


def test_an_nft_that_cannot_express_the_deadline_keeps_the_relative_lease(fake: FakeNft) -> None:
    fake.fail = "meta time"
    dp = NftDataplane(VIPS, 4096, 0x1BD)
    dp.install()
    fake.fail = None
    assert not dp.deadline_checked
    dp.apply({1}, 500)
    assert "timeout 500ms" in fake.calls[-1] and "meta time" not in fake.calls[-1]
    assert "add rule inet lbd live meta mark set" in fake.calls[-1]


def test_failed_apply_keeps_shadow_state_and_raises_lbd_error(fake: FakeNft) -> None:
    now = [0.0]
    dp = NftDataplane(VIPS, 4096, 0x1BD, guard_period=1.0, clock=lambda: now[0])
    dp.install()
    fake.calls[1:] = []  # the deadline probe
    now[0] = 0.5
    dp.apply({1}, 500)
    now[0] = 1.2
    fake.fail = "{ 7 }"
    with pytest.raises(LbdError, match="Operation not permitted"):
        dp.apply({1, 7}, 500)
    assert dp.owned == {1}
    fake.fail = None
    dp.apply({1, 7}, 500)
    assert "add element inet lbd owned { 7 }" in fake.calls[-1]
    now[0] = 1.5
    dp.apply({1, 7}, 400)
    # guard_period=1: install (t=0) writes the guard, t=0.5 does not, the failed
    # t=1.2 tried to and so does its successful retry; then not until t=2.2.
    guards = ["lbd_guard" in c for c in fake.calls]
    assert guards == [True, False, True, True, False]


def test_argument_checks(fake: FakeNft) -> None:
    dp = NftDataplane(VIPS, 16, 1)
    dp.install()
    np = pytest.importorskip("numpy")
    dp.apply(frozenset(np.arange(3, dtype=np.int64).tolist()) | {np.int64(5)}, 499.9)  # type: ignore[arg-type]  # a float
    assert dp.owned == {0, 1, 2, 5}
    assert "timeout 499ms" in fake.calls[-1]  # rounded down: shorter is safe
    with pytest.raises(TypeError):
        dp.apply({1.5}, 500)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        dp.apply({16}, 500)
    with pytest.raises(ValueError, match="lease_ms"):
        dp.apply({1}, 0)
    with pytest.raises(ValueError):
        NftDataplane(VIPS, 16, 1, guard_period=-1)
    with pytest.raises(ValueError):
        NftDataplane(VIPS, 16, 1, balance=["gre"])


def test_remove(fake: FakeNft) -> None:
    dp = NftDataplane(VIPS, 16, 1)
    dp.install()
    dp.remove(guard=False)
    assert fake.calls[-1] == "delete table inet lbd"
    assert not dp.installed
    dp.install()
    dp.remove()
    assert fake.calls[-1].splitlines() == [
        "delete table inet lbd",
        "add table inet lbd_guard",
        "delete table inet lbd_guard",
    ]
