"""Reading posteriordb folders (data, reference moments) and comparing a fitted guide with them."""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro import poutine
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent / "posteriordb"

Moments = dict[str, tuple[Tensor, Tensor]]  # site -> (mean, sd), flattened, float64


def read_data(name: str) -> dict:
    """The data object of posterior ``name`` (``data.json.zip``)."""
    with zipfile.ZipFile(ROOT / name / "data.json.zip") as z:
        return json.loads(z.read(z.namelist()[0]))


def reference(name: str) -> Moments:
    """Reference (NUTS) posterior mean and sd per parameter, constrained space, in Stan's order
    (``beta[1]``, ``beta[2]``, … flattened into one tensor per site). A posterior without its own
    reference (eight_schools_centered) uses the one its ``posterior.json`` names."""
    info = json.loads((ROOT / name / "posterior.json").read_text())
    folder = ROOT / info["reference_posterior_name"]
    means = json.loads((folder / "mean_value.json").read_text())
    squares = json.loads((folder / "mean_squared_value.json").read_text())
    out: dict[str, tuple[list[float], list[float]]] = {}
    for label, m, m2 in zip(means["names"], means["mean_value"],
                            squares["mean_squared_value"], strict=True):
        mean, sd = out.setdefault(re.sub(r"\[.*\]", "", label), ([], []))
        mean.append(m)
        sd.append(math.sqrt(max(m2 - m * m, 0.0)))
    return {site: (torch.tensor(m, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
            for site, (m, s) in out.items()}


def draws(model: Callable, guide: Callable, data: tuple, num_samples: int) -> dict[str, Tensor]:
    """Values of every site of ``model`` replayed on ``num_samples`` vectorized guide draws (as
    :class:`pyro.infer.Trace_ELBO` vectorizes particles), each reshaped to (num_samples, -1)."""
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*data)
        model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(*data)
        nesting = max([-frame.dim for trace in (model_trace, guide_trace)
                       for site in trace.nodes.values() if site["type"] == "sample"
                       for frame in site["cond_indep_stack"] if frame.vectorized], default=0)
        particles = pyro.plate("_draws", num_samples, dim=-(nesting + 1))
        guide_trace = poutine.trace(particles(guide)).get_trace(*data)
        model_trace = poutine.trace(
            poutine.replay(particles(model), guide_trace)).get_trace(*data)
    return {name: site["value"].expand(num_samples, *site["value"].shape[1:])
            .reshape(num_samples, -1)
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and site["value"].dim() > 0
            and site["value"].shape[0] == num_samples}


def moments(model: Callable, guide: Callable, data: tuple, sites, num_samples: int = 4000
            ) -> Moments:
    """Mean and sd of ``sites`` (latent or deterministic) of the model under guide draws, in the
    constrained space; drawn in chunks of at most ~4e6 / (largest data tensor) particles."""
    chunk = max(1, min(num_samples, int(4e6 // max(t.numel() for t in data))))
    values: dict[str, list[Tensor]] = {site: [] for site in sites}
    for start in range(0, num_samples, chunk):
        drawn = draws(model, guide, data, min(chunk, num_samples - start))
        for site in sites:
            values[site].append(drawn[site].double())
    return {site: (torch.cat(v).mean(0), torch.cat(v).std(0)) for site, v in values.items()}


def moment_error(ref: Moments, fitted: Moments) -> tuple[float, float]:
    """(max |Δmean|/sd_ref, max |log(sd/sd_ref)|) over the sites of ``ref``."""
    mean_error = sd_error = 0.0
    for site, (m_ref, s_ref) in ref.items():
        m, s = (t.double().cpu() for t in fitted[site])
        mean_error = max(mean_error, float(((m - m_ref) / s_ref).abs().max()))
        sd_error = max(sd_error, float((s / s_ref).log().abs().max()))
    return mean_error, sd_error


def posterior_error(model: Callable, guide: Callable, data: tuple, ref: Moments,
                    num_samples: int = 4000) -> tuple[float, float]:
    """(max |Δmean|/sd_ref, max |log(sd/sd_ref)|) of a fitted guide against ``ref``."""
    return moment_error(ref, moments(model, guide, data, ref, num_samples))
