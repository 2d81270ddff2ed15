"""The daemon's configuration: one TOML file, every setting with its default here.

``DaemonConfig`` is the single documented list of settings (systemd/lbd.toml.example
mirrors it). ``load_config`` reads the file strictly: an unknown key, a wrong type or
an out-of-range value raises ``ConfigFileError`` whose message names the file, the key
and the problem on one line (the CLI prints it and exits 2, never a traceback).

The cluster key lives in its own file (``key_file``): 32 raw bytes, or 64 hex
characters on the first line and optionally the previous key (64 hex) on the second,
for rotation. Group- or world-accessible key files are refused.

Values that depend on the host (own address, node ID) are resolved separately by
``resolve_address`` / ``default_node_id`` so that parsing stays pure and testable.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lbd.daemon.healthconfig import (
    CHECK_USER,
    AgentSpec,
    CheckSpec,
    check_exec_security,
    parse_agent,
    parse_checks,
    parse_interfaces,
)
from lbd.protocol.config import PROFILES, CoreConfig, QuorumMode, Timers
from lbd.protocol.errors import ConfigError, LbdError
from lbd.protocol.messages import MAX_NODES, MAX_WEIGHT, NODE_ID_PATTERN
from lbd.protocol.wire import KEY_LEN, Keyring

DEFAULT_CONFIG_PATH = "/etc/lbd/lbd.toml"
MAC_MODES = ("shared", "multicast", "flood")
CLUSTER_MAC_MODES = ("multicast", "flood")
"""Modes where every node keeps its own MAC and the VIPs resolve to a cluster MAC."""
TIMER_FIELDS = ("interval", "dead_after", "lease", "join_holddown", "startup_wait",
                "leave_timeout", "apply_margin")  # fmt: skip


class ConfigFileError(LbdError):
    """A configuration or key file mistake; str() is the one line shown to the admin."""

    def __init__(self, path: str | Path, key: str | None, problem: str) -> None:
        self.path, self.key, self.problem = str(path), key, problem
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + problem)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Every setting of ``lbd run``; defaults are what an empty file gives."""

    cluster: str = "lbd"
    """Cluster name: part of every datagram's authentication (must match on all nodes)."""
    interface: str = "eth0"
    """The interface facing the shared segment: VIPs and heartbeats live here."""
    address: str | None = None
    """This node's own IPv4 address (heartbeat source); default: interface's primary IPv4."""
    vips: tuple[str, ...] = ()
    """Virtual addresses shared by the cluster ("192.0.2.100", "2001:db8::100"): single
    addresses (a "/32" or "/128" suffix is accepted and dropped), kept in canonical form."""
    key_file: str = "/etc/lbd/cluster.key"
    """The cluster key (lbd keygen); must not be group/world-accessible."""
    node_id: str | None = None
    """Stable node name; default /etc/machine-id, else the hostname (sanitised)."""
    weight: int = 100
    """Relative share of slices (1..1000)."""
    draining: bool = False
    """Start (or, on reload, switch to) draining: keep established flows, take no NEW."""
    bootstrap_expect: int = 2
    """A first start (no state from an earlier run) forms a new cluster only together
    with this many nodes, itself included; a node that ever agreed a view rejoins its
    cluster instead. Set it to the initial cluster size (1 for a one-node cluster)."""
    buckets: int = 4096
    """Number of slices B (1..65536); identical on every node."""
    seed: int = 0x4C4244
    """jhash seed (32-bit); identical on every node."""
    quorum: str = "majority"
    """"majority" (safe under partition) or "none" (available; both sides may serve)."""
    timers: Timers = field(default_factory=Timers)
    """[timers] profile = "default"|"fast", plus per-value overrides in seconds."""
    timer_profile: str = "default"
    group: str = "239.255.0.1"
    """IPv4 multicast group of the heartbeats."""
    port: int = 7946
    """UDP port of the heartbeats (group and unicast peers)."""
    peers: tuple[str, ...] = ()
    """Optional unicast peer addresses, for networks that block multicast."""
    multicast: bool = True
    """Send heartbeats to ``group`` (set false to use ``peers`` only)."""
    mac_mode: str = "flood"
    """"flood" (default): nodes keep their own MACs; the VIPs resolve to a unicast
    cluster MAC that no frame is ever sent from, so switches flood it as unknown and
    routers accept it (no switch or router configuration; README "Switched networks").
    "shared": every node wears one unicast MAC (hub, or a switch set to flood it); the
    default when ``cluster_mac`` is set and ``mac_mode`` is not (the seed's recipe).
    "multicast": nodes keep their own MACs; the VIPs resolve (ARP/ND) to a multicast
    cluster MAC that any learning switch floods to every port (lbd.netcfg.macmode)."""
    cluster_mac: str | None = None
    """shared: optional unicast MAC set on the interface (else the site provides one).
    multicast: the cluster MAC (group bit set); flood: the cluster MAC (unicast, best
    locally administered: first octet x2, x6, xA or xE). Default derived from
    ``cluster``."""
    balance: tuple[str, ...] = ("all",)
    """Traffic shared out: "all" or tokens like "tcp/80", "udp/53", "icmp"."""
    prefix4: int = 32
    """Source-prefix affinity for IPv4 clients (e.g. 24: a /24 stays on one node)."""
    prefix6: int = 128
    """Source-prefix affinity for IPv6 clients (e.g. 56)."""
    control_socket: str = "/run/lbd/control.sock"
    """Unix socket of lbd-cli (mode 0660, group lbd if that group exists)."""
    state_dir: str = "/var/lib/lbd"
    """Lock file, incarnation counter and the link record for restore."""
    checks: tuple[CheckSpec, ...] = ()
    """Service checks, the ``[[check]]`` tables (http, tcp or exec; daemon/health.py)."""
    track_interface: tuple[str, ...] = ()
    """Interfaces that must be up (IFF_UP and carrier) for the node to be healthy."""
    agent: AgentSpec | None = None
    """The ``[agent]`` load agent: its capacity answer scales ``weight``."""
    check_user: str = CHECK_USER
    """Unprivileged user the exec checks and agent run as (must exist when used)."""
    check_allow_root: bool = False
    """Allow ``check_user`` to be root (uid 0); refused otherwise."""
    all_unhealthy: str = "serve"
    """When every member is unhealthy: "serve" (keep serving rather than refuse the
    whole VIP) or "close" (drain regardless)."""
    metrics_listen: str | None = None
    """"HOST:PORT" ("[::1]:PORT" for IPv6) serving Prometheus metrics at /metrics over
    HTTP; off when unset. HOST must be a loopback address (no TLS, no authentication)."""

    def effective_cluster_mac(self) -> str | None:
        """The MAC the VIPs resolve to: in multicast mode ``cluster_mac`` or the one
        derived from the cluster name (flood likewise); in shared mode ``cluster_mac``
        (may be None)."""
        if self.mac_mode in CLUSTER_MAC_MODES:
            from lbd.netcfg.macmode import derive_cluster_mac  # noqa: PLC0415

            return (self.cluster_mac or derive_cluster_mac(self.cluster, self.mac_mode)).lower()
        return self.cluster_mac

    def core_config(self) -> CoreConfig:
        return CoreConfig(self.cluster, self.buckets, self.seed, QuorumMode(self.quorum),
                          self.timers, shared=self.agreed_shared(),
                          bootstrap_expect=self.bootstrap_expect)  # fmt: skip

    def agreed_shared(self) -> tuple[tuple[str, str], ...]:
        """Canonical text of the daemon's settings every node must share (params.py):
        equal settings spelt differently ("192.0.2.1/32", "192.0.2.1") digest alike."""
        vips = sorted(str(ipaddress.ip_interface(v)) for v in self.vips)
        return (
            ("prefix4", str(self.prefix4)),
            ("prefix6", str(self.prefix6)),
            ("balance", ",".join(sorted(t.strip().lower() for t in self.balance))),
            ("vips", ",".join(vips)),
            ("mac_mode", self.mac_mode),
            ("cluster_mac", self.effective_cluster_mac() or ""),
        )


