"""Posteriors from posteriordb (stan-dev/posteriordb, BSD-3; data in ``benchmarks/posteriordb/``),
translated from Stan to Pyro once, with their gold-standard reference moments.

Each model is written for vectorized particles: a global latent of shape (P, 1, D) broadcasts
against data (N, D) as ``(X * w).sum(-1)``. Truncated priors of ``<lower=0>`` parameters are the
folded (half) densities, which equal Stan's truncated ones up to a constant.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import biject_to

ROOT = Path(__file__).resolve().parent / "posteriordb"


@dataclass
class Posterior:
    """A model, its data (the model's arguments) and the reference mean and sd of each site."""

    name: str
    model: Callable
    data: tuple[Tensor, ...]
    reference: dict[str, tuple[Tensor, Tensor]]  # site -> (mean, sd), flattened


def _read(name: str) -> tuple[dict, dict[str, tuple[Tensor, Tensor]]]:
    folder = ROOT / name
    with zipfile.ZipFile(folder / "data.json.zip") as z:
        data = json.loads(z.read(z.namelist()[0]))
    means = json.loads((folder / "mean_value.json").read_text())
    squares = json.loads((folder / "mean_squared_value.json").read_text())
    reference: dict[str, tuple[list[float], list[float]]] = {}
    for label, m, m2 in zip(means["names"], means["mean_value"],
                            squares["mean_squared_value"], strict=True):
        site = re.sub(r"\[.*\]", "", label)
        reference.setdefault(site, ([], []))
        reference[site][0].append(m)
        reference[site][1].append(math.sqrt(max(m2 - m * m, 0.0)))
    return data, {k: (torch.tensor(m, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
                  for k, (m, s) in reference.items()}


def sblrc(dtype: torch.dtype = torch.float64) -> Posterior:
    """sblrc-blr: y ~ N(Xβ, σ), β ~ N(0, 10), σ ~ N⁺(0, 10); X unscaled, correlated columns."""
    data, reference = _read("sblrc-blr")
    X, y = torch.tensor(data["X"], dtype=dtype), torch.tensor(data["y"], dtype=dtype)

    def model(X, y):
        beta = pyro.sample("beta", dist.Normal(X.new_zeros(X.shape[1]), 10.0).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(X.new_tensor(10.0)))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal((X * beta).sum(-1), sigma), obs=y)

    return Posterior("sblrc-blr", model, (X, y), reference)


def ark(dtype: torch.dtype = torch.float64) -> Posterior:
    """arK-arK: AR(K), y_t ~ N(α + Σ_k β_k y_{t−k}, σ), α, β ~ N(0, 10), σ ~ Cauchy⁺(0, 2.5)."""
    data, reference = _read("arK-arK")
    y, K = torch.tensor(data["y"], dtype=dtype), data["K"]
    lags = torch.stack([y[K - k:len(y) - k] for k in range(1, K + 1)], -1)  # y_{t−k}, t > K

    def model(lags, target):
        alpha = pyro.sample("alpha", dist.Normal(lags.new_tensor(0.0), 10.0))
        beta = pyro.sample("beta", dist.Normal(lags.new_zeros(lags.shape[1]), 10.0).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfCauchy(lags.new_tensor(2.5)))
        with pyro.plate("time", lags.shape[0]):
            pyro.sample("y", dist.Normal(alpha + (lags * beta).sum(-1), sigma), obs=target)

    return Posterior("arK-arK", model, (lags, y[K:]), reference)


def diamonds(dtype: torch.dtype = torch.float64) -> Posterior:
    """diamonds-diamonds (brms): Y ~ N(Intercept + X_c b, σ) with centred covariates,
    b ~ N(0, 1), Intercept ~ t₃(8, 10), σ ~ t₃⁺(0, 10); condition number ≈ 2.6e5."""
    data, reference = _read("diamonds-diamonds")
    X, Y = torch.tensor(data["X"], dtype=dtype), torch.tensor(data["Y"], dtype=dtype)
    Xc = X[:, 1:] - X[:, 1:].mean(0)

    def model(Xc, Y):
        b = pyro.sample("b", dist.Normal(Xc.new_zeros(Xc.shape[1]), 1.0).to_event(1))
        intercept = pyro.sample("Intercept", dist.StudentT(3.0, Xc.new_tensor(8.0), 10.0))
        sigma = pyro.sample("sigma", dist.FoldedDistribution(
            dist.StudentT(3.0, Xc.new_tensor(0.0), 10.0)))
        with pyro.plate("data", Xc.shape[0]):
            pyro.sample("Y", dist.Normal(intercept + (Xc * b).sum(-1), sigma), obs=Y)

    return Posterior("diamonds-diamonds", model, (Xc, Y), reference)


def eight_schools(dtype: torch.dtype = torch.float64) -> Posterior:
    """eight_schools_noncentered: θ = μ + τ θ̃, θ̃ ~ N(0, 1), μ ~ N(0, 5), τ ~ Cauchy⁺(0, 5)."""
    data, reference = _read("eight_schools-eight_schools_noncentered")
    y, sigma = torch.tensor(data["y"], dtype=dtype), torch.tensor(data["sigma"], dtype=dtype)

    def model(y, sigma):
        mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
        with pyro.plate("schools", len(y)):
            theta_trans = pyro.sample("theta_trans", dist.Normal(y.new_tensor(0.0), 1.0))
            theta = pyro.deterministic("theta", mu + tau * theta_trans)
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    return Posterior("eight_schools-eight_schools_noncentered", model, (y, sigma), reference)


POSTERIORS: dict[str, Callable[..., Posterior]] = {
    "sblrc-blr": sblrc, "arK-arK": ark, "diamonds-diamonds": diamonds,
    "eight_schools_noncentered": eight_schools,
}


def guide_moments(guide, num_samples: int = 4000) -> dict[str, tuple[Tensor, Tensor]]:
    """Mean and sd of each latent site of an AutoContinuous guide, in the constrained space."""
    with torch.no_grad():
        z = guide.get_posterior().sample((num_samples,))
        out = {}
        for site, u in guide._unpack_latent(z):
            v = biject_to(site["fn"].support)(u).reshape(num_samples, -1)
            out[site["name"]] = (v.mean(0), v.std(0))
    return out


def posterior_error(posterior: Posterior, moments: dict[str, tuple[Tensor, Tensor]]
                    ) -> tuple[float, float]:
    """(max |Δmean|/sd_ref, max |log(sd/sd_ref)|) over the reference's sites."""
    mean_error = sd_error = 0.0
    for site, (m_ref, s_ref) in posterior.reference.items():
        if site not in moments:
            continue
        m, s = (t.double().cpu() for t in moments[site])
        mean_error = max(mean_error, float(((m - m_ref) / s_ref).abs().max()))
        sd_error = max(sd_error, float((s / s_ref).log().abs().max()))
    return mean_error, sd_error
