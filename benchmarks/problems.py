"""The benchmark problems: model, data, guide families, particle counts, step budget, and the
optimum −ELBO where it is known in closed form (conjugate models whose guide family contains the
posterior: −ELBO* = −log p(x)). Every problem is a zero-argument factory in :data:`PROBLEMS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from pyro_natgrad import NaturalGradient, record_args
from pyro_natgrad.demo import breast_cancer, logistic_model
from pyro_natgrad.gp import ExpectedBernoulli, ExpectedGaussian
from pyro_natgrad.optim import FisherSolve
from tests import conjugate

from .models import MODELS, Moments, load_posterior

DTYPE = torch.float64


@dataclass
class Problem:
    """One benchmark problem; every optimizer gets the same model, guides, ELBO and particles."""

    name: str
    section: str
    model: Callable
    data: tuple
    guides: dict[str, Callable]  # label -> factory(model) -> guide
    steps: int  # step budget of every optimizer
    particles: int = 64
    eval_particles: int = 1000
    exact: dict[str, float] = field(default_factory=dict)  # label -> optimum −ELBO
    reference: Moments | None = None  # posteriordb: reference posterior moments
    extra: dict[str, Callable] = field(default_factory=dict)  # more optimizers: name -> factory
    long_run_reference: bool = True  # without ``exact``: a long run's −ELBO, else best observed
    w2_lrs: tuple[float, ...] | None = None  # WassersteinGradient's extra lr grid (None: the
    # protocol's; (): none, its defaults only)


def _plain_guide(guide: Callable) -> Callable[[Callable], Callable]:
    return lambda model: record_args(guide)


def _optimum(case: conjugate.Conjugate) -> float:
    """The closed-form −ELBO of a tests/conjugate.py case at its exact posterior."""
    pyro.clear_param_store()
    for name, value in case.exact.items():
        pyro.param(name, value, constraint=constraints.positive)
    with torch.no_grad():
        loss = float(case.loss(case.model, case.guide, *case.data))
    pyro.clear_param_store()
    return loss


def conjugate_scalar(make: Callable[..., conjugate.Conjugate], family: str) -> Problem:
    case = make(DTYPE)
    return Problem(case.name, "1 conjugate", case.model, case.data,
                   {family: _plain_guide(case.guide)}, steps=100, exact={family: _optimum(case)})


def gaussian_regression() -> Problem:
    """w ~ N(0, I₅), y ~ N(Xw, 0.5²), 100 rows (tests/conjugate.py); exact posterior Gaussian."""
    X, y, mean, cov = conjugate.linear_regression(DTYPE, n=100, d=5)
    loss = conjugate.regression_loss(lambda: (mean, cov))
    return Problem("gaussian_regression", "1 conjugate", conjugate.regression_model(), (X, y),
                   {"AutoMultivariateNormal": AutoMultivariateNormal}, steps=100,
                   exact={"AutoMultivariateNormal": float(loss(None, None, X, y))})


def breast_cancer_logistic() -> Problem:
    """pyro_natgrad.demo's model: 569 × (30 standardized + intercept), w ~ N(0, I)."""
    return Problem("breast_cancer_logistic", "2 logistic", logistic_model, breast_cancer(DTYPE),
                   {"AutoMultivariateNormal": AutoMultivariateNormal,
                    "AutoDiagonalNormal": AutoDiagonalNormal}, steps=300, eval_particles=500)


def breast_cancer_logistic_256() -> Problem:
    """The same with 256 particles for every optimizer: how the steps to the target depend on
    the gradient noise (the issue's prototype used 1,000)."""
    return Problem("breast_cancer_logistic_p256", "2 logistic", logistic_model,
                   breast_cancer(DTYPE), {"AutoMultivariateNormal": AutoMultivariateNormal},
                   steps=300, particles=256, eval_particles=500)


def posteriordb(name: str) -> Problem:
    post = load_posterior(name, DTYPE)
    big = post.data[0].numel() > 50_000  # diamonds: 5000 × 24
    return Problem(name, "3 posteriordb", post.model, post.data,
                   {"AutoMultivariateNormal": AutoMultivariateNormal,
                    "AutoDiagonalNormal": AutoDiagonalNormal},
                   steps=200, particles=16 if big else 64, eval_particles=200 if big else 500,
                   reference=post.reference)


