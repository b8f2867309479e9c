"""Every test starts from an empty param store."""

import pyro
import pytest


@pytest.fixture(autouse=True)
def _clear_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
