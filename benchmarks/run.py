"""Benchmark of pyro_natgrad's optimizers against Pyro's Adam and ClippedAdam:
``python -m benchmarks.run [--quick] [--problems a,b] [--seeds 3]``.

Writes ``benchmarks/results/benchmark.md``: the protocol, one row per problem, guide and optimizer
family, and the peak-memory table; and one plot per problem and guide,
``benchmark_<problem>_<guide>.png`` (−ELBO gap vs steps and seconds). ``--quick`` writes the same
under ``benchmarks/results/quick/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import pyro
import torch
from pyro.optim import Adam

from pyro_natgrad import NaturalGradient
from pyro_natgrad.optim import FisherSolve

from . import protocol
from .problems import PROBLEMS, Problem, network
from .protocol import TOL, Comparison, Run, compare, median, peak_memory_mib

RESULTS = Path(__file__).resolve().parent / "results"
EARLY = 50  # the "fixed step budget" column: −ELBO gap after this many steps
MEMORY_WIDTHS, QUICK_WIDTHS = (25, 50, 100, 200), (10, 25)
QUICK_PROBLEMS = ("gaussian_regression", "beta_bernoulli", "breast_cancer_logistic", "sblrc-blr",
                  "logistic_d10000", "bnn_diabetes")  # one or two per section


def describe(args: argparse.Namespace, problems: dict[str, Problem]) -> list[str]:
    """The protocol, printed before the runs and written above the table."""
    grid = protocol.QUICK_GRID if args.quick else protocol.LR_GRID
    w2 = ("not available (ImportError): no rows" if protocol.WassersteinGradient is None else
          f"defaults, and as an extra row the best of lr {protocol.W2_GRID}")
    budgets = ", ".join(f"{name} {protocol.budget(problem, args.quick)[0]}"
                        for name, problem in problems.items())
    return [
        "## Protocol", "",
        "* Per problem, every optimizer gets the same model, guide, `Trace_ELBO` (vectorized, the "
        "particle count in the table), Pyro's default initialisation and the same step budget "
        f"({budgets}).",
        "* NaturalGradient (and its listed variants): library defaults, no tuning. Adam and "
        f"ClippedAdam: best of lr {grid}; WassersteinGradient: {w2}. Best = fewest steps to the "
        "target, then lowest final −ELBO, judged on seed 0; the chosen configuration then runs "
        f"on every seed ({args.seeds_used} seeds, medians reported; the seed-0 selection favours "
        "the tuned baselines slightly).",
        "* Reference optimum −ELBO*: exact (−log p(x)) where the guide family contains the "
        f"posterior; otherwise NaturalGradient with {protocol.REFERENCE_STEPS}× the budget and "
        f"{protocol.REFERENCE_PARTICLES}× the particles, evaluated with "
        f"{protocol.REFERENCE_PARTICLES}× the evaluation particles, lowered to any run's final "
        "−ELBO below it; for the BNN and the d = 500 and d = 10,000 logistic regressions (no "
        "optimum known, long runs too costly) the best final −ELBO of any run: gaps there are "
        "relative.",
        "* −ELBO evaluated at ~6 log-spaced checkpoints per decade with the problem's evaluation "
        "particles (not timed). Target: −ELBO ≤ −ELBO* + "
        f"{TOL} nats. Steps / seconds to target: the first checkpoint inside it (— : never).",
        "* Seconds: `time.perf_counter` around `svi.step` only (the optimizer's own work "
        "included, evaluation excluded); step cost: mean seconds per step / Adam's, same "
        "process; speed-up: Adam's median seconds to target / this optimizer's (> x: Adam did "
        "not reach it in its whole budget, x = Adam's total seconds / ours).",
        f"* Posterior error (posteriordb): max over parameters of |Δmean|/sd_ref / max "
        f"|log(sd/sd_ref)| from {protocol.POSTERIOR_DRAWS} guide draws against the reference NUTS "
        "moments, median over seeds.",
        f"* Machine: torch {torch.__version__}, pyro {pyro.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, 1 torch thread, a 2-core machine "
        "shared with other jobs (absolute seconds are noisy; ratios are measured in the same "
        "process).", ""]


def _num(x: float, digits: int = 2) -> str:
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "—"
    return f"{x:.2e}" if abs(x) >= 1e4 else f"{x:.{digits}f}"


def rows(c: Comparison) -> list[str]:
    """One Markdown row per optimizer family."""
    adam = c.runs["Adam"]
    adam_secs = median(r.first_within(c.reference)[1] for r in adam)
    adam_total = median(r.seconds[-1] if r.seconds else math.nan for r in adam)
    adam_cost = median(r.step_cost for r in adam)
    early = min(EARLY, c.steps)
    lines = []
    for family, runs in c.runs.items():
        steps_to = median(r.first_within(c.reference)[0] for r in runs)
        secs = median(r.first_within(c.reference)[1] for r in runs)
        if math.isfinite(secs) and math.isfinite(adam_secs):
            speedup = _num(adam_secs / secs, 1) + "×"
        elif math.isfinite(secs) and secs > 0:
            speedup = f"> {_num(adam_total / secs, 1)}×"
        else:
            speedup = "—"
        errors = [r.extra["posterior_error"] for r in runs if "posterior_error" in r.extra]
        posterior = (f"{_num(median(e[0] for e in errors))} / {_num(median(e[1] for e in errors))}"
                     if errors else "")
        notes = []
        failed = [r.failed for r in runs if r.failed]
        if failed:
            notes.append(f"{len(failed)}/{len(runs)} failed ({failed[0]})")
        refused, undone = sum(r.refused for r in runs), sum(r.undone for r in runs)
        if refused:
            notes.append(f"{refused} steps refused")
        if undone:
            notes.append(f"{undone}/{sum(len(r.step_seconds) for r in runs)} steps undone by "
                         "the adaptive rule")
        if family.startswith("NaturalGradient"):
            notes += behind(c, runs)
        lines.append(
            f"| {c.problem.name} | {c.guide} | {c.problem.particles} | {c.chosen[family]} | "
            f"{_num(steps_to, 0)} | {_num(secs)} | "
            f"{_num(median(r.loss_at(early) - c.reference for r in runs))} | "
            f"{_num(median(r.final - c.reference for r in runs))} | {speedup} | "
            f"{_num(median(r.step_cost for r in runs) / adam_cost)} | {posterior} | "
            f"{'; '.join(notes).replace('|', '/')} |")
    return lines


def behind(c: Comparison, runs: list[Run]) -> list[str]:
    """Where the best tuned Adam or ClippedAdam ends closer to −ELBO* than this NaturalGradient
    row (median final gaps, by more than 0.05 nats), what bounded it, read from its own runs:
    the median accepted step as a fraction of lr, the stationarity ceiling at the end, and the
    params its base optimizer stepped."""
    gap = median(r.final - c.reference for r in runs)
    gaps = {f: median(r.final - c.reference for r in c.runs[f]) for f in ("Adam", "ClippedAdam")}
    closest = min(gaps, key=gaps.__getitem__)
    other = gaps[closest]
    if not (math.isfinite(other) and other < gap - 0.05):
        return []
    rates = [x for r in runs for x in r.rates]
    why = [f"median step {_num(median(rates))}× lr" if rates else "",
           f"step ceiling at the end {_num(median(r.ceiling for r in runs))}× lr"
           if all(math.isfinite(r.ceiling) for r in runs) else "", runs[0].base]
    return [f"{c.chosen[closest]} ends closer ({_num(other)} vs {_num(gap)} nats): "
            + ", ".join(w for w in why if w)]


HEADER = ["| problem | guide | particles | optimizer | steps to target | s to target | "
          f"gap @{EARLY} | gap @budget | speed-up vs Adam | step cost / Adam | "
          "posterior error | notes |", "|" + "---|" * 12]


def plot(c: Comparison, folder: Path) -> str:
    """−ELBO − reference against steps and against optimizer seconds, seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for family, runs in c.runs.items():
        run = runs[0]
        gap = [max(loss - c.reference, 1e-2) for loss in run.losses]
        axes[0].loglog(run.steps, gap, label=c.chosen[family])
        axes[1].loglog(run.seconds, gap, label=c.chosen[family])
    for ax, xlabel in zip(axes, ("step", "optimizer seconds"), strict=True):
        ax.axhline(TOL, color="grey", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("−ELBO − reference (nats)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{c.problem.name}, {c.guide}, {c.problem.particles} particles (seed 0)")
    fig.tight_layout()
    path = folder / f"benchmark_{c.problem.name}_{c.guide}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


MEMORY_OPTIMIZERS = {
    "NaturalGradient(fisher=monte_carlo, form=cg)":
        lambda guide: NaturalGradient(guide, fisher="monte_carlo", solve=FisherSolve(form="cg")),
    "NaturalGradient(fisher=monte_carlo, form=dense)":
        lambda guide: NaturalGradient(guide, fisher="monte_carlo", solve=FisherSolve(form="dense")),
    "Adam(lr=0.01)": lambda guide: Adam({"lr": 0.01})}


def memory(widths: tuple[int, ...]) -> list[str]:
    """Peak allocation of one step on the diabetes BNN's AutoNormal guide, by hidden width."""
    optimizers = MEMORY_OPTIMIZERS
    lines = ["## Peak memory of one step (problem 6)", "",
             "Diabetes BNN of problem 5 with wider hidden layers, AutoNormal guide, 16 particles. "
             "Peak of torch's CPU allocations (torch profiler memory events) during the "
             "optimizer's own call, above what was live when it was called, then during the "
             "whole `svi.step` (loss, gradient and optimizer), and the step's seconds; last "
             "column: one dense n × n float64 matrix for comparison.", "",
             "| hidden | guide params n | " + " | ".join(optimizers) + " | n² float64 |",
             "|" + "---|" * (len(optimizers) + 3)]
    for hidden in widths:
        cells = []
        for make in optimizers.values():
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            model, guide, data, particles = network(hidden)
            start = time.perf_counter()
            step_mib, optim_mib = peak_memory_mib(model, guide, data, particles, make)
            cells.append(f"{optim_mib:.2f} / {step_mib:.1f} MiB "
                         f"({time.perf_counter() - start:.1f} s)")
        n = sum(p.numel() for p in pyro.get_param_store().values())
        dense = n * n * 8 / 2**20
        lines.append(f"| {hidden} | {n} | " + " | ".join(cells) + f" | {dense:.1f} MiB |")
        print(lines[-1], flush=True)
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, budgets / 10, lr grid (0.01, 0.1), problems "
                        + ",".join(QUICK_PROBLEMS))
    parser.add_argument("--problems", help="comma-separated, from: " + ", ".join(PROBLEMS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    parser.add_argument("--out", default="benchmark",
                        help="name of the Markdown file written (default: benchmark)")
    args = parser.parse_args(argv)
    args.seeds_used = 1 if args.quick else args.seeds
    names = (args.problems.split(",") if args.problems else
             list(QUICK_PROBLEMS if args.quick else PROBLEMS))
    unknown = [n for n in names if n not in PROBLEMS]
    if unknown:
        parser.error(f"unknown problem(s) {unknown}; choose from {list(PROBLEMS)}")
    torch.set_num_threads(1)
    folder = RESULTS / "quick" if args.quick else RESULTS
    folder.mkdir(exist_ok=True)
    started, cpu = time.time(), time.process_time()
    problems = {name: PROBLEMS[name]() for name in names}
    text = describe(args, problems)
    print("\n".join(text), flush=True)
    table, references, plots = [], [], []
    for name, problem in problems.items():
        for label in problem.guides:
            tick = time.time()
            c = compare(problem, label, args.seeds_used, args.quick)
            table += rows(c)
            plots.append(plot(c, folder))
            references.append(f"- {name}, {label} ({problem.section}; {c.steps} steps, "
                              f"{c.eval_particles} evaluation particles): −ELBO* = "
                              f"{c.reference:.3f} ± {_num(c.reference_error, 3)} ({c.how})")
            print("\n".join([*HEADER, *rows(c), references[-1],
                             f"({time.time() - tick:.0f} s)"]), flush=True)
    mem = [] if args.no_memory else memory(QUICK_WIDTHS if args.quick else MEMORY_WIDTHS)
    minutes, cpu_minutes = (time.time() - started) / 60, (time.process_time() - cpu) / 60
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "") + (
        f" --problems {args.problems}" if args.problems else "") + (
        " --no-memory" if args.no_memory else "") + (
        f" --out {args.out}" if args.out != "benchmark" else "")
    out = ["# Benchmark: pyro_natgrad vs Pyro's Adam and ClippedAdam", "",
           f"Produced by `{command}` in {minutes:.1f} minutes ({cpu_minutes:.1f} minutes of CPU "
           "time).", "", *text, "## Results", "",
           *HEADER, *table, "",
           "Gaps: median over seeds of −ELBO − −ELBO* (nats) after "
           f"{EARLY} steps and at the budget (— : every run failed). References (± standard "
           "error of the estimate):", *references, "", *mem,
           "Plots: " + ", ".join(f"[{p}]({p})" for p in plots), ""]
    path = folder / (f"{args.out}_quick.md" if args.quick else f"{args.out}.md")
    path.write_text("\n".join(out))
    print("\n".join(out[out.index("## Results"):]))
    print(f"wrote {path} in {minutes:.1f} minutes ({cpu_minutes:.1f} CPU)")


if __name__ == "__main__":
    main()
