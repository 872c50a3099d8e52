#!/usr/bin/env python3
"""Draws the PNG charts of a chatraftd-bench results folder from its results.json.

Usage: bench-charts.py RESULTS_DIR   (needs matplotlib: pip install matplotlib)
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SYSTEMS = ["chatraftd", "etcd", "nats"]
COLORS = {"chatraftd": "tab:blue", "etcd": "tab:orange", "nats": "tab:green"}
MODES = {"spread": "spread over all nodes", "leader": "all to the leader"}


def rows(data, key, system, mode=None):
    out = [r for r in data.get(key, []) if r.get("system") == system
           and (mode is None or r.get("mode") == mode)]
    return sorted(out, key=lambda r: r.get("concurrency", r.get("subscribers", 0)))


def throughput(data, out):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (mode, label) in zip(axes, MODES.items()):
        for s in SYSTEMS:
            r = rows(data, "writes", s, mode)
            if r:
                ax.plot([x["concurrency"] for x in r], [x["msgs_per_s"] for x in r],
                        marker="o", label=s, color=COLORS[s])
        ax.set_xscale("log", base=2)
        ax.set_title(f"writes {label}")
        ax.set_xlabel("concurrent writers")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("acknowledged msgs/s")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)


def latency(data, out):
    quants = [("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"), ("max_ms", "max")]
    fig, axes = plt.subplots(1, 4, figsize=(15, 4), sharey=True)
    for ax, (key, label) in zip(axes, quants):
        for s in SYSTEMS:
            r = rows(data, "writes", s, "spread")
            if r:
                ax.plot([x["concurrency"] for x in r], [x[key] for x in r],
                        marker="o", label=s, color=COLORS[s])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"write latency {label} (spread)")
        ax.set_xlabel("concurrent writers")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("ms")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)


def fanout(data, out):
    if not data.get("fanout"):
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in SYSTEMS:
        r = [x for x in rows(data, "fanout", s) if x.get("p99_ms") is not None]
        if not r:
            continue
        n = [x["subscribers"] for x in r]
        axes[0].plot(n, [x["p99_ms"] for x in r], marker="o", label=f"{s} p99", color=COLORS[s])
        axes[0].plot(n, [x["p50_ms"] for x in r], marker=".", linestyle="--",
                     label=f"{s} p50", color=COLORS[s])
        axes[1].plot(n, [x["deliveries_per_s"] for x in r], marker="o", label=s, color=COLORS[s])
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("subscribers")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0].set_yscale("log")
    axes[0].set_title("publish-to-delivery latency (ms)")
    axes[1].set_title("deliveries/s")
    fig.tight_layout()
    fig.savefig(out / "fanout.png", dpi=110)
    plt.close(fig)


def main():
    out = Path(sys.argv[1])
    data = json.loads((out / "results.json").read_text())
    if data.get("writes"):
        throughput(data, out)
        latency(data, out)
    fanout(data, out)


if __name__ == "__main__":
    main()
