"""The optimizers reproduce their golden trajectories (``tests/golden.py``) to round-off."""

import pytest
import torch

from .golden import CASES, PATH

GOLDEN = torch.load(PATH, weights_only=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_trajectory_is_reproduced(name):
    got = CASES[name]()
    for step, params in GOLDEN[name].items():
        assert set(got[step]) == set(params), f"{name}: param names at step {step}"
        for param, value in params.items():
            torch.testing.assert_close(got[step][param], value, rtol=1e-9, atol=1e-11,
                                       msg=lambda m, s=step, p=param: f"{name} step {s} {p}: {m}")
