"""A short demo fit: ``python -m pyro_natgrad.demo`` (needs scikit-learn: ``pip install
"pyro_natgrad[demo]"``).

Bayesian logistic regression on scikit-learn's breast-cancer data (569 × 30, standardized, plus an
intercept; prior N(0, 1)), an ``AutoMultivariateNormal`` guide, fitted by :class:`NaturalGradient`
and by Pyro's ``Adam(lr=0.01)`` with the same ELBO, in the same process. Prints −ELBO (estimated
with 2,000 particles) against steps and seconds as it goes, then compares the two at equal steps,
at equal time and at the end. The −ELBO is KL(q ‖ p(z | x)) − log p(x) and log p(x) is the same
for both, so a difference in −ELBO is the difference in KL from the posterior; the final
comparison gives its Monte Carlo standard error (Yao et al. 2018's log ratios
log p(x, z_s) − log q(z_s), z_s ~ q, whose mean is the ELBO), and the PSIS k̂ check of each fit.
"""

from __future__ import annotations

import argparse
import math
import textwrap
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.optim import Adam
from tqdm import tqdm

from . import NaturalGradient, VIDiagnostics, vi_diagnostics


def breast_cancer(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized covariates with an intercept column, and 0/1 labels."""
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as e:
        raise ImportError('the demo needs scikit-learn: pip install "pyro_natgrad[demo]" (or '
                          '"pyro_natgrad[test]")') from e

    data = load_breast_cancer()
    X = torch.as_tensor(data.data, dtype=dtype)
    X = (X - X.mean(0)) / X.std(0)
    X = torch.cat([torch.ones(len(X), 1, dtype=dtype), X], dim=1)
    return X, torch.as_tensor(data.target, dtype=dtype)


def logistic_model(X: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1)), obs=y)


Row = tuple[int, float, float]  # step, seconds, -ELBO
CHECKPOINTS = (1, 5, 10, 20, 50, 100, 200, 500, 1000, 1500, 2000)


def _run(name: str, make_optim, steps: int, X, y, seed: int,
         at_seconds: float | None = None) -> tuple[list[Row], Row | None, Summary]:
    """Fits from ``seed``, printing a row of −ELBO at each checkpoint as it is reached (a progress
    bar in between). ``at_seconds``: also evaluate at the first step whose fitting time reaches
    it. Returns the rows, that evaluation, and the fitted guide's :func:`_summary` (taken before
    the next run, whose guide reuses the param store's names)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoMultivariateNormal(logistic_model)
    optim = make_optim(guide)
    svi = SVI(logistic_model, guide, optim,
              Trace_ELBO(num_particles=64, vectorize_particles=True, max_plate_nesting=1))
    evaluate = Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)

    def minus_elbo() -> float:
        with torch.no_grad():
            return evaluate.loss(logistic_model, guide, X, y)

    rows, timed, elapsed = [], None, 0.0
    print(f"\n{name}, {steps} steps\n  {'step':>6} {'seconds':>9} {'-ELBO':>9}", flush=True)
    with tqdm(total=steps, desc=name, leave=False, mininterval=1.0) as bar:
        for step in range(1, steps + 1):
            start = time.perf_counter()
            svi.step(X, y)
            elapsed += time.perf_counter() - start
            bar.update()
            if at_seconds is not None and timed is None and elapsed >= at_seconds:
                timed = (step, elapsed, minus_elbo())
            if step in CHECKPOINTS or step == steps:
                rows.append((step, elapsed, minus_elbo()))
                bar.write(f"  {step:>6} {elapsed:>9.2f} {rows[-1][2]:>9.2f}")
    for note in getattr(optim, "diagnose", lambda: [])():
        _say(f"{name} says: {note}")
    return rows, timed, _summary(guide, X, y)


def _say(text: str) -> None:
    print(textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="    "))


def _at_step(rows: list[Row], step: int) -> Row | None:
    return next((r for r in rows if r[0] == step), None)


Summary = tuple[float, float, VIDiagnostics]  # -ELBO, its standard error, the PSIS report


def _summary(guide, X, y) -> Summary:
    """−ELBO and its Monte Carlo standard error from 2,000 log ratios, and the PSIS report."""
    report = vi_diagnostics(logistic_model, guide, X, y, num_samples=2000)
    ratios = torch.as_tensor(report.log_ratios)
    return float(-ratios.mean()), float(ratios.std() / math.sqrt(len(ratios))), report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ng-steps", type=int, default=50)
    parser.add_argument("--adam-steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (small tensors: more threads cost more than "
                             "they save on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    X, y = breast_cancer()
    # a torch optimizer's first construction imports torch._dynamo (seconds): not a step's cost
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    print(f"Bayesian logistic regression, breast cancer ({X.shape[0]} x {X.shape[1]}), "
          "AutoMultivariateNormal, Trace_ELBO(num_particles=64); -ELBO from 2,000 particles")
    ng, _, (ng_final, ng_se, ng_report) = _run(
        "NaturalGradient(guide)", lambda g: NaturalGradient(g), args.ng_steps, X, y, args.seed)
    ng_step, ng_seconds, ng_loss = ng[-1]
    adam, timed, (adam_final, adam_se, adam_report) = _run(
        "pyro.optim.Adam(lr=0.01)", lambda g: Adam({"lr": 0.01}), args.adam_steps, X, y,
        args.seed, at_seconds=ng_seconds)

    print("\nComparison (lower -ELBO = closer to the posterior in KL, by the same number of nats)")
    same_steps = _at_step(adam, ng_step)
    if same_steps is not None:
        print(f"  at equal steps ({ng_step}): NaturalGradient {ng_loss:.2f}, "
              f"Adam {same_steps[2]:.2f}")
    if timed is not None:
        print(f"  at equal time ({ng_seconds:.1f} s): NaturalGradient {ng_loss:.2f} after "
              f"{ng_step} steps, Adam {timed[2]:.2f} after {timed[0]} steps")
    gap, gap_se = adam_final - ng_final, math.hypot(ng_se, adam_se)
    _say(f"at the end: NaturalGradient {ng_final:.2f} ± {ng_se:.2f} ({ng_step} steps, "
         f"{ng_seconds:.1f} s); Adam {adam_final:.2f} ± {adam_se:.2f} ({adam[-1][0]} steps, "
         f"{adam[-1][1]:.1f} s)")
    if abs(gap) <= 2 * gap_se:
        verdict = (f"within twice its Monte Carlo standard error ({gap_se:.2f}): the two fits "
                   "are equally close to the posterior as far as 2,000 draws can tell")
    else:
        closer = "Adam's" if gap < 0 else "NaturalGradient's"
        verdict = (f"beyond twice its standard error ({gap_se:.2f}): {closer} guide is closer to "
                   f"the posterior by {abs(gap):.2f} nats of KL")
        if gap < 0:
            verdict += (f", after {adam[-1][0] / ng_step:.0f}x the steps and "
                        f"{adam[-1][1] / ng_seconds:.0f}x the time; NaturalGradient ran only its "
                        f"{ng_step}-step budget (--ng-steps), and its own diagnosis above says "
                        "what limits it and how to get closer")
    _say(f"difference Adam - NaturalGradient {gap:+.2f} nats, {verdict}")
    print(f"  PSIS check (k-hat): NaturalGradient {ng_report.pareto_k:.2f} "
          f"({ng_report.verdict}), Adam {adam_report.pareto_k:.2f} ({adam_report.verdict})")


if __name__ == "__main__":
    main()
