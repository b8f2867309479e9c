"""benchmarks/scaling.py runs end to end on tiny dims and writes its tables; its exponent fit."""

import math

import torch

from benchmarks import scaling


def test_exponent_of_a_power_law():
    dims = [10, 20, 40, 80]
    assert math.isclose(scaling.exponent(dims, [3 * d**1.5 for d in dims]), 1.5)


def test_tiny_run_writes_the_tables(tmp_path):
    out = tmp_path / "scaling.md"
    scaling.main(["--dims", "4,6", "--steps", "2", "--seeds", "1", "--guides",
                  "AutoMultivariateNormal,AutoDiagonalNormal", "--out", str(out),
                  "--note", "The machine was shared."])
    text = out.read_text()
    assert "## Protocol" in text and "* The machine was shared." in text
    assert "load average at the start" in text and "d³ multiply–adds / optimizer step" in text
    for row in ("| AutoMultivariateNormal | 4 |", "| AutoMultivariateNormal | 6 |",
                "| AutoDiagonalNormal | 6 |"):
        assert row in text
    assert "| AutoMultivariateNormal |" in text.split("b (NG step)")[1]
    rows = {line.split(" | ")[0] + " | " + line.split(" | ")[1]: line for line in text.splitlines()
            if line.startswith("| Auto")}
    floor = rows["| AutoMultivariateNormal | 6"].rstrip(" |").rsplit(" | ", 1)[1]
    assert float(floor) > 0  # the three-op floor ratio, full rank only
    assert rows["| AutoDiagonalNormal | 6"].endswith("| — |")


def test_three_ops_are_the_full_rank_steps_operations():
    """The floor's three operations run on a positive-definite B and a lower-triangular
    gradient: the Cholesky succeeds and the timing is positive."""
    ops = scaling._ThreeOps(5)
    assert torch.equal(ops.grad, ops.grad.tril())
    assert int(torch.linalg.cholesky_ex(ops.b).info) == 0 and ops() > 0
