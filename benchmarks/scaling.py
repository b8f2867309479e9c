"""Step-cost scaling of NaturalGradient against Pyro's Adam with the dimension:
``python -m benchmarks.scaling [--quick] [--dims 50,100] [--seeds 3] [--steps 30]
[--dtype float32]``.

Logistic regression on d AR(1)-correlated features (:func:`benchmarks.problems.correlated_logistic`,
500 rows), for d in ``--dims``, with AutoMultivariateNormal, AutoLowRankMultivariateNormal and
AutoDiagonalNormal guides. Each (d, guide) runs in a fresh Python process; in it, per seed, one
NaturalGradient fit (library defaults) and one Adam fit run side by side with one torch thread,
their steps interleaved (the order alternating every step), so that both see the same machine
load; each ``svi.step`` is timed whole (ELBO and optimizer), and the optimizer call alone too.
Reported: the median step times, the ratio of the medians, the optimizer's share of
NaturalGradient's step, its halvings (backtracks) and undone steps per step, its O(d³)
linear-algebra calls and their multiply–adds (in units of d³) per optimizer step (counted on
extra untimed steps by ``tests/op_count.py``), the full-rank step's three-op floor, and per guide
the exponent b of a least-squares fit time ∝ d^b over the dims. ``--note`` adds a line to the
protocol (e.g. that the machine was shared); the load average is recorded at start and end.
``--dtype``: the data's and so the guide's dtype (default float64, as every benchmark; float32 is
Pyro's own default, and LAPACK's speed per multiply–add differs between the two). Writes
``benchmarks/results/scaling.md`` (``scaling_float32.md`` for float32); ``--quick`` (two small
dims, few steps, one seed) writes under ``benchmarks/results/quick/``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
)
from pyro.optim import Adam

from pyro_natgrad import NaturalGradient, StepRefusedWarning
from pyro_natgrad.demo import logistic_model
from pyro_natgrad.families.gaussian_step import lower_product, lower_solve
from tests.op_count import count_ops

from .problems import DTYPE, correlated_logistic

RESULTS = Path(__file__).resolve().parent / "results"
GUIDES = {"AutoMultivariateNormal": AutoMultivariateNormal,
          "AutoLowRankMultivariateNormal": AutoLowRankMultivariateNormal,
          "AutoDiagonalNormal": AutoDiagonalNormal}
DIMS, QUICK_DIMS = (50, 100, 200, 500, 1000), (20, 50)
ROWS = 500
PARTICLES = 8
ADAM_LR = 0.01  # the step cost of Adam does not depend on it
WARMUP = 2  # untimed steps of each fit before the clock starts
COUNTED = 3  # untimed NaturalGradient steps after the timed ones, with the O(d³) counter on


class _Timed:
    """Wraps an optimizer so that ``svi.step`` calls are timed for the optimizer alone, or, with
    ``count`` set to d, have their O(d³) calls counted (not timed) as (calls, factorizations,
    multiply–adds / d³)."""

    def __init__(self, optim):
        self.optim, self.seconds, self.counts = optim, [], []
        self.count: int | None = None

    def __call__(self, *args, **kwargs):
        if self.count is not None:
            with count_ops(self.count) as ops:
                out = self.optim(*args, **kwargs)
            self.counts.append((ops.cubic, ops.factorizations, ops.work))
            return out
        start = time.perf_counter()
        out = self.optim(*args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        return out

    def __getattr__(self, name):
        return getattr(self.optim, name)


@dataclass
class Row:
    """One (d, guide): per-seed medians and NaturalGradient's counters."""

    ng: list[float] = field(default_factory=list)  # median svi.step seconds, per seed
    adam: list[float] = field(default_factory=list)
    ng_optim: list[float] = field(default_factory=list)  # median optimizer-call seconds
    halvings: list[float] = field(default_factory=list)  # per step
    undone: list[float] = field(default_factory=list)
    cubic: list[float] = field(default_factory=list)  # O(d³) calls per optimizer step
    factorizations: list[float] = field(default_factory=list)
    work: list[float] = field(default_factory=list)  # multiply–adds / d³ per optimizer step
    floor: list[float] = field(default_factory=list)  # seconds: NG's step with a 3-op optimizer
    refused: int = 0

    def ratio(self) -> float:
        return statistics.median(self.ng) / statistics.median(self.adam)

    def floor_ratio(self) -> float | None:
        """The three-op floor over Adam's step (full rank only, else None)."""
        return statistics.median(self.floor) / statistics.median(self.adam) if self.floor else None


