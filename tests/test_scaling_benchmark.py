"""benchmarks/scaling.py runs end to end on tiny dims and writes its tables; its exponent fit."""

import math

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
