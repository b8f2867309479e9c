"""NaturalGradient keeps every param in its dtype and on its device, and still fits, for each guide
kind: AutoGuides (mirror descent and closed-form Fisher steps) and a custom Gamma/Beta guide
(iterative mean maps)."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from pyro_natgrad import NaturalGradient, StepRefusedWarning, record_args

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
               not torch.cuda.is_available(), reason="CUDA is not available on this machine"))]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
AUTOGUIDES = [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal,
              AutoLowRankMultivariateNormal]
NOISE = 0.5


def _regression(dtype: torch.dtype, device: str, n: int = 40, d: int = 3):
    """w ~ N(0, I), y ~ N(Xw, NOISE²): data and the exact posterior mean and sds (float64, CPU)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, d,
                                                                           dtype=torch.float64)
    y = X @ torch.linspace(-1.0, 1.0, d, dtype=torch.float64) + NOISE * torch.randn(
        n, generator=g, dtype=torch.float64)
    cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + X.T @ X / NOISE**2)
    mean = cov @ X.T @ y / NOISE**2
    return X.to(device, dtype), y.to(device, dtype), mean, cov.diagonal().sqrt()


def _regression_model(X: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), NOISE), obs=y)


def _fit(model, guide, *args, steps: int = 100) -> NaturalGradient:
    opt = NaturalGradient(guide)
    svi = SVI(model, guide, opt, Trace_ELBO(num_particles=32, vectorize_particles=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepRefusedWarning)
        for _ in range(steps):
            assert torch.isfinite(torch.tensor(svi.step(*args)))
    return opt


def _assert_params_kept(dtype: torch.dtype, device: str) -> None:
    for name, value in pyro.get_param_store().items():
        assert value.dtype == dtype, f"{name} is {value.dtype}, not {dtype}"
        assert value.device.type == device, f"{name} is on {value.device}, not {device}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guide_class", AUTOGUIDES, ids=lambda c: c.__name__)
def test_autoguides_keep_dtype_and_device_and_fit(guide_class, dtype, device):
    pyro.set_rng_seed(0)
    X, y, mean, sd = _regression(dtype, device)
    guide = guide_class(_regression_model)
    _fit(_regression_model, guide, X, y)
    _assert_params_kept(dtype, device)
    fitted = guide.median(X, y)["w"].detach().to("cpu", torch.float64)  # a Gaussian's mean
    assert ((fitted - mean).abs() / sd).max() < 0.3


def _poisson_bernoulli(dtype: torch.dtype, device: str):
    """Two conjugate sites, rate ~ Gamma(2, 0.5) with Poisson counts, p ~ Beta(2, 3) with coin
    flips; exact posteriors Gamma(2 + Σx, 0.5 + n) and Beta(2 + Σf, 3 + n − Σf)."""
    kw = dict(dtype=dtype, device=device)
    counts = torch.tensor([3.0, 5, 2, 4, 6, 3, 4, 1], **kw)
    flips = torch.tensor([1.0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1], **kw)

    def model(counts, flips):
        rate = pyro.sample("rate", dist.Gamma(torch.tensor(2.0, **kw), torch.tensor(0.5, **kw)))
        p = pyro.sample("p", dist.Beta(torch.tensor(2.0, **kw), torch.tensor(3.0, **kw)))
        with pyro.plate("counts", len(counts)):
            pyro.sample("x", dist.Poisson(rate), obs=counts)
        with pyro.plate("flips", len(flips)):
            pyro.sample("f", dist.Bernoulli(p), obs=flips)

    def guide(counts, flips):
        one = torch.tensor(1.0, **kw)
        pyro.sample("rate", dist.Gamma(pyro.param("alpha", one, constraints.positive),
                                       pyro.param("beta", one, constraints.positive)))
        pyro.sample("p", dist.Beta(pyro.param("c1", one, constraints.positive),
                                   pyro.param("c0", one, constraints.positive)))

    exact = {"rate": dist.Gamma(2.0 + counts.sum().cpu().double(), 0.5 + len(counts)),
             "p": dist.Beta(2.0 + flips.sum().cpu().double(),
                            3.0 + len(flips) - flips.sum().cpu().double())}
    return model, record_args(guide), (counts, flips), exact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gamma_beta_guide_keeps_dtype_and_device_and_fits(dtype, device):
    pyro.set_rng_seed(0)
    model, guide, data, exact = _poisson_bernoulli(dtype, device)
    opt = _fit(model, guide, *data)
    assert {v["method"] for v in opt.last_step.values()} <= {"natural", "undone"}
    _assert_params_kept(dtype, device)
    store = pyro.get_param_store()
    fitted = {"rate": dist.Gamma(store["alpha"], store["beta"]),
              "p": dist.Beta(store["c1"], store["c0"])}
    for site, q in fitted.items():
        error = (q.mean.detach().cpu().double() - exact[site].mean) / exact[site].stddev
        assert abs(float(error)) < 0.3, (site, float(error))