class _ThreeOps:
    """The three O(d³) operations a full-covariance natural step cannot do without
    (:mod:`pyro_natgrad.families.gaussian_step`): S's product Lᵀtril(∂L/∂L), one Cholesky of
    B = I + ρS and the new factor's solve L U⁻ᵀ, on d×d data of the benchmark's kind and dtype,
    each timed call running all three once."""

    def __init__(self, d: int, dtype: torch.dtype = DTYPE):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(d, d, generator=g, dtype=dtype) / d**0.5
        self.tril = torch.linalg.cholesky(a @ a.mT + torch.eye(d, dtype=dtype))
        self.grad = torch.randn(d, d, generator=g, dtype=dtype).tril()
        self.b = self.tril @ self.tril.mT

    def __call__(self) -> float:
        start = time.perf_counter()
        lower_product(self.tril.mT, self.grad)
        factor = torch.linalg.cholesky_ex(self.b).L
        lower_solve(self.tril, factor)
        return time.perf_counter() - start


def _named(guide_class: type, prefix: str) -> type:
    """A subclass whose params are stored under its own name, so that two fits of the same
    guide share one process (and one param store) without sharing params."""
    return type(prefix + guide_class.__name__, (guide_class,), {})


def measure(d: int, label: str, seed: int, steps: int, row: Row,
            dtype: torch.dtype = DTYPE) -> None:
    """One seed: a NaturalGradient fit and an Adam fit, steps interleaved."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    X, y = correlated_logistic(d, ROWS, dtype=dtype, seed=seed)
    fits = {}
    for name, make in (("ng", NaturalGradient), ("adam", lambda g: Adam({"lr": ADAM_LR}))):
        guide = _named(GUIDES[label], name.upper() + "_")(logistic_model)
        elbo = Trace_ELBO(num_particles=PARTICLES, vectorize_particles=True)
        with torch.no_grad():
            elbo.loss(logistic_model, guide, X, y)  # creates the params
        svi = SVI(logistic_model, guide, make(guide), elbo)
        svi.optim = _Timed(svi.optim)
        fits[name] = svi
    times: dict[str, list[float]] = {"ng": [], "adam": []}
    three_ops = _ThreeOps(d, dtype) if label == "AutoMultivariateNormal" else None
    floor_ops: list[float] = []
    halvings = undone = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StepRefusedWarning)
        for step in range(WARMUP + steps):
            order = ("ng", "adam") if step % 2 == 0 else ("adam", "ng")
            for name in order:
                start = time.perf_counter()
                fits[name].step(X, y)
                if step >= WARMUP:
                    times[name].append(time.perf_counter() - start)
            if step >= WARMUP:
                if three_ops is not None:
                    floor_ops.append(three_ops())
                last = fits["ng"].optim.last_step
                halvings += sum(v.get("backtracks", 0) or 0 for v in last.values())
                undone += any(v.get("method") == "undone" for v in last.values())
        ng_optim = fits["ng"].optim.seconds[-steps:]
        fits["ng"].optim.count = d
        for _ in range(COUNTED):
            fits["ng"].step(X, y)
        counts = fits["ng"].optim.counts
    row.refused += sum(issubclass(w.category, StepRefusedWarning) for w in caught)
    row.ng.append(statistics.median(times["ng"]))
    row.adam.append(statistics.median(times["adam"]))
    row.ng_optim.append(statistics.median(ng_optim))
    if floor_ops:  # NG's own step, its optimizer call replaced by the three operations
        row.floor.append(statistics.median(t - o for t, o in zip(times["ng"], ng_optim,
                                                                  strict=True))
                         + statistics.median(floor_ops))
    row.halvings.append(halvings / steps)
    row.undone.append(undone / steps)
    row.cubic.append(statistics.fmean(c for c, _, _ in counts))
    row.factorizations.append(statistics.fmean(f for _, f, _ in counts))
    row.work.append(statistics.fmean(w for _, _, w in counts))


def _measure_seeds(d: int, label: str, seeds: int, steps: int, dtype: torch.dtype) -> Row:
    torch.set_num_threads(1)
    row = Row()
    for seed in range(seeds):
        measure(d, label, seed, steps, row, dtype)
    return row


def measured_apart(d: int, label: str, seeds: int, steps: int,
                   dtype: torch.dtype = DTYPE) -> Row:
    """Every seed of one (d, guide) in a fresh Python process (one torch thread): the step
    times of a process that has just run other fits depend on what those fits left behind (at
    d = 500, after the full-rank fits, Adam's low-rank step measured 2.9× its time in a fresh
    process, NaturalGradient's 1.6×), so no (d, guide) inherits another's."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_measure_seeds, (d, label, seeds, steps, dtype))


def exponent(dims: list[int], values: list[float]) -> float:
    """b of the least-squares fit log value = a + b log d."""
    xs, ys = [math.log(d) for d in dims], [math.log(v) for v in values]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
            / sum((x - mx) ** 2 for x in xs))


