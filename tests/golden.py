"""Golden trajectories: the params after 1, 10 and 100 SVI steps of fixed, seeded float64 runs.

They pin what the optimizers do, so that a change of structure (not of behaviour) can be checked
to round-off. ``python -m tests.golden`` rewrites ``tests/data/golden.pt`` from the current code:
do that only in a commit that changes behaviour on purpose, and say which cases moved and why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
)

from pyro_natgrad import NaturalGradient, WassersteinGradient, record_args

PATH = Path(__file__).parent / "data" / "golden.pt"
CHECKPOINTS = (1, 10, 100)


def _logistic_data(n: int = 80, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.linspace(-1.5, 1.5, d, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=g)
    return X, y


def _linear(X, w):
    return (X * w.unsqueeze(-2)).sum(-1)


def _logistic_model(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=_linear(X, w)), obs=y)


def _regression_model(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(_linear(X, w), 0.5), obs=y)


def _regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.5 * torch.randn(
        40, generator=g, dtype=torch.float64)
    return X, y


def _robust_model(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.StudentT(2.0, _linear(X, w), 0.5), obs=y)


def _student_t_guide(X, y):
    loc = pyro.param("loc", X.new_zeros(X.shape[1]))
    scale = pyro.param("scale", X.new_full((X.shape[1],), 0.1), constraints.positive)
    pyro.sample("w", dist.StudentT(4.0, loc, scale).to_event(1))


def _case(model, make_guide, make_optim, data, particles: int = 8):
    def run() -> dict[int, dict[str, torch.Tensor]]:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = make_guide(model)
        guide(*data)  # params exist before the optimizer's first call
        optim = make_optim(guide)
        svi = SVI(model, guide, optim, Trace_ELBO(num_particles=particles,
                                                   vectorize_particles=True))
        out = {}
        for step in range(1, CHECKPOINTS[-1] + 1):
            svi.step(*data)
            if step in CHECKPOINTS:
                store = pyro.get_param_store()
                out[step] = {n: store.get_param(n).detach().clone() for n in store.keys()}
        return out
    return run


CASES: dict[str, Callable[[], dict]] = {
    "conjugate_regression_mvn": _case(_regression_model, AutoMultivariateNormal,
                                      NaturalGradient, _regression_data()),
    "logistic_mvn": _case(_logistic_model, AutoMultivariateNormal, NaturalGradient,
                          _logistic_data()),
    "logistic_diagonal": _case(_logistic_model, AutoDiagonalNormal, NaturalGradient,
                               _logistic_data()),
    "logistic_low_rank": _case(_logistic_model,
                               lambda m: AutoLowRankMultivariateNormal(m, rank=2),
                               NaturalGradient, _logistic_data(d=6)),
    "robust_student_t": _case(_robust_model, lambda m: record_args(_student_t_guide),
                              NaturalGradient, _regression_data()),
    "wasserstein_mvn": _case(_logistic_model, AutoMultivariateNormal,
                             lambda g: WassersteinGradient(g, lr=0.05), _logistic_data()),
    "wasserstein_diagonal": _case(_logistic_model, AutoDiagonalNormal,
                                  lambda g: WassersteinGradient(g, lr=0.05), _logistic_data()),
}


def main() -> None:
    torch.set_num_threads(1)
    PATH.parent.mkdir(exist_ok=True)
    torch.save({name: run() for name, run in CASES.items()}, PATH)
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
