"""The benchmarks' shared command line: ``--json``, ``--out FILE`` and ``--prefix``.

Every benchmark writes one JSON document: to a file with ``--out`` (bench/out/ by
convention; the README's figures come from there), to stdout with ``--json``, and
otherwise prints its own text summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_output_args(parser: argparse.ArgumentParser, *, prefix: str | None = None) -> None:
    """``--json`` and ``--out``; with ``prefix``, also ``--prefix`` (namespace names)."""
    if prefix is not None:
        parser.add_argument(
            "--prefix",
            default=prefix,
            help="namespace name prefix (lbdt-...; its leftovers are deleted)",
        )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the JSON here")


def emit(args: argparse.Namespace, document: dict[str, Any]) -> bool:
    """Write ``document`` to ``--out`` and print it with ``--json``; True if printed
    (the caller prints its text summary otherwise)."""
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=1) + "\n")
    if args.json:
        print(json.dumps(document, indent=2))
    return bool(args.json)
