"""Draws the throughput ratios of a run: plot.py RESULTS.json OUT.png

One horizontal bar group per job (pattern, state, iodepth, connections):
ours/qemu-storage-daemon, ours/nbdkit and ours/raw (O_DIRECT), with the
targets marked (1.0 against qemu, 0.9 of nbdkit for tracking only).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401

from report import ratio_rows  # noqa: E402

SHORT = {
    ("tracking", "w4k"): "tracking, 4K rand write",
    ("tracking", "w1m"): "tracking, 1M seq write",
    ("first", "c4k"): "snapshot, first 4K write/chunk",
    ("first", "c1m"): "snapshot, first 1M seq write",
    ("rewrite", "w4k"): "snapshot, 4K rewrite",
    ("rewrite", "w1m"): "snapshot, 1M seq rewrite",
    ("fresh", "r1m"): "image read fresh, 1M seq",
    ("fresh", "r4k"): "image read fresh, 4K rand",
    ("copied", "r1m"): "image read copied, 1M seq",
    ("copied", "r4k"): "image read copied, 4K rand",
}


def main():
    results = json.load(open(sys.argv[1]))
    rows = ratio_rows(results)
    labels = [f"{SHORT[(r['state'], r['pattern'])]}  qd{r['iodepth']} x{r['conns']}" for r in rows]
    series = [("vs_qemu", "ours / qemu-storage-daemon", "#1f77b4"),
              ("vs_nbdkit", "ours / nbdkit file", "#ff7f0e"),
              ("vs_raw", "ours / raw file (O_DIRECT)", "#2ca02c")]
    n = len(rows)
    h = 0.27
    fig, ax = plt.subplots(figsize=(10, 0.42 * n + 1.8))
    for k, (key, name, color) in enumerate(series):
        ys = [i + (k - 1) * h for i in range(n)]
        xs = [r[key] if r[key] is not None else 0 for r in rows]
        ax.barh(ys, xs, height=h, label=name, color=color)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.axvline(0.9, color="grey", linewidth=1, linestyle="--")
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel("throughput ratio (log scale; 1 = equal, dashed = 0.9)")
    m = results["machine"]
    ax.set_title(f"blksnapd throughput ratios — {m['date']}, {m['cpu']}", fontsize=10, pad=22)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.02), ncol=3, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
