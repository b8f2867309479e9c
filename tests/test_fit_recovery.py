"""fit when a step does not finish or fails: interrupts inside the optimizer, a model that fails at
the params of the last step (undo), a non-finite loss, ``finalize`` and ``diagnose``.

The optimizer-facing contract is duck-typed (``undo(reason) -> bool``, ``finalize()``,
``diagnose() -> list[str]``); most tests use a small Adam-based fake that implements it, and one
runs NaturalGradient end to end.
"""

from __future__ import annotations

import math
import signal
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import PyroOptim

from pyro_natgrad import NaturalGradient
from pyro_natgrad.distributed import DistributedOptim
from pyro_natgrad.fit import FitDiagnosisWarning, StepUndoneWarning, fit

from .test_diagnostics import normal_data, normal_model, normal_posterior


class Undoable(PyroOptim):
    """SGD with fit's optional methods: ``undo`` puts back the params of the last step (once),
    ``finalize`` and ``diagnose`` record their calls. ``fail_at``: calls that raise ``error``
    after writing the params (an interrupt or failure inside the optimizer)."""

    def __init__(self, lr: float = 0.1, notes: tuple[str, ...] = (), fail_at: tuple = (),
                 error: BaseException | None = None):
        super().__init__(torch.optim.SGD, {"lr": lr})
        self.before: dict | None = None
        self.undone: list[str] = []
        self.finalized: list[dict] = []
        self.notes, self.fail_at, self.error, self.calls = list(notes), fail_at, error, 0

    def __call__(self, params, *args, **kwargs) -> None:
        self.calls += 1
        params = list(params)
        self.before = {p: p.detach().clone() for p in params}
        super().__call__(params, *args, **kwargs)
        if self.calls in self.fail_at:
            raise self.error

    def undo(self, reason: str) -> bool:
        if self.before is None:
            return False
        with torch.no_grad():
            for p, value in self.before.items():
                p.copy_(value)
        self.before = None
        self.undone.append(reason)
        return True

    def finalize(self) -> None:
        store = pyro.get_param_store()
        self.finalized.append({n: None if p.grad is None else p.grad.clone()
                               for n, p in store.named_parameters()})

    def diagnose(self) -> list[str]:
        return self.notes


def _nothing(*args):
    pass


def _svi(loss, optim) -> SVI:
    """SVI on a deterministic loss of the param ``p`` (initial value 0, float64)."""
    return SVI(_nothing, _nothing, optim, loss=lambda model, guide: loss(pyro.param(
        "p", torch.tensor(0.0, dtype=torch.float64))))


def _quadratic(p):
    return (p - 3.0) ** 2


def _p() -> torch.Tensor:
    return pyro.param("p").detach().clone()


def _sgd_path(steps: int, lr: float = 0.1) -> list[float]:
    """p after 0, 1, …, steps SGD steps on (p − 3)² from 0: 3 − 3 (1 − 2 lr)ᵏ."""
    return [3.0 - 3.0 * (1 - 2 * lr) ** k for k in range(steps + 1)]


# ----- interrupts --------------------------------------------------------------------------------
def test_interrupt_inside_the_optimizer_keeps_history_and_params_together():
    """A KeyboardInterrupt raised by the optimizer of step 7 after it wrote the params: the
    history has 6 losses and the params are those of 6 steps (put back), with no ``.grad``."""
    optim = Undoable(fail_at=(7,), error=KeyboardInterrupt())
    with pytest.warns(UserWarning, match="interrupted after 6 finished steps"):
        history = fit(_svi(_quadratic, optim), num_steps=50, progress=False)
    assert len(history) == 6
    assert _p().item() == pytest.approx(_sgd_path(6)[6], abs=1e-12)
    assert pyro.param("p").unconstrained().grad is None


def test_ctrl_c_inside_the_optimizer_lets_it_finish():
    """SIGINT while the optimizer of step 7 runs: the step finishes and counts (7 and 7)."""
    previous = signal.getsignal(signal.SIGINT)

    class Signalling(Undoable):
        def __call__(self, params, *args, **kwargs):
            if self.calls == 6:
                signal.raise_signal(signal.SIGINT)
            super().__call__(params, *args, **kwargs)

    with pytest.warns(UserWarning, match="interrupted after 7 finished steps"):
        history = fit(_svi(_quadratic, Signalling()), num_steps=50, progress=False)
    assert len(history) == 7
    assert _p().item() == pytest.approx(_sgd_path(7)[7], abs=1e-12)
    assert signal.getsignal(signal.SIGINT) is previous


def test_resuming_after_an_interrupt_adds_no_stale_gradient():
    """Interrupted inside step 7's optimizer, then resumed for 10 more steps: exactly the path
    of 16 uninterrupted steps (a stale ``.grad`` of step 7 would be added to step 8's)."""
    optim = Undoable(fail_at=(7,), error=KeyboardInterrupt())
    svi = _svi(_quadratic, optim)
    with pytest.warns(UserWarning, match="interrupted"):
        fit(svi, num_steps=50, progress=False)
    fit(svi, num_steps=10, progress=False, tol=None)
    assert _p().item() == pytest.approx(_sgd_path(16)[16], abs=1e-12)