def _expect(path: Path, key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    # bool is an int subclass in Python; TOML true must not pass as a number.
    if isinstance(value, bool) and kind is not bool:
        raise ConfigFileError(path, key, f"expected {what}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigFileError(path, key, f"expected {what}, got {type(value).__name__}")
    return value


def _string_list(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    _expect(path, key, value, list, "a list of strings")
    for item in value:
        _expect(path, key, item, str, "a list of strings")
    return tuple(value)


def _ipv4(path: Path, key: str, text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ConfigFileError(path, key, f"{text!r} is not an IPv4 address") from None


def _parse_timers(path: Path, raw: Any) -> tuple[str, Timers]:
    if isinstance(raw, str):
        raw = {"profile": raw}
    _expect(path, "timers", raw, dict, "a profile name or a [timers] table")
    profile = raw.get("profile", "default")
    if profile not in PROFILES:
        raise ConfigFileError(
            path, "timers.profile", f"{profile!r} is not one of {', '.join(sorted(PROFILES))}"
        )
    overrides: dict[str, float] = {}
    for name, value in raw.items():
        if name == "profile":
            continue
        if name not in TIMER_FIELDS:
            raise ConfigFileError(path, f"timers.{name}", "unknown key")
        number = _expect(path, f"timers.{name}", value, (int, float), "seconds (a number)")
        try:
            overrides[name] = float(number)
        except OverflowError:  # a TOML integer has no size limit in tomllib
            raise ConfigFileError(path, f"timers.{name}", "is far too large") from None
    timers = replace(PROFILES[profile], **overrides)
    try:
        timers.validate()  # refuses nan, inf and negative values too (TOML spells them)
    except ConfigError as exc:
        raise ConfigFileError(path, exc.key or "timers", exc.problem) from None
    return profile, timers


def _canonical_vip(path: Path, text: str) -> str:
    """One VIP as the data plane takes it: a single unicast address, canonical text.

    The nft rules match ``ip daddr <VIP>`` and need a plain address; a "/24" that
    passed here used to kill ``lbd run`` at start-up in a restart loop.
    """
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise ConfigFileError(path, "vips", f"{text!r} is not an IP address") from None
    addr = iface.ip
    if iface.network.prefixlen != addr.max_prefixlen:
        raise ConfigFileError(
            path,
            "vips",
            f"{text!r} has a /{iface.network.prefixlen} "
            f"prefix; a VIP is one address: write '{addr}'",
        )
    # Addresses no node could serve a connection on: the kernel drops such packets
    # as martians or never hands them to TCP as a local unicast destination.
    if addr.is_unspecified:
        kind = "the unspecified address"
    elif addr.is_loopback:
        kind = "a loopback address"
    elif addr.is_multicast:
        kind = "a multicast address"
    elif addr == ipaddress.IPv4Address("255.255.255.255"):
        kind = "the broadcast address"
    elif addr in ipaddress.IPv4Network("0.0.0.0/8"):
        kind = 'in 0.0.0.0/8 ("this network", never a destination)'
    elif isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        kind = f"an IPv4-mapped IPv6 address (write '{addr.ipv4_mapped}')"
    elif "%" in text:  # ip_interface() drops the zone silently; say so instead
        kind = "scoped (a %zone); the rules match the bare address"
    else:
        return str(addr)
    raise ConfigFileError(path, "vips", f"{text!r} is {kind}; a VIP must be a unicast address")


def _canonical_vips(path: Path, vips: tuple[str, ...]) -> tuple[str, ...]:
    if not vips:
        raise ConfigFileError(path, "vips", "at least one VIP is required")
    canonical: list[str] = []
    for text in vips:
        vip = _canonical_vip(path, text)
        if vip in canonical:
            raise ConfigFileError(path, "vips", f"{vip} is listed more than once")
        canonical.append(vip)
    return tuple(canonical)


def check_vips_against_address(path: str | Path, vips: tuple[str, ...], address: str) -> None:
    """Refuse a VIP equal to this node's own address (configured or resolved).

    That address is the heartbeat source and stays with this node; as a VIP it
    would be shared out, taken away on stop, and answered by every node.
    """
    own = ipaddress.ip_address(address)
    for vip in vips:
        if ipaddress.ip_interface(vip).ip == own:
            raise ConfigFileError(
                path,
                "vips",
                f"{vip} is this node's own address; a VIP "
                "must be an extra address that no node uses as its own",
            )


def parse_config(data: dict[str, Any], path: str | Path = "<config>") -> DaemonConfig:
    """Validate a decoded TOML document into a DaemonConfig (strict: unknown keys fail)."""
    p = Path(path)
    known = ({f.name for f in fields(DaemonConfig)} - {"timer_profile", "checks"}) | {"check"}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in known:
            raise ConfigFileError(p, key, "unknown key")
        if key in ("check", "agent", "track_interface"):
            values.update(_parse_health(p, key, raw))
        elif key == "timers":
            values["timer_profile"], values["timers"] = _parse_timers(p, raw)
        elif key in ("vips", "peers", "balance"):
            values[key] = _string_list(p, key, raw)
        elif key in ("weight", "buckets", "seed", "port", "prefix4", "prefix6", "bootstrap_expect"):
            values[key] = _expect(p, key, raw, int, "an integer")
        elif key in ("draining", "multicast", "check_allow_root"):
            values[key] = _expect(p, key, raw, bool, "true or false")
        else:
            values[key] = _expect(p, key, raw, str, "a string")
    if "cluster_mac" in values and "mac_mode" not in values:
        # The seed's recipe (one MAC on every node) from before flood became the
        # default: a config that names a MAC to wear keeps meaning shared mode.
        values["mac_mode"] = "shared"
    cfg = DaemonConfig(**values)
    cfg = replace(cfg, vips=_canonical_vips(p, cfg.vips))
    _check_values(p, cfg)
    try:  # the check user and the scripts' files: only when an exec runs
        check_exec_security(cfg.checks, cfg.agent, cfg.check_user, cfg.check_allow_root)
    except ConfigError as exc:
        raise ConfigFileError(p, exc.key, exc.problem) from None
    return cfg


def _parse_health(p: Path, key: str, raw: Any) -> dict[str, Any]:
    """``[[check]]``, ``[agent]``, ``track_interface`` (daemon/healthconfig.py)."""
    try:
        if key == "check":
            return {"checks": parse_checks(raw)}
        if key == "agent":
            return {"agent": parse_agent(raw)}
        return {"track_interface": parse_interfaces(raw)}
    except ConfigError as exc:
        raise ConfigFileError(p, exc.key, exc.problem) from None


# What a claim of one bucket costs the kernel and the daemon, measured here (65536
# buckets in parts: ~150 ms; more on a loaded machine). A node must be able to claim
# every bucket within half a lease, or its own claim starves the acknowledgements
# that renew the lease and it lapses, again and again (seen: fast timers at 65536).
CLAIM_SECONDS_PER_BUCKET = 2.5e-6


def _check_values(p: Path, cfg: DaemonConfig) -> None:
    ranges = {"weight": (1, MAX_WEIGHT), "buckets": (1, 65536), "seed": (0, 2**32 - 1),
              "port": (1, 65535), "prefix4": (0, 32), "prefix6": (0, 128),
              "bootstrap_expect": (1, MAX_NODES)}  # fmt: skip
    for key, (low, high) in ranges.items():
        value = getattr(cfg, key)
        if not low <= value <= high:
            raise ConfigFileError(p, key, f"{value} is out of range {low}..{high}")
    claim = cfg.buckets * CLAIM_SECONDS_PER_BUCKET
    if claim > cfg.timers.lease / 2:
        most = int(cfg.timers.lease / 2 / CLAIM_SECONDS_PER_BUCKET)
        raise ConfigFileError(
            p,
            "buckets",
            f"{cfg.buckets} is too many for a "
            f"{cfg.timers.lease * 1000:.0f} ms lease: claiming them all "
            f"takes ~{claim * 1000:.0f} ms, more than half the lease "
            f"(use at most {most} buckets, or longer timers)",
        )
    if not cfg.cluster or len(cfg.cluster.encode()) > 64:
        raise ConfigFileError(p, "cluster", "must be 1..64 bytes")
    if cfg.all_unhealthy not in ("serve", "close"):
        raise ConfigFileError(
            p, "all_unhealthy", f'{cfg.all_unhealthy!r} is not "serve" or "close"'
        )
    if cfg.quorum not in ("majority", "none"):
        raise ConfigFileError(p, "quorum", f'{cfg.quorum!r} is not "majority" or "none"')
    if cfg.address is not None:
        check_vips_against_address(p, cfg.vips, _ipv4(p, "address", cfg.address))
    group = _ipv4(p, "group", cfg.group)
    if not ipaddress.IPv4Address(group).is_multicast:
        raise ConfigFileError(p, "group", f"{group} is not a multicast address")
    for peer in cfg.peers:
        if _ipv4(p, "peers", peer) in cfg.vips:  # a peer's own address
            raise ConfigFileError(
                p,
                "vips",
                f"{peer} is also listed in peers; a VIP must "
                "be an extra address that no node uses as its own",
            )
    if not cfg.multicast and not cfg.peers:
        raise ConfigFileError(p, "multicast", "false needs a non-empty peers list")
    if cfg.node_id is not None and not NODE_ID_PATTERN.fullmatch(cfg.node_id):
        raise ConfigFileError(
            p, "node_id", f"{cfg.node_id!r} must match [A-Za-z0-9][A-Za-z0-9._:-]{{0,63}}"
        )
    if not cfg.interface or len(cfg.interface) > 15 or "/" in cfg.interface:
        raise ConfigFileError(p, "interface", f"{cfg.interface!r} is not an interface name")
    if cfg.cluster_mac is not None and not re.fullmatch(
        r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", cfg.cluster_mac
    ):
        raise ConfigFileError(p, "cluster_mac", f"{cfg.cluster_mac!r} is not a MAC address")
    if cfg.mac_mode not in MAC_MODES:
        raise ConfigFileError(
            p, "mac_mode", f'{cfg.mac_mode!r} is not "shared", "multicast" or "flood"'
        )
    if cfg.cluster_mac is not None:
        # I/G bit: bit 0 of the first octet. A switch floods a group MAC and never
        # learns it; an interface cannot wear one (the kernel refuses it).
        is_group = bool(int(cfg.cluster_mac[:2], 16) & 1)
        if cfg.mac_mode == "multicast" and not is_group:
            raise ConfigFileError(
                p,
                "cluster_mac",
                f"{cfg.cluster_mac} is a unicast MAC; "
                'mac_mode = "multicast" needs a group MAC (first octet '
                "odd, e.g. 03:00:5e:...)",
            )
        if cfg.mac_mode == "multicast" and cfg.cluster_mac.lower() == "ff:ff:ff:ff:ff:ff":
            raise ConfigFileError(p, "cluster_mac", "the broadcast MAC cannot be a cluster MAC")
        if cfg.mac_mode == "shared" and is_group:
            raise ConfigFileError(
                p,
                "cluster_mac",
                f"{cfg.cluster_mac} is a multicast MAC; "
                'an interface cannot wear it (use mac_mode = "multicast")',
            )
        if cfg.mac_mode == "flood" and is_group:
            raise ConfigFileError(
                p,
                "cluster_mac",
                f"{cfg.cluster_mac} is a multicast MAC; "
                'mac_mode = "flood" needs a unicast MAC (first octet even, '
                'e.g. 02:6c:...) or mac_mode = "multicast"',
            )
        if cfg.mac_mode == "flood" and cfg.cluster_mac.strip("0:") == "":
            raise ConfigFileError(p, "cluster_mac", "00:00:00:00:00:00 cannot be a cluster MAC")
    from lbd.netcfg.ruleset import Balance  # noqa: PLC0415 - only to validate the tokens

    try:
        Balance.parse(list(cfg.balance))
    except ValueError as exc:
        raise ConfigFileError(p, "balance", str(exc)) from None
    for key in ("control_socket", "state_dir", "key_file"):
        if not os.path.isabs(getattr(cfg, key)):
            raise ConfigFileError(p, key, "must be an absolute path")
    if cfg.metrics_listen is not None:
        metrics_address(cfg.metrics_listen, p)


def metrics_address(text: str, path: str | Path = "<config>") -> tuple[str, int]:
    """(host, port) of ``metrics_listen``: "127.0.0.1:9477", "[::1]:9477",
    "localhost:9477". Only loopback: the endpoint has neither TLS nor authentication
    and names every node of the cluster (README, Metrics)."""
    key = "metrics_listen"
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigFileError(
            path, key, f'{text!r} is not HOST:PORT (e.g. "127.0.0.1:9477" or "[::1]:9477")'
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigFileError(
            path, key, f'{text!r}: write an IPv6 host in brackets, e.g. "[{host}]:{port_text}"'
        )
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigFileError(path, key, f"{port_text!r} is not a port (1..65535)")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigFileError(path, key, f"{host!r} is not an IP address (or localhost)") from None
    if not addr.is_loopback:
        raise ConfigFileError(
            path,
            key,
            f"{addr} is not a loopback address: metrics are "
            "served on this host only (127.0.0.1 or ::1), having no TLS "
            "or authentication",
        )
    return str(addr), int(port_text)


def load_config(path: str | Path) -> DaemonConfig:
    """Read and validate ``path``; every failure is a one-line ConfigFileError."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigFileError(p, None, "no such file") from None
    except OSError as exc:
        raise ConfigFileError(p, None, f"cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFileError(p, None, f"not valid TOML: {exc}") from None
    return parse_config(data, p)


# ------------------------------------------------------------------ key file


def load_keyring(path: str | Path) -> Keyring:
    """The cluster keyring from ``path`` (see module doc); refuses loose permissions."""
    p = Path(path)
    try:
        st = p.stat()
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigFileError(
            p, None, f"key file does not exist (create one: lbd keygen {p})"
        ) from None
    except OSError as exc:
        raise ConfigFileError(p, None, f"cannot read key file: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise ConfigFileError(
            p,
            None,
            f"key file is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {p}",
        )
    if len(raw) == KEY_LEN and not _looks_hex(raw):
        return Keyring(raw)
    try:
        lines = [ln.strip() for ln in raw.decode("ascii").splitlines()]
    except UnicodeDecodeError:
        raise ConfigFileError(p, None, "key file is neither 32 raw bytes nor hex text") from None
    keys = [ln for ln in lines if ln and not ln.startswith("#")]
    if not 1 <= len(keys) <= 2:
        raise ConfigFileError(p, None, "key file must hold 1 or 2 keys (current, previous)")
    decoded = []
    for number, text in enumerate(keys, 1):
        if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
            raise ConfigFileError(p, f"key {number}", "must be exactly 64 hex characters")
        decoded.append(bytes.fromhex(text))
    try:
        return Keyring(decoded[0], decoded[1] if len(decoded) > 1 else None)
    except ConfigError as exc:
        raise ConfigFileError(p, None, str(exc)) from None


def _looks_hex(raw: bytes) -> bool:
    return re.fullmatch(rb"[0-9a-fA-F]{32}", raw) is not None


ROTATION_STEPS = ("add", "promote", "retire")
"""Key rotation without a gap: each step is one file change, copied to every node and
reloaded everywhere before the next (``lbd-cli members`` shows who seals with what).

1. ``add``: keep sealing with the current key, also accept a new one (second line);
2. ``promote``: seal with the new key, still accept the old one (lines swapped);
3. ``retire``: drop the old key.

Sealing with a key before every peer accepts it makes those peers declare the node
dead; so does dropping a key some peer still seals with."""


def write_key(path: str | Path, *, step: str | None = None, force: bool = False) -> str:
    """Write a key file with mode 0600; returns what was done, for the operator.

    Without ``step``: a fresh random key (an existing file is refused unless
    ``force``). With one of ``ROTATION_STEPS``: the next step of a rotation.
    """
    p = Path(path)
    if step is None:
        if p.exists() and not force:
            raise ConfigFileError(
                p,
                None,
                "exists; rotate it with --add, --promote and --retire, or replace it with --force",
            )
        lines = [os.urandom(KEY_LEN).hex()]
        done = "wrote a new cluster key"
    else:
        ring = load_keyring(p)
        if step == "add":
            if ring.previous is not None:
                raise ConfigFileError(
                    p,
                    None,
                    "already holds two keys: finish that rotation first (--promote, then --retire)",
                )
            lines = [ring.current.hex(), os.urandom(KEY_LEN).hex()]
            done = "added a new key (accepted, not yet used to seal)"
        elif step == "promote":
            if ring.previous is None:
                raise ConfigFileError(p, None, "holds one key: --add a new one first")
            lines = [ring.previous.hex(), ring.current.hex()]
            done = "the new key now seals; the old one is still accepted"
        elif step == "retire":
            if ring.previous is None:
                raise ConfigFileError(p, None, "holds one key: nothing to retire")
            lines = [ring.current.hex()]
            done = "dropped the key that no longer seals"
        else:
            raise ValueError(f"unknown rotation step {step!r}")
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, p)
    except OSError as exc:
        raise ConfigFileError(p, None, f"cannot write key file: {exc.strerror}") from None
    return done


# ------------------------------------------------------------------ host defaults


def sanitize_node_id(text: str) -> str | None:
    """Make ``text`` fit the node-ID pattern, or None if nothing usable is left."""
    cleaned = re.sub(r"[^A-Za-z0-9._:-]", "-", text.strip())
    cleaned = re.sub(r"^[^A-Za-z0-9]+", "", cleaned)[:64]
    return cleaned if cleaned and NODE_ID_PATTERN.fullmatch(cleaned) else None


def default_node_id(machine_id: str | Path = "/etc/machine-id") -> str:
    """/etc/machine-id (stable, unique per install), else the hostname."""
    try:
        text = Path(machine_id).read_text().strip()
    except OSError:
        text = ""
    for candidate in (text, socket.gethostname()):
        node_id = sanitize_node_id(candidate)
        if node_id:
            return node_id
    raise ConfigError("no usable node ID: set node_id in the config")


def resolve_address(interface: str, address: str | None, path: str | Path) -> tuple[int, str]:
    """(interface index, own IPv4 address); errors name the config key.

    Runs pyroute2 in this process: the daemon calls it through
    ``lbd.netcfg.linkproc.resolve_address`` (a child process) instead.
    """
    from pyroute2 import IPRoute  # noqa: PLC0415 - netlink only when really resolving

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=interface)
        if not links:
            raise ConfigFileError(path, "interface", f"{interface!r} does not exist")
        index = int(links[0])
        present = []
        for msg in ipr.get_addr(family=socket.AF_INET, index=index):
            # The default is the primary address (VIPs are secondaries, flag 0x01);
            # an explicitly configured address may be any of them.
            if address is not None or not msg["flags"] & 0x01:
                present.append(str(msg.get_attr("IFA_ADDRESS")))
    if address is not None:
        if address not in present:
            raise ConfigFileError(path, "address", f"{address} is not configured on {interface}")
        return index, address
    if not present:
        raise ConfigFileError(path, "address", f"{interface} has no IPv4 address; set address")
    return index, present[0]
