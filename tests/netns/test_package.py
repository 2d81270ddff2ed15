"""The Debian package, built, installed on this machine, used, removed and purged.

``make deb`` builds ``lbd_<version>_all.deb`` (debhelper + pybuild); ``apt-get
install`` puts it on this machine with Debian 12's own python3-pyroute2, -msgpack,
-cryptography and -numpy. Everything after that runs from the INSTALLED files only:
``/usr/bin/lbd`` and ``/usr/bin/python3`` with a clean environment (no venv, no
checkout on the path), which is what an operator gets from ``apt install``:

- ``lbd keygen`` and ``lbd check-config`` (default config path) inside a
  namespace whose interface carries the node's address;
- ``lbd lab --json``: a real 3-node cluster in namespaces, one daemon killed,
  no duplicate answer and no connection broken on the nodes that stayed up.

Then ``apt-get remove`` (the prerm stops the service where systemd runs; program
and unit gone; /etc/lbd and /var/lib/lbd kept;
the unit's enablement link left dangling, as Debian does, until purge) and
``apt-get purge`` (configuration and state gone; the group ``lbd`` kept, as
Debian does with system groups). The test refuses to run where lbd is already
installed or /etc/lbd or /var/lib/lbd exist: a purge would take them away.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = Path("/lib/systemd/system/lbd.service")
WANTS = Path("/etc/systemd/system/multi-user.target.wants/lbd.service")
ETC, STATE = Path("/etc/lbd"), Path("/var/lib/lbd")
# What a shell of an operator has: Debian's interpreter, no venv, no PYTHONPATH.
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
FILES = ("/usr/bin/lbd", "/usr/bin/lbd-cli", str(UNIT), "/etc/lbd/lbd.toml.example",
         "/usr/share/man/man8/lbd.8.gz", "/usr/share/man/man8/lbd-cli.8.gz",
         "/usr/share/man/man5/lbd.toml.5.gz", "/usr/share/doc/lbd/README.md")  # fmt: skip
DEBIAN_VERSIONS = {"pyroute2": "0.7.2", "msgpack": "1.0.3", "cryptography": "38.0.4",
                   "numpy": "1.24.2"}  # fmt: skip


def sh(
    *argv: str,
    timeout: float = 120.0,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=cwd
    )
    if check and out.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {out.returncode}\n"
            f"stdout: {out.stdout[-3000:]}\nstderr: {out.stderr[-3000:]}"
        )
    return out


def installed() -> bool:
    out = sh("dpkg-query", "-W", "-f", "${db:Status-Status}", "lbd", check=False)
    return out.returncode == 0 and out.stdout.strip() not in ("", "not-installed")


def apt(*args: str, timeout: float = 300.0) -> float:
    """apt-get ARGS non-interactively; returns the seconds it took."""
    env = {**CLEAN_ENV, "DEBIAN_FRONTEND": "noninteractive"}
    start = time.monotonic()
    sh("apt-get", "-y", "-q", *args, timeout=timeout, env=env)
    return time.monotonic() - start


def has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def namespace() -> Iterator[str]:
    """One namespace with a veth pair up, 192.0.2.11/24 on lbdt0: a node's interface."""
    ns = f"lbdt-package-{secrets.token_hex(2)}-n0"
    sh("ip", "netns", "add", ns)
    try:
        for cmd in (
            ("link", "add", "lbdt0", "type", "veth", "peer", "name", "lbdt1"),
            ("addr", "add", "192.0.2.11/24", "dev", "lbdt0"),
            ("link", "set", "lbdt1", "up"),
            ("link", "set", "lbdt0", "up"),
        ):
            sh("ip", "-n", ns, *cmd)
        yield ns
    finally:
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def package(tmp_path: Path) -> Iterator[tuple[Path, dict[str, float]]]:
    """Build the .deb; purge it afterwards whatever happened (and the group, if the
    package created it: that is the test cleaning up after itself)."""
    if installed():
        pytest.fail(
            "the lbd package is already installed here; this test installs and "
            "purges its own (dpkg --purge lbd first)"
        )
    for path in (ETC, STATE):
        if path.exists():
            pytest.fail(f"{path} exists; this test purges the package, which removes it")
    group_before = has_group("lbd")
    dist = tmp_path / "dist"
    start = time.monotonic()
    sh("make", "-C", str(REPO), "deb", f"DIST={dist}", timeout=600)
    figures = {"build_s": time.monotonic() - start}
    (deb,) = dist.glob("lbd_*_all.deb")
    try:
        yield deb, figures
    finally:
        if installed():
            apt("purge", "lbd")
        if not group_before and has_group("lbd"):
            sh("delgroup", "--system", "--quiet", "lbd", check=False)
        shutil.rmtree(ETC, ignore_errors=True)
        shutil.rmtree(STATE, ignore_errors=True)