def test_interrupt_in_the_backward_pass_clears_partial_gradients():
    """A KeyboardInterrupt raised during step 5's backward pass (after p's gradient was
    accumulated): the params are those of 4 steps and no ``.grad`` is left."""
    calls = 0

    def loss(p):
        nonlocal calls
        calls += 1

        def hook(grad):
            if calls == 5:
                raise KeyboardInterrupt
            return grad

        q = p * 1.0
        q.register_hook(hook)
        return (p - 3.0) ** 2 + 0.0 * q

    with pytest.warns(UserWarning, match="interrupted after 4 finished steps"):
        fit(_svi(loss, Undoable()), num_steps=50, progress=False)
    assert _p().item() == pytest.approx(_sgd_path(4)[4], abs=1e-12)
    assert pyro.param("p").unconstrained().grad is None


# ----- failures at the params of the last step ------------------------------------------------
def _fails_once_at(step_to_fail: int, error: Exception):
    """(p − 3)², raising ``error`` when evaluated for the ``step_to_fail``-th time."""
    calls = 0

    def loss(p):
        nonlocal calls
        calls += 1
        if calls == step_to_fail:
            raise error
        return (p - 3.0) ** 2

    return loss


@pytest.mark.parametrize("error", [
    torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed"),
    ValueError("Expected parameter scale of Normal at site 'z' to satisfy GreaterThan(0.0)"),
    RuntimeError("cholesky_cpu: U(2,2) is zero, singular U."),
])
def test_a_model_failure_at_the_last_step_is_undone_and_the_fit_goes_on(error):
    """The loss raises at step 5 (at the params of step 4): the optimizer's ``undo`` puts back
    the params of step 3, fit warns naming the error, and 20 calls leave the params of 18 steps
    with 19 losses."""
    optim, name = Undoable(), type(error).__name__.lstrip("_")  # torch's is _LinAlgError
    with pytest.warns(StepUndoneWarning, match=rf"step 5: {name}: .*undone"):
        history = fit(_svi(_fails_once_at(5, error), optim), num_steps=20, progress=False,
                      tol=None)
    assert len(history) == 19 and len(optim.undone) == 1
    assert str(error) in optim.undone[0]
    assert _p().item() == pytest.approx(_sgd_path(18)[18], abs=1e-12)


def test_distributed_optim_on_one_process_undoes_as_the_wrapped_optimizer():
    """DistributedOptim without a process group is the wrapped optimizer: undo and finalize go
    through (the no-undo rule is for several ranks)."""
    optim = DistributedOptim(Undoable())
    with pytest.warns(StepUndoneWarning, match="step 5"):
        fit(_svi(_fails_once_at(5, ValueError("bad")), optim), num_steps=20, progress=False,
            tol=None)
    assert _p().item() == pytest.approx(_sgd_path(18)[18], abs=1e-12)
    assert len(optim.optim.finalized) == 1


def test_a_failure_without_undo_is_raised_with_clean_gradients():
    """Plain Pyro optimizers have no ``undo``: the model's error propagates as before."""
    svi = _svi(_fails_once_at(5, ValueError("bad scale at site 'z'")), pyro.optim.SGD({"lr": 0.1}))
    with pytest.raises(ValueError, match="bad scale"):
        fit(svi, num_steps=20, progress=False)
    assert _p().item() == pytest.approx(_sgd_path(4)[4], abs=1e-12)
    assert pyro.param("p").unconstrained().grad is None


def test_a_failure_at_the_first_step_is_raised():
    """No step to undo: ``undo`` returns False and the error propagates."""
    optim = Undoable()
    with pytest.raises(ValueError, match="at the initial params"):
        fit(_svi(_fails_once_at(1, ValueError("at the initial params")), optim), num_steps=5,
            progress=False)
    assert optim.undone == []


def test_an_error_inside_the_optimizer_is_not_undone():
    """An error raised by the optimizer itself is not a failure of the model at the last step's
    params: it propagates, and the params it began to write are put back."""
    optim = Undoable(fail_at=(4,), error=RuntimeError("the optimizer's own failure"))
    with pytest.raises(RuntimeError, match="own failure"):
        fit(_svi(_quadratic, optim), num_steps=20, progress=False)
    assert optim.undone == []
    assert _p().item() == pytest.approx(_sgd_path(3)[3], abs=1e-12)


def test_a_non_finite_loss_is_undone_when_the_optimizer_can():
    """The loss at step 3 is NaN once (its gradient too): undone, the fit goes on."""
    calls = 0

    def loss(p):
        nonlocal calls
        calls += 1
        value = (p - 3.0) ** 2
        return value * float("nan") if calls == 3 else value

    optim = Undoable()
    with pytest.warns(StepUndoneWarning, match="step 3: the loss is nan"):
        history = fit(_svi(loss, optim), num_steps=10, progress=False, tol=None)
    assert len(history) == 9


