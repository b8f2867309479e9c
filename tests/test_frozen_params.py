"""Frozen guide params (``requires_grad=False``): the guide reader leaves them out of every site,
so they are not stepped, and the sites they feed step in their remaining params.

Model: a ~ N(0, 1), y_i ~ N(a, 1), i = 1..n; the posterior is N(Σy / (n + 1), 1 / (n + 1)). For
a guide N(loc, s) with s fixed, −ELBO = (n + 1)/2 · ((loc − m)² + s²) − log s + const, so the
optimal loc is the posterior mean m whatever s is.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_natgrad import NaturalGradient, WassersteinGradient, record_args

N = 10


def data(dtype: torch.dtype) -> torch.Tensor:
    return 1.0 + torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=dtype)


def model(y: torch.Tensor) -> None:
    a = pyro.sample("a", dist.Normal(y.new_tensor(0.0), 1.0))
    b = pyro.sample("b", dist.Normal(y.new_tensor(0.0), 1.0))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(a, 1.0), obs=y)
        pyro.sample("y2", dist.Normal(b, 1.0), obs=y + 1)


@record_args
def guide(y: torch.Tensor) -> None:
    loc = pyro.param("loc", y.new_tensor(0.0))
    scale = pyro.param("scale", y.new_tensor(0.5), constraint=constraints.positive)
    pyro.sample("a", dist.Normal(loc, scale))
    loc_b = pyro.param("loc_b", y.new_tensor(0.0))
    scale_b = pyro.param("scale_b", y.new_tensor(0.5), constraint=constraints.positive)
    pyro.sample("b", dist.Normal(loc_b, scale_b))


def fit(guide, frozen: str, make_optim, y: torch.Tensor, steps: int = 60):
    guide(y)
    param = pyro.get_param_store()._params[frozen]
    param.requires_grad_(False)
    before = param.detach().clone()
    optim = make_optim(guide)
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=64, vectorize_particles=True))
    for _ in range(steps):
        svi.step(y)
    assert torch.equal(param.detach(), before), "a frozen param was stepped"
    return optim


@pytest.mark.parametrize("make_optim", [NaturalGradient, WassersteinGradient])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_custom_guide_frozen_scale(make_optim, dtype):
    y = data(dtype)
    optim = fit(guide, "scale", make_optim, y)
    store = pyro.get_param_store()
    # the site keeps stepping in its free param, to the posterior mean
    assert optim.last_step["a"]["method"] not in ("refused", "undone")
    assert abs(float(store["loc"]) - float(y.sum() / (N + 1))) < 0.05
    # the other site is untouched by the freezing: natural step to its exact posterior
    assert abs(float(store["loc_b"]) - float((y + 1).sum() / (N + 1))) < 0.05
    assert abs(float(store["scale_b"]) - (N + 1) ** -0.5) < 0.02


def test_autonormal_frozen_scale():
    """AutoNormal's scale of ``a`` frozen at its init 0.1 while the posterior sd is 0.30: the
    natural step of the loc, preconditioned by 1/0.1², is ~9× shorter than the loss's curvature
    asks, so the loc converges slowly (measured over seeds 0–3: 0.051–0.058 from m after 60
    steps, 0.014–0.020 after 150)."""
    y = data(torch.float64)
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    optim = fit(guide, "AutoNormal.scales.a", NaturalGradient, y, steps=150)
    store = pyro.get_param_store()
    assert abs(float(store["AutoNormal.locs.a"]) - float(y.sum() / (N + 1))) < 0.05
    rows = {line.split()[0]: line.split()[-1] for line in optim.summary().splitlines()[1:]}
    assert rows["AutoNormal.locs.b"] == rows["AutoNormal.scales.b"] == "natural"
    assert abs(float(store["AutoNormal.scales.b"]) - (N + 1) ** -0.5) < 0.02


def test_every_guide_param_frozen_is_named():
    y = data(torch.float64)

    def model_with_param(y):
        pyro.param("noise", y.new_tensor(1.0), constraint=constraints.positive)
        model(y)

    guide(y)
    for name in ("loc", "scale", "loc_b", "scale_b"):
        pyro.get_param_store()._params[name].requires_grad_(False)
    svi = SVI(model_with_param, guide, NaturalGradient(guide), Trace_ELBO())
    with pytest.raises(ValueError, match="frozen"):
        svi.step(y)


def test_summary_lists_a_frozen_param_as_not_stepped():
    y = data(torch.float64)
    guide = AutoNormal(model)
    optim = fit(guide, "AutoNormal.scales.a", NaturalGradient, y, steps=2)
    rows = {line.split()[0]: line for line in optim.summary().splitlines()[1:]}
    assert "frozen (requires_grad=False): not stepped" in rows["AutoNormal.scales.a"]
    assert "base:" not in rows["AutoNormal.scales.a"]
