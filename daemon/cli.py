"""``lbd``: run the daemon, check a config, make a cluster key.

    lbd run [--config /etc/lbd/lbd.toml]
    lbd check-config [--config PATH]      parse, read the key, resolve the interface
    lbd keygen PATH [--force]              new random key, mode 0600
    lbd keygen PATH --add|--promote|--retire   the three steps of a key rotation

Exit codes: 0 ok; 1 runtime failure (lock held, kernel refused the rules, kernel
apply failed later); 2 configuration or key-file mistake (one line naming the
file, the key and the problem, never a traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import sys
import traceback
from pathlib import Path

from lbd.daemon.config import (
    DEFAULT_CONFIG_PATH,
    ROTATION_STEPS,
    ConfigFileError,
    DaemonConfig,
    check_vips_against_address,
    default_node_id,
    load_config,
    load_keyring,
    write_key,
)
from lbd.daemon.notify import ERR, LogSink, Notifier, SinkHandler
from lbd.netcfg.linkproc import resolve_address
from lbd.protocol.errors import ConfigError, LbdError
from lbd.protocol.wire import Keyring

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2


def _prepare(path: Path) -> tuple[DaemonConfig, Keyring, str, int, str]:
    """Everything a start needs that can be wrong in the config; ConfigFileError otherwise."""
    cfg = load_config(path)
    keyring = load_keyring(cfg.key_file)
    try:
        node_id = cfg.node_id or default_node_id()
    except ConfigError as exc:
        raise ConfigFileError(path, "node_id", str(exc)) from None
    # In a child process: the daemon itself never imports pyroute2 (see linkproc).
    ifindex, address = resolve_address(cfg.interface, cfg.address, path)
    # Checked here, not in load_config: the default own address is known only now.
    check_vips_against_address(path, cfg.vips, address)
    return cfg, keyring, node_id, ifindex, address


def _run(args: argparse.Namespace) -> int:
    from lbd.daemon.service import Service  # noqa: PLC0415 - keeps keygen/check light

    # A crash in native code (libnftables, numpy, OpenSSL) then leaves every thread's
    # Python stack on stderr, i.e. in the journal, beside the C library's last words.
    # Without a stderr that has a file descriptor (started without one, or in a test),
    # there is nowhere to write the stacks.
    with contextlib.suppress(RuntimeError, ValueError, OSError):
        faulthandler.enable(all_threads=True)
    path = Path(args.config)
    cfg, keyring, node_id, ifindex, address = _prepare(path)
    sink = LogSink()
    handler = SinkHandler(sink)
    root = logging.getLogger("lbd")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    service = Service(
        cfg,
        path,
        keyring,
        node_id=node_id,
        ifindex=ifindex,
        address=address,
        sink=sink,
        notifier=Notifier(),
    )
    try:
        code = asyncio.run(service.run())
    except ConfigFileError as exc:  # a state file the operator must look at
        sink.emit(ERR, f"cannot start: {exc}")
        return EXIT_CONFIG
    except LbdError as exc:
        sink.emit(ERR, f"cannot start: {exc}")
        return EXIT_RUNTIME
    except Exception as exc:
        # Unforeseen, so a bug: one line (the traceback only in the journal entry's
        # TRACEBACK field), and exit 1 so that systemd restarts the daemon.
        line = " ".join(f"internal error, stopping: {type(exc).__name__}: {exc}".split())
        sink.emit(ERR, line, "InternalError", {"TRACEBACK": traceback.format_exc().strip()})
        return EXIT_RUNTIME
    finally:
        root.removeHandler(handler)
    sink.emit(6, f"stopped (exit {code})", "Stopped")
    sink.close()
    return code


def _check(args: argparse.Namespace) -> int:
    cfg, keyring, node_id, _ifindex, address = _prepare(Path(args.config))
    rotation = (
        f" (also accepts {keyring.previous_fingerprint.hex()})"
        if keyring.previous_fingerprint is not None
        else ""
    )
    print(
        f"{args.config}: ok: cluster {cfg.cluster!r}, node {node_id} at {address} on "
        f"{cfg.interface}, VIPs {', '.join(cfg.vips)}, {cfg.buckets} buckets, "
        f"timers {cfg.timer_profile}, key {keyring.current_fingerprint.hex()}{rotation}"
    )
    return EXIT_OK


def _keygen(args: argparse.Namespace) -> int:
    step = next((s for s in ROTATION_STEPS if getattr(args, s)), None)
    done = write_key(args.path, step=step, force=args.force)
    ring = load_keyring(args.path)
    print(
        f"{args.path}: {done}; seals with {ring.current_fingerprint.hex()}"
        + (
            f", also accepts {ring.previous_fingerprint.hex()}"
            if ring.previous_fingerprint is not None
            else ""
        )
        + ". Copy it to every node and reload each (systemctl reload lbd) before the "
        "next step."
    )
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lbd", description="load-sharing daemon")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    run.set_defaults(func=_run)
    check = sub.add_parser("check-config", help="validate the config and key file")
    check.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    check.set_defaults(func=_check)
    keygen = sub.add_parser("keygen", help="write a new random cluster key")
    keygen.add_argument("path")
    how = keygen.add_mutually_exclusive_group()
    how.add_argument(
        "--add",
        action="store_true",
        help="rotation step 1: also accept a new key, still seal with the old",
    )
    how.add_argument(
        "--promote",
        action="store_true",
        help="rotation step 2: seal with the new key, still accept the old",
    )
    how.add_argument("--retire", action="store_true", help="rotation step 3: drop the old key")
    how.add_argument("--force", action="store_true", help="replace an existing file")
    keygen.set_defaults(func=_keygen)
    # Listed for --help only: main() hands `lbd lab ...` to the lab's own parser.
    sub.add_parser(
        "lab", help="a live cluster in network namespaces on this machine (lbd lab --help)"
    )
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lab"]:
        from lbd.daemon import lab  # noqa: PLC0415 (only the lab needs the test bed)

        return lab.main(argv[1:])
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigFileError as exc:
        print(f"lbd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LbdError as exc:
        print(f"lbd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_RUNTIME
    return code


if __name__ == "__main__":
    sys.exit(main())