def test_a_non_finite_loss_at_the_initial_params_or_again_after_undos_is_raised():
    """Step 1's loss is evaluated at the initial params, before any step: nothing to undo, so it
    is raised (as without undo). A loss that stays NaN from step 3 on is undone three times in a
    row, then raised: undoing does not help."""
    with pytest.raises(FloatingPointError, match="step 1, at the initial params"):
        fit(_svi(lambda p: (p - 3.0) ** 2 * float("inf"), Undoable()), num_steps=5,
            progress=False)
    calls = 0

    def loss(p):
        nonlocal calls
        calls += 1
        return (p - 3.0) ** 2 * (float("nan") if calls >= 3 else 1.0)

    with pytest.warns(StepUndoneWarning), pytest.raises(
            FloatingPointError, match="step 6, after 3 steps in a row were undone"):
        fit(_svi(loss, Undoable()), num_steps=10, progress=False, tol=None)


def test_a_non_finite_loss_without_undo_raises_with_the_params_of_the_history():
    """SGD: p = 0, then 0.4, where log(0.025 − p) is NaN: FloatingPointError names step 2, and
    the NaN gradient's update is put back (p = 0.4, the params after the one step in the
    history)."""
    svi = _svi(lambda p: torch.log(0.025 - p), pyro.optim.SGD({"lr": 0.01}))
    with pytest.raises(FloatingPointError, match="step 2"):
        fit(svi, num_steps=10, progress=False)
    assert _p().item() == pytest.approx(0.4)


# ----- finalize and diagnose -----------------------------------------------------------------
def test_finalize_gets_the_gradient_at_the_final_params():
    """fit ends with one gradient at the final params handed to ``finalize``, then clears it:
    d/dp (p − 3)² = 2 (p − 3)."""
    optim = Undoable()
    fit(_svi(_quadratic, optim), num_steps=8, progress=False, tol=None)
    (grads,) = optim.finalized
    (name,) = grads
    assert grads[name].item() == pytest.approx(2 * (_sgd_path(8)[8] - 3.0), abs=1e-12)
    assert pyro.param("p").unconstrained().grad is None


def test_diagnose_messages_are_warned_when_the_fit_converges():
    note = "step size lowered to 3% of lr by the stationarity test: use more particles"
    optim = Undoable(lr=0.0, notes=(note,))  # a constant loss: converged at the first chance
    with pytest.warns(FitDiagnosisWarning, match=r"fit converged after 80 steps; step size "
                                                 r"lowered to 3% .* more particles"):
        fit(_svi(_quadratic, optim), num_steps=1000, progress=False, window=20, patience=3)


def test_plain_optimizers_are_not_finalized_or_diagnosed():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = fit(_svi(_quadratic, pyro.optim.Adam({"lr": 0.1})), num_steps=30,
                      progress=False, tol=None)
    assert len(history) == 30


def test_natural_gradient_undoes_a_step_the_model_fails_at():
    """End to end with NaturalGradient: the Normal-Normal model raises (as its own Cholesky
    would) the first time it is run at params other than the initial ones; fit warns, the
    optimizer undoes its first step, and the fit still ends at the exact posterior, saying that
    Monte Carlo noise limits it (16 particles)."""
    y = normal_data(torch.float64)
    seen = {"failed": False}

    def model(y):
        store = pyro.get_param_store()
        moved = "AutoNormal.locs.mu" in store and store["AutoNormal.locs.mu"].item() != 0.0
        if moved and not seen["failed"]:
            seen["failed"] = True
            raise torch.linalg.LinAlgError("linalg.cholesky: the model's own matrix")
        normal_model(y)

    guide = AutoNormal(model)
    optim = NaturalGradient(guide)
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=16, vectorize_particles=True))
    with (pytest.warns(FitDiagnosisWarning, match="Monte Carlo noise"),
          pytest.warns(StepUndoneWarning, match="step 2: LinAlgError")):
        fit(svi, y, num_steps=300, progress=False)
    mean, sd = normal_posterior(y)
    assert abs(guide.locs.mu.item() - mean) < 0.3 * sd
    assert 0.8 < guide.scales.mu.item() / sd < 1.25


def test_a_nan_loss_with_a_finite_gradient_undoes_the_step_that_reached_it():
    """Validation off, log(10 − μ) in the model: a step past μ = 10 gives a NaN loss whose
    gradient is finite. fit does not hand that step to NaturalGradient (which would judge the step
    that reached it by the gradient alone and might take a new one from there): the step is undone
    and the fit ends at the posterior (μ ≈ ȳ = 9.7, below 10), with a finite loss there."""
    y = 9.7 + 0.3 * torch.randn(40, generator=torch.Generator().manual_seed(0))

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 20.0))
        pyro.factor("bound", torch.log(10.0 - mu))
        with pyro.plate("N", len(y)):
            pyro.sample("y", dist.Normal(mu, 0.3), obs=y)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, NaturalGradient(guide), elbo)
    with pyro.validation_enabled(False), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(svi, y, num_steps=100, progress=False, tol=None)
        loss = elbo.loss(model, guide, y)
    assert any(issubclass(w.category, StepUndoneWarning) and "the loss is nan" in str(w.message)
               for w in caught)
    assert math.isfinite(loss)
    assert 9.0 < pyro.param("AutoNormal.locs.mu").item() < 10.0
