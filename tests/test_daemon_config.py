"""Daemon configuration: strict TOML parsing, key files, keygen, CLI exit codes, the unit."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lbd.daemon import cli
from lbd.daemon.config import (
    ConfigFileError,
    DaemonConfig,
    default_node_id,
    load_config,
    load_keyring,
    parse_config,
    sanitize_node_id,
    write_key,
)
from lbd.daemon.statedir import load_quorum_base, save_quorum_base
from lbd.netcfg.ruleset import RulesetSpec
from lbd.protocol.config import FAST_TIMERS, CoreConfig, QuorumMode, Timers
from lbd.protocol.errors import ConfigError
from lbd.protocol.messages import wire_id

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "systemd" / "lbd.toml.example"
UNIT = REPO / "systemd" / "lbd.service"
MINIMAL = {"vips": ["192.0.2.100"]}


def error_of(data: dict[str, object]) -> ConfigFileError:
    with pytest.raises(ConfigFileError) as info:
        parse_config(data, "/etc/lbd/lbd.toml")
    return info.value


def test_example_file_parses_to_the_defaults() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg == DaemonConfig(vips=("192.0.2.100",))
    assert cfg.core_config().quorum is QuorumMode.MAJORITY


def test_example_documents_every_setting() -> None:
    text = EXAMPLE.read_text()
    tables = {"checks": "[[check]]", "agent": "[agent]"}  # TOML tables, not keys
    for name in DaemonConfig.__dataclass_fields__:
        if name not in ("timers", "timer_profile"):
            assert tables.get(name, f"{name} = ") in text, name


def test_timers_profile_and_override() -> None:
    cfg = parse_config({**MINIMAL, "timers": {"profile": "fast", "leave_timeout": 2}})
    assert cfg.timer_profile == "fast"
    assert cfg.timers.interval == FAST_TIMERS.interval
    assert cfg.timers.leave_timeout == 2.0
    assert parse_config({**MINIMAL, "timers": "fast"}).timers == FAST_TIMERS


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({**MINIMAL, "colour": "red"}, "colour", "unknown key"),
        ({**MINIMAL, "weight": "heavy"}, "weight", "expected an integer"),
        ({**MINIMAL, "weight": True}, "weight", "boolean"),
        ({**MINIMAL, "weight": 0}, "weight", "out of range"),
        ({**MINIMAL, "buckets": 70000}, "buckets", "out of range"),
        ({**MINIMAL, "quorum": "most"}, "quorum", "majority"),
        ({**MINIMAL, "group": "192.0.2.1"}, "group", "not a multicast"),
        ({**MINIMAL, "peers": ["nope"]}, "peers", "not an IPv4"),
        ({**MINIMAL, "node_id": "-bad id"}, "node_id", "must match"),
        ({**MINIMAL, "vips": ["300.1.1.1"]}, "vips", "not an IP"),
        ({}, "vips", "required"),
        ({**MINIMAL, "timers": {"profile": "turbo"}}, "timers.profile", "not one of"),
        ({**MINIMAL, "timers": {"speed": 1}}, "timers.speed", "unknown key"),
        ({**MINIMAL, "timers": {"lease": 5.0}}, "timers.lease", "too long"),
        ({**MINIMAL, "balance": ["sctp"]}, "balance", ""),
        ({**MINIMAL, "state_dir": "relative"}, "state_dir", "absolute"),
        ({**MINIMAL, "multicast": False}, "multicast", "peers"),
    ],
)
def test_mistakes_name_file_key_and_problem(data: dict[str, object], key: str, words: str) -> None:
    err = error_of(data)
    assert err.key == key
    assert words in err.problem
    assert str(err).startswith(f"/etc/lbd/lbd.toml: {key}: ")
    assert "\n" not in str(err)


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("vips = [\n")
    with pytest.raises(ConfigFileError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigFileError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_keygen_writes_0600_hex_and_refuses_overwrite(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    write_key(key)
    assert (key.stat().st_mode & 0o777) == 0o600
    ring = load_keyring(key)
    assert ring.previous is None
    with pytest.raises(ConfigFileError, match="exists"):
        write_key(key)

    # Rotation, step by step: accept a new key, seal with it, drop the old one.
    with pytest.raises(ConfigFileError, match="holds one key"):
        write_key(key, step="promote")
    write_key(key, step="add")
    added = load_keyring(key)
    assert added.current == ring.current and added.previous not in (None, ring.current)
    with pytest.raises(ConfigFileError, match="already holds two keys"):
        write_key(key, step="add")
    write_key(key, step="promote")
    promoted = load_keyring(key)
    assert (promoted.current, promoted.previous) == (added.previous, ring.current)
    write_key(key, step="retire")
    retired = load_keyring(key)
    assert retired.current == added.previous and retired.previous is None
    assert (key.stat().st_mode & 0o777) == 0o600


def test_raw_key_and_loose_permissions(tmp_path: Path) -> None:
    raw = tmp_path / "raw.key"
    raw.write_bytes(bytes(range(32)))
    raw.chmod(0o600)
    assert load_keyring(raw).current == bytes(range(32))
    raw.chmod(0o644)
    with pytest.raises(ConfigFileError, match=r"accessible by group or others \(mode 0644\)"):
        load_keyring(raw)
    short = tmp_path / "short.key"
    short.write_text("abcd\n")
    short.chmod(0o600)
    with pytest.raises(ConfigFileError, match="64 hex"):
        load_keyring(short)


def test_node_id_defaults(tmp_path: Path) -> None:
    assert sanitize_node_id("web 1.example/x") == "web-1.example-x"
    assert sanitize_node_id("--") is None
    mid = tmp_path / "machine-id"
    mid.write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    assert default_node_id(mid) == "3d1219c7c4c5404aaa1f6d2a48adfda4"
    assert default_node_id(tmp_path / "absent")  # falls back to the hostname


def test_cli_config_mistake_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "lbd.toml"
    conf.write_text('vips = ["192.0.2.100"]\nweight = -1\n')
    assert cli.main(["check-config", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert err == f"lbd: {conf}: weight: -1 is out of range 1..1000\n"


def test_cli_keygen_and_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k"
    assert cli.main(["keygen", str(key)]) == 0
    key.chmod(0o640)
    conf = tmp_path / "lbd.toml"
    conf.write_text(f'vips = ["192.0.2.100"]\nkey_file = "{key}"\n')
    capsys.readouterr()
    assert cli.main(["check-config", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chmod 600" in err and "Traceback" not in err


def test_example_is_valid_toml_with_hex_seed() -> None:
    assert tomllib.loads(EXAMPLE.read_text())["seed"] == 0x4C4244


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    lbd = REPO / ".venv" / "bin" / "lbd"
    exe = str(lbd) if os.access(lbd, os.X_OK) else "/bin/true"
    text = UNIT.read_text().replace("/usr/bin/lbd", exe)
    unit = tmp_path / "lbd.service"
    unit.write_text(text)
    # The man pages it names ship with the package (docs/man), not installed here.
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    pages = re.findall(r"man:([\w.-]+)\((\d)\)", text)
    assert len(pages) == 3, pages
    for name, section in pages:
        assert (REPO / "docs" / "man" / f"{name}.{section}").is_file(), name
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr
    for needle in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RuntimeDirectory=lbd",
        "ExecReload=",
    ):
        assert needle in text


def test_quorum_base_record_round_trips_and_reads_older_records(tmp_path: Path) -> None:
    """Bases hold wire IDs; a record of an older release (node names, no "previous")
    is read as those names' wire IDs; a corrupt one is refused (test_daemon_errors)."""
    ids = tuple(sorted(wire_id(n) for n in ("a", "b", "c")))
    assert load_quorum_base(tmp_path) == ((), 0, None)  # first start
    save_quorum_base(tmp_path, ids, 6, ids[:2])
    assert load_quorum_base(tmp_path) == (ids, 6, ids[:2])
    save_quorum_base(tmp_path, ids[:2], 7, None)
    assert load_quorum_base(tmp_path) == (ids[:2], 7, None)
    record = tmp_path / "quorum-base.json"
    record.write_text('{"version": 1, "base": ["a", "b"], "epoch": 3}')  # written before
    assert load_quorum_base(tmp_path) == (tuple(sorted((wire_id("a"), wire_id("b")))), 3, None)
    record.write_text('{"version": 1, "base": ["a"], "epoch": 3, "previous": [1]}')
    with pytest.raises(ConfigFileError, match="corrupt quorum base"):
        load_quorum_base(tmp_path)


