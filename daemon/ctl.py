"""``lbd-cli``: ask the local lbd daemon over its control socket.

    lbd-cli [--socket PATH] [--json] members|status|metrics|drain|undrain|table
    lbd-cli [--socket PATH] [--json] owner ADDRESS

Exit codes: 0 ok; 1 daemon not reachable; 2 usage error; 3 the daemon refused the
request; 4 (status only) the node is not converged or has no quorum.
Human output fits in 80 columns; ``--json`` prints the daemon's answer as is.
``metrics`` prints the Prometheus text exposition (0.0.4) of the snapshot that
``status`` shows (daemon/metrics.py).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

from lbd.protocol.errors import LbdError

DEFAULT_SOCKET = "/run/lbd/control.sock"
EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_REFUSED, EXIT_DEGRADED = 0, 1, 2, 3, 4
WIDTH = 80
TIMEOUT = 5.0


class CtlError(LbdError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def request(path: str, payload: dict[str, Any], timeout: float = TIMEOUT) -> Any:
    """Send one request, return the daemon's ``result`` or raise CtlError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(payload).encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except PermissionError:
        raise CtlError(
            f"permission denied on {path} (root or group lbd needed)", EXIT_UNREACHABLE
        ) from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise CtlError(
            f"cannot reach lbd at {path} (is the daemon running?)", EXIT_UNREACHABLE
        ) from None
    except OSError as exc:
        raise CtlError(
            f"cannot talk to lbd at {path}: {exc.strerror or exc}", EXIT_UNREACHABLE
        ) from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise CtlError(f"lbd at {path} sent no valid answer", EXIT_UNREACHABLE) from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else None
        raise CtlError(f"lbd refused: {error or 'unknown error'}", EXIT_REFUSED)
    return answer.get("result")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def format_members(rows: list[dict[str, Any]]) -> str:
    """One row per node; the node-ID column shrinks so that a line stays within 80."""
    fixed = [("ADDRESS", 15), ("STATE", 8), ("SLICES", 6), ("SHARE", 6), ("WEIGHT", 6),
             ("HEARD", 7), ("INCARNATION", 13)]  # fmt: skip
    used = 2 + sum(w + 1 for _, w in fixed)
    id_width = max(7, min(max((len(r["node_id"]) for r in rows), default=7), WIDTH - used))
    header = f"  {'NODE':<{id_width}} " + " ".join(
        f"{name:>{w}}" if name not in ("ADDRESS", "STATE") else f"{name:<{w}}" for name, w in fixed
    )
    lines = [header.rstrip()]
    for r in rows:
        heard = "-" if r.get("last_heard_ms") is None else f"{r['last_heard_ms']}ms"
        if r.get("is_self"):
            heard = "self"
        lines.append(
            f"{'*' if r.get('is_self') else ' '} {_clip(r['node_id'], id_width):<{id_width}} "
            f"{_clip(str(r['address']), 15):<15} {r['state']:<8} {r['slices']:>6} "
            f"{r['share']:>5.1f}% {r['weight']:>6} {heard:>7} "
            f"{_clip(str(r['incarnation']), 13):>13}".rstrip()
        )
    for r in rows:
        if r.get("health", "ok") != "ok":
            lines.append(_clip(f"  {r['node_id']} is {r['health']}", WIDTH))
        if r.get("mismatch"):
            lines.append(
                _clip(
                    f"  {r['node_id']} is not admitted: it differs in {', '.join(r['mismatch'])}",
                    WIDTH,
                )
            )
    keys = {r.get("key") for r in rows if r.get("key")}
    if len(keys) > 1:  # a key rotation under way: who seals with which key
        lines.append(
            "  sealing keys: "
            + ", ".join(f"{r['node_id']} {r['key']}" for r in rows if r.get("key"))
        )
    return "\n".join(lines)


