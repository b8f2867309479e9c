"""How one optimizer is measured: timed SVI fits from Pyro's default initialisation (only
``svi.step`` is timed), −ELBO estimated with many particles at log-spaced checkpoints (not
timed), the learning-rate grid search, medians over seeds, and the peak memory of one step."""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam, ClippedAdam

from pyro_natgrad import NaturalGradient, StepRefusedWarning

from .models import posterior_error
from .problems import Problem

try:
    from pyro_natgrad import WassersteinGradient
except ImportError:  # being written alongside this benchmark
    WassersteinGradient = None

TOL = 0.5  # nats: "reached" means −ELBO ≤ reference + TOL
LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)  # Adam and ClippedAdam
W2_GRID = (0.25, 1.0)  # WassersteinGradient's extra lr-grid row (its scale-free lr: default 0.5)
QUICK_GRID = (0.01, 0.1)
REFERENCE_PARTICLES = 4  # the long reference run: this many times the problem's particles,
REFERENCE_STEPS = 2  # and this many times its step budget
POSTERIOR_DRAWS = 2000
WARMUP_STEPS = 3


def checkpoints(num_steps: int) -> list[int]:
    """About 6 log-spaced checkpoints per decade, and the last step."""
    marks = {int(round(10 ** (k / 6))) for k in range(0, 6 * 5)}
    return sorted({m for m in marks if m <= num_steps} | {num_steps})


@dataclass
class Run:
    """One fit: −ELBO at the checkpoints, optimizer seconds up to each, every step's seconds."""

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)  # standard error of each −ELBO estimate
    step_seconds: list[float] = field(default_factory=list)
    failed: str = ""
    refused: int = 0  # StepRefusedWarnings
    undone: int = 0  # steps whose previous step the adaptive rule undid (pyro_natgrad only)
    extra: dict = field(default_factory=dict)  # what ``after(guide)`` returned
    # pyro_natgrad only: the accepted steps' rates over the optimizer's lr (per site and step),
    # its stationarity ceiling over lr at the end, and the params its base optimizer stepped
    rates: list[float] = field(default_factory=list)
    ceiling: float = math.nan
    base: str = ""

    def first_within(self, reference: float, tol: float = TOL) -> tuple[float, float]:
        """(steps, seconds) at the first checkpoint with −ELBO ≤ reference + tol, else inf."""
        for step, seconds, loss in zip(self.steps, self.seconds, self.losses, strict=True):
            if loss <= reference + tol:
                return step, seconds
        return math.inf, math.inf

    def loss_at(self, step: int) -> float:
        """−ELBO at the last checkpoint ≤ ``step`` (inf if the run failed before it)."""
        if self.failed and (not self.steps or self.steps[-1] < step):
            return math.inf
        values = [loss for s, loss in zip(self.steps, self.losses, strict=True) if s <= step]
        return values[-1] if values else math.inf

    @property
    def final(self) -> float:
        return math.inf if self.failed or not self.losses else self.losses[-1]

    @property
    def step_cost(self) -> float:
        """Mean optimizer seconds per step (undone steps included: the user pays for them)."""
        return statistics.fmean(self.step_seconds) if self.step_seconds else math.nan