# ------------------------------------------------------------------ bad values (issue 12)


def toml_error(tmp_path: Path, text: str) -> ConfigFileError:
    """The error of a real TOML file (TOML spells nan and inf), loaded as lbd does."""
    conf = tmp_path / "lbd.toml"
    conf.write_text(text)
    with pytest.raises(ConfigFileError) as info:
        load_config(conf)
    assert str(info.value).startswith(f"{conf}: {info.value.key}: ")
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("timers", "key", "words"),
    [
        ("lease = nan", "timers.lease", "must be a finite number of seconds, not nan"),
        ("dead_after = inf", "timers.dead_after", "must be a finite number of seconds, not inf"),
        ("interval = -inf", "timers.interval", "finite number"),
        ("leave_timeout = +inf", "timers.leave_timeout", "finite number"),
        ("apply_margin = -10", "timers.apply_margin", "must be 0 or more seconds, not -10"),
        ("join_holddown = -0.1", "timers.join_holddown", "must be 0 or more seconds"),
        ("lease = 0", "timers.lease", "must be more than 0 seconds, not 0"),
        ("interval = 0", "timers.interval", "more than 0"),
        ("dead_after = 0.0", "timers.dead_after", "more than 0"),
        ("startup_wait = 0", "timers.startup_wait", "more than 0"),
        ("leave_timeout = 0", "timers.leave_timeout", "more than 0"),
        ("leave_timeout = -3", "timers.leave_timeout", "more than 0"),
        ("startup_wait = 86400", "timers.startup_wait", "at most 3600 seconds"),
        ("lease = 1" + "0" * 400, "timers.lease", "far too large"),
        ("lease = 5.0", "timers.lease", "is too long for timers.dead_after"),
        ("join_holddown = 0.6", "timers.join_holddown", "shorter than timers.dead_after"),
    ],
)
def test_bad_timer_values_in_toml_name_the_timer(
    tmp_path: Path, timers: str, key: str, words: str
) -> None:
    err = toml_error(tmp_path, f'vips = ["192.0.2.100"]\n[timers]\n{timers}\n')
    assert err.key == key
    assert words in err.problem


