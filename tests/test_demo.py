"""The quick-start demo (``python -m pyro_natgrad.demo``), shortened: rows appear as each run
goes, with a progress bar, and the comparison says at equal steps, at equal time and at the end
what the difference in −ELBO means."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("sklearn")

from pyro_natgrad import demo  # noqa: E402


def test_demo_reports_progress_and_explains_the_comparison(capsys):
    demo.main(["--ng-steps", "5", "--adam-steps", "20"])
    out, err = capsys.readouterr()
    ng, adam = out.index("NaturalGradient(guide), 5 steps"), out.index("Adam(lr=0.01), 20 steps")
    assert ng < adam < out.index("Comparison")
    assert re.findall(r"^\s+(\d+)\s+\d+\.\d\d\s+-?\d+\.\d\d$", out[adam:], re.M) == [
        "1", "5", "10", "20"]  # a row per checkpoint
    assert "pyro.optim.Adam(lr=0.01)" in err  # the progress bar (stderr)
    assert re.search(r"at equal steps \(5\): NaturalGradient -?\d+\.\d\d, Adam -?\d+\.\d\d", out)
    assert re.search(r"at the end: NaturalGradient -?\d+\.\d\d ± \d+\.\d\d", out)
    assert re.search(r"difference Adam - NaturalGradient [+-]\d+\.\d\d nats, (within|beyond) "
                     r"twice its", out)
    assert "PSIS check (k-hat)" in out


def test_demo_without_scikit_learn_says_how_to_get_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match=r"pyro_natgrad\[demo\]"):
        demo.breast_cancer()
