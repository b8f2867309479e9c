"""The SVI loop: a progress bar with the smoothed loss, early stopping, a clean Ctrl-C, and a step
the model fails at undone (see :func:`fit`).

Smoothed loss: the bias-corrected exponential moving average of Kingma & Ba (2015, "Adam", §3),
m_t = β m_{t−1} + (1 − β) L_t, m_0 = 0, ē_t = m_t / (1 − βᵗ): a weighted mean of the losses so
far, with weights decaying as βᵏ (about 1 / (1 − β) steps' worth).

Early stopping: every ``window`` steps the smoothed loss is compared with its value at the previous
check; the improvement Δ = (ē_prev − ē_now) / max(|ē_prev|, 1) is relative (absolute where
|ē| < 1). A check with Δ < ``tol`` (a rise included) is stale, any other resets the count, and the
loop stops after ``patience`` consecutive stale checks. The earliest stop is therefore after
(patience + 1) · window steps.

A rising loss: the history is cut into b = 20 blocks of n ≥ 5 steps; the block of lowest median
before the last quarter of the fit (n losses) is compared with the last quarter (m = 5n) by the
Mann–Whitney U statistic (the count of pairs in which the last quarter's loss is the higher;
Mann & Whitney 1947), z = (U − mn/2) / √(mn(m + n + 1)/12), a rank test that the heavy tails
of an importance-weighted loss estimate do not defeat. Where z > 4, the medians differ by
more than ``tol`` relatively and by more than 5 robust standard deviations of the first three
quarters' block medians (1.4826 × their median absolute deviation: a loss that wanders slowly
at its optimum, its steps correlated, moves the blocks together and fails the rank test's
independence), the fit warns that its steps did not descend the loss it reports.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import warnings
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyro
import torch
from tqdm import tqdm

from .distributed import RankFailedError, world_size

_UNDOS_IN_A_ROW = 3  # failed steps undone in a row before fit raises
_RISE_Z = 4.0  # the Mann–Whitney z of a rising loss (module docstring)


class _EMA:
    """Bias-corrected exponential moving average ē_t (module docstring)."""

    def __init__(self, smoothing: float):
        self.beta, self.m, self.t = smoothing, 0.0, 0

    def update(self, value: float) -> float:
        self.t += 1
        self.m = self.beta * self.m + (1.0 - self.beta) * value
        return self.m / (1.0 - self.beta**self.t)


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[threading.Event]:
    """Hold a first Ctrl-C (SIGINT) as a set event, so the running step can finish; a second one
    raises KeyboardInterrupt at once. Outside the main thread signals cannot be caught: no-op."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return

    def handler(signum, frame):
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_arguments(num_steps: int, tol: float | None, patience: int, window: int,
                     smoothing: float) -> None:
    problems = [f"{name} must be {rule}, got {value!r}" for name, value, ok, rule in [
        ("num_steps", num_steps, num_steps >= 0, "a non-negative integer"),
        ("tol", tol, tol is None or tol >= 0, "None or non-negative"),
        ("patience", patience, patience >= 1, "at least 1"),
        ("window", window, window >= 1, "at least 1"),
        ("smoothing", smoothing, 0 <= smoothing < 1, "in [0, 1)"),
    ] if not ok]
    if problems:
        raise ValueError("; ".join(problems))


class StepUndoneWarning(UserWarning):
    """The model or guide failed, or the loss was not finite, at the params of the optimizer's
    last step, and the optimizer undid that step (``optim.undo``)."""


class FitDiagnosisWarning(UserWarning):
    """What limits a finished fit, in the optimizer's words (``optim.diagnose()``), or that its
    loss rose (module docstring)."""