def describe(args: argparse.Namespace) -> list[str]:
    """The protocol, printed before the runs and written above the table."""
    return [
        "## Protocol", "",
        f"* Logistic regression, {ROWS} rows of d AR(1)-correlated features (ρ = 0.9, "
        f"`benchmarks.problems.correlated_logistic`, {str(args.dtype).removeprefix('torch.')}), "
        "d ∈ "
        f"{{{', '.join(map(str, args.dims))}}}; guides {', '.join(GUIDES)} (Pyro defaults: "
        "low rank ≈ √d).",
        f"* `Trace_ELBO(num_particles={PARTICLES}, vectorize_particles=True)`. NaturalGradient: "
        f"library defaults; Adam: `pyro.optim.Adam(lr={ADAM_LR})`.",
        f"* One torch thread. Per d and guide, a fresh Python process; per seed "
        f"({args.seeds} seed(s)): both fits start from "
        f"Pyro's default initialisation in that process, {WARMUP} untimed warm-up steps each, "
        f"then {args.steps} timed steps each, interleaved (order alternating every step). "
        "Timed: the whole `svi.step` (ELBO, backward, optimizer), and the optimizer call alone.",
        "* Reported: median over seeds of each seed's median step time; ratio = NG / Adam of "
        "those; NG optimizer share = optimizer call / whole step; halvings and undone steps "
        f"per step (NaturalGradient's `last_step`); O(d³) calls per optimizer step (and the "
        f"factorizations among them) counted over {COUNTED} extra untimed steps by "
        "`tests/op_count.py`, with their multiply–adds in units of d³ (a d×d product 1, a "
        "Cholesky ⅓; it also sees work done in blocks smaller than d); b = least-squares "
        "exponent of time ∝ d^b over the dims.",
        "* Three-op floor (full rank): the ratio a natural step with nothing but its three "
        "unavoidable O(d³) operations would have, on this machine: NG's step less its optimizer "
        "call (median over steps), plus the median time of S = Lᵀtril(∂L/∂L) "
        "(`lower_product`), one Cholesky and L U⁻ᵀ (`lower_solve`) at the same d, timed once "
        "after every step pair, over Adam's step. Where it exceeds 2, no full-covariance "
        "natural step that reads only SVI's gradient meets 2× Adam here.",
        f"* Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} "
        f"cores, {torch.get_num_threads()} torch thread, Python {platform.python_version()}, "
        f"torch {torch.__version__}, pyro {pyro.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; load average at the start "
        f"{os.getloadavg()[0]:.1f}.",
        *([f"* {args.note}"] if args.note else []), ""]


