"""Every optimizer the benchmark runs can be built with the library's current API (a renamed
option would otherwise surface only minutes into `python -m benchmarks.run`); a row that a tuned
baseline beats says why."""

import pytest
from pyro.optim import PyroOptim

from benchmarks.problems import PROBLEMS
from benchmarks.protocol import Comparison, Run, optimizer_families
from benchmarks.run import MEMORY_OPTIMIZERS, behind, rows


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


def _comparison(gaps: dict[str, float]) -> Comparison:
    """A comparison whose families end at the given median gaps from −ELBO* = 0 (3 seeds)."""
    def runs(gap):
        return [Run(steps=[10], seconds=[1.0], losses=[gap], errors=[0.0], step_seconds=[0.1],
                    rates=[0.25, 0.5], ceiling=0.125, base="2 param(s) on its base Adam")
                for _ in range(3)]
    problem = PROBLEMS["gaussian_regression"]()
    return Comparison(problem, "AutoMultivariateNormal", 10, 10, 0.0, 0.0, "",
                      {f: f"{f}(lr=0.1)" for f in gaps}, {f: runs(g) for f, g in gaps.items()},
                      {})


def test_a_row_behind_a_tuned_adam_says_why_with_its_own_numbers():
    """A NaturalGradient row that a tuned Adam or ClippedAdam ends closer to the optimum than
    (by more than 0.05 nats) gets a note with the baseline, both gaps and what bounded it;
    level or ahead, none."""
    c = _comparison({"NaturalGradient": 1.0, "Adam": 0.5, "ClippedAdam": 0.25})
    (note,) = behind(c, c.runs["NaturalGradient"])
    assert note.startswith("ClippedAdam(lr=0.1) ends closer (0.25 vs 1.00 nats)")
    assert "median step 0.38× lr" in note and "step ceiling at the end 0.12× lr" in note
    assert note.endswith("2 param(s) on its base Adam")
    level = _comparison({"NaturalGradient": 0.27, "Adam": 0.5, "ClippedAdam": 0.25})
    assert behind(level, level.runs["NaturalGradient"]) == []
    rows_text = "\n".join(rows(c))
    assert rows_text.count("ends closer") == 1  # on NaturalGradient's row only