def evaluate(model: Callable, guide: Callable, data: tuple, num_particles: int
             ) -> tuple[float, float]:
    """(−ELBO, its standard error) from ``num_particles`` vectorized draws, in 5 chunks."""
    chunks = 5 if num_particles >= 10 else 1
    elbo = Trace_ELBO(num_particles=num_particles // chunks, vectorize_particles=True)
    with torch.no_grad():
        values = torch.tensor([elbo.loss(model, guide, *data) for _ in range(chunks)])
    error = float(values.std() / chunks**0.5) if chunks > 1 else math.nan
    return float(values.mean()), error


def fit(model: Callable, make_guide: Callable, make_optim: Callable, data: tuple,
        num_steps: int, num_particles: int, eval_particles: int, seed: int,
        after: Callable | None = None, marks: list[int] | None = None) -> Run:
    """Fits from Pyro's default initialisation. The guide's params are created by one loss
    evaluation before the clock starts (the same for every optimizer); an exception or a
    non-finite loss ends the run and is recorded in ``failed``. ``after(guide)`` (untimed)
    measures the fitted guide before the next fit clears the param store. −ELBO is evaluated
    at ``marks`` (default :func:`checkpoints`)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(model)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    with torch.no_grad():
        elbo.loss(model, guide, *data)
    run = Run()
    svi = SVI(model, guide, make_optim(guide), elbo)
    marks, elapsed = set(marks or checkpoints(num_steps)), 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StepRefusedWarning)
        for step in range(1, num_steps + 1):
            start = time.perf_counter()
            try:
                loss = svi.step(*data)
            except (ValueError, RuntimeError) as e:  # e.g. a scale that overflowed to inf
                run.failed = f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                break
            run.step_seconds.append(time.perf_counter() - start)
            elapsed += run.step_seconds[-1]
            last = getattr(svi.optim, "last_step", None) or {}
            run.undone += any(v.get("method") == "undone" for v in last.values())
            run.rates += [v["lr"] / svi.optim.lr for v in last.values() if "lr" in v]
            if not math.isfinite(loss):
                run.failed = f"step {step}: non-finite loss"
                break
            if step in marks:
                try:
                    value, error = evaluate(model, guide, data, eval_particles)
                except (ValueError, RuntimeError) as e:
                    run.failed = f"step {step}: evaluation {type(e).__name__}"
                    break
                if not math.isfinite(value):
                    run.failed = f"step {step}: −ELBO estimate {value}"
                    break
                run.steps.append(step)
                run.seconds.append(elapsed)
                run.losses.append(value)
                run.errors.append(error)
    run.refused = sum(issubclass(w.category, StepRefusedWarning) for w in caught)
    _limits(svi.optim, run)
    if after is not None and not run.failed:
        run.extra = after(guide)
    return run


def _limits(optim, run: Run) -> None:
    """What bounded a pyro_natgrad optimizer's fit, read at its end: the stationarity ceiling
    and the params its base optimizer steps (nothing for Pyro's optimizers)."""
    stationarity = getattr(optim, "stationarity", None)
    if stationarity is not None and stationarity.ceiling is not None:
        run.ceiling = stationarity.ceiling / optim.lr
    base = optim.base_params() if hasattr(optim, "base_params") else []
    if base:
        run.base = (f"{len(base)} param(s) on its base {optim.pt_optim_constructor.__name__}"
                    f"({optim.pt_optim_args})")


def median(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def rank_key(runs: list[Run], reference: float | None) -> tuple[float, float]:
    """Order of a configuration: median steps to the target, then median final −ELBO."""
    steps = median(r.first_within(reference)[0] for r in runs) if reference is not None else 0.0
    return steps, median(r.final for r in runs)


def grid_search(run_one: Callable[[Callable, int], Run], grid: dict[str, Callable],
                seeds: int, reference: float | None) -> tuple[str, list[Run], dict[str, Run]]:
    """Every grid point on seed 0; the best (fewest steps to the target, then lowest final
    −ELBO) on the remaining seeds. Returns (best name, its runs over all seeds, the seed-0 run
    of every grid point)."""
    tried = {name: run_one(make, 0) for name, make in grid.items()}
    best = min(tried, key=lambda name: rank_key([tried[name]], reference))
    runs = [tried[best]] + [run_one(grid[best], seed) for seed in range(1, seeds)]
    return best, runs, tried


class _Labelled:
    """Runs an optimizer inside a profiler range named ``optimizer``."""

    def __init__(self, optim):
        self.optim = optim

    def __call__(self, *args, **kwargs):
        with torch.profiler.record_function("optimizer"):
            return self.optim(*args, **kwargs)


def peak_memory_mib(model: Callable, guide: Callable, data: tuple, num_particles: int,
                    make_optim: Callable) -> tuple[float, float]:
    """Peak torch CPU allocations (MiB) during one SVI step, above those live when it starts:
    (whole step: loss, gradient and optimizer; the optimizer's own call, above what was live
    when it was called), from the torch profiler's memory events."""
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    with torch.no_grad():
        elbo.loss(model, guide, *data)
    svi = SVI(model, guide, make_optim(guide), elbo)
    svi.optim = _Labelled(svi.optim)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        svi.step(*data)
    events = list(prof.profiler.kineto_results.events())
    window = next(e for e in events if e.name() == "optimizer")
    start, end = window.start_ns(), window.start_ns() + window.duration_ns()
    live = step_peak = at_call = optim_peak = 0
    for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if t < start:
            at_call = live + nbytes
        live += nbytes
        step_peak = max(step_peak, live)
        if start <= t <= end:
            optim_peak = max(optim_peak, live - at_call)
    return step_peak / 2**20, optim_peak / 2**20


def optimizer_families(problem: Problem, quick: bool) -> dict[str, dict[str, Callable]]:
    """family -> {configuration name -> factory(guide)}; ours run with their defaults."""
    grid = QUICK_GRID if quick else LR_GRID
    families = {"NaturalGradient": {"NaturalGradient": lambda guide: NaturalGradient(guide)}}
    families.update({name: {name: make} for name, make in problem.extra.items()})
    if WassersteinGradient is not None:
        families["WassersteinGradient"] = {
            "WassersteinGradient": lambda guide: WassersteinGradient(guide)}
        if not quick and problem.w2_lrs != ():  # an extra row: the best of a small grid
            families["WassersteinGradient (lr grid)"] = {
                f"WassersteinGradient(lr={lr})": lambda guide, lr=lr: WassersteinGradient(guide,
                                                                                        lr=lr)
                for lr in problem.w2_lrs or W2_GRID}
    families["Adam"] = {f"Adam(lr={lr})": lambda guide, lr=lr: Adam({"lr": lr}) for lr in grid}
    families["ClippedAdam"] = {f"ClippedAdam(lr={lr})": lambda guide, lr=lr: ClippedAdam({"lr": lr})
                               for lr in grid}
    return families


@dataclass
class Comparison:
    """Every optimizer family on one problem and guide."""

    problem: Problem
    guide: str
    steps: int
    eval_particles: int
    reference: float
    reference_error: float
    how: str
    chosen: dict[str, str]  # family -> chosen configuration
    runs: dict[str, list[Run]]  # family -> the chosen configuration's runs, seeds 0 … n−1
    tried: dict[str, dict[str, Run]]  # family -> configuration -> its seed-0 run


def budget(problem: Problem, quick: bool) -> tuple[int, int]:
    """(step budget, evaluation particles); ``quick`` divides both."""
    if quick:
        return max(10, problem.steps // 10), max(min(problem.eval_particles, 40),
                                                 problem.eval_particles // 5)
    return problem.steps, problem.eval_particles


def compare(problem: Problem, label: str, seeds: int, quick: bool) -> Comparison:
    """The reference (exact, else a long high-particle NaturalGradient run, else the best run),
    then each optimizer family: its grid on seed 0, the best configuration on every seed."""
    steps, eval_particles = budget(problem, quick)
    make_guide = problem.guides[label]
    after = None
    if problem.reference is not None:
        def after(guide):
            return {"posterior_error": posterior_error(problem.model, guide, problem.data,
                                                       problem.reference, POSTERIOR_DRAWS)}

    def run_one(make_optim: Callable, seed: int) -> Run:
        return fit(problem.model, make_guide, make_optim, problem.data, steps,
                   problem.particles, eval_particles, seed, after)

    families = optimizer_families(problem, quick)
    for grid in families.values():  # warm-up: one-time costs (lazy imports, caches) untimed
        fit(problem.model, make_guide, next(iter(grid.values())), problem.data, WARMUP_STEPS,
            problem.particles, 10, seed=0, marks=[WARMUP_STEPS])
    reference, error, how = _initial_reference(problem, label, steps, eval_particles)
    chosen, runs, tried = {}, {}, {}
    for family, grid in families.items():
        chosen[family], runs[family], tried[family] = grid_search(run_one, grid, seeds,
                                                                  reference)
    finals = [r for rs in runs.values() for r in rs] + [r for t in tried.values()
                                                         for r in t.values()]
    best = min(finals, key=lambda r: r.final)
    if not math.isfinite(best.final):  # every run failed
        reference, error = (math.nan, math.nan) if reference is None else (reference, error)
    elif reference is None:
        reference, error = best.final, best.errors[-1] if best.errors else math.nan
        how = ("best final −ELBO of any run (optimum unknown)" + (" " + how if how else ""))
    elif best.final < reference and label not in problem.exact:
        how += f"; lowered to a run's final {best.final:.3f}"
        reference, error = best.final, best.errors[-1]
    return Comparison(problem, label, steps, eval_particles, reference, error, how, chosen, runs,
                      tried)


def _initial_reference(problem: Problem, label: str, steps: int, eval_particles: int
                       ) -> tuple[float | None, float, str]:
    if label in problem.exact:
        return problem.exact[label], 0.0, "exact: −log p(x), the family contains the posterior"
    if not problem.long_run_reference:
        return None, math.nan, ""
    particles, steps = REFERENCE_PARTICLES * problem.particles, REFERENCE_STEPS * steps
    run = fit(problem.model, problem.guides[label], lambda guide: NaturalGradient(guide),
              problem.data, steps, particles, REFERENCE_PARTICLES * eval_particles, seed=1234,
              marks=[steps])
    if run.failed:
        return None, math.nan, f"(reference run failed: {run.failed})"
    return run.final, run.errors[-1], (f"NaturalGradient, {steps} steps × {particles} particles, "
                                       f"evaluated with {REFERENCE_PARTICLES * eval_particles}")