def format_status(s: dict[str, Any]) -> str:
    lease = s["lease_remaining_ms"]
    c, e, k = s["counters"], s["events"], s["kernel"]
    lines = [
        f"node        {s['node_id']} at {s['address']} (incarnation {s['incarnation']})",
        f"view        {s['view']}  {_clip(' '.join(s['view_members']), WIDTH - 22)}",
        f"converged   {'yes' if s['converged'] else 'no'}",
        f"quorum      {'yes' if s['quorum'] else 'NO'} ({s['quorum_mode']})",
        f"lease       {'none' if lease is None else f'{lease} ms remaining'}",
        f"slices      {s['slices']} of {s['buckets']}"
        f"{' (draining)' if s['draining'] else ''}, weight {s['weight']}",
        f"datagrams   {c['accepted']} accepted, {c['sent']} sent; dropped: "
        f"{c['malformed']} malformed, {c['forged']} forged, {c['replayed']} replayed",
        f"changes     {c['view_changes']} view changes; slices gained "
        f"{e['slices_gained']}, released {e['slices_released']}; members lost "
        f"{e['members_lost']}",
        f"kernel      {k['applies']} applies, mean "
        f"{'-' if k['mean_apply_ms'] is None else k['mean_apply_ms']} ms, max "
        f"{k['max_apply_ms']} ms",
    ]
    keys = s.get("keys")
    if keys:
        lines.append(
            f"keys        seals with {keys['seals']}, accepts {', '.join(keys['accepts'])}"
        )
    lines += _health_lines(s.get("health"))
    lines += [f"PROBLEM     {problem}" for problem in s.get("problems", [])]
    return "\n".join(lines)


def _health_lines(health: dict[str, Any] | None) -> list[str]:
    """One line per check, tracked interface and the agent, then each one's output."""
    if not health:
        return []
    lines = [
        f"health      {'healthy' if health['healthy'] else 'UNHEALTHY'}"
        f"{' (serving anyway: every node is unhealthy)' if health['serving_anyway'] else ''}"
    ]
    for c in health["checks"]:
        latency = "" if c.get("latency_ms") is None else f" in {c['latency_ms']} ms"
        said = f": {c['reason']}" if c.get("reason") else ""
        extra = f", weight {c['weight']}" if c["kind"] == "agent" and "weight" in c else ""
        lines.append(
            _clip(
                f"  {c['kind']:<9} {c['name']:<12} {c['state']}"
                f"{extra} (last {c.get('result') or 'none'}{said}{latency})",
                WIDTH,
            )
        )
        if c.get("output"):
            lines.append(_clip(f"            output: {' '.join(c['output'].split())}", WIDTH))
    return lines


def format_table(t: dict[str, Any]) -> str:
    lines = [
        f"view {t['view']}, {t['buckets']} buckets"
        f"{'' if t['converged'] else ' (not converged: this is the target)'}"
    ]
    for node, runs in t["ranges"].items():
        text = " ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
        head = f"{node} ({t['counts'][node]}): "
        lines.append(_clip(head + (text or "-"), WIDTH))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    top = argparse.ArgumentParser(prog="lbd-cli", description="query the local lbd daemon")
    top.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    top.add_argument("--json", action="store_true", help="machine-readable output")
    sub = top.add_subparsers(dest="cmd", required=True)
    for name, text in (("members", "one row per node"), ("status", "this node's state"),
                       ("metrics", "Prometheus text exposition of the status"),
                       ("drain", "take no NEW connections, keep established ones"),
                       ("undrain", "take NEW connections again"),
                       ("table", "bucket ranges per node")):  # fmt: skip
        sub.add_parser(name, help=text)
    owner = sub.add_parser("owner", help="which node serves a client address")
    owner.add_argument("address")
    args = top.parse_args(argv)
    payload: dict[str, Any] = {"cmd": args.cmd}
    if args.cmd == "owner":
        payload["address"] = args.address
    try:
        result = request(args.socket, payload)
    except CtlError as exc:
        print(f"lbd-cli: {exc}", file=sys.stderr)
        return exc.code
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.cmd == "metrics":
        sys.stdout.write(result)  # the exposition ends with its own newline
    elif args.cmd == "members":
        print(format_members(result))
    elif args.cmd == "status":
        print(format_status(result))
    elif args.cmd == "table":
        print(format_table(result))
    elif args.cmd == "owner":
        held = "held here" if result["held_here"] else "not held here"
        print(
            f"{result['address']}: bucket {result['bucket']}, owner {result['owner']} "
            f"(view {result['view']}, {held})"
        )
    else:
        print("draining" if result["draining"] else "not draining")
    if args.cmd == "status" and not (result["converged"] and result["quorum"]):
        return EXIT_DEGRADED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