def test_zero_is_fine_for_join_holddown_and_apply_margin(tmp_path: Path) -> None:
    conf = tmp_path / "lbd.toml"
    conf.write_text('vips = ["192.0.2.100"]\n[timers]\njoin_holddown = 0\napply_margin = 0\n')
    timers = load_config(conf).timers
    assert (timers.join_holddown, timers.apply_margin) == (0.0, 0.0)


def test_cli_reports_a_nan_timer_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "lbd.toml"
    conf.write_text('vips = ["192.0.2.100"]\n[timers]\nlease = nan\n')
    assert cli.main(["check-config", "--config", str(conf)]) == 2
    assert capsys.readouterr().err == (
        f"lbd: {conf}: timers.lease: must be a finite number of seconds, not nan\n"
    )


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"buckets": True}, "buckets", "must be an integer, not True"),
        ({"buckets": 4096.0}, "buckets", "must be an integer"),
        ({"buckets": 0}, "buckets", "between 1 and 65536, not 0"),
        ({"seed": False}, "seed", "must be an integer, not False"),
        ({"seed": -1}, "seed", "between 0 and 4294967295"),
        ({"seed": 2**32}, "seed", "between 0 and 4294967295"),
        ({"seed": "0x4c4244"}, "seed", "must be an integer"),
        ({"cluster": ""}, "cluster", "1..64 bytes"),
        ({"timers": Timers(lease=math.nan)}, "timers.lease", "finite number"),
    ],
)
def test_core_config_refuses_non_int_and_out_of_range(
    changes: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        replace(CoreConfig(), **changes).validate()
    assert info.value.key == key
    assert words in info.value.problem
    assert str(info.value) == f"{key} {info.value.problem}"  # the key comes first


def test_config_error_without_key_is_unchanged() -> None:
    err = ConfigError("plain message")
    assert (str(err), err.key, err.problem) == ("plain message", None, "plain message")


@pytest.mark.parametrize(
    ("vips", "words"),
    [
        (
            '["192.0.2.100/24"]',
            "'192.0.2.100/24' has a /24 prefix; a VIP is one address: write '192.0.2.100'",
        ),
        ('["2001:db8::100/64"]', "has a /64 prefix"),
        ('["192.0.2.0/24"]', "has a /24 prefix"),
        ('["192.0.2.100", "192.0.2.100"]', "192.0.2.100 is listed more than once"),
        ('["192.0.2.100", "192.0.2.100/32"]', "192.0.2.100 is listed more than once"),
        ('["2001:DB8::1", "2001:db8:0::1"]', "2001:db8::1 is listed more than once"),
        ('["239.1.2.3"]', "is a multicast address"),
        ('["ff02::1"]', "is a multicast address"),
        ('["127.0.0.2"]', "is a loopback address"),
        ('["::1"]', "is a loopback address"),
        ('["0.0.0.0"]', "is the unspecified address"),
        ('["::"]', "is the unspecified address"),
        ('["255.255.255.255"]', "is the broadcast address"),
        ('["0.1.2.3"]', "0.0.0.0/8"),
        ('["::ffff:192.0.2.100"]', "write '192.0.2.100'"),
        ('["fe80::1%eth0"]', "scoped"),
        ('["192.0.2.300"]', "not an IP address"),
        ("[]", "at least one VIP"),
    ],
)
def test_vips_the_data_plane_cannot_serve_are_refused(
    tmp_path: Path, vips: str, words: str
) -> None:
    err = toml_error(tmp_path, f"vips = {vips}\n")
    assert err.key == "vips"
    assert words in err.problem


def test_vips_with_host_prefix_are_kept_as_plain_canonical_addresses() -> None:
    cfg = parse_config({"vips": ["192.0.2.100/32", "2001:DB8:0::100/128", "192.0.2.101"]})
    assert cfg.vips == ("192.0.2.100", "2001:db8::100", "192.0.2.101")
    # Exactly what the data plane takes: it would raise on any of the raw forms above.
    assert RulesetSpec.build(cfg.vips, buckets=16, seed=1).vips6 == ("2001:db8::100",)


def test_vip_equal_to_the_explicit_address_or_a_peer_is_refused(tmp_path: Path) -> None:
    err = toml_error(tmp_path, 'vips = ["192.0.2.100", "192.0.2.11"]\naddress = "192.0.2.11"\n')
    assert err.key == "vips"
    assert err.problem == (
        "192.0.2.11 is this node's own address; a VIP must be an extra "
        "address that no node uses as its own"
    )
    err = toml_error(tmp_path, 'vips = ["192.0.2.100"]\npeers = ["192.0.2.12", "192.0.2.100"]\n')
    assert err.key == "vips"
    assert "192.0.2.100 is also listed in peers" in err.problem


@pytest.mark.parametrize(
    ("profile", "buckets", "refused"),
    [
        ("fast", 65536, True),
        ("fast", 32768, True),
        ("fast", 16384, False),
        ("default", 65536, False),
        ("fast", 4096, False),
    ],
)
def test_buckets_too_many_to_claim_within_half_a_lease_are_refused(
    tmp_path: Path, profile: str, buckets: int, refused: bool
) -> None:
    """Fast timers at B = 65536 lapse again and again under load (each claim starves
    the acknowledgements that would renew the lease): refused with the limit."""
    text = f'vips = ["192.0.2.100"]\nbuckets = {buckets}\n[timers]\nprofile = "{profile}"\n'
    if not refused:
        conf = tmp_path / "lbd.toml"
        conf.write_text(text)
        assert load_config(conf).buckets == buckets
        return
    err = toml_error(tmp_path, text)
    assert err.key == "buckets"
    assert f"{buckets} is too many for a 100 ms lease" in err.problem
    assert "use at most 20000 buckets, or longer timers" in err.problem
