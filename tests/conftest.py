"""Test tiers, and a clean start for every test.

Tiers (``--strict-markers``; registered in pyproject.toml). Every test gets exactly one of
``unit``, ``integration``, ``notebooks``, ``distributed``; ``slow`` comes on top:

* ``unit``: fast, no SVI fit; the modules in ``UNIT_MODULES`` (the fast tier, under 2 minutes:
  ``python -m pytest -m unit -n 2 -q tests``, CONTRIBUTING.md).
* ``notebooks``: tests/test_tutorials.py; ``distributed``: tests/test_distributed.py.
* ``integration``: every other module (SVI fits, optimizer trajectories). A new module is
  ``integration`` until it is added to ``UNIT_MODULES``.
* ``slow``: marked explicitly in the test file (long statistical comparisons); a slow test is
  not ``unit``.

A tier marker written on a test or its module wins over this mapping.

Every test starts from an empty param store and seed 0, on one torch thread (small ops are
many times slower with two intra-op threads on a shared two-core machine, and pytest-xdist already
runs one worker per core). Without torch (CI's Python 3.12 leg where no CPU build of torch is
installable) only the torch-free tests can run (tests/test_arviz_compat.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

try:
    import pyro
    import torch
except ImportError:
    pyro = torch = None

TIERS = ("unit", "integration", "notebooks", "distributed")
UNIT_MODULES = {
    "test_arviz_compat",
    "test_benchmark_protocol",
    "test_diagnostics",
    "test_empirical_fisher",
    "test_families",
    "test_gaussian_step",
    "test_low_rank_fisher",
    "test_pieces",
    "test_step_size",
}
MODULE_TIERS = {"test_tutorials": "notebooks", "test_distributed": "distributed"}


def tier(item: pytest.Item) -> str:
    """The tier of a test by the mapping in the module docstring."""
    explicit = [name for name in TIERS if item.get_closest_marker(name)]
    if len(explicit) > 1:
        raise pytest.UsageError(f"{item.nodeid}: more than one tier marker {explicit}")
    if explicit:
        return explicit[0]
    module = item.path.stem
    if module in MODULE_TIERS:
        return MODULE_TIERS[module]
    if module in UNIT_MODULES and not item.get_closest_marker("slow"):
        return "unit"
    return "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = tier(item)
        if name == "unit" and item.get_closest_marker("slow"):
            raise pytest.UsageError(f"{item.nodeid}: a slow test cannot be in the unit tier")
        if not item.get_closest_marker(name):
            item.add_marker(name)


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_store() -> Iterator[None]:
    if pyro is None:
        yield
        return
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