def correlated_logistic(d: int, n: int, rho: float = 0.9, dtype=DTYPE, seed: int = 0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows of AR(1)-correlated features (corr ρ^|i−j|), labels from w* ~ N(0, I/ d)·3."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=dtype)
    X = torch.empty_like(z)
    X[:, 0] = z[:, 0]
    for j in range(1, d):
        X[:, j] = rho * X[:, j - 1] + (1 - rho**2) ** 0.5 * z[:, j]
    w = 3 * torch.randn(d, generator=g, dtype=dtype) / d**0.5
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=g)
    return X, y


def synthetic_logistic_500() -> Problem:
    """d = 500, 500 rows, 8 particles, 30 steps: a few-particle, high-dimensional fit, where the
    precision's Monte Carlo estimate is noise-dominated. WassersteinGradient runs at its default
    lr only (no lr grid row)."""
    return Problem("logistic_d500", "4 high-dim", logistic_model,
                   correlated_logistic(500, 500),
                   {"AutoMultivariateNormal": AutoMultivariateNormal,
                    "AutoLowRankMultivariateNormal": AutoLowRankMultivariateNormal},
                   steps=30, particles=8, eval_particles=100, long_run_reference=False,
                   w2_lrs=())


def synthetic_logistic_10k() -> Problem:
    """d = 10,000, 200 rows, float32 (a (particles, rows, d) product is formed per step); 100
    steps: at 30 every optimizer is still descending (most scales must grow tenfold from Pyro's
    initial 0.1)."""
    return Problem("logistic_d10000", "4 high-dim", logistic_model,
                   correlated_logistic(10_000, 200, dtype=torch.float32),
                   {"AutoDiagonalNormal": AutoDiagonalNormal}, steps=100, particles=4,
                   eval_particles=40, long_run_reference=False)


