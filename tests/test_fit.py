"""fit: early stopping by its documented rule, history, interrupts; plot_history."""

from __future__ import annotations

import math
import signal
import warnings

import matplotlib
import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_natgrad import NaturalGradient
from pyro_natgrad.fit import FitDiagnosisWarning, fit, plot_history

from .test_diagnostics import normal_data, normal_model, normal_posterior

matplotlib.use("Agg")


def _nothing(*args):
    pass


def _svi(loss, optim=None):
    """SVI on a deterministic loss of the param ``p`` (initial value 0)."""
    optim = optim or pyro.optim.SGD({"lr": 0.01})
    return SVI(_nothing, _nothing, optim, loss=lambda model, guide: loss(pyro.param(
        "p", torch.tensor(0.0, dtype=torch.float64))))


def test_stops_at_the_first_possible_check_on_a_constant_loss():
    """A converged loss (constant) is stale at every check: checks at steps w, 2w, ...; the first
    only records ē, so the stop comes at (patience + 1) · window steps."""
    svi = _svi(lambda p: 0 * p + 5.0)
    history = fit(svi, num_steps=10_000, progress=False, tol=1e-6, patience=3, window=20)
    assert len(history) == (3 + 1) * 20
    assert history == [5.0] * len(history)


def test_does_not_stop_while_improving():
    """loss = -p under SGD falls by lr = 0.01 per step: over a window of 20 steps the smoothed
    loss falls by 0.2, relative to |ē| ≤ 5 at least 4%, far above tol."""
    svi = _svi(lambda p: -p)
    history = fit(svi, num_steps=500, progress=False, tol=1e-3, patience=2, window=20)
    assert len(history) == 500
    assert history[-1] == pytest.approx(-0.01 * 499)


def test_tol_none_never_stops_early():
    history = fit(_svi(lambda p: 0 * p + 5.0), num_steps=300, progress=False, tol=None, window=10)
    assert len(history) == 300


def test_a_loss_that_rises_beyond_its_noise_is_named():
    """``rising``: the block of lowest median against the last quarter (Mann–Whitney z > 4, the
    rise above 5 robust sds of the block medians). Named: a fall then a heavy-tailed rise (the
    shape of a helper's RenyiELBO(alpha=0.5) fit at 32 particles, q 332 posterior sds off with
    −ELBO estimates 43 → 204, outliers to 27,000). Not named: stationary noise, normal or
    heavy-tailed (0 and 1 of 2,000 histories of 200 steps measured), a fall, a short fit."""
    from pyro_natgrad.fit import rising

    g = np.random.default_rng(0)
    fall = 44 + 20 * np.exp(-np.arange(200) / 10)
    rise = np.where(np.arange(200) < 80, 0.0, np.exp((np.arange(200) - 80) / 25.0))
    noisy = (fall + rise) * np.exp(g.standard_t(2, 200) * 0.2)
    message = rising(list(noisy))
    assert message is not None and "the loss rose" in message and "steps" in message
    assert rising(list(100 + g.standard_normal(200))) is None
    assert rising(list(100 + g.standard_t(1.5, 1000))) is None
    assert rising(list(fall + g.standard_normal(200))) is None
    assert rising(list(noisy[:90])) is None  # under 5 steps a block


def test_fit_warns_when_the_loss_it_reports_rises():
    """The reported loss 10 − p² rises while the steps descend p² (a gradient that does not
    belong to the loss reported, as a biased estimate's does not): fit names it."""
    def loss(p):
        return (p**2 - (p**2).detach()) + 10.0 - p.detach() ** 2

    svi = SVI(_nothing, _nothing, pyro.optim.SGD({"lr": 0.02}), loss=lambda model, guide: loss(
        pyro.param("p", torch.tensor(3.0, dtype=torch.float64))))
    with pytest.warns(FitDiagnosisWarning, match="the loss rose"):
        fit(svi, num_steps=200, progress=False, tol=None)


def test_early_stop_on_a_real_elbo_leaves_the_exact_posterior():
    """Normal-Normal, AutoNormal, 16-particle Trace_ELBO, Adam(0.05), default stopping rule.
    Measured over seeds 0-9: stops after 500-1600 of 5000 steps, |mean error| ≤ 0.29 posterior sd,
    scale ratio 0.91-1.11 (the stationary noise of Adam); tolerances 0.5 sd and [0.8, 1.25]."""
    y = normal_data(torch.float64)
    guide = AutoNormal(normal_model)
    svi = SVI(normal_model, guide, pyro.optim.Adam({"lr": 0.05}),
              Trace_ELBO(num_particles=16, vectorize_particles=True))
    window = 100
    history = fit(svi, y, num_steps=5000, progress=False, window=window)
    assert len(history) < 5000 and len(history) % window == 0
    mean, sd = normal_posterior(y)
    assert abs(guide.locs.mu.item() - mean) < 0.5 * sd
    assert 0.8 < guide.scales.mu.item() / sd < 1.25


