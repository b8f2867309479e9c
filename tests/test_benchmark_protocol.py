"""Every optimizer the benchmark runs can be built with the library's current API (a renamed
option would otherwise surface only minutes into `python -m benchmarks.run`)."""

import pytest
from pyro.optim import PyroOptim

from benchmarks.problems import PROBLEMS
from benchmarks.protocol import optimizer_families
from benchmarks.run import MEMORY_OPTIMIZERS


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_every_benchmark_optimizer_builds_on_every_guide(name):
    problem = PROBLEMS[name]()
    for label, make_guide in problem.guides.items():
        guide = make_guide(problem.model)
        for quick in (False, True):
            for family, grid in optimizer_families(problem, quick).items():
                for config, make in grid.items():
                    assert isinstance(make(guide), PyroOptim), (label, family, config)


def test_memory_table_optimizers_build():
    bnn = PROBLEMS["bnn_diabetes"]()
    guide = bnn.guides["AutoNormal"](bnn.model)
    for make in MEMORY_OPTIMIZERS.values():
        assert isinstance(make(guide), PyroOptim)