def diabetes(dtype=DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's diabetes data, 442 × 10, covariates and target standardized."""
    from sklearn.datasets import load_diabetes

    X, y = (torch.as_tensor(a, dtype=dtype) for a in load_diabetes(return_X_y=True))
    return (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()


def bnn_model(hidden: int) -> Callable:
    """One tanh hidden layer, N(0, 1) weights, HalfNormal(1) noise sd; written for particles:
    weights of shape (P, 1, D, H) broadcast against X[:, :, None] of shape (N, D, 1)."""
    def model(X, y):
        d = X.shape[1]
        w1 = pyro.sample("w1", dist.Normal(X.new_zeros(d, hidden), 1.0).to_event(2))
        b1 = pyro.sample("b1", dist.Normal(X.new_zeros(hidden), 1.0).to_event(1))
        w2 = pyro.sample("w2", dist.Normal(X.new_zeros(hidden), hidden**-0.5).to_event(1))
        b2 = pyro.sample("b2", dist.Normal(X.new_tensor(0.0), 1.0))
        noise = pyro.sample("noise", dist.HalfNormal(X.new_tensor(1.0)))
        with pyro.plate("data", X.shape[0]):
            h = torch.tanh((X[:, :, None] * w1).sum(-2) + b1)
            pyro.sample("y", dist.Normal((h * w2).sum(-1) + b2, noise), obs=y)
    return model


def bnn_diabetes() -> Problem:
    mc_diag = {"NaturalGradient(fisher=monte_carlo, form=diag)":
               lambda guide: NaturalGradient(guide, fisher="monte_carlo",
                                             solve=FisherSolve(form="diag"))}
    return Problem("bnn_diabetes", "5 BNN", bnn_model(50), diabetes(),
                   {"AutoNormal": AutoNormal}, steps=200, particles=16, eval_particles=500,
                   extra=mc_diag, long_run_reference=False)


def robust_regression(dtype=DTYPE) -> tuple[Callable, tuple]:
    """w ~ N(0, I₃), y ~ StudentT(3, Xw, 0.5), 100 rows of X ~ N(0, I), w = (1, −2, 0.5)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 3, generator=g, dtype=dtype)
    chi2 = torch.randn(100, 3, generator=g, dtype=dtype).square().sum(-1)  # 3 degrees of freedom
    t = torch.randn(100, generator=g, dtype=dtype) / torch.sqrt(chi2 / 3)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype) + 0.5 * t

    def model(X, y):
        w = pyro.sample("w", dist.Normal(X.new_zeros(3), 1.0).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.StudentT(3.0, (X * w).sum(-1), 0.5), obs=y)
    return model, (X, y)


def studentt_guide(X, y):
    """w ~ StudentT(5, loc, scale), independent coordinates: not an exponential family."""
    pyro.sample("w", dist.StudentT(5.0, pyro.param("loc", X.new_zeros(3)),
                                   pyro.param("scale", X.new_ones(3), constraints.positive)
                                   ).to_event(1))


def non_gaussian_guides() -> Problem:
    """Robust regression with guides outside the exponential families: NaturalGradient uses the
    Monte Carlo Fisher (its default for such sites); WassersteinGradient the pushforward metric."""
    model, data = robust_regression()
    return Problem("robust_regression", "6 non-Gaussian guides", model, data,
                   {"StudentT": _plain_guide(studentt_guide),
                    "AutoIAFNormal": lambda m: AutoIAFNormal(m, hidden_dim=[8])},
                   steps=200, particles=16, eval_particles=1000, long_run_reference=False)


def sparse_gp(name: str, X: torch.Tensor, y: torch.Tensor, likelihood: Callable[[], Callable],
              num_inducing: int, steps: int) -> Problem:
    """contrib.gp's whitened ``VariationalSparseGP``: ARD RBF kernel (lengthscales √d, variance
    1), inducing inputs a random subset of X (drawn from the run's seed), q(u) = N(0, I). Every
    fit builds a fresh module (``guides`` factory), and the problem's model runs the latest one's
    model. NaturalGradient steps q(u); kernel, likelihood params and inducing inputs go to its
    base optimizer (Salimbeni, Eleftheriadis & Hensman 2018); Adam fits everything. A listed
    variant gives that base optimizer the tuned Adam's largest grid rate, lr 0.1."""
    current = {}

    def model():
        return current["gp"].model()

    def make_guide(_model: Callable) -> Callable:
        Z = X[torch.randperm(len(X))[:num_inducing]].clone()
        kernel = gp.kernels.RBF(X.shape[1], lengthscale=X.new_full((X.shape[1],),
                                                                   X.shape[1] ** 0.5))
        current["gp"] = gp.models.VariationalSparseGP(X, y, kernel, Z, likelihood(),
                                                      whiten=True).to(X.dtype)
        return current["gp"].guide

    base = {"NaturalGradient(base lr=0.1)":
            lambda guide: NaturalGradient(guide, base_args={"lr": 0.1})}
    return Problem(name, "7 sparse GP", model, (), {"VariationalSparseGP": make_guide},
                   steps=steps, particles=8, eval_particles=200, extra=base)


def svgp_regression() -> Problem:
    """Diabetes (442 × 10, standardized), 20 inducing inputs, exact expected log-likelihood
    (:class:`~pyro_natgrad.gp.ExpectedGaussian`; noise variance learned)."""
    return sparse_gp("svgp_diabetes", *diabetes(), ExpectedGaussian, num_inducing=20, steps=200)


def svgp_classification() -> Problem:
    """scikit-learn's two moons (400 points, noise 0.25, standardized), 16 inducing inputs,
    Bernoulli likelihood by 20-point Gauss–Hermite quadrature
    (:class:`~pyro_natgrad.gp.ExpectedBernoulli`)."""
    from sklearn.datasets import make_moons

    X, y = (torch.as_tensor(a, dtype=DTYPE) for a in make_moons(400, noise=0.25, random_state=0))
    return sparse_gp("svgp_moons", (X - X.mean(0)) / X.std(0), y, ExpectedBernoulli,
                     num_inducing=16, steps=200)


def network(hidden: int) -> tuple[Callable, Callable, tuple, int]:
    """The diabetes BNN with ``hidden`` units and its AutoNormal guide (for the memory test):
    (model, guide, data, particles); 2 × (12·hidden + 2) guide params."""
    model = bnn_model(hidden)
    return model, AutoNormal(model), diabetes(), 16


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "gaussian_regression": gaussian_regression,
    "beta_bernoulli": lambda: conjugate_scalar(conjugate.beta_bernoulli, "Beta"),
    "gamma_poisson": lambda: conjugate_scalar(conjugate.gamma_poisson, "Gamma"),
    "breast_cancer_logistic": breast_cancer_logistic,
    "breast_cancer_logistic_p256": breast_cancer_logistic_256,
    **{name: (lambda name=name: posteriordb(name)) for name in MODELS},
    "logistic_d500": synthetic_logistic_500,
    "logistic_d10000": synthetic_logistic_10k,
    "bnn_diabetes": bnn_diabetes,
    "robust_regression": non_gaussian_guides,
    "svgp_diabetes": svgp_regression,
    "svgp_moons": svgp_classification,
}