def table(rows: dict[tuple[int, str], Row], dims: list[int]) -> list[str]:
    out = ["| guide | d | NG step ms | Adam step ms | ratio | NG optimizer share | "
           "halvings / step | undone / step | O(d³) calls / optimizer step (factorizations) | "
           "d³ multiply–adds / optimizer step | three-op floor ratio |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label in GUIDES:
        for d in dims:
            row = rows.get((d, label))
            if row is None:
                continue
            ng, adam = statistics.median(row.ng), statistics.median(row.adam)
            share = statistics.median(row.ng_optim) / ng
            floor = "—" if row.floor_ratio() is None else f"{row.floor_ratio():.2f}"
            out.append(f"| {label} | {d} | {1e3 * ng:.1f} | {1e3 * adam:.1f} | "
                       f"{row.ratio():.2f} | {share:.0%} | {statistics.fmean(row.halvings):.1f} | "
                       f"{statistics.fmean(row.undone):.2f} | {statistics.fmean(row.cubic):.1f} "
                       f"({statistics.fmean(row.factorizations):.1f}) | "
                       f"{statistics.fmean(row.work):.2f} | {floor} |")
    out += ["", "| guide | b (NG step) | b (Adam step) | b (ratio) |", "|---|---:|---:|---:|"]
    for label in GUIDES:
        have = [d for d in dims if (d, label) in rows]
        if len(have) < 2:
            continue
        ng = [statistics.median(rows[d, label].ng) for d in have]
        adam = [statistics.median(rows[d, label].adam) for d in have]
        out.append(f"| {label} | {exponent(have, ng):.2f} | {exponent(have, adam):.2f} | "
                   f"{exponent(have, [a / b for a, b in zip(ng, adam, strict=True)]):.2f} |")
    refused = sum(r.refused for r in rows.values())
    if refused:
        out += ["", f"{refused} NaturalGradient steps were refused (StepRefusedWarning)."]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small dims, 5 steps, 1 seed")
    parser.add_argument("--dims", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--guides", type=lambda s: s.split(","), default=list(GUIDES))
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--note", default="", help="a line added to the protocol")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    args.dims = args.dims or list(QUICK_DIMS if args.quick else DIMS)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.steps = args.steps or (5 if args.quick else 30)
    unknown = sorted(set(args.guides) - set(GUIDES))
    if unknown:
        parser.error(f"--guides: unknown {unknown}; choose from {list(GUIDES)}")
    name = "scaling.md" if args.dtype == torch.float64 else "scaling_float32.md"
    out = args.out or (RESULTS / "quick" / name if args.quick else RESULTS / name)
    torch.set_num_threads(1)
    protocol = describe(args)
    print("\n".join(protocol))
    rows: dict[tuple[int, str], Row] = {}
    start = time.perf_counter()
    for d in args.dims:
        for label in args.guides:
            rows[d, label] = row = measured_apart(d, label, args.seeds, args.steps, args.dtype)
            floor = "" if row.floor_ratio() is None else f", three-op floor {row.floor_ratio():.2f}"
            print(f"d = {d}, {label}: NG {1e3 * statistics.median(row.ng):.1f} ms, Adam "
                  f"{1e3 * statistics.median(row.adam):.1f} ms, ratio {row.ratio():.2f}{floor} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    lines = ["# Step-cost scaling: NaturalGradient vs Adam", "",
             f"`python -m benchmarks.scaling{' --quick' if args.quick else ''}` "
             f"({(time.perf_counter() - start) / 60:.1f} min; load average at the end "
             f"{os.getloadavg()[0]:.1f})", "", *protocol,
             "## Step cost", "", *table(rows, args.dims), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(table(rows, args.dims)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
