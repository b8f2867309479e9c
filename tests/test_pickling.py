"""A fitted guide and its optimizer survive pickle, ``torch.save``/``torch.load`` and
``copy.deepcopy`` after steps of NaturalGradient and WassersteinGradient; and an optimizer built on
another object than the guide SVI runs (or on the model) is named as such."""

from __future__ import annotations

import copy
import io
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.nn import PyroModule, PyroParam

from pyro_natgrad import NaturalGradient, WassersteinGradient, record_args
from pyro_natgrad.guides import is_real, is_unit_lower_cholesky


def model(y: torch.Tensor) -> None:
    """Counts ~ Poisson(rate) and values ~ N(loc₁ + loc₂, 1): conjugate, Gamma and Normal."""
    rate = pyro.sample("rate", dist.Gamma(torch.tensor(2.0, dtype=y.dtype), 1.0))
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2, dtype=y.dtype), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("counts", dist.Poisson(rate), obs=y.round().abs())
        pyro.sample("y", dist.Normal(loc.sum(), 1.0), obs=y)


class ModuleGuide(PyroModule):
    """A PyroModule guide with its own constrained params."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.q_shape = PyroParam(torch.tensor(2.0, dtype=dtype), constraint=constraints.positive)
        self.q_rate = PyroParam(torch.tensor(1.0, dtype=dtype),
                                   constraint=constraints.positive)
        self.q_loc = PyroParam(torch.zeros(2, dtype=dtype))
        self.q_scale = PyroParam(torch.ones(2, dtype=dtype), constraint=constraints.positive)

    def forward(self, y: torch.Tensor) -> None:
        pyro.sample("rate", dist.Gamma(self.q_shape, self.q_rate))
        pyro.sample("loc", dist.Normal(self.q_loc, self.q_scale).to_event(1))


GUIDES = {"AutoNormal": lambda dt: AutoNormal(model),
          "AutoMultivariateNormal": lambda dt: AutoMultivariateNormal(model),
          "PyroModule": ModuleGuide}
OPTIMS = {"natural": NaturalGradient, "wasserstein": WassersteinGradient}
ROUND_TRIPS = {"pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
               "deepcopy": copy.deepcopy,
               "torch.save": lambda obj: _torch_round_trip(obj)}


def _torch_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _data(dtype: torch.dtype) -> torch.Tensor:
    return 2.0 + torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _svi(guide, optim) -> SVI:
    return SVI(model, guide, optim, Trace_ELBO(num_particles=4, vectorize_particles=True))


def _traced(guide, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The guide's samples under seed 5."""
    pyro.set_rng_seed(5)
    trace = pyro.poutine.trace(guide).get_trace(y)
    return {n: s["value"].detach().clone() for n, s in trace.nodes.items() if s["type"] == "sample"}


def _params(guide) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in guide.state_dict().items()}


def _fit(guide, optim, y, steps: int) -> list[float]:
    svi = _svi(guide, optim)
    return [svi.step(y) for _ in range(steps)]


