"""Reading ArviZ results the same way on both ArviZ lines, for the tests (torch-free).

0.x: InferenceData, ``az.loo`` an ELPDData series (``elpd_loo``), ``az.plot_posterior`` axes.
1.x: an xarray DataTree, ``az.loo`` an ELPDDataLOO (``elpd``), arviz-plots' ``az.plot_dist`` (the
successor of ``plot_posterior``) a PlotCollection.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=FutureWarning)  # 0.x's notice of its refactor
    import arviz as az

ARVIZ_1 = int(az.__version__.split(".")[0]) >= 1


def group_names(data: Any) -> set[str]:
    return set(data.children) if ARVIZ_1 else set(data.groups())


def loo(data: Any) -> tuple[float, np.ndarray]:
    """PSIS-LOO's elpd and the Pareto k̂ of every observation."""
    result = az.loo(data)
    elpd = result.elpd if ARVIZ_1 else result["elpd_loo"]
    return float(elpd), np.asarray(result.pareto_k.values)


def plot_marginal(data: Any, var_name: str) -> str:
    """Plot the posterior marginal of ``var_name``; return its panel's title. Closes figures."""
    import matplotlib.pyplot as plt

    if ARVIZ_1:
        collection = az.plot_dist(data, var_names=[var_name])
        title = collection.viz["title"][var_name].item().get_text()
    else:
        title = np.ravel(az.plot_posterior(data, var_names=[var_name]))[0].get_title()
    plt.close("all")
    return title