def _interrupting_loss(step_to_interrupt, interrupt):
    """Loss (p − 3)² that calls ``interrupt()`` while computing step ``step_to_interrupt``."""
    calls = 0

    def loss(p):
        nonlocal calls
        calls += 1
        if calls == step_to_interrupt:
            interrupt()
        return (p - 3.0) ** 2

    return loss


def _params_after(steps):
    pyro.clear_param_store()
    svi = _svi(lambda p: (p - 3.0) ** 2, pyro.optim.Adam({"lr": 0.1}))
    for _ in range(steps):
        svi.step()
    return pyro.param("p").detach().clone()


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


def test_keyboard_interrupt_in_a_step_keeps_the_params_of_the_previous_step():
    k = 7
    svi = _svi(_interrupting_loss(k, _raise_keyboard_interrupt), pyro.optim.Adam({"lr": 0.1}))
    with pytest.warns(UserWarning, match="interrupted after 6 finished steps"):
        history = fit(svi, num_steps=50, progress=False)
    assert len(history) == k - 1
    fitted = pyro.param("p").detach().clone()
    assert not torch.equal(fitted, _params_after(k))
    assert torch.equal(fitted, _params_after(k - 1))


def test_ctrl_c_lets_the_running_step_finish():
    k = 7
    previous_handler = signal.getsignal(signal.SIGINT)
    svi = _svi(_interrupting_loss(k, lambda: signal.raise_signal(signal.SIGINT)),
               pyro.optim.Adam({"lr": 0.1}))
    with pytest.warns(UserWarning, match="interrupted after 7 finished steps"):
        history = fit(svi, num_steps=50, progress=False)
    assert len(history) == k
    assert torch.equal(pyro.param("p").detach(), _params_after(k))
    assert signal.getsignal(signal.SIGINT) is previous_handler


def test_non_finite_loss_names_the_step():
    svi = _svi(lambda p: torch.log(0.025 - p))  # SGD: p = 0, then 0.4: log of a negative number
    with pytest.raises(FloatingPointError, match="step 2"):
        fit(svi, num_steps=10, progress=False)


@pytest.mark.parametrize("bad", [{"num_steps": -1}, {"patience": 0}, {"window": 0},
                                 {"smoothing": 1.0}, {"tol": -1.0}])
def test_bad_arguments_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        fit(_svi(lambda p: p), progress=False, **bad)


def test_progress_bar_shows_the_smoothed_loss(capsys):
    fit(_svi(lambda p: 0 * p + 5.0), num_steps=20, progress=True, tol=None)
    assert "loss 5" in capsys.readouterr().err


def test_plot_history_raw_and_smoothed():
    beta = 0.9
    ax = plot_history([1.0, 2.0], smoothing=beta)
    raw, smoothed = ax.get_lines()
    assert list(raw.get_ydata()) == [1.0, 2.0]
    # bias-corrected EMA: ē_1 = L_1, ē_2 = (β(1−β)·1 + (1−β)·2) / (1 − β²) = (β + 2) / (1 + β)
    assert smoothed.get_ydata() == pytest.approx([1.0, (beta + 2) / (1 + beta)])
    assert ax.get_yscale() == "log"
    matplotlib.pyplot.close("all")


def test_plot_history_linear_for_negative_losses_and_given_axes():
    _, given = matplotlib.pyplot.subplots()
    ax = plot_history([-3.0, -5.0, -6.0], ax=given)
    assert ax is given and ax.get_yscale() == "linear"
    assert math.isclose(ax.get_lines()[1].get_ydata()[0], -3.0)
    matplotlib.pyplot.close("all")


def test_a_converged_natural_fit_is_told_how_its_step_size_settled_not_that_noise_rules():
    """A Normal–Normal fit with NaturalGradient's defaults and 4 particles settles by the
    stationarity test lowering its rate, and fit's stopping rule ends it. The note says that is
    how a noisy fit settles, and when noise stops one short (before, every converged fit was
    told that noise dominated its step)."""
    y = normal_data(torch.float64)
    guide = AutoNormal(normal_model)
    opt = NaturalGradient(guide)
    svi = SVI(normal_model, guide, opt, Trace_ELBO(num_particles=4, vectorize_particles=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(svi, y, num_steps=5000, progress=False)
    assert len(history) < 5000  # converged by the stopping rule
    (note,) = [str(w.message) for w in caught if issubclass(w.category, FitDiagnosisWarning)]
    assert note.startswith("fit converged") and "lowered to" in note
    assert "settles at its optimum" in note and "stop it short" in note
    assert "now dominates the step" not in note