def _continue(guide, optim, y, steps: int = 2) -> list[float]:
    pyro.set_rng_seed(11)
    return _fit(guide, optim, y, steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("how", list(ROUND_TRIPS))
@pytest.mark.parametrize("guide_name", list(GUIDES))
@pytest.mark.parametrize("optim_name", list(OPTIMS))
def test_fitted_guide_and_optimizer_round_trip(optim_name, guide_name, how, dtype):
    """Guide and optimizer saved together after 2 steps: the loaded guide, in an empty param store
    (as in a fresh process), has the same params and draws the same samples under the same seed,
    and the loaded pair continues the fit exactly as the original pair does."""
    y = _data(dtype)
    guide = GUIDES[guide_name](dtype)
    optim = OPTIMS[optim_name](guide)
    _fit(guide, optim, y, 2)  # few: WassersteinGradient reaches a NaN loss by step 5 on this model
    loaded = ROUND_TRIPS[how]({"guide": guide, "optim": optim})
    assert loaded["optim"].reader.guide is loaded["guide"]  # one object, as SVI needs

    params, samples = _params(guide), _traced(guide, y)
    original = _continue(guide, optim, y)
    pyro.clear_param_store()
    assert _params(loaded["guide"]).keys() == params.keys()
    for name, value in _params(loaded["guide"]).items():
        assert torch.equal(value, params[name]), name
    for name, value in _traced(loaded["guide"], y).items():
        assert torch.equal(value, samples[name]), name
    assert _continue(loaded["guide"], loaded["optim"], y) == original


def test_a_normalizing_flow_resumes_exactly_after_pickling():
    """AutoIAFNormal keeps its first weight also as ``_prototype_tensor``, a second name in the
    param store, and which of the two ``store.param_name`` returns changes with unpickling: the
    optimizer names the tensor the same way either side, so its state (step size, trust region)
    still belongs to the group and the loaded pair continues the fit exactly."""
    y = _data(torch.float64)
    guide = AutoIAFNormal(model, num_transforms=1)
    optim = NaturalGradient(guide)
    _fit(guide, optim, y, 5)
    loaded = pickle.loads(pickle.dumps({"guide": guide, "optim": optim}))
    original = _continue(guide, optim, y, steps=5)
    pyro.clear_param_store()
    assert _continue(loaded["guide"], loaded["optim"], y, steps=5) == original


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
@pytest.mark.parametrize("optim_name", list(OPTIMS))
def test_a_loaded_guide_takes_the_same_code_paths(optim_name, how):
    """A loaded guide holds new instances of the parameterless constraints (``real``,
    ``unit_lower_cholesky``); they are recognised as the originals, so the loaded pair takes the
    same steps to the last bit over a longer continuation (other code paths agree with the
    originals' only to round-off: ~1e-6 apart here, on the trajectory of seed 1)."""
    pyro.set_rng_seed(1)
    y = _data(torch.float32)
    guide = AutoMultivariateNormal(model)
    optim = OPTIMS[optim_name](guide)
    _fit(guide, optim, y, 4)
    loaded = ROUND_TRIPS[how]({"guide": guide, "optim": optim})
    original = _continue(guide, optim, y, steps=4), _params(guide)
    pyro.clear_param_store()
    resumed = _continue(loaded["guide"], loaded["optim"], y, steps=4), _params(loaded["guide"])
    assert resumed[0] == original[0]
    for name, value in resumed[1].items():
        assert torch.equal(value, original[1][name]), name


@pytest.mark.parametrize("constraint", [constraints.real, constraints.real_vector,
                                        constraints.unit_lower_cholesky])
@pytest.mark.parametrize("how", list(ROUND_TRIPS))
def test_loaded_constraints_are_recognised(constraint, how):
    """``is_real`` and ``is_unit_lower_cholesky`` hold for a pickled, deep-copied or loaded copy
    of the constraint as for the original, and only for their own constraint."""
    loaded = ROUND_TRIPS[how](constraint)
    assert loaded is not constraint
    unit = constraint is constraints.unit_lower_cholesky
    assert is_real(loaded) is not unit and is_unit_lower_cholesky(loaded) is unit
    assert not is_real(constraints.positive) and not is_unit_lower_cholesky(
        constraints.lower_cholesky)


@pytest.mark.parametrize("optim_name", list(OPTIMS))
def test_guide_alone_round_trips_and_its_optimizer_pickles(optim_name):
    """The user's usual save: the fitted guide alone (``torch.save(guide)``), and the optimizer
    alone (``pickle.dumps(optim)``): neither keeps a trace or a graph."""
    y = _data(torch.float64)
    guide = AutoNormal(model)
    optim = OPTIMS[optim_name](guide)
    _fit(guide, optim, y, 3)
    samples = _traced(guide, y)
    pickle.dumps(optim)
    copy.deepcopy(optim)
    loaded = _torch_round_trip(guide)
    pyro.clear_param_store()
    for name, value in _traced(loaded, y).items():
        assert torch.equal(value, samples[name]), name


def test_one_hook_per_guide():
    """Optimizers built again on the same guide add no second recording hook."""
    guide = AutoNormal(model)
    for _ in range(3):
        NaturalGradient(guide)
    assert len(guide._forward_pre_hooks) == 1


def test_an_optimizer_on_a_rebuilt_copy_of_the_guide_is_named():
    """A rebuilt AutoNormal is another object: SVI never calls it, so the optimizer cannot read
    it; the error says the optimizer needs the same guide object, not to use ``record_args``."""
    y = _data(torch.float64)
    guide, copy_ = AutoNormal(model), AutoNormal(model)
    svi = _svi(guide, NaturalGradient(copy_))
    with pytest.raises(ValueError, match="needs the same guide object as SVI") as info:
        svi.step(y)
    assert "record_args" not in str(info.value) and "Adam" not in str(info.value)


def test_an_optimizer_on_another_guide_whose_params_svi_does_not_optimize_is_named():
    def guide_a(y):
        pyro.sample("rate", dist.Gamma(pyro.param("a_shape", torch.tensor(2.0),
                                                  constraint=constraints.positive), 1.0))
        pyro.sample("loc", dist.Normal(pyro.param("a_loc", torch.zeros(2)), 1.0).to_event(1))

    def guide_b(y):
        pyro.sample("rate", dist.Gamma(pyro.param("b_shape", torch.tensor(2.0),
                                                  constraint=constraints.positive), 1.0))
        pyro.sample("loc", dist.Normal(pyro.param("b_loc", torch.zeros(2)), 1.0).to_event(1))

    y = _data(torch.float32)
    guide_a, guide_b = record_args(guide_a), record_args(guide_b)
    optim = NaturalGradient(guide_b)
    guide_b(y)
    with pytest.raises(ValueError, match=r"none of guide 'guide_b'.*same guide object") as info:
        _svi(guide_a, optim).step(y)
    assert "Adam" not in str(info.value) and "'b_loc'" in str(info.value)


def test_the_model_passed_as_the_guide_is_named():
    """The model (no params in its distributions, an observed site) passed instead of the guide:
    the message says so rather than suggesting Adam or record_args."""
    y = _data(torch.float32)
    bound = record_args(model)
    guide = AutoNormal(bound)
    with pytest.raises(ValueError, match=r"observed sample site\(s\) \['counts', 'y'\].*looks "
                                         "like the model") as info:
        SVI(bound, guide, NaturalGradient(bound), Trace_ELBO()).step(y)
    assert "Adam" not in str(info.value) and "record_args" not in str(info.value)


def test_the_unwrapped_model_passed_as_the_guide_gets_both_remedies():
    """Without recorded arguments the callable cannot be re-run: the message names the two
    possible mistakes (a plain guide not wrapped, or the model passed)."""
    y = _data(torch.float32)
    guide = AutoNormal(model)
    with pytest.raises(TypeError, match=r"record_args.*if this is the model, build the "
                                        "optimizer on the guide"):
        SVI(model, guide, NaturalGradient(model), Trace_ELBO()).step(y)  # refused when built


def _svi_nesting(guide, optim) -> SVI:
    """SVI whose ELBO is told max_plate_nesting (else it guesses it on its first step by running
    the model and guide, which draws random numbers)."""
    return SVI(model, guide, optim, Trace_ELBO(num_particles=4, vectorize_particles=True,
                                               max_plate_nesting=1))


def _resume(y, path, set_up_before_seeding: bool) -> list[float]:
    """A fresh run (empty param store, new guide and optimizer) loading the saved params and
    optimizer state, seeded with 123, then 3 steps."""
    pyro.clear_param_store()
    guide = AutoNormal(model)
    if set_up_before_seeding:
        guide(y)  # the AutoGuide's set-up draws random numbers (its initial values)
    pyro.get_param_store().load(path / "params.pt")
    optim = NaturalGradient(guide)
    optim.load(path / "optim.pt")
    pyro.set_rng_seed(123)
    svi = _svi_nesting(guide, optim)
    return [svi.step(y) for _ in range(3)]


def test_resume_bit_for_bit_needs_the_guide_set_up_before_seeding(tmp_path):
    """README's recipe: save the param store and the optimizer; in the new run build the guide,
    call it once on the data, load both, give the ELBO max_plate_nesting, then seed. The resumed
    steps equal the original run's continuation exactly; setting the guide up after seeding
    (inside the first step) draws from the seeded stream and does not."""
    y = _data(torch.float64)
    guide = AutoNormal(model)
    optim = NaturalGradient(guide)
    svi = _svi_nesting(guide, optim)
    for _ in range(4):
        svi.step(y)
    pyro.get_param_store().save(tmp_path / "params.pt")
    optim.save(tmp_path / "optim.pt")
    pyro.set_rng_seed(123)
    original = [svi.step(y) for _ in range(3)]

    assert _resume(y, tmp_path, set_up_before_seeding=True) == original
    assert _resume(y, tmp_path, set_up_before_seeding=False) != original
