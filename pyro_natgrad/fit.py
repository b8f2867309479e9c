"""The SVI loop: a progress bar with the smoothed loss, early stopping, and a clean Ctrl-C.

Smoothed loss: the bias-corrected exponential moving average of Kingma & Ba (2015, "Adam", §3),
m_t = β m_{t−1} + (1 − β) L_t, m_0 = 0, ē_t = m_t / (1 − βᵗ): a weighted mean of the losses so
far, with weights decaying as βᵏ (about 1 / (1 − β) steps' worth).

Early stopping: every ``window`` steps the smoothed loss is compared with its value at the previous
check; the improvement Δ = (ē_prev − ē_now) / max(|ē_prev|, 1) is relative (absolute where
|ē| < 1). A check with Δ < ``tol`` (a rise included) is stale, any other resets the count, and the
loop stops after ``patience`` consecutive stale checks. The earliest stop is therefore after
(patience + 1) · window steps.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm


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


def fit(svi: Any, *args: Any, num_steps: int = 1000, progress: bool = True,
        tol: float | None = 1e-4, patience: int = 3, window: int = 100, smoothing: float = 0.95,
        **kwargs: Any) -> list[float]:
    """Run ``svi.step(*args, **kwargs)`` up to ``num_steps`` times; return the loss of each step.

    Works with any ``pyro.infer.SVI`` (any optimizer, any loss). The progress bar shows the
    smoothed loss ē_t; the loop stops early by the rule in the module docstring (``tol=None``
    never stops early). Ctrl-C lets the running step finish, then returns the history with a
    warning (a second Ctrl-C interrupts at once). A KeyboardInterrupt raised inside a step also
    returns the history of the finished steps with a warning; SVI writes params only after the
    loss and its gradients, so an interrupt in the loss leaves the params of the last finished step.
    A non-finite loss raises FloatingPointError (SVI has already applied that step's update).
    """
    _check_arguments(num_steps, tol, patience, window, smoothing)
    history: list[float] = []
    ema, last_check, stale = _EMA(smoothing), None, 0
    with _deferred_sigint() as interrupted, tqdm(total=num_steps, disable=not progress,
                                                 desc="SVI") as bar:
        try:
            for step in range(1, num_steps + 1):
                loss = float(svi.step(*args, **kwargs))
                if not math.isfinite(loss):
                    raise FloatingPointError(f"SVI loss is {loss} at step {step}")
                history.append(loss)
                smoothed = ema.update(loss)
                bar.set_postfix_str(f"loss {smoothed:.5g}", refresh=False)
                bar.update()
                if interrupted.is_set():
                    raise KeyboardInterrupt
                if tol is None or step % window:
                    continue
                if last_check is not None:
                    improved = (last_check - smoothed) / max(abs(last_check), 1.0) >= tol
                    stale = 0 if improved else stale + 1
                last_check = smoothed
                if stale >= patience:
                    bar.set_description("SVI converged")
                    break
        except KeyboardInterrupt:
            warnings.warn(f"fit interrupted after {len(history)} finished steps; returning their "
                          "losses", stacklevel=2)
    return history


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
