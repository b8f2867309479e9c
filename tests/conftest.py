"""Every test starts from an empty param store and seed 0, on one torch thread (small ops are
many times slower with two intra-op threads on a shared two-core machine, and pytest-xdist already
runs one worker per core)."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_store():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
