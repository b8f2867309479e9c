"""Empirical Fisher diagonal: the seed's per-sample backward loop vs ``empirical_fisher`` (vmap).

Run from the repository root: ``python -m benchmarks.empirical_fisher [--repeats 7 --threads 1]``.
Writes ``benchmarks/results/empirical_fisher.md`` and ``benchmarks/results/empirical_fisher.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from pyro_natgrad.fisher.empirical import empirical_fisher
from tests.test_empirical_fisher import compute_empirical_fisher  # the seed's loop, verbatim

RESULTS = Path(__file__).parent / "results"
BATCHES = (32, 256, 2048)
NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "Linear(10,2)": lambda: nn.Sequential(nn.Linear(10, 2)),
    "MLP 10-64-2": lambda: nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 2)),
}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(repeats: int) -> list[dict[str, object]]:
    """Times both methods on every network and batch size; returns one row per pair."""
    rows = []
    for name, make in NETWORKS.items():
        for batch in BATCHES:
            torch.manual_seed(0)
            model = make()
            data = (model, torch.randn(batch, 10), torch.randint(0, 2, (batch,)),
                    nn.CrossEntropyLoss())
            loop, ours = compute_empirical_fisher(*data), empirical_fisher(*data)
            diff = max((a - b).abs().max().item() for a, b in zip(loop, ours, strict=True))
            t_loop = median_seconds(partial(compute_empirical_fisher, *data), repeats)
            t_ours = median_seconds(partial(empirical_fisher, *data), repeats)
            params = sum(p.numel() for p in model.parameters())
            rows.append(dict(network=name, batch=batch, params=params, loop=t_loop, ours=t_ours,
                             diff=diff))
            print(f"{name:>13} batch {batch:5d}: loop {1e3 * t_loop:9.2f} ms, "
                  f"vmap {1e3 * t_ours:7.2f} ms, speed-up {t_loop / t_ours:6.1f}x, "
                  f"max |diff| {diff:.1e}", flush=True)
    return rows


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def protocol(repeats: int) -> str:
    return (f"float32, CrossEntropyLoss, diagonal empirical Fisher. Median of {repeats} timed "
            f"calls (time.perf_counter) after 1 warm-up call, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s), CPU {cpu_name()} "
            f"({os.cpu_count()} logical cores, 1-min load average {os.getloadavg()[0]:.1f} at "
            f"start), Python {platform.python_version()}.")


def write_markdown(rows: list[dict[str, object]], repeats: int, path: Path) -> None:
    lines = [
        "# Empirical Fisher: seed's per-sample loop vs vectorized `empirical_fisher`",
        "",
        f"Protocol: {protocol(repeats)} Produced by `python -m benchmarks.empirical_fisher`.",
        "",
        "| network | params | batch | loop (ms) | vmap (ms) | speed-up loop/vmap | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['network']} | {r['params']} | {r['batch']} | {1e3 * r['loop']:.2f} | "
              f"{1e3 * r['ours']:.2f} | {r['loop'] / r['ours']:.1f}x | {r['diff']:.1e} |"
              for r in rows]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, object]], path: Path) -> None:
    fig = Figure(figsize=(10, 4))
    ax_time, ax_ratio = fig.subplots(1, 2)
    for name in NETWORKS:
        mine = [r for r in rows if r["network"] == name]
        batch = [r["batch"] for r in mine]
        line, = ax_time.loglog(batch, [1e3 * r["loop"] for r in mine], "o--",
                               label=f"{name}: seed loop")
        ax_time.loglog(batch, [1e3 * r["ours"] for r in mine], "s-", color=line.get_color(),
                       label=f"{name}: vmap")
        ax_ratio.loglog(batch, [r["loop"] / r["ours"] for r in mine], "o-", label=name)
    ax_time.set(xlabel="batch size", ylabel="median time per call (ms)",
                title="Diagonal empirical Fisher")
    ax_ratio.set(xlabel="batch size", ylabel="speed-up (loop / vmap)", title="Speed-up")
    ax_ratio.axhline(1.0, color="gray", lw=0.8)
    for ax in (ax_time, ax_ratio):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("Protocol:", protocol(args.repeats))
    rows = run(args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_markdown(rows, args.repeats, RESULTS / "empirical_fisher.md")
    plot(rows, RESULTS / "empirical_fisher.png")
    print(f"wrote {RESULTS / 'empirical_fisher.md'} and {RESULTS / 'empirical_fisher.png'}")


if __name__ == "__main__":
    main()
