"""Figures for the README from the JSON the failover benches write into bench/out/.

    .venv/bin/pip install -e '.[bench]'      # matplotlib, not needed by CI
    .venv/bin/python bench/failover_lab.py --out bench/out/failover_lab.json
    .venv/bin/python bench/keepalived_lab.py --out bench/out/keepalived_lab.json
    .venv/bin/python bench/failover_lab.py --fault service --profiles default \
        --out bench/out/failover_lab_service.json          # optional, docs/service.png
    .venv/bin/python bench/keepalived_lab.py --fault service \
        --out bench/out/keepalived_lab_service.json        # optional, docs/service.png
    .venv/bin/python bench/plots.py [--lbd FILE] [--keepalived FILE] [--docs docs]

* ``docs/failover.png``: client-visible outage of every trial (dots) with box plots,
  per system and timer setting (longest heartbeat first, lbd and keepalived side by
  side at equal interval; lbd under host death too if failover_lab_hostdeath.json
  exists), log scale, p50/p99 written above each;
* ``docs/share.png``: new connections per 100 ms per answering node (stacked) and
  failed attempts, from 2 s before to 3 s after the first failure of each run; one
  panel per run (lbd default, lbd fast, keepalived 1 s, 0.1 s, ...);
* ``docs/service.png`` (if the ``--fault service`` files exist): as failover.png, for
  a killed service under a live daemon (lbd's ``[[check]]``, keepalived's
  ``vrrp_script``, the same check interval, rise and fall).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
NODE_COLOURS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]
FAIL_COLOUR = "#d62728"


def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        print(f"plots: {path} missing, skipped", file=sys.stderr)
        return []
    results: list[dict[str, Any]] = json.loads(path.read_text())["results"]
    return results


def label(result: dict[str, Any]) -> str:
    check = result.get("check")
    if check:
        how = f"check {check['interval_s']:g} s × fall {check['fall']}"
        if result["system"] == "lbd":
            return f"lbd {result['profile']}\n({how})"
        return f"keepalived advert_int\n{result['advert_int_s']:g} s ({how})"
    if result["system"] == "lbd":
        return f"lbd {result['profile']}\n({result['interval_ms']} ms heartbeat)"
    return f"keepalived\nadvert_int {result['advert_int_s']:g} s"


def fault_name(result: dict[str, Any]) -> str:
    return {"kill": "daemon SIGKILL", "hostdeath": "host death", "service": "service killed"}.get(
        result.get("fault", "kill"), str(result.get("fault"))
    )


def failover_png(
    results: list[dict[str, Any]],
    path: Path,
    title: str = (
        "Failover after a node failure: lbd vs keepalived (VRRP), 3 nodes, same bed, same load"
    ),
) -> None:
    rows = [r for r in results if r.get("outages_ms")]
    fig, ax = plt.subplots(figsize=(max(9, 1.7 * len(rows)), 5.4), dpi=110)
    data = [r["outages_ms"] for r in rows]
    ax.boxplot(data, widths=0.5, showfliers=False, medianprops={"color": "black"})
    rng = random.Random(1)
    for i, (row, values) in enumerate(zip(rows, data, strict=True), start=1):
        colour = "#1f77b4" if row["system"] == "lbd" else "#ff7f0e"
        xs = [i + rng.uniform(-0.15, 0.15) for _ in values]
        ax.scatter(xs, values, s=16, alpha=0.75, color=colour, zorder=3)
        o = row["outage_ms"]
        ax.annotate(
            f"p50 {o['p50']:.0f}\np99 {o['p99']:.0f} ms",
            (i, max(values)),
            xytext=(0, 8),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(
        range(1, len(rows) + 1),
        [f"{label(r)}\n{fault_name(r)}, n={len(r['outages_ms'])}" for r in rows],
        fontsize=8,
    )
    ax.set_yscale("log")
    ax.set_ylim(30, 10000)
    ax.set_ylabel("client-visible outage (ms, log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def share_png(results: list[dict[str, Any]], path: Path) -> None:
    rows = [r for r in results if r.get("timeline")]
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(9, 2.3 * len(rows)), dpi=110, sharex=True, squeeze=False
    )
    for ax, row in zip(axes[:, 0], rows, strict=True):
        tl = row["timeline"]
        step, t0 = tl["step_s"], tl["t0_s"]
        count = len(tl["failed"])
        xs = [t0 + step * (k + 0.5) for k in range(count)]
        bottom = [0] * count
        for n, (name, counts) in enumerate(tl["nodes"].items()):
            short = name.rsplit("-", 1)[-1]
            ax.bar(
                xs,
                counts,
                width=step,
                bottom=bottom,
                label=short,
                color=NODE_COLOURS[n % len(NODE_COLOURS)],
                linewidth=0,
            )
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
        ax.bar(
            xs,
            tl["failed"],
            width=step,
            bottom=bottom,
            label="failed",
            color=FAIL_COLOUR,
            alpha=0.6,
            linewidth=0,
        )
        ax.axvline(0, color="black", linestyle="--", linewidth=1)
        ax.set_title(
            f"{label(row).replace(chr(10), ' ')}: {fault_name(row)} of "
            f"{'n1' if row['system'] == 'lbd' else 'the master n0'} at t = 0",
            fontsize=9,
        )
        ax.set_ylabel(f"new conns\nper {step * 1000:.0f} ms", fontsize=8)
        ax.set_ylim(0, max(b + f for b, f in zip(bottom, tl["failed"], strict=True)) * 1.1)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    axes[-1, 0].set_xlabel(
        "time relative to the failure (s); connections counted when they "
        "complete, a failed one when its 0.25 s connect timeout expires",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lbd", type=Path, default=OUT / "failover_lab.json")
    parser.add_argument(
        "--lbd-hostdeath",
        type=Path,
        default=OUT / "failover_lab_hostdeath.json",
        help="optional: failover_lab.py --fault hostdeath (outages only)",
    )
    parser.add_argument("--keepalived", type=Path, default=OUT / "keepalived_lab.json")
    parser.add_argument(
        "--lbd-service",
        type=Path,
        default=OUT / "failover_lab_service.json",
        help="optional: failover_lab.py --fault service",
    )
    parser.add_argument(
        "--keepalived-service",
        type=Path,
        default=OUT / "keepalived_lab_service.json",
        help="optional: keepalived_lab.py --fault service",
    )
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    results = load(args.lbd) + load(args.keepalived)
    service = [
        r for f in (args.lbd_service, args.keepalived_service) if f.exists() for r in load(f)
    ]
    if not results and not service:
        print("plots: no results to plot", file=sys.stderr)
        return 1
    args.docs.mkdir(parents=True, exist_ok=True)
    if results:
        extra = load(args.lbd_hostdeath) if args.lbd_hostdeath.exists() else []
        # Longest heartbeat first; at equal interval lbd, then keepalived, side by side.
        ordered = sorted(
            results + extra,
            key=lambda r: (-r["interval_ms"], r["system"] != "lbd", r.get("fault", "")),
        )
        failover_png(ordered, args.docs / "failover.png")
        share_png(
            sorted(results, key=lambda r: (r["system"] != "lbd", -r["interval_ms"])),
            args.docs / "share.png",
        )
        print(f"wrote {args.docs / 'failover.png'} and {args.docs / 'share.png'}")
    if service:  # lbd first, then keepalived, longest advertisement first
        failover_png(
            sorted(service, key=lambda r: (r["system"] != "lbd", -r["interval_ms"])),
            args.docs / "service.png",
            "Service killed, daemon and host up: lbd [[check]] vs keepalived "
            "vrrp_script (same check), 3 nodes, same bed, same load",
        )
        print(f"wrote {args.docs / 'service.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