class _Watched:
    """Stands in for ``svi.optim`` during :func:`fit`: keeps a copy of the params it is handed,
    so that a step the optimizer does not finish (an interrupt or an error inside it, or after it
    inside ``svi.step``) can be put back. ``loss``: the loss of the running ``svi.step``, where
    :func:`_watching` could record it; a non-finite one is not handed to the optimizer (unless
    ``hand_nonfinite``), which would judge its last step by the gradient alone: fit undoes that
    step instead."""

    def __init__(self, optim: Any, hand_nonfinite: bool = False):
        self.optim, self.hand_nonfinite = optim, hand_nonfinite
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.loss: float | None = None
        self.skipped = False  # the running step's non-finite loss was not handed on

    def __call__(self, params: Iterable[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        if not isinstance(params, Collection):
            params = list(params)
        self.saved = [(p, p.detach().clone()) for p in params]
        loss, self.loss = self.loss, None
        self.skipped = loss is not None and not math.isfinite(loss) and not self.hand_nonfinite
        return None if self.skipped else self.optim(params, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "optim":  # not yet set
            raise AttributeError(name)
        return getattr(self.optim, name)

    def restore(self) -> bool:
        """Puts back the params of an unfinished step; True when there was one."""
        saved, self.saved = self.saved, None
        if saved is None:
            return False
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
        return True


@contextlib.contextmanager
def _watching(svi: Any, distributed: bool) -> Iterator[_Watched | None]:
    """``svi.optim`` watched, and ``svi.loss_and_grads`` (where the SVI has one) recording each
    step's loss for it. Distributed optimizers are handed every loss: every rank must call."""
    optim = getattr(svi, "optim", None)
    if optim is None:
        yield None
        return
    svi.optim = watched = _Watched(optim, hand_nonfinite=distributed)
    loss_and_grads = getattr(svi, "loss_and_grads", None)
    own = "loss_and_grads" in vars(svi)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        loss = loss_and_grads(*args, **kwargs)
        watched.loss = float(loss)
        return loss

    if callable(loss_and_grads):
        svi.loss_and_grads = recorded
    try:
        yield watched
    finally:
        svi.optim = optim
        if callable(loss_and_grads):
            if own:
                svi.loss_and_grads = loss_and_grads
            else:
                del svi.loss_and_grads


def _clear_grads() -> None:
    """Drops every param's ``.grad``: a step that did not finish leaves them, and the next
    backward pass would add to them."""
    for _, p in pyro.get_param_store().named_parameters():
        p.grad = None


def fit(svi: Any, *args: Any, num_steps: int = 1000, progress: bool = True,
        tol: float | None = 1e-4, patience: int = 3, window: int = 100, smoothing: float = 0.95,
        **kwargs: Any) -> list[float]:
    """Run ``svi.step(*args, **kwargs)`` up to ``num_steps`` times; return the loss of each step.

    Works with any ``pyro.infer.SVI`` (any optimizer, any loss). The progress bar shows the
    smoothed loss ē_t; the loop stops early by the rule in the module docstring (``tol=None``
    never stops early).

    Interrupts: Ctrl-C lets the running step finish, then returns the history with a warning (a
    second Ctrl-C interrupts at once). A KeyboardInterrupt raised inside a step returns the
    history of the finished steps with a warning, and the params are those of the last finished
    step (put back if the optimizer had begun to write them); ``.grad`` is cleared either way.

    Failures: when the model or guide raises (``ValueError``, ``RuntimeError`` such as a failed
    Cholesky) at the params of the last step, or the loss is not finite, and the optimizer can
    undo that step (``optim.undo(reason)`` returns True), fit warns (:class:`StepUndoneWarning`)
    and goes on; otherwise it raises (a non-finite loss as FloatingPointError naming the step).
    A step whose loss is not finite is not handed to the optimizer (which would judge its last
    step by the gradient alone, finite where the loss is not); where the optimizer has nothing
    left to undo, that step is skipped with the same warning. A failure at the first step (the
    initial params: there is no step to undo) is raised, and so is a fourth in a row (undoing
    does not help).

    End: an optimizer with ``finalize()`` judges its last step on one more gradient (so the fit
    ends on a kept step), and the messages of its ``diagnose()`` (what limits the fit, such as
    Monte Carlo noise, and the remedy) are issued as :class:`FitDiagnosisWarning`.

    Data-parallel (:class:`~pyro_natgrad.distributed.DistributedOptim` on more than one
    process): the stopping rule uses the ranks' mean smoothed loss, a Ctrl-C on any
    rank stops every rank after the same step, and a rank that fails makes every rank raise
    promptly (no undo: the ranks' params must stay equal).
    """
    _check_arguments(num_steps, tol, patience, window, smoothing)
    optim = getattr(svi, "optim", None)
    distributed = callable(getattr(optim, "agree", None)) and world_size(optim.group) > 1
    if distributed:
        optim.stop_agreed = False
    history: list[float] = []
    ema, last_check, stale, ended, undone = _EMA(smoothing), None, 0, "ended", 0
    with (_deferred_sigint() as interrupted, _watching(svi, distributed) as watched,
          tqdm(total=num_steps, disable=not progress, desc="SVI") as bar):
        try:
            for step in range(1, num_steps + 1):
                loss = _step(svi, watched, step, distributed, args, kwargs,
                             undo=bool(history) and undone < _UNDOS_IN_A_ROW)
                bar.update()
                undone = 0 if loss is not None else undone + 1
                if loss is None:
                    continue
                history.append(loss)
                smoothed = ema.update(loss)
                bar.set_postfix_str(f"loss {smoothed:.5g}", refresh=False)
                if interrupted.is_set() and not distributed:
                    raise KeyboardInterrupt
                if interrupted.is_set():
                    optim.request_stop()  # every rank stops after the same step
                if distributed and optim.stop_agreed:
                    raise KeyboardInterrupt
                if tol is None or step % window:
                    continue
                if distributed:
                    smoothed = optim.agree(smoothed)
                if last_check is not None:
                    improved = (last_check - smoothed) / max(abs(last_check), 1.0) >= tol
                    stale = 0 if improved else stale + 1
                last_check = smoothed
                if stale >= patience:
                    ended = "converged"
                    bar.set_description("SVI converged")
                    break
        except KeyboardInterrupt:
            warnings.warn(f"fit interrupted after {len(history)} finished steps; returning their "
                          "losses", stacklevel=2)
            return history
        _finalize(svi, watched, distributed, args, kwargs)
    rose = rising(history, 1e-4 if tol is None else tol)
    for message in ([rose] if rose else []) + list(getattr(optim, "diagnose", lambda: [])()):
        warnings.warn(f"fit {ended} after {len(history)} steps; {message}", FitDiagnosisWarning,
                      stacklevel=2)
    return history


def rising(history: Sequence[float], tol: float = 1e-4, blocks: int = 20) -> str | None:
    """A message where the loss rose over the fit beyond its Monte Carlo noise (module
    docstring), else None. Needs at least 5 steps a block."""
    n = len(history) // blocks
    if n < 5:
        return None
    values = np.asarray(history[len(history) - n * blocks:], dtype=float).reshape(blocks, n)
    if not np.isfinite(values).all():
        return None
    medians = np.median(values, axis=1)
    head = blocks - blocks // 4
    low = int(np.argmin(medians[:head]))
    last = values[head:].reshape(-1)
    above = last[:, None] - values[low][None, :]
    u = float((above > 0).sum() + 0.5 * (above == 0).sum())  # Mann–Whitney U, last over low
    m = len(last)
    z = (u - m * n / 2) / math.sqrt(m * n * (m + n + 1) / 12)
    end, lowest = float(np.median(last)), float(medians[low])
    rise = end - lowest
    wander = 1.4826 * float(np.median(np.abs(medians[:head] - np.median(medians[:head]))))
    if not (z > _RISE_Z and rise > 5 * wander and rise > tol * max(abs(lowest), 1.0)):
        return None
    start = len(history) - n * blocks + low * n + 1
    return (f"the loss rose: the median of the last {m} steps is {end:.6g}, {rise:.3g} above "
            f"the lowest median of {n} steps ({lowest:.6g}, steps {start}–{start + n - 1}; "
            f"Mann–Whitney z = {z:.2f}), so the steps did not descend "
            "the loss that was reported. A gradient estimate that is biased or heavy-tailed "
            "(e.g. RenyiELBO with alpha < 1, or an importance-weighted bound, with few "
            "particles) or too large a step can do this: use more particles or a smaller lr, "
            "and check the fitted guide")


def _step(svi: Any, watched: _Watched | None, step: int, distributed: bool, args: tuple,
          kwargs: dict, undo: bool = True) -> float | None:
    """One ``svi.step``: its loss, or None when it failed at the params of the previous step and
    the optimizer undid that step. Without ``undo`` (no step has finished yet, so the params are
    the initial ones; or undone steps keep failing) a failure is raised."""
    try:
        loss = float(svi.step(*args, **kwargs))
    except BaseException as e:
        inside = watched is not None and watched.restore()  # the optimizer had begun
        _clear_grads()
        if isinstance(e, KeyboardInterrupt | RankFailedError):
            raise
        if (undo and not inside and isinstance(e, ValueError | RuntimeError)
                and _undone(watched, distributed, _describe(e), f"step {step}")):
            return None
        if distributed:
            watched.agree(failed=True)
        raise
    if math.isfinite(loss) or (undo and (
            _undone(watched, distributed, f"the loss is {loss}", f"step {step}")
            or _skipped(watched, f"step {step}: the loss is {loss}"))):
        if watched is not None:
            watched.saved = None
        return loss if math.isfinite(loss) else None
    if watched is not None:
        watched.restore()  # the params of the last step with a finite loss
    if distributed:
        watched.agree(failed=True)
    raise FloatingPointError(f"SVI loss is {loss} at step {step}" + (
        "" if undo else ", at the initial params" if step == 1 else
        f", after {_UNDOS_IN_A_ROW} steps in a row were undone for the same"))


def _undone(optim: Any, distributed: bool, reason: str, where: str) -> bool:
    """Asks the optimizer to undo its last step; warns and returns True when it did."""
    undo = getattr(optim, "undo", None)
    if distributed or undo is None or not undo(reason):
        return False
    warnings.warn(f"{where}: {reason} at the params of the optimizer's last step; that step "
                  "was undone and its step size shrunk", StepUndoneWarning, stacklevel=4)
    return True


def _skipped(watched: _Watched | None, where: str) -> bool:
    """Where an optimizer that can undo was not handed a step with a non-finite loss and had
    nothing left to undo (its last step was undone already): warns and returns True (the params
    are unchanged)."""
    if watched is None or not watched.skipped or getattr(watched, "undo", None) is None:
        return False
    warnings.warn(f"{where} with nothing left to undo; the step was skipped, params unchanged",
                  StepUndoneWarning, stacklevel=4)
    return True


def _describe(error: BaseException) -> str:
    """``Type: message``, without the trace shapes Pyro appends, cut to 300 characters."""
    message = str(error).split("\nTrace Shapes:")[0]
    message = message if len(message) <= 300 else message[:297] + "..."
    return f"{type(error).__name__.lstrip('_')}: {message}"


def _finalize(svi: Any, optim: Any, distributed: bool, args: tuple, kwargs: dict) -> None:
    """Computes the gradient at the current params and lets the optimizer judge its last step
    (``optim.finalize()``), so the run ends on a kept step."""
    finalize = getattr(optim, "finalize", None)
    loss_and_grads = getattr(svi, "loss_and_grads", None)
    if finalize is None or loss_and_grads is None:
        return
    try:
        loss_and_grads(svi.model, svi.guide, *args, **kwargs)
    except (ValueError, RuntimeError) as e:
        _clear_grads()
        if _undone(optim, distributed, _describe(e), "final gradient"):
            return
        if distributed:
            optim.agree(failed=True)
        raise
    try:
        finalize()
    finally:
        _clear_grads()


def plot_history(history: Sequence[float], ax: Any = None, smoothing: float = 0.95) -> Any:
    """Plot the losses of :func:`fit` and their smoothed curve ē_t; log y-axis when all losses
    are positive. Returns the matplotlib Axes (a new figure's when ``ax`` is None)."""
    import matplotlib.pyplot as plt

    losses = np.asarray(history, dtype=float)
    ema = _EMA(smoothing)
    smoothed = [ema.update(loss) for loss in losses]
    if ax is None:
        _, ax = plt.subplots()
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    ax.plot(steps, smoothed, lw=1.6, label=f"smoothed (EMA, smoothing {smoothing})")
    if len(losses) and losses.min() > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (-ELBO)")
    ax.legend()
    return ax
