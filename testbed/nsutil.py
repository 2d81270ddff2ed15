"""Namespace and process housekeeping for the test bed (bed.py re-exports all of it).

Bounded polling, listing and deleting named network namespaces, killing what is left
inside them (by PID), and the owner records in /run/lbd-testbed/ that let a later run
remove beds whose builder process died.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

RUN_NETNS = Path("/run/netns")
OWNER_DIR = Path("/run/lbd-testbed")

T = TypeVar("T")

TIME_SCALE = max(1.0, float(os.environ.get("LBD_TEST_TIME_SCALE") or 1))
"""Every bounded wait is this many times longer: for a bed inside an emulated machine
(tests/netns/test_vlan_vm.py), where everything runs several times slower."""


class BedError(RuntimeError):
    """The bed could not be built or a helper command failed."""


def wait_for(
    predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns a truthy value; bounded in time.

    Returns that value, raises TimeoutError naming ``what`` otherwise.
    """
    timeout *= TIME_SCALE
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what or predicate}")
        time.sleep(interval)


def netns_unavailable_reason() -> str | None:
    """Why this machine cannot build beds, or None if it can."""
    if os.geteuid() != 0:
        return "network-namespace tests need root"
    if shutil.which("ip") is None:
        return "iproute2 'ip' is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"'ip netns' unavailable: {probe.stderr.strip()}"
    return None


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    try:
        return sorted(os.listdir(RUN_NETNS))
    except FileNotFoundError:
        return []


def _pids_in(ns: str) -> list[int]:
    out = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False, timeout=10
    )
    return [int(tok) for tok in out.stdout.split() if tok.isdigit()]


def _is_gone(pid: int) -> bool:
    """True if ``pid`` is dead: absent, or a zombie waiting for a slow reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # The state field follows the parenthesised command name, which may hold spaces.
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


def delete_netns(names: Iterable[str]) -> None:
    """Kill what is left inside the namespaces (SIGKILL, by PID), then delete them."""
    names = [n for n in names if (RUN_NETNS / n).exists()]
    for name in names:
        # Only processes inside namespaces this bed created: started by its tests.
        for pid in _pids_in(name):
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    for name in names:

        def emptied(ns: str = name) -> bool:
            return all(_is_gone(pid) for pid in _pids_in(ns))

        with contextlib.suppress(TimeoutError):
            wait_for(emptied, 5.0, what=f"processes in {name} to die")
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=10)


def cleanup_prefix(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with ``prefix``; return their names."""
    if not prefix:
        raise ValueError("refusing to clean up an empty prefix")
    doomed = [n for n in list_netns() if n.startswith(prefix)]
    delete_netns(doomed)
    with contextlib.suppress(FileNotFoundError):
        (OWNER_DIR / prefix).unlink()
    for logdir in Path(tempfile.gettempdir()).glob(f"{prefix}*"):  # the bed's process logs
        shutil.rmtree(logdir, ignore_errors=True)
    return doomed


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def cleanup_stale(root: str = "lbdt-") -> list[str]:
    """Remove beds under ``root`` whose builder process is dead (crashed test runs).

    Beds of live processes (other test runs going on right now) are left alone, and
    so are namespaces without an owner file.
    """
    removed: list[str] = []
    if not OWNER_DIR.is_dir():
        return removed
    for owner in OWNER_DIR.iterdir():
        if not owner.name.startswith(root):
            continue
        try:
            record = json.loads(owner.read_text())
            alive = _start_time(int(record["pid"])) == record["start"]
        except (ValueError, KeyError, OSError):
            alive = False
        if not alive:
            removed += cleanup_prefix(owner.name)
    return removed


def write_owner(prefix: str) -> None:
    """Record that this process owns the bed ``prefix`` (for cleanup_stale)."""
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    # Written then renamed, so cleanup_stale never reads a half-written record.
    tmp = OWNER_DIR / f".{prefix}.{os.getpid()}"
    tmp.write_text(json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid())}))
    tmp.replace(OWNER_DIR / prefix)
