"""A tiny process that owns lbd's nftables tables inside one namespace, for the tests.

Run inside a node namespace (the owner table lives as long as THIS process)::

    ip netns exec NS python -m lbd.testbed.nft_agent --vip 192.0.2.100 --buckets 4096 ...

Protocol: one JSON object per line on stdin, one JSON answer per line on stdout.
    {"op": "apply", "owned": [..], "lease_ms": 500}   -> {"ok": true, "stats": {...}}
    {"op": "install"} | {"op": "remove", "guard": true} | {"op": "ping"}
    {"op": "list"}  -> {"ok": true, "ruleset": {"owner": [..], "guard": [..]}}
    {"op": "text"}  -> {"ok": true, "text": "..."}
    {"op": "kernel_owned"} -> {"ok": true, "owned": [..]}
    {"op": "exit"}
Errors answer {"ok": false, "error": "...", "type": "NftError"}. On start it installs
(unless --no-install) and prints {"ready": true, "pid": PID}.

The test-side :class:`AgentClient` starts one through the bed and talks to it with
bounded waits. The agent never starts children: libnftables' netlink socket is not
close-on-exec, and a child would keep the owner table alive after a SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any


def serve(args: argparse.Namespace) -> None:
    from lbd.netcfg.nft import NftDataplane

    dp = NftDataplane(
        args.vip,
        args.buckets,
        args.seed,
        prefix4=args.prefix4,
        prefix6=args.prefix6,
        balance=args.balance or "all",
        guard_period=args.guard_period,
    )

    def answer(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    if not args.no_install:
        try:
            dp.install()
        except Exception as exc:  # report, then exit non-zero: the test reads it
            answer({"ready": False, "error": str(exc), "type": type(exc).__name__})
            raise SystemExit(1) from exc
    answer({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req["op"]
            if op == "apply":
                dp.apply(frozenset(req["owned"]), req.get("lease_ms"), until_ns=req.get("until_ns"))
                stats = dp.last_apply_stats
                answer({"ok": True, "stats": asdict(stats) if stats else None})
            elif op == "install":
                dp.install()
                answer({"ok": True})
            elif op == "remove":
                dp.remove(guard=bool(req.get("guard", True)))
                answer({"ok": True})
            elif op == "list":
                answer({"ok": True, "ruleset": dp.ruleset()})
            elif op == "text":
                answer({"ok": True, "text": dp.ruleset_text()})
            elif op == "kernel_owned":
                answer({"ok": True, "owned": sorted(dp.kernel_owned())})
            elif op == "ping":
                answer({"ok": True, "mono": time.monotonic()})
            elif op == "exit":
                answer({"ok": True})
                return
            else:
                answer({"ok": False, "error": f"unknown op {op!r}", "type": "ValueError"})
        except Exception as exc:  # every failure goes back to the test as data
            answer({"ok": False, "error": str(exc), "type": type(exc).__name__})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vip", action="append", required=True)
    parser.add_argument("--buckets", type=int, default=4096)
    parser.add_argument("--seed", type=lambda s: int(s, 0), default=0x1BD)
    parser.add_argument("--prefix4", type=int, default=32)
    parser.add_argument("--prefix6", type=int, default=128)
    parser.add_argument("--balance", action="append")
    parser.add_argument("--guard-period", type=float, default=0.0)
    parser.add_argument("--no-install", action="store_true")
    serve(parser.parse_args())


# ---------------------------------------------------------------- test side


class AgentError(RuntimeError):
    """The agent answered ok=false, died, or did not answer in time."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


class AgentClient:
    """Start an agent in ``ns`` through a bed and talk to it (bounded waits)."""

    def __init__(
        self,
        bed: Any,
        ns: str,
        vips: list[str],
        *,
        buckets: int = 4096,
        seed: int = 0x1BD,
        extra: tuple[str, ...] = (),
        timeout: float = 10.0,
    ) -> None:
        argv = ["-m", "lbd.testbed.nft_agent", "--buckets", str(buckets), "--seed", str(seed)]
        for vip in vips:
            argv += ["--vip", vip]
        argv += list(extra)
        self.ns = ns
        self.proc: subprocess.Popen[str] = bed.python(
            ns, *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.pid = self.proc.pid
        self.hello = self._read(timeout)
        if not self.hello.get("ready"):
            raise AgentError(f"agent in {ns} failed: {self.hello}", self.hello.get("type", ""))

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"agent in {self.ns} did not answer within {timeout}s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise AgentError(f"agent in {self.ns} exited ({self.proc.poll()})")
                result: dict[str, Any] = json.loads(line)
                return result

    def call(self, op: str, timeout: float = 10.0, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        reply = self._read(timeout)
        if not reply.get("ok"):
            raise AgentError(f"{op} in {self.ns}: {reply.get('error')}", reply.get("type", ""))
        return reply

    def apply(
        self, owned: Any, lease_ms: int | None = 5000, until_ns: int | None = None
    ) -> dict[str, Any]:
        stats: dict[str, Any] = self.call(
            "apply", owned=sorted(owned), lease_ms=lease_ms, until_ns=until_ns
        )["stats"]
        return stats

    def ruleset(self) -> dict[str, list[dict[str, Any]]]:
        result: dict[str, list[dict[str, Any]]] = self.call("list")["ruleset"]
        return result

    def signal(self, sig: int) -> None:
        """Signal the agent by its own PID (``ip netns exec`` execs in place)."""
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def stop(self) -> None:
        """Ask it to exit; SIGKILL (by PID) if it does not within 3 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(AgentError, OSError, ValueError):
                self.call("exit", timeout=3.0)
            try:
                self.proc.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout=5.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


if __name__ == "__main__":
    main()
