"""link.py's netlink work in a short-lived child process, so the daemon never imports pyroute2.

pyroute2 (with the ndb/ipdb/sqlite3 modules its package pulls in) adds about
12 MB to a process that imports it, and the daemon needs netlink for addresses
and the MAC only at start and stop. So ``lbd run`` asks a child
(``python -m lbd.netcfg.linkproc``, one JSON request on stdin, one JSON answer
on stdout) to resolve the interface, apply the link settings, and restore them.
The child works in the daemon's network namespace and with its privileges, and
gets no inherited file descriptors (``close_fds``): the libnftables socket that
owns ``inet lbd`` must never live on in another process.

The daemon's kernel watch (daemon/kernelwatch.py) runs ``apply`` again, with a short
timeout, to put back a VIP, the shared MAC or a sysctl that someone changed, and
reads what lbd set from link.py's record (``recorded_sysctls``) without pyroute2.

Errors keep their kind: a config mistake comes back as ``ConfigFileError``
(file, key, problem), a link failure as :class:`LinkProcessError` with link.py's
message. A child that dies, hangs past ``TIMEOUT`` or prints garbage is a
:class:`LinkProcessError` too.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lbd.netcfg import netlink as nl
from lbd.netcfg.statefile import RecordError, load_record
from lbd.protocol.errors import LbdError

TIMEOUT = 60.0
NICE = 5
PROC_SYS = Path("/proc/sys")  # follows the reading thread's network namespace


class LinkProcessError(LbdError):
    """The link helper failed; the message is link.py's (it names the interface)."""


def call(request: dict[str, Any], timeout: float = TIMEOUT) -> Any:
    """Run one request in a child process; its result, or the error it reported."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lbd.netcfg.linkproc"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            close_fds=True,
        )
    except subprocess.TimeoutExpired:
        raise LinkProcessError(
            f"link helper ({request['op']}) did not finish within {timeout:.0f} s"
        ) from None
    except OSError as exc:
        raise LinkProcessError(f"cannot start the link helper: {exc.strerror}") from None
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LinkProcessError(
            f"link helper ({request['op']}) failed with exit code {done.returncode}: {detail}"
        ) from None
    error = answer.get("error")
    if error is None:
        return answer.get("result")
    if "key" in error:
        from lbd.daemon.config import ConfigFileError  # noqa: PLC0415 - only on a config error

        raise ConfigFileError(error["path"], error["key"], error["problem"])
    raise LinkProcessError(str(error["message"]))


def resolve_address(interface: str, address: str | None, path: str | Path) -> tuple[int, str]:
    """(interface index, own IPv4 address), as ``lbd.daemon.config.resolve_address``."""
    index, found = call(
        {"op": "resolve", "interface": interface, "address": address, "path": str(path)}
    )
    return int(index), str(found)


class LinkProcess:
    """``LinkSetup``'s apply/restore, each run in a child process (same arguments)."""

    def __init__(
        self,
        interface: str,
        vips: Sequence[str],
        *,
        cluster_mac: str | None,
        state_file: str | Path,
    ) -> None:
        self.state_file = Path(state_file)
        self.params = {
            "interface": interface,
            "vips": list(vips),
            "cluster_mac": cluster_mac,
            "state_file": str(state_file),
        }

    def add_vip(self, index: int, address: str) -> bool:
        """Put one VIP back at once, over netlink from this process (no child, no
        pyroute2: ``netlink.add_vip``); ``apply`` still does the rest."""
        return nl.add_vip(index, address)

    def apply(self, timeout: float = TIMEOUT) -> None:
        """Idempotent (link.py): also what puts back a VIP, MAC or sysctl someone
        changed since (daemon/kernelwatch.py, with a short ``timeout``)."""
        call({"op": "apply", **self.params}, timeout)

    def restore(self) -> None:
        call({"op": "restore", **self.params})

    def sysctls_now(self) -> dict[str, tuple[str | None, str]]:
        """{sysctl path: (its value now, None if unreadable; the value lbd set)}."""
        now: dict[str, tuple[str | None, str]] = {}
        for key, want in self.recorded_sysctls().items():
            try:
                now[key] = ((PROC_SYS / key).read_text().strip(), want)
            except OSError:
                now[key] = (None, want)
        return now

    def recorded_sysctls(self) -> dict[str, str]:
        """{sysctl path under /proc/sys: the value lbd set} from link.py's record (read
        here, without pyroute2); empty if there is no readable record."""
        try:
            record = load_record(self.state_file, 1)
        except RecordError:
            return {}
        sysctls = record.get("sysctls") if record else None
        if not isinstance(sysctls, dict):
            return {}
        return {
            str(key): str(entry["set"])
            for key, entry in sysctls.items()
            if isinstance(entry, dict) and "set" in entry
        }


# ---------------------------------------------------------------- child side


def _serve(request: dict[str, Any]) -> Any:
    from lbd.daemon.config import resolve_address as resolve  # noqa: PLC0415
    from lbd.netcfg.link import LinkSetup  # noqa: PLC0415 - pyroute2 only in the child

    op = request["op"]
    if op == "resolve":
        return list(resolve(request["interface"], request["address"], request["path"]))
    if op not in ("apply", "restore"):
        raise LinkProcessError(f"unknown link helper request {op!r}")
    setup = LinkSetup(
        request["interface"],
        request["vips"],
        cluster_mac=request["cluster_mac"],
        state_file=request["state_file"],
    )
    getattr(setup, op)()
    return None


def main() -> int:
    # Below the daemon: on a small busy host its heartbeats matter more than this
    # child's ~150 ms of pyroute2 import (a restore runs while the node is drained).
    with contextlib.suppress(OSError):
        os.nice(NICE)
    from lbd.daemon.config import ConfigFileError  # noqa: PLC0415

    try:
        answer: dict[str, Any] = {"result": _serve(json.loads(sys.stdin.read()))}
    except ConfigFileError as exc:
        answer = {"error": {"path": exc.path, "key": exc.key, "problem": exc.problem}}
    except LbdError as exc:
        answer = {"error": {"message": str(exc)}}
    print(json.dumps(answer))
    return 0 if "result" in answer else 1


if __name__ == "__main__":
    sys.exit(main())