@pytest.mark.timeout(1200)
def test_package_installs_runs_removes_and_purges(
    package: tuple[Path, dict[str, float]], namespace: str, tmp_path: Path
) -> None:
    deb, figures = package
    fields = sh("dpkg-deb", "-f", str(deb), "Architecture", "Depends", "Recommends").stdout
    assert "Architecture: all" in fields and "Recommends: tcpdump" in fields, fields
    for dep in (
        "python3-nftables",
        "python3-msgpack",
        "python3-cryptography",
        "python3-numpy",
        "python3-pyroute2",
        "nftables",
        "iproute2",
    ):
        assert dep in fields, fields
    contents = sh("dpkg-deb", "-c", str(deb)).stdout
    modules = [ln for ln in contents.splitlines() if "/dist-packages/lbd/" in ln]
    assert any(ln.endswith("/lbd/daemon/cli.py") for ln in modules), contents
    assert any(ln.endswith("/lbd/protocol/wire.py") for ln in modules), contents
    assert not [ln for ln in modules if ln.startswith("l")], "symlinks in the package"

    # systemd is not PID 1 on CI machines, so the stop on removal cannot be watched
    # here: check that the package's prerm does it where systemd runs.
    control = tmp_path / "control"
    sh("dpkg-deb", "-e", str(deb), str(control))
    prerm = (control / "prerm").read_text()
    assert "deb-systemd-invoke stop 'lbd.service'" in prerm and '"$1" = remove' in prerm

    figures["install_s"] = apt("install", str(deb))
    for path in FILES:
        assert Path(path).is_file(), path
    assert "ExecStart=/usr/bin/lbd run" in UNIT.read_text()
    assert has_group("lbd")
    assert stat.S_IMODE(STATE.stat().st_mode) == 0o750
    assert WANTS.is_symlink() and WANTS.resolve() == UNIT.resolve()  # enabled

    # The installed code runs on Debian's own libraries, from /usr/lib/python3.
    probe = (
        "import importlib.metadata as m, lbd.daemon.cli as c; print(c.__file__); "
        "print(' '.join(f'{n}={m.version(n)}' for n in "
        f"{sorted(DEBIAN_VERSIONS)!r}))"
    )
    where, versions = sh("/usr/bin/python3", "-c", probe, env=CLEAN_ENV, cwd=tmp_path).stdout.split(
        "\n"
    )[:2]
    assert where == "/usr/lib/python3/dist-packages/lbd/daemon/cli.py"
    assert versions == " ".join(f"{n}={DEBIAN_VERSIONS[n]}" for n in sorted(DEBIAN_VERSIONS))

    # The operator's steps (README "Running it on servers"), in a namespace.
    example = (ETC / "lbd.toml.example").read_text()
    (ETC / "lbd.toml").write_text(example.replace('interface = "eth0"', 'interface = "lbdt0"'))
    sh("/usr/bin/lbd", "keygen", "/etc/lbd/cluster.key", env=CLEAN_ENV, cwd=tmp_path)
    assert stat.S_IMODE((ETC / "cluster.key").stat().st_mode) == 0o600
    checked = sh(
        "ip",
        "netns",
        "exec",
        namespace,
        "/usr/bin/lbd",
        "check-config",
        env=CLEAN_ENV,
        cwd=tmp_path,
    ).stdout
    assert "/etc/lbd/lbd.toml: ok: cluster 'lbd'" in checked, checked
    assert "at 192.0.2.11 on lbdt0, VIPs 192.0.2.100" in checked, checked
    bad = sh(
        "/usr/bin/lbd",
        "check-config",
        "--config",
        str(tmp_path / "missing.toml"),
        env=CLEAN_ENV,
        cwd=tmp_path,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert (
        sh(
            "/usr/bin/lbd-cli",
            "--socket",
            str(tmp_path / "none.sock"),
            "status",
            env=CLEAN_ENV,
            check=False,
        ).returncode
        == 1
    )

    # A real 3-node cluster in namespaces, from the installed files.
    lab = sh("/usr/bin/lbd", "lab", "--json", env=CLEAN_ENV, cwd=tmp_path, timeout=600)
    result = json.loads(lab.stdout)
    assert result["nodes"] == 3 and result["converged_after"], result
    assert result["duplicate_synacks"] == 0 and result["duplicate_udp_answers"] == 0, result
    assert result["broken_connections"] == 0, result

    figures["remove_s"] = apt("remove", "lbd")
    for path in ("/usr/bin/lbd", "/usr/bin/lbd-cli", str(UNIT)):
        assert not Path(path).exists(), path
    assert sh("dpkg-query", "-W", "-f", "${db:Status-Status}", "lbd").stdout == "config-files"
    for path in ("lbd.toml", "cluster.key", "lbd.toml.example"):
        assert (ETC / path).is_file(), path  # configuration kept
    assert STATE.is_dir()
    assert not WANTS.exists()  # the unit is gone: nothing can start it
    assert not os.path.exists("/usr/lib/python3/dist-packages/lbd")

    figures["purge_s"] = apt("purge", "lbd")
    assert not installed()
    assert not ETC.exists() and not STATE.exists()
    assert not WANTS.is_symlink()  # enablement forgotten
    assert has_group("lbd")  # kept, as Debian does with system groups
    print(
        f"\npackage: {deb.stat().st_size} bytes, "
        + ", ".join(f"{k} {v:.1f}" for k, v in figures.items())
        + "; lab: "
        + ", ".join(
            f"{k} {result.get(k)}"
            for k in ("outage_ms", "served_again_ms", "duplicate_synacks", "broken_connections")
        )
    )
